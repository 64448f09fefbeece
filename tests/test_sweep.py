"""Budget sweeps: one table, latency model and importance; a plan per target."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from helpers_timing import fake_ms
from torch import nn

import mdp_trt
from mdp_trt.space import Plan
from mdp_trt.sweep import main as sweep_main

ARGV = ["--model", "test_resnet", "--resolution", "32", "--max-choices", "4", "--calibration-plans", "4",
        "--importance-batches", "2", "--train-batch-size", "8", "--train-limit", "32", "--quiet"]


def test_sweep_command_and_function(tmp_path: Path, fake_timing: list[nn.Module]) -> None:
    out, table = tmp_path / "sweep", tmp_path / "t.sqlite"
    targets = ["1.2x", "1.5x", "2x"]
    assert sweep_main([*ARGV, "--targets", *targets, "--lut", str(table), "--out", str(out), "--measure"]) == 0
    doc = json.loads((out / "sweep.json").read_text())
    rows = doc["rows"]
    assert [r["target"] for r in rows] == targets
    assert all(r["predicted_ms"] <= r["budget_ms"] * (1 + 1e-9) for r in rows)
    # A tighter budget keeps less importance, predicts a faster model.
    for a, b in zip(rows, rows[1:], strict=False):
        assert b["predicted_ms"] <= a["predicted_ms"] and b["importance_kept"] <= a["importance_kept"]
    assert rows[-1]["predicted_ms"] < rows[0]["predicted_ms"]
    assert 0 < rows[-1]["importance_kept"] <= rows[0]["importance_kept"] <= 1 + 1e-9
    model = mdp_trt.create_model("test_resnet")
    for r in rows:
        plan = Plan.load(out / r["file"])
        pruned = mdp_trt.apply_plan(model, plan)
        assert sum(p.numel() for p in pruned.parameters()) == r["params"] <= doc["dense_params"]
        # Measured beside the dense model (here by the fake clock: size).
        assert r["measured_ms"] == pytest.approx(fake_ms(pruned))
        assert r["speedup"] == pytest.approx(doc["dense_ms"] / r["measured_ms"])
    assert rows[-1]["params"] < doc["dense_params"]
    assert doc["dense_ms"] == pytest.approx(fake_ms(model))
    with (out / "sweep.csv").open() as f:
        assert [r["target"] for r in csv.DictReader(f)] == targets
    assert (out / "sweep.png").stat().st_size > 0
    # The function, on the same table: the same plans.
    res = mdp_trt.sweep("test_resnet", ["1.5x", "2x"], lut=table, resolution=32, max_choices=4,
                        calibration_plans=4, importance_batches=2, train_batch_size=8, train_limit=32, quiet=True)
    assert res.plans["1.5x"].widths == Plan.load(out / "plan-1.5x.json").widths
    assert res.plans["2x"].widths == Plan.load(out / "plan-2x.json").widths
    assert [r.file for r in res.rows] == ["plan-1.5x.json", "plan-2x.json"]
