"""benchmarks.latency_model: calibration and evaluated plans measured together, twice."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from benchmarks.latency_model import run, spread_among


def test_few_are_spread_evenly_among_many() -> None:
    many, few = list(range(30)), [f"c{k}" for k in range(7)]
    out = spread_among(few, many)  # type: ignore[arg-type]
    assert [x for x in out if isinstance(x, int)] == many and [x for x in out if isinstance(x, str)] == few
    at = [i for i, x in enumerate(out) if isinstance(x, str)]
    gaps = [b - a for a, b in zip(at, at[1:], strict=False)]
    assert at[0] >= 3 and len(out) - 1 - at[-1] >= 3 and max(gaps) - min(gaps) <= 1
    assert spread_among([], many) == many and spread_among(few, []) == few  # type: ignore[arg-type]


def test_every_plan_is_read_twice_and_calibration_plans_share_the_groups(tmp_path: Path, fake_timing: list
                                                                        ) -> None:
    from helpers_timing import fake_ms

    args = argparse.Namespace(model="test_resnet", engine="onnxruntime", precision="fp32", batch_size=1,
                              resolution=32, threads=1, plans=6, clock="cpu", calibration_plans=3,
                              max_choices=2, lut=tmp_path / "t.sqlite", seed=0, plot=None, json=True)
    groups: list[int] = []
    from mdp_trt.engine_io import Lab

    inner = Lab._compare

    def counting(self: Lab, modules: list, shape: tuple[int, ...], times: int) -> list:
        groups.append(len(modules))
        return inner(self, modules, shape, times)

    Lab._compare = counting  # type: ignore[method-assign]
    try:
        r = run(args)
    finally:
        Lab._compare = inner  # type: ignore[method-assign]
    n = r["plans"] + r["calibration_plans"] - 1  # the dense plan is the reference of every group
    whole = [g for g in groups if g > 1]
    assert sum(g - 1 for g in whole) == 2 * n  # two readings of every plan, no more
    assert len(whole) == 2 * -(-n // 3)  # in groups the size of the calibration set, per sweep
    # the fake engine times every model exactly: the dense figure is its time, the others below it
    from mdp_trt.api import create_model

    dense = fake_ms(create_model("test_resnet", resolution=32))
    assert r["calibration_points"][0]["measured_ms"] == pytest.approx(dense)
    assert all(0.02 < p["measured_ms"] < dense for p in r["eval_points"])
