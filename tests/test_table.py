"""Latency tables: identity binding, corruption, key-value records, shards and merging."""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import pytest

from mdp_trt.errors import TableError
from profilers.engines.base import EngineIdentity
from profilers.table import (
    LatencyTable,
    default_table_path,
    in_shard,
    merge,
    parse_shard,
    parse_widths,
    shard_path,
    widths_key,
)
from profilers.timing import summarize

IDENT = EngineIdentity(engine="onnxruntime", version="1.0/CPUExecutionProvider", device="test cpu",
                       driver="", precision="fp32", batch_size=1, resolution=32, threads=1,
                       mdp_trt_version="0.1.0")


def _timing(ms: float):
    return summarize([[ms, ms, ms]])


def test_put_get_rows_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite"
    with LatencyTable.open(path, IDENT) as t:
        t.put("conv(k=3)", (8, 16), _timing(1.5))
        t.put("conv(k=3)", (16, 16), _timing(2.5))
        t.put("mlp()", (32,), _timing(0.5))
        assert len(t) == 3
        assert ("conv(k=3)", (8, 16)) in t and ("conv(k=3)", (8, 8)) not in t
    with LatencyTable.open(path, IDENT) as t:
        row = t.get("conv(k=3)", [8, 16])
        assert row is not None and row.median_ms == pytest.approx(1.5) and row.samples == 3
        assert t.get("conv(k=3)", (24, 16)) is None
        assert t.points("conv(k=3)") == {(8, 16): pytest.approx(1.5), (16, 16): pytest.approx(2.5)}
        assert set(t.rows("mlp()")) == {(32,)}
        assert t.signatures() == ["conv(k=3)", "mlp()"]
        assert t.identity == IDENT


def test_other_identity_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite"
    LatencyTable.open(path, IDENT).close()
    other = dataclasses.replace(IDENT, batch_size=8)
    with pytest.raises(TableError, match="batch_size: 1 != 8"):
        LatencyTable.open(path, other)
    with pytest.raises(TableError, match="another engine identity"):
        LatencyTable.open(path, dataclasses.replace(IDENT, mdp_trt_version="9.9"))


def test_corrupt_and_foreign_files_are_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(TableError, match=f"corrupt latency table {junk}"):
        LatencyTable.open(junk, IDENT)
    foreign = tmp_path / "foreign.sqlite"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE x (a)")
    conn.commit()
    conn.close()
    with pytest.raises(TableError, match="is not a latency table"):
        LatencyTable.open(foreign, IDENT)
    with pytest.raises(TableError, match="no latency table"):
        LatencyTable.read(tmp_path / "missing.sqlite")
    edited = tmp_path / "edited.sqlite"
    LatencyTable.open(edited, IDENT).close()
    conn = sqlite3.connect(edited)
    with conn:
        conn.execute("INSERT INTO latency VALUES ('conv', '64,abc', 1, 1, 1, 0, 1, '')")
    conn.close()
    with LatencyTable.read(edited) as t, pytest.raises(TableError, match="corrupt widths '64,abc'"):
        t.keys()


def test_kv_records(tmp_path: Path) -> None:
    with LatencyTable.open(tmp_path / "t.sqlite", IDENT) as t:
        assert t.kv_get("calibration/abc") is None
        assert t.kv_get("calibration/abc", {}) == {}
        t.kv_set("calibration/abc", {"scale": 1.1, "offset": -0.2})
        t.kv_set("whole/plan1", [1.0, 2.0])
        t.kv_set("whole/plan1", [3.0])
        assert t.kv_get("calibration/abc") == {"scale": 1.1, "offset": -0.2}
        assert t.kv_get("whole/plan1") == [3.0]
        assert t.kv_keys("whole/") == ["whole/plan1"]


def test_widths_and_paths() -> None:
    assert widths_key((64, 128)) == "64,128"
    assert parse_widths("64,128") == (64, 128)
    assert default_table_path("cpu-x", "resnet18", "onnxruntime", "fp32", 1, 224, clock="cpu").name == \
        "resnet18-onnxruntime-cputime-fp32-bs1-r224.sqlite"
    p = default_table_path("a100", "resnet50", "tensorrt", "fp16", 8, 224)
    assert p == Path("luts/a100/resnet50-tensorrt-fp16-bs8-r224.sqlite")
    assert shard_path(p, (1, 4)).name == "resnet50-tensorrt-fp16-bs8-r224.shard-1-of-4.sqlite"


def test_shards_partition_the_grid() -> None:
    keys = [(f"sig{s}", (w, v)) for s in range(3) for w in range(8, 65, 8) for v in (8, 16)]
    for n in (1, 2, 3, 5):
        owners = [[i for i in range(n) if in_shard(sig, w, (i, n))] for sig, w in keys]
        assert all(len(o) == 1 for o in owners)
    counts = [sum(in_shard(s, w, (i, 3)) for s, w in keys) for i in range(3)]
    assert min(counts) > 0  # a real split, not everything in one shard
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(TableError, match="shard"):
            parse_shard(bad)


def test_merge(tmp_path: Path) -> None:
    a, b, out = tmp_path / "a.sqlite", tmp_path / "b.sqlite", tmp_path / "out.sqlite"
    with LatencyTable.open(a, IDENT) as t:
        t.put("s", (8,), _timing(1.0))
        t.put("s", (16,), _timing(2.0))
        t.kv_set("k", 1)
    with LatencyTable.open(b, IDENT) as t:
        t.put("s", (16,), _timing(9.0))
        t.put("s", (24,), _timing(3.0))
    counts = merge([a, b], out)
    assert counts == {"inputs": 2, "added": 3, "duplicates": 1}
    with LatencyTable.read(out) as t:
        assert t.points("s") == {(8,): 1.0, (16,): 2.0, (24,): 3.0}
        assert t.kv_get("k") == 1
        assert t.identity == IDENT
    c = tmp_path / "c.sqlite"
    LatencyTable.open(c, dataclasses.replace(IDENT, device="other cpu")).close()
    with pytest.raises(TableError, match="another engine identity"):
        merge([a, c], tmp_path / "out2.sqlite")
