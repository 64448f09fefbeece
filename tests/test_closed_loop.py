"""The prune command's closed loop: solve, cut, measure, correct, on an engine the surface misjudges."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mdp_trt.api import create_model
from mdp_trt.closed_loop import REFITS, ClosedLoop, _secant
from mdp_trt.importance import random_importance, with_floor
from mdp_trt.latency import SurfaceModel
from mdp_trt.models import SpaceConfig
from mdp_trt.part import Subject
from mdp_trt.surface import LatencySurface, grid
from profilers.timing import Comparison


def test_secant_interpolates_between_rounds_on_either_side() -> None:
    # Solve budgets 1.0 -> 0.8 ms measured, 1.2 -> 1.2 ms measured: 1.0 ms needs 1.1.
    assert _secant([(1.0, 0.8), (1.2, 1.2)], 1.0) == pytest.approx(1.1)
    # The closest pair around the budget is used, not the first rounds.
    assert _secant([(0.5, 0.4), (1.0, 0.8), (1.2, 1.2), (2.0, 3.0)], 1.0) == pytest.approx(1.1)


def test_secant_scales_in_proportion_from_one_side() -> None:
    assert _secant([(1.0, 1.25)], 1.0) == pytest.approx(0.8)
    assert _secant([(1.0, 1.25), (0.8, 1.1)], 1.0) == pytest.approx(0.8 / 1.1)
    assert _secant([(1.0, 100.0)], 1.0) == pytest.approx(0.25)  # kept within 1/4..4 of the budget
    # Bracketed but not monotone (a lower solve budget measured slower): proportional, nearest.
    assert _secant([(1.0, 0.95), (0.9, 1.1)], 1.0) == pytest.approx(1.0 / 0.95)


class CurvedEngine:
    """Latency grows as params ** 1.6: no affine calibration of a sum of terms fits it.

    With refits only (no secant), the 0.45 case ends 2x off its budget.
    """

    def __init__(self) -> None:
        self.calls = 0

    def measured_points(self, space: object, tag: str = "") -> list:
        return []

    def measure(self, modules: list[torch.nn.Module], input_shape: tuple[int, ...]) -> list[float]:
        self.calls += 1
        return [0.05 + 2e-9 * sum(p.numel() for p in m.parameters()) ** 1.6 for m in modules]

    def compare(self, modules: list[torch.nn.Module], input_shape: tuple[int, ...]) -> Comparison:
        ms = self.measure(modules, input_shape)
        return Comparison(ms=ms, ratios=[ms[0] / m for m in ms], spread=[0.0] * len(ms), ratio_spread=0.0,
                          rounds=[ms], clock="thread-cpu", others_cores=0.0, load_avg=0.0, attempts=1,
                          reliable=True)


@pytest.mark.parametrize("share", [0.45, 0.6, 0.75])
def test_closed_loop_lands_the_budget_on_a_curved_engine(share: float) -> None:
    model = create_model("test_resnet").eval()
    subject = Subject(model)
    space = subject.space(SpaceConfig(max_choices=16, resolution=32))
    points = {t.signature: {w: 1e-5 * math.prod(w) + 0.002 for w in grid(space, t)} for t in space.terms}
    surface = LatencySurface.from_points(space, points)
    imp = with_floor(random_importance(space, seed=0))
    lab = CurvedEngine()
    dense_ms = lab.measure([model], (1, 3, 32, 32))[0]
    budget = share * dense_ms
    loop = ClosedLoop(lab, subject, space, surface, imp, SurfaceModel(), (1, 3, 32, 32), tolerance_pct=3.0,
                      max_rounds=8)
    out = loop.run(lambda d: budget, model)
    pruned, measured, rounds, note = out.model, out.measured_ms, out.rounds, out.note
    assert budget * 0.97 <= measured <= budget, (rounds, note)  # at or under the budget
    assert note == ""
    assert measured == pytest.approx(lab.measure([pruned], (1, 3, 32, 32))[0])
    chosen = [r for r in rounds if r.get("chosen")]
    assert len(chosen) == 1 and chosen[0]["measured_ms"] == measured
    assert len(rounds) <= loop.max_rounds and np.isfinite([r["solve_budget_ms"] for r in rounds]).all()
    if len(rounds) > REFITS + 1:  # past the refits, the solve budget moved off the budget
        assert rounds[-1]["solve_budget_ms"] != pytest.approx(budget)


def test_closed_loop_keeps_a_round_under_the_budget_over_one_just_past_it() -> None:
    # Rounds at +2% (within the verdict's tolerance) and -1.5% of the budget: the one under it
    # is kept, though it is the faster; past the budget only, the slowest within the tolerance.
    model = create_model("test_resnet").eval()
    subject = Subject(model)
    space = subject.space(SpaceConfig(max_choices=4, resolution=32))
    points = {t.signature: {w: 1e-5 * math.prod(w) + 0.002 for w in grid(space, t)} for t in space.terms}
    loop = ClosedLoop(CurvedEngine(), subject, space, LatencySurface.from_points(space, points),
                      with_floor(random_importance(space, seed=0)), SurfaceModel(), (1, 3, 32, 32))
    assert loop.aim(1.0) == pytest.approx(0.985)
    assert loop.accepted(1.0, 1.0) and loop.accepted(0.97, 1.0)
    assert not loop.accepted(1.02, 1.0) and not loop.accepted(0.96, 1.0)
    plan = space.full_plan()
    for measured in (1.02, 0.985, 0.9):
        loop.rounds.append({"measured_ms": measured})
        loop.tried.append((plan, model, measured, 1.0))
    out = loop._pick()
    assert out.measured_ms == 0.985 and out.note == "" and loop.rounds[1]["chosen"]
    del loop.tried[1], loop.rounds[1]
    loop.rounds[0].pop("chosen", None)
    out = loop._pick()
    assert out.measured_ms == 1.02 and out.note == ""  # past the budget, within the tolerance
    loop.tried[0] = (plan, model, 1.05, 1.0)
    loop.rounds[0]["measured_ms"] = 1.05
    out = loop._pick()
    assert out.measured_ms == 0.9 and "-10.0%" in out.note  # over-pruned beats missed
