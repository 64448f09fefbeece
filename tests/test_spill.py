"""Weights spilling out of cache: the calibration part past a knee, its knee located by
measuring plans there, and the solver's exact handling of the charge (a second latency row)."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from test_solver import brute_force, latency_of, random_problem
from test_surface import full_points, toy_mparams, toy_space

from mdp_trt.latency import SurfaceModel, refine_knee
from mdp_trt.surface import Calibration, LatencySurface, fit_calibration, pct_err, sample_plans
from solvers import Problem, SolverError, SolverExcess, min_latency, solve


def spill_truth(scale: float, k: float, knee: float, offset: float):  # type: ignore[no-untyped-def]
    return lambda raw, mp: scale * raw + k * max(0.0, mp - knee) + offset


def test_spill_fit_recovers_a_known_knee() -> None:
    rng = np.random.default_rng(0)
    mp = np.sort(rng.uniform(0.5, 12.0, 14))
    raw = 0.25 * mp + rng.uniform(0.0, 0.5, len(mp))  # terms grow with the weights, not exactly
    truth = spill_truth(1.05, 0.33, 3.0, 0.02)
    measured = [truth(r, m) for r, m in zip(raw, mp, strict=True)]
    cal = Calibration.fit(list(raw), measured, mparams=list(mp), spill=True)
    assert cal.form == "spill"
    step = (mp.max() - mp.min()) / 65
    assert abs(cal.spill_mparams - 3.0) <= step
    assert cal.ms_per_spilled_mparam == pytest.approx(0.33, rel=0.1)
    assert cal.scale == pytest.approx(1.05, rel=0.05)
    pred = [float(cal(r, m)) for r, m in zip(raw, mp, strict=True)]
    assert np.max(pct_err(pred, measured)) < 2.0
    # the part is the charge past the knee, nothing below it
    assert cal.spilled(cal.spill_mparams - 1.0) == 0.0
    assert cal.spilled(cal.spill_mparams + 2.0) == pytest.approx(2.0 * cal.ms_per_spilled_mparam)
    assert Calibration.from_dict(cal.to_dict()) == cal
    # an old record (before the part existed) has none
    old = Calibration.from_dict({"scale": 1.0, "offset": 0.1, "plans": 8})
    assert old.ms_per_spilled_mparam == 0.0 and old(2.0, 100.0) == pytest.approx(2.1)


def test_spill_fit_refuses_too_few_points_and_a_falling_charge() -> None:
    mp = [1.0, 2.0, 4.0, 6.0, 8.0]
    raw = [0.3, 0.6, 1.1, 1.6, 2.2]
    truth = spill_truth(1.0, 0.3, 3.0, 0.0)
    few = Calibration.fit(raw, [truth(r, m) for r, m in zip(raw, mp, strict=True)], mparams=mp, spill=True)
    assert few.form != "spill" and few.ms_per_spilled_mparam == 0.0
    mp6, raw6 = [*mp, 10.0], [*raw, 2.8]
    falling = spill_truth(1.0, -0.3, 3.0, 0.5)
    cal = Calibration.fit(raw6, [falling(r, m) for r, m in zip(raw6, mp6, strict=True)], mparams=mp6, spill=True)
    assert cal.ms_per_spilled_mparam == 0.0 and cal.form != "spill"


def spill_surface() -> tuple[LatencySurface, float]:
    space = toy_space()
    base = LatencySurface.from_points(space, full_points(space))
    surf = LatencySurface(space, base.arrays, base.interpolated, mparams=toy_mparams(space))
    sizes = sorted(surf.plan_mparams(p) for p in sample_plans(space, 40, seed=5))
    return surf, float(np.quantile(sizes, 0.4))


def test_spill_chosen_by_leave_one_out_where_weights_outgrow_the_cache() -> None:
    surf, knee = spill_surface()
    per_mp = 2.0 * np.median([surf.raw(p) / surf.plan_mparams(p) for p in sample_plans(surf.space, 10, seed=1)])
    truth = lambda p: 1.1 * surf.raw(p) + per_mp * max(0.0, surf.plan_mparams(p) - knee) + 0.01  # noqa: E731
    plans = sample_plans(surf.space, 12, seed=1)
    cal = fit_calibration(surf, plans, [truth(p) for p in plans])
    assert cal.form == "spill"
    surf.calibration = cal
    held_out = sample_plans(surf.space, 20, seed=2)
    err = pct_err([surf.predict(p) for p in held_out], [truth(p) for p in held_out])
    assert np.median(err) < 2.0
    # asked not to, it is not tried
    assert fit_calibration(surf, plans, [truth(p) for p in plans], spill=False).form != "spill"
    # on latency affine in the terms, with a few percent of noise, it is not taken (the knee
    # only chases the noise: no clear leave-one-out evidence)
    noise = [1.0, 0.97, 1.02, 0.99, 1.03, 0.98, 1.01, 0.96, 1.04, 1.0, 0.98, 1.02]
    affine = [(1.2 * surf.raw(p) + 0.03) * e for p, e in zip(plans, noise, strict=True)]
    assert fit_calibration(surf, plans, affine).form == "affine"


def test_knee_plans_are_measured_where_the_knee_lies() -> None:
    """Calibration plans with a gap around the true knee: the first fit puts the knee in the
    gap, refine_knee measures plans inside it and the knee moves towards the truth."""
    surf, _ = spill_surface()
    space = surf.space
    pool = sample_plans(space, 64, seed=20_000)
    sizes = sorted(surf.plan_mparams(p) for p in pool)
    knee = float(np.quantile(sizes, 0.5))
    per_mp = 2.0 * np.median([surf.raw(p) / surf.plan_mparams(p) for p in pool])
    truth = lambda p: surf.raw(p) + per_mp * max(0.0, surf.plan_mparams(p) - knee) + 0.01  # noqa: E731
    lo, hi = np.quantile(sizes, 0.2), np.quantile(sizes, 0.8)
    from mdp_trt.engine_io import plan_key

    spread = list({plan_key(p): p for p in sample_plans(space, 300, seed=7)}.values())
    below = sorted((p for p in spread if surf.plan_mparams(p) <= lo), key=surf.plan_mparams)
    above = sorted((p for p in spread if surf.plan_mparams(p) >= hi), key=surf.plan_mparams)
    plans = below[::max(1, len(below) // 5)][:5] + above[::max(1, len(above) // 5)][:5]  # nothing near the knee
    assert len(plans) == 10
    measured = [truth(p) for p in plans]
    model = SurfaceModel()
    cal = model.fit(surf, plans, measured)
    assert cal.form == "spill"
    calls: list[float] = []

    def measure(p):  # type: ignore[no-untyped-def]
        calls.append(surf.plan_mparams(p))
        return truth(p)

    more, more_ms, refined = refine_knee(surf, plans, measured, cal, model, measure, n=3)
    assert len(more) == len(plans) + len(calls) and 1 <= len(calls) <= 3
    assert more[:len(plans)] == plans and more_ms[len(plans):] == [truth(p) for p in more[len(plans):]]
    assert all(lo < c < hi for c in calls[:1])  # the first one inside the gap
    assert refined.form == "spill"
    assert abs(refined.spill_mparams - knee) < abs(cal.spill_mparams - knee) or \
        abs(refined.spill_mparams - knee) < 0.05 * knee
    # without a knee, nothing is measured
    affine = model.fit(surf, plans, [1.2 * surf.raw(p) for p in plans])
    none_calls: list[float] = []
    same, _, _ = refine_knee(surf, plans, [1.2 * surf.raw(p) for p in plans], affine, model,
                             lambda p: none_calls.append(1.0) or 1.0)  # type: ignore[func-returns-value]
    assert same == plans and not none_calls


def test_solver_problem_with_a_spill_part_agrees_with_predict() -> None:
    from mdp_trt.models import Importance
    from mdp_trt.optimize import problem, solve_plan

    surf, knee = spill_surface()
    space = surf.space
    surf.calibration = Calibration(1.1, 0.01, form="spill", ms_per_spilled_mparam=30.0, spill_mparams=knee)
    imp = Importance({d.name: np.linspace(1.0, 2.0, d.size) for d in space.dims}, {"b1": 1.0})
    prob = problem(space, surf, imp)
    assert prob.excess is not None
    plans = [space.random_plan(seed) for seed in range(10)] + sample_plans(space, 10, seed=3)
    assert any(surf.plan_mparams(p) > knee for p in plans) and any(surf.plan_mparams(p) < knee for p in plans)
    for p in plans:
        assert prob.latency(p.widths, p.removed) == pytest.approx(surf.predict(p), rel=1e-12)
        assert surf.predict(p) == pytest.approx(1.1 * surf.raw(p) + 30.0 * max(0.0, surf.plan_mparams(p) - knee)
                                                + 0.01)
    budget = float(np.median([surf.predict(p) for p in plans]))
    plan, sol = solve_plan(space, surf, imp, budget)
    assert plan is not None and sol.status == "optimal"
    assert surf.predict(plan) <= budget * (1 + 1e-9)
    assert sol.predicted_ms == pytest.approx(surf.predict(plan))


def with_excess(p: Problem, seed: int, k: float = 0.4, where: float = 0.5) -> Problem:
    """``p`` with random nonnegative excess tables on most terms, the threshold at ``where``
    of the way between the smallest and largest sum."""
    nrng = np.random.default_rng(1000 + seed)
    tables = {t.name: nrng.random(np.shape(t.table)) for t in p.terms if t.name != "head"}
    probe = Problem(p.dims, p.blocks, p.terms, p.fixed_ms, p.scale, p.offset, p.values,
                    SolverExcess(tables, 0.0, 0.0)).excess_problem()  # its latency: the excess sum
    removable = [b.name for b in p.blocks if b.removable]
    sums = [probe.latency(dict(zip([d.name for d in p.dims], combo, strict=True)), removed)
            for r in range(len(removable) + 1) for removed in itertools.combinations(removable, r)
            for combo in itertools.product(*(d.choices for d in p.dims))]
    threshold = min(sums) + where * (max(sums) - min(sums))
    return Problem(p.dims, p.blocks, p.terms, p.fixed_ms, p.scale, p.offset, p.values,
                   SolverExcess(tables, threshold, k))


def excess_latency_of(p: Problem, widths: dict[str, int], removed: tuple[str, ...]) -> float:
    """Latency with the excess charge, straight from the arrays (not :meth:`Problem.latency`)."""
    e = p.excess
    assert e is not None
    owner = {d.name: d.block for d in p.dims}
    index = {d.name: d.choices.index(widths[d.name]) for d in p.dims}
    kept = [t for t in p.terms if t.block not in removed and not any(owner[n] in removed for n in t.dims)]
    x = sum(float(e.tables[t.name][tuple(index[n] for n in t.dims)]) for t in kept if t.name in e.tables)
    return latency_of(p, widths, removed) + e.ms_per_unit * max(0.0, x - e.threshold)


def brute_force_excess(p: Problem, budget: float) -> tuple[float, float]:
    """(best objective within the budget, smallest latency) by enumeration, the excess charged."""
    return brute_force(p, budget, excess_latency_of)


@pytest.mark.parametrize("seed", range(24))
def test_excess_solve_agrees_with_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    p = with_excess(random_problem(seed, values=seed % 2 == 0), seed, k=rng.uniform(0.1, 1.5),
                    where=rng.uniform(0.2, 0.8))
    _, fastest = brute_force_excess(p, 0.0)
    full = p.latency({d.name: d.choices[-1] for d in p.dims})
    budget = fastest + rng.uniform(0.05, 0.95) * (full - fastest)
    expected, _ = brute_force_excess(p, budget)
    for reduce in (True, False):
        sol = solve(p, budget, reduce=reduce)
        assert sol.status == "optimal", sol.message
        assert sol.objective == pytest.approx(expected, abs=1e-7)
        assert sol.predicted_ms <= budget + 1e-9
        assert sol.predicted_ms == pytest.approx(p.latency(sol.widths, sol.removed))
    # the charge matters here: without it the optimum is at least as good, often better
    plain, _ = brute_force(p.without_excess(), budget)
    assert plain >= expected - 1e-9


@pytest.mark.parametrize("seed", range(8))
def test_excess_smallest_latency_and_infeasible_budget(seed: int) -> None:
    p = with_excess(random_problem(seed), seed, k=2.0, where=0.1)
    _, fastest = brute_force_excess(p, 0.0)
    assert min_latency(p) == pytest.approx(fastest, abs=1e-9)
    sol = solve(p, fastest * 0.98)
    assert sol.status == "infeasible"
    assert sol.min_latency_ms == pytest.approx(fastest, abs=1e-9)


def test_the_budget_where_the_charge_starts_needs_both_rows() -> None:
    """Seeds where neither one-row relaxation's optimum fits: the two-row program decides."""
    hard = 0
    for seed in range(40):
        rng = random.Random(seed)
        p = with_excess(random_problem(seed), seed, k=rng.uniform(0.5, 2.0), where=rng.uniform(0.3, 0.6))
        _, fastest = brute_force_excess(p, 0.0)
        full = p.latency({d.name: d.choices[-1] for d in p.dims})
        budget = fastest + rng.uniform(0.2, 0.8) * (full - fastest)
        a = solve(p.without_excess(), budget)
        b = solve(p.excess_folded(), budget)
        if a.widths and p.latency(a.widths, a.removed) > budget and b.widths and \
                p.latency(b.widths, b.removed) > budget:
            hard += 1
            expected, _ = brute_force_excess(p, budget)
            sol = solve(p, budget)
            assert sol.status == "optimal" and sol.objective == pytest.approx(expected, abs=1e-7)
    assert hard >= 1


def test_malformed_excess_is_refused() -> None:
    p = random_problem(0)
    good = {t.name: np.zeros(np.shape(t.table)) for t in p.terms}
    with pytest.raises(SolverError, match="unknown term"):
        Problem(p.dims, p.blocks, p.terms, excess=SolverExcess({**good, "nope": np.zeros(1)}, 0.0, 1.0))
    with pytest.raises(SolverError, match="table shape"):
        Problem(p.dims, p.blocks, p.terms, excess=SolverExcess({"stem": np.zeros(7)}, 0.0, 1.0))
    with pytest.raises(SolverError, match="ms_per_unit"):
        Problem(p.dims, p.blocks, p.terms, excess=SolverExcess(good, 0.0, -1.0))
    with pytest.raises(SolverError, match="positive scale"):
        Problem(p.dims, p.blocks, p.terms, scale=0.0, excess=SolverExcess(good, 0.0, 1.0))
