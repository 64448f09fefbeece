"""The accuracy-against-latency benchmark: a quick run of every method, and resumable results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch_pruning")

from benchmarks import pareto  # noqa: E402
from mdp_trt.data import FASHION_MNIST_DIR  # noqa: E402
from mdp_trt.errors import MdpError  # noqa: E402

ROW_KEYS = {"model", "method", "target", "target_speedup", "target_ms", "dense_ref_ms", "dense_ms", "latency_ms",
            "speedup", "samples", "dense_samples", "measured_with", "model_file", "seed", "params", "dense_params", "top1_before_ft", "top1",
            "dense_top1", "search", "wall_s"}


def _args(tmp_path: Path, *extra: str) -> list[str]:
    data = "fashion-mnist" if (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file() else "synthetic"
    return ["--quick", "--data", data, "--out", str(tmp_path / "results"), "--work", str(tmp_path / "work"),
            "--tag", "t", *extra]


@pytest.mark.slow
def test_quick_run_every_method(tmp_path: Path) -> None:
    # CPU-time clock: the latencies of a shared test machine are not inflated by other processes.
    # 1.6x: this tiny model's space, channels only, reaches little more than 2x.
    argv = _args(tmp_path, "--models", "test_resnet@32", "--targets", "1.6x", "--train-limit", "384",
                 "--val-limit", "256", "--clock", "cpu")
    assert pareto.main(argv) == 0
    doc = json.loads((tmp_path / "results" / "pareto_t.json").read_text())
    rows = doc["rows"]
    assert sorted(r["method"] for r in rows) == sorted(pareto.METHODS)
    for r in rows:
        assert "error" not in r, r
        assert set(r) >= ROW_KEYS, sorted(ROW_KEYS - set(r))
        assert r["model"] == "test_resnet@32" and r["target"] == "1.6x"
        assert 0.0 <= r["top1_before_ft"] <= 100.0 and 0.0 <= r["top1"] <= 100.0
        assert 0 < r["params"] < r["dense_params"]
        assert r["latency_ms"] < r["dense_ms"]
        # One latency target for every method: the stored dense reference over the speedup.
        assert r["dense_ref_ms"] == doc["models"]["test_resnet@32"]["dense_ref_ms"]
        assert r["target_ms"] == pytest.approx(r["dense_ref_ms"] / 1.6)
        # Every model of the target measured together with the dense model: one dense figure.
        assert r["dense_ms"] == rows[0]["dense_ms"] and len(r["measured_with"]) == len(pareto.METHODS)
        assert r["speedup"] == pytest.approx(r["dense_ms"] / r["latency_ms"])
        assert r["search"]["matched_ms"] > 0 and len(r["samples"]) == 1
        assert Path(r["model_file"]).is_file()
        # Matched on a shared, noisy machine at sub-millisecond latencies: a sane band, not 3%.
        assert 1.3 <= r["speedup"] <= 3.0, (r["method"], r["speedup"])
    info = doc["models"]["test_resnet@32"]
    assert len(info["dense_ref_samples"]) == 3
    assert min(info["dense_ref_samples"]) <= info["dense_ref_ms"] <= max(info["dense_ref_samples"])
    assert info["settings"]["finetune_epochs"] == 0.5 and "command" in info
    assert "cpu" in doc["machine"]
    md = (tmp_path / "results" / "pareto_t.md").read_text()
    assert "| mdp_trt (full) | 1.6x |" in md and "Torch-Pruning" in md and "Dense reference:" in md
    assert (tmp_path / "results" / "pareto_t.png").stat().st_size > 1000

    # A rerun finds every row finished and measures nothing.
    log = tmp_path / "work" / "progress.log"
    before = log.read_text()
    assert pareto.main(argv) == 0
    assert "every row done" in log.read_text()[len(before):]
    assert len(json.loads((tmp_path / "results" / "pareto_t.json").read_text())["rows"]) == len(rows)


def _row(model: str, method: str, target: str) -> dict:
    return {"model": model, "method": method, "target": target, "target_speedup": float(target[:-1]),
            "dense_ms": 2.0, "latency_ms": 1.0, "speedup": 2.0, "params": 10, "dense_params": 20,
            "top1_before_ft": 50.0, "top1": 80.0, "dense_top1": 90.0, "search": {}, "wall_s": 1.0}


def test_results_merge_and_refuse_other_settings(tmp_path: Path) -> None:
    args = pareto._defaults(pareto.build_parser().parse_args(_args(tmp_path)))
    meta = {"machine": pareto.machine(), "command": "python -m benchmarks.pareto"}
    info = {"dense_top1": 90.0, "dense_params": 20, "engine": {}}

    a = pareto.Results(args)
    b = pareto.Results(args)  # a second process filling the same file
    a.doc["models"]["m@32"] = dict(info, settings=a.settings)
    a.doc["rows"].append(_row("m@32", "mdp", "2x"))
    a.save(meta)
    b.doc["models"]["v@64"] = dict(info, settings=b.settings)
    b.doc["rows"].append(_row("v@64", "uniform", "3x"))
    b.save(meta)

    c = pareto.Results(args)
    assert c.done("m@32", "mdp", "2x") and c.done("v@64", "uniform", "3x")
    assert not c.done("m@32", "mdp", "3x")
    md = (tmp_path / "results" / "pareto_t.md").read_text()
    assert "## m@32" in md and "## v@64" in md and "| uniform width scaling | 3x |" in md

    other = pareto._defaults(pareto.build_parser().parse_args(_args(tmp_path, "--finetune-epochs", "2")))
    with pytest.raises(MdpError, match="other settings"):
        pareto.Results(other).check("m@32")
    other.fresh = True
    d = pareto.Results(other)
    d.check("m@32")
    d.save(meta)
    left = json.loads((tmp_path / "results" / "pareto_t.json").read_text())
    assert [r["model"] for r in left["rows"]] == ["v@64"]


def test_reading_compares_mdp_with_baselines_at_each_target() -> None:
    rows = [dict(_row("m@32", m, t), top1=top1) for m, t, top1 in [
        ("mdp", "2x", 85.0), ("torch-pruning", "2x", 83.5), ("uniform", "2x", 84.0), ("mdp-linear", "2x", 85.5),
        ("mdp", "3x", 80.0), ("uniform", "3x", 81.0), ("torch-pruning", "4x", 70.0)]]
    lines = pareto.reading(rows)
    assert lines[2] == "| 2x | 85.00 | uniform width scaling 84.00 | +1.00 | +1.50 | -0.50 |"
    assert lines[3] == "| 3x | 80.00 | uniform width scaling 81.00 | -1.00 | — | — |"
    assert len(lines) == 4  # no mdp_trt row at 4x: nothing to compare


def test_aggregate_over_seeds() -> None:
    rows = [dict(_row("m@32", "mdp", "2x"), seed=0, top1=80.0, latency_ms=1.0, dense_ref_ms=2.2, target_ms=1.1,
                 search={"matched_ms": 1.05}),
            dict(_row("m@32", "mdp", "2x"), seed=1, top1=82.0, latency_ms=1.2, dense_ref_ms=2.2, target_ms=1.1,
                 search={"matched_ms": 1.07}),
            dict(_row("m@32", "mdp", "2x"), seed=2, top1=84.0, latency_ms=1.1, dense_ref_ms=2.2, target_ms=1.1,
                 search={"matched_ms": 1.09}),
            {"model": "m@32", "method": "uniform", "target": "2x", "target_speedup": 2.0, "seed": 0, "error": "x"},
            dict(_row("m@32", "uniform", "3x"), seed=0, top1=70.0)]
    agg = pareto.aggregate(rows)
    assert [(r["method"], r["target"]) for r in agg] == [("mdp", "2x"), ("uniform", "2x"), ("uniform", "3x")]
    mdp = agg[0]
    assert mdp["n"] == 3 and mdp["seeds"] == [0, 1, 2]
    assert mdp["top1"] == pytest.approx(82.0) and mdp["top1_sd"] == pytest.approx(2.0)
    assert mdp["latency_ms"] == pytest.approx(1.1) and mdp["speedup"] == pytest.approx(2.0)
    assert mdp["matched_ms"] == pytest.approx(1.07)
    assert agg[1]["error"] == "x" and agg[2]["top1_sd"] == 0.0
    assert pareto.reading(agg)[2].startswith("| 2x | 82.00 | — |")


def test_a_target_is_measured_again_when_its_rows_change(tmp_path: Path) -> None:
    def row(method: str) -> dict:
        f = tmp_path / f"{method}.pt"
        f.write_bytes(b"x")
        return dict(_row("m@32", method, "2x"), seed=0, model_file=str(f))

    rows = [row("mdp"), row("uniform")]
    assert pareto._stale(rows)
    _, group = pareto._measurable(rows)
    for r in rows:
        r["measured_with"] = group
    assert not pareto._stale(rows)
    rows.append(row("torch-pruning"))  # one more method (or seed) at this target
    assert pareto._stale(rows)
    failed = {"model": "m@32", "method": "mdp-linear", "target": "2x", "seed": 0, "error": "no plan"}
    assert pareto._measurable(rows + [failed])[1] == pareto._measurable(rows)[1]
