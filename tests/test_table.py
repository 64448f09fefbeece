"""Latency tables: identity binding, corruption, key-value records, shards and merging."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import subprocess
import sys
import time
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


def _edit(path: Path, sql: str, *args: object) -> None:
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(sql, args)
    conn.close()


@pytest.mark.parametrize("column, value", [
    ("median_ms", float("inf")), ("median_ms", "NaN"), ("median_ms", "fast"), ("median_ms", -0.5),
    ("median_ms", 0.0), ("p90_ms", float("-inf")), ("p99_ms", -1.0), ("cv", -0.1), ("samples", 0),
])
def test_bad_values_are_refused_naming_the_row(tmp_path: Path, column: str, value: object) -> None:
    path = tmp_path / "t.sqlite"
    with LatencyTable.open(path, IDENT) as t:
        t.put("conv(k=3)", (8, 16), _timing(1.5))
        t.put("conv(k=3)", (16, 16), _timing(2.5))
    _edit(path, f"UPDATE latency SET {column} = ? WHERE widths = '16,16'", value)
    needle = f"row conv(k=3) at widths (16,16) has {column}"
    with LatencyTable.read(path) as t:
        for read in (lambda: t.points("conv(k=3)"), lambda: t.rows("conv(k=3)"),
                     lambda: list(t.iter_rows()), lambda: t.get("conv(k=3)", (16, 16))):
            with pytest.raises(TableError, match=needle.replace("(", r"\(").replace(")", r"\)")):
                read()
        assert t.get("conv(k=3)", (8, 16)) is not None  # the other row is fine
    with pytest.raises(TableError, match="corrupt latency table"):
        merge([path], tmp_path / "out.sqlite")


@pytest.mark.parametrize("value", ["-1.0", "0", "Infinity", "NaN", '"slow"'])
def test_bad_whole_model_measurement_is_refused(tmp_path: Path, value: str) -> None:
    path = tmp_path / "t.sqlite"
    with LatencyTable.open(path, IDENT) as t:
        t.kv_set("model/abc/123", {"median_ms": 2.0, "widths": {}, "removed": []})
    _edit(path, "UPDATE kv SET value = ? WHERE key = 'model/abc/123'",
          f'{{"median_ms": {value}, "removed": [], "widths": {{}}}}')
    with LatencyTable.read(path) as t, pytest.raises(TableError, match="record 'model/abc/123' has median_ms"):
        t.kv_get("model/abc/123")


def _read_only(monkeypatch: pytest.MonkeyPatch, path: Path) -> None:
    """Make ``path`` read-only: by its mode, and, for a superuser who writes anyway, as seen by the table."""
    path.chmod(0o444)
    monkeypatch.setattr("profilers.table._writable", lambda p: False)


def test_read_only_table_serves_rows_and_keeps_records_in_memory(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "t.sqlite"
    with LatencyTable.open(path, IDENT) as t:
        t.put("s", (8,), _timing(1.0))
        t.kv_set("model/x/1", {"median_ms": 3.0})
    before = path.read_bytes()
    _read_only(monkeypatch, path)
    with LatencyTable.open(path, IDENT) as t:
        assert t.read_only
        assert t.points("s") == {(8,): 1.0}
        t.kv_set("model/x/2", {"median_ms": 4.0})
        t.kv_set("calibration/x", {"scale": 1.0})
        assert t.kv_get("model/x/2") == {"median_ms": 4.0}
        assert t.kv_keys("model/x/") == ["model/x/1", "model/x/2"]
        with pytest.raises(TableError, match="read-only"):
            t.put("s", (16,), _timing(2.0))
    assert path.read_bytes() == before  # nothing written
    with pytest.raises(TableError, match="another engine identity"):
        LatencyTable.open(path, dataclasses.replace(IDENT, batch_size=4))


@pytest.mark.skipif(os.geteuid() == 0, reason="a superuser writes read-only files anyway")
def test_read_only_by_mode(tmp_path: Path) -> None:
    path = tmp_path / "t.sqlite"
    with LatencyTable.open(path, IDENT) as t:
        t.put("s", (8,), _timing(1.0))
    path.chmod(0o444)
    tmp_path.chmod(0o555)
    try:
        with LatencyTable.open(path, IDENT) as t:
            assert t.read_only and len(t) == 1
    finally:
        tmp_path.chmod(0o755)


_OPENER = """
import sys, time
from profilers.table import LatencyTable
from tests.test_table import IDENT
start = float(sys.argv[1])
for path in sys.argv[2:]:
    start += 0.1
    time.sleep(max(0.0, start - time.time()))
    LatencyTable.open(path, IDENT).close()
"""


def test_concurrent_openers_of_a_new_path(tmp_path: Path) -> None:
    """Processes opening one new table path at the same moment all succeed (no check-then-create race)."""
    paths = [str(tmp_path / f"t{i}.sqlite") for i in range(20)]
    start = time.time() + 3.0  # after every process has imported what it needs
    root = Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen([sys.executable, "-c", _OPENER, str(start), *paths], cwd=root,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(errors)
    for path in paths:
        with LatencyTable.read(path) as t:
            assert t.identity == IDENT and len(t) == 0
