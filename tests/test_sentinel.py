"""The sentinel: a reference workload that tells a quiet machine from a loud one, so that
episodes of a slow machine (a hardware sibling used from outside a VM, for seconds at a time)
are not measured into whole-model figures or latency tables."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from torch import nn

from mdp_trt.space import Dim, PruningSpace, Term
from profilers.engines.base import EngineIdentity, HostRunner
from profilers.profile import profile_space
from profilers.table import LatencyTable
from profilers.timing import Budget, Sentinel, compare

FAST = Budget(warmup_ms=0.0, warmup_iters=1, repeats=9, iters=8, max_spread=0.03, max_rounds=3)


class Machine:
    """A fake clock whose speed drops by ``factor`` while ``loud(now)`` says so: everything run
    on it (models and sentinel alike) then takes longer."""

    def __init__(self, loud, factor: float = 1.4) -> None:
        self.now = 0.0
        self.loud, self.factor = loud, factor

    def __call__(self) -> float:
        return self.now

    def runner(self, ms: float):
        def run() -> None:
            self.now += ms * (self.factor if self.loud(self.now) else 1.0) / 1e3
        return run


class QuietMeter:
    def others_cores(self) -> float | None:
        return 0.0


def _compare(machine: Machine, runners, sentinel: Sentinel | None, wait_s: float = 30.0):
    return compare(runners, FAST, clock=machine, wall=machine, meter=QuietMeter, sentinel=sentinel,
                   wait_s=wait_s)


def test_a_long_loud_episode_fools_rounds_but_not_the_sentinel() -> None:
    # Loud for the first 1.2 s: longer than a whole attempt of 9 rounds of two models.
    def episode(t: float) -> bool:
        return t < 1.2

    m = Machine(episode)
    plain = _compare(m, [m.runner(10.0), m.runner(5.0)], None)
    assert plain.reliable and plain.ms[0] == pytest.approx(14.0)  # the spread saw nothing

    m = Machine(episode)
    s = Sentinel(m.runner(1.0), clock=m)
    s.calibrate(0.05, wall=m)  # inside the episode: the floor starts too high
    assert s.floor_ms == pytest.approx(1.4)
    guarded = _compare(m, [m.runner(10.0), m.runner(5.0)], s)
    assert guarded.reliable and guarded.ms == pytest.approx([10.0, 5.0])
    assert guarded.ratios[1] == pytest.approx(2.0)
    assert s.floor_ms == pytest.approx(1.0)
    assert guarded.loud_rounds > 0 and len(guarded.rounds) == FAST.repeats
    assert guarded.sentinel_floor_ms == pytest.approx(1.0)


def test_a_machine_that_stays_loud_is_unreliable_within_the_wait() -> None:
    m = Machine(lambda t: True, factor=1.5)
    s = Sentinel(m.runner(1.0), clock=m, floor_ms=1.0)  # the quiet floor seen earlier
    c = _compare(m, [m.runner(4.0), m.runner(2.0)], s, wait_s=2.0)
    assert not c.reliable and "stayed loud" in c.reason and c.attempts == FAST.max_rounds
    assert m.now < FAST.max_rounds * (2.0 + 0.5)  # each attempt gave up at its deadline
    assert c.ratios[1] == pytest.approx(2.0)


def test_short_noise_below_the_tolerance_is_quiet() -> None:
    s = Sentinel(lambda: None, clock=lambda: 0.0, floor_ms=1.0, tolerance=0.06)
    assert s.loudness(1.05) == pytest.approx(0.05) and s.loudness(1.2) == pytest.approx(0.2)
    assert Sentinel(lambda: None).loudness(1.0) == float("inf")  # no floor yet: never quiet


class EpisodeRunner(HostRunner):
    def __init__(self, machine: Machine, ms: float) -> None:
        super().__init__(machine.runner(ms))


class EpisodeEngine:
    """Terms cost ``in x out`` microseconds, the sentinel 1 ms."""

    name, precision, batch_size, resolution, device = "fake", "fp32", 1, 8, "cpu"

    def __init__(self, machine: Machine) -> None:
        self.m = machine

    def identity(self) -> EngineIdentity:
        return EngineIdentity("fake", "1", "cpu", "", "fp32", 1, 8, 1, "test")

    def prepare(self, module: nn.Module, input_shape: Sequence[int]) -> EpisodeRunner:
        conv = next(x for x in module.modules() if isinstance(x, nn.Conv2d))
        return EpisodeRunner(self.m, 1e-3 * conv.in_channels * conv.out_channels)


def test_profiling_re_measures_points_taken_in_a_loud_episode(tmp_path: Path) -> None:
    # Loud at the start (the sentinel's floor is first read too high, so the points measured
    # then look quiet until the machine calms down) and again for a while in the middle.
    m = Machine(lambda t: t < 0.08 or 0.15 <= t < 0.2, factor=1.5)
    dims = [Dim("a", "channels", 32, 8, (8, 16, 24, 32)), Dim("b", "channels", 32, 8, (8, 16, 24, 32))]
    terms = [Term("t", "conv", ("a", "b"), (("hw", 8),))]
    space = PruningSpace("fake", "test", dims, [], terms, (3, 8, 8))
    engine = EpisodeEngine(m)
    sentinel = Sentinel(EpisodeRunner(m, 1.0), clock=m)
    sentinel.calibrate(0.01, wall=m)
    assert sentinel.floor_ms == pytest.approx(1.5)
    budget = Budget(warmup_ms=0.0, warmup_iters=1, repeats=2, iters=3, max_rounds=1)

    def module(term: Term, w: tuple[int, ...]) -> tuple[nn.Module, tuple[int, ...]]:
        return nn.Conv2d(w[0], w[1], 1), (w[0], 8, 8)

    with LatencyTable.open(tmp_path / "t.sqlite", engine.identity()) as table:
        stats = profile_space(space, module, engine, table, progress=False, budget=budget,
                              sentinel=lambda: sentinel, wait_s=0.2, clock=m)
        got = table.points(space.terms[0].signature)
    assert stats.measured == 16 and stats.loud == 0
    assert stats.remeasured > 0 and len(got) == 16
    for (a, b), ms in got.items():
        assert ms == pytest.approx(1e-3 * a * b), (a, b)



def fake_compare(factors, groups: list[int], cost, slowed):
    """A ``Lab.compare`` whose groups run ``next(factors)`` slow: the dense model (first) by
    that factor, the plans by ``slowed(factor)``; ``groups`` records each group's size."""
    from profilers.timing import Comparison

    def compare(modules, shape) -> Comparison:
        f = next(factors)
        groups.append(len(modules))
        ms = [f * cost(modules[0])] + [slowed(f) * cost(m) for m in modules[1:]]
        return Comparison(ms=ms, ratios=[ms[0] / v for v in ms], spread=[0.0] * len(ms), ratio_spread=0.0,
                          rounds=[ms], clock="thread-cpu", others_cores=0.0, load_avg=0.0, attempts=1,
                          reliable=True)

    return compare

def test_plans_are_measured_against_the_dense_model_of_their_group(tmp_path: Path, monkeypatch) -> None:
    import timm

    from mdp_trt import apply_plan, space_of
    from mdp_trt.engine_io import READINGS, Lab
    from mdp_trt.models import SpaceConfig
    from mdp_trt.part import Subject
    from mdp_trt.surface import sample_plans

    model = timm.create_model("resnet18", num_classes=10).eval()
    space = space_of(model, SpaceConfig(resolution=32, max_choices=4))
    lab = Lab("onnxruntime", "fp32", 1, 32, 1, tmp_path / "t.sqlite", "resnet18", progress=False)

    def cost(m: nn.Module) -> float:  # a latency that follows the parameter count
        return sum(p.numel() for p in m.parameters()) / 1e6

    # every plan is read in READINGS quiet groups; the second group is measured 30% slow
    # throughout, so its plans are measured a third time
    factors = iter([1.0, 1.3, 1.0, 1.0, 1.0, 0.95, 0.95])
    groups: list[int] = []

    monkeypatch.setattr(lab, "compare", fake_compare(factors, groups, cost, slowed=lambda f: f))
    plans = sample_plans(space, 6, seed=1)
    subject = Subject(model)
    got = lab.measure_plans(subject, space, plans[:3]) + lab.measure_plans(subject, space, plans[3:])
    dense = cost(model)
    assert READINGS == 2 and groups == [4, 4, 4, 4, 4]  # the dense model joins every group
    assert got == pytest.approx([cost(apply_plan(model, p, space=space)) for p in plans])
    assert lab.measure_plans(subject, space, [space.full_plan()])[0] == pytest.approx(dense)
    # a later, quieter group lowers the reference every plan is read against
    smallest = space.plan({d.name: d.choices[0] for d in space.dims}, ())
    lab.measure_plans(subject, space, [smallest])
    assert groups == [4, 4, 4, 4, 4, 2, 2]
    assert lab.measure_plans(subject, space, [plans[0]])[0] == pytest.approx(0.95 * cost(apply_plan(model, plans[0], space=space)))
    from mdp_trt.engine_io import plan_key

    points = {plan_key(p): ms for p, ms in lab.measured_points(space)}
    assert set(points) == {plan_key(p) for p in [*plans, smallest, space.full_plan()]}
    assert points[plan_key(space.full_plan())] == pytest.approx(0.95 * dense)


def test_a_group_whose_dense_model_read_slow_is_measured_again_and_its_quietest_kept(tmp_path: Path,
                                                                                   monkeypatch) -> None:
    """A loud episode that slows the plans more than the dense model (so their speedup is
    wrong too): the plans are measured again while their groups' dense model reads more than
    the tolerance above the reference, at most DENSE_TRIES groups in all; with no quiet group
    the quietest is kept."""
    import timm

    from mdp_trt import apply_plan, space_of
    from mdp_trt.engine_io import DENSE_TRIES, Lab
    from mdp_trt.models import SpaceConfig
    from mdp_trt.part import Subject
    from mdp_trt.surface import sample_plans

    model = timm.create_model("resnet18", num_classes=10).eval()
    space = space_of(model, SpaceConfig(resolution=32, max_choices=4))
    lab = Lab("onnxruntime", "fp32", 1, 32, 1, tmp_path / "t.sqlite", "resnet18", progress=False)

    def cost(m: nn.Module) -> float:
        return sum(p.numel() for p in m.parameters()) / 1e6

    factors = iter([1.0, 1.0, 1.5, 1.3, 1.4, 1.35])
    groups: list[int] = []

    monkeypatch.setattr(lab, "compare", fake_compare(factors, groups, cost, slowed=lambda f: f * f))
    plans = sample_plans(space, 4, seed=2)
    subject = Subject(model)
    quiet = lab.measure_plans(subject, space, plans[:2])
    assert quiet == pytest.approx([cost(apply_plan(model, p, space=space)) for p in plans[:2]])
    loud = lab.measure_plans(subject, space, plans[2:])
    assert DENSE_TRIES == 4 and groups == [3] * 6  # 1.5, 1.3 (kept), 1.4, 1.35: none quiet
    assert loud == pytest.approx([1.3 * cost(apply_plan(model, p, space=space)) for p in plans[2:]])
    assert lab.measure_plans(subject, space, plans) == pytest.approx(quiet + loud)  # no tries left
    assert groups == [3] * 6


def test_a_plan_is_the_mean_of_its_quiet_groups_and_loud_ones_are_left_out(tmp_path: Path,
                                                                           monkeypatch) -> None:
    """Groups whose plans read a few percent apart (the dense model quiet in both) are
    averaged (geometric mean of the speedups); a loud group between them is measured past,
    not averaged in, and a reopened table gives the same figures without measuring."""
    import timm

    from mdp_trt import apply_plan, space_of
    from mdp_trt.engine_io import Lab
    from mdp_trt.models import SpaceConfig
    from mdp_trt.part import Subject
    from mdp_trt.surface import sample_plans

    model = timm.create_model("resnet18", num_classes=10).eval()
    space = space_of(model, SpaceConfig(resolution=32, max_choices=4))

    def cost(m: nn.Module) -> float:
        return sum(p.numel() for p in m.parameters()) / 1e6

    lab = Lab("onnxruntime", "fp32", 1, 32, 1, tmp_path / "t.sqlite", "resnet18", progress=False)
    groups: list[int] = []
    # plans read f**2 / f = f slower than their dense model: 1.0, then loud 1.5, then 1.04
    monkeypatch.setattr(lab, "compare", fake_compare(iter([1.0, 1.5, 1.04]), groups, cost,
                                                     slowed=lambda f: f * f))
    plans = sample_plans(space, 3, seed=3)
    subject = Subject(model)
    got = lab.measure_plans(subject, space, plans)
    assert groups == [4, 4, 4]
    want = [cost(apply_plan(model, p, space=space)) * 1.04 ** 0.5 for p in plans]
    assert got == pytest.approx(want)
    lab2 = Lab("onnxruntime", "fp32", 1, 32, 1, tmp_path / "t.sqlite", "resnet18", progress=False)
    monkeypatch.setattr(lab2, "compare", fake_compare(iter([]), groups, cost, slowed=lambda f: f))
    assert lab2.measure_plans(subject, space, plans) == pytest.approx(want)
    from mdp_trt.engine_io import plan_key

    points = {plan_key(p): ms for p, ms in lab2.measured_points(space)}
    assert [points[plan_key(p)] for p in plans] == pytest.approx(want)
