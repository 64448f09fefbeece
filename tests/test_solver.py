"""The exact solver against brute-force enumeration on tiny random instances."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from solvers import (
    Problem,
    SolverBlock,
    SolverDim,
    SolverError,
    SolverTerm,
    min_latency,
    solve,
    sweep,
)


def random_problem(seed: int) -> Problem:
    """Shared dims, private dims of removable and locked blocks, 1-, 2- and 3-dim terms."""
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)

    def dim(name: str, block: str | None) -> SolverDim:
        n = rng.randint(2, 3)
        choices = tuple(sorted(rng.sample(range(1, 9), n)))
        return SolverDim(name, choices, np.cumsum(nrng.random(n)), block)

    dims = [dim("s0", None), dim("s1", None)]
    blocks = [SolverBlock("b0", False), SolverBlock("b1", True, float(nrng.random())),
              SolverBlock("b2", True, float(nrng.random()))]
    dims += [dim("b0.p", "b0"), dim("b1.p", "b1"), dim("b2.p", "b2")]
    shape = {d.name: len(d.choices) for d in dims}

    def term(name: str, ds: tuple[str, ...], block: str | None) -> SolverTerm:
        table = nrng.random(tuple(shape[d] for d in ds)) + 0.1
        return SolverTerm(name, ds, table, block)

    terms = [term("stem", ("s0",), None), term("b0.a", ("s0", "b0.p"), "b0"),
             term("b1.a", ("s0", "b1.p", "s1"), "b1"), term("b1.b", ("s1",), "b1"),
             term("b2.a", ("b2.p", "s1"), "b2"), term("b2.b", ("s0", "s1"), "b2"), term("head", ("s1",), None)]
    return Problem(dims, blocks, terms, fixed_ms=0.05, scale=rng.uniform(0.8, 1.2), offset=rng.uniform(0, 0.1))


def brute_force(p: Problem, budget: float) -> tuple[float, float]:
    """(best objective under the budget or -inf, smallest latency) by enumeration."""
    removable = [b.name for b in p.blocks if b.removable]
    best, fastest = -np.inf, np.inf
    for k in range(len(removable) + 1):
        for removed in itertools.combinations(removable, k):
            for combo in itertools.product(*(d.choices for d in p.dims)):
                widths = dict(zip([d.name for d in p.dims], combo, strict=True))
                lat = p.latency(widths, removed)
                fastest = min(fastest, lat)
                if lat <= budget:
                    best = max(best, p.objective(widths, removed))
    return best, fastest


@pytest.mark.parametrize("seed", range(50))
def test_agrees_with_brute_force(seed: int) -> None:
    p = random_problem(seed)
    _, fastest = brute_force(p, 0.0)
    full = p.latency({d.name: d.choices[-1] for d in p.dims})
    budget = fastest + random.Random(seed).uniform(0.1, 0.9) * (full - fastest)
    expected, _ = brute_force(p, budget)
    sol = solve(p, budget)
    assert sol.status == "optimal"
    assert sol.objective == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert p.latency(sol.widths, sol.removed) <= budget + 1e-9
    assert sol.predicted_ms == pytest.approx(p.latency(sol.widths, sol.removed))


@pytest.mark.parametrize("seed", range(5))
def test_reductions_keep_the_optimum(seed: int) -> None:
    p = random_problem(100 + seed)
    _, fastest = brute_force(p, 0.0)
    budget = fastest * 1.5
    whole, reduced = solve(p, budget, reduce=False), solve(p, budget)
    assert whole.status == reduced.status == "optimal"
    assert reduced.objective == pytest.approx(whole.objective, rel=1e-6)
    assert reduced.widths.keys() == whole.widths.keys() == {d.name for d in p.dims}


def test_infeasible_budget_reports_smallest_latency() -> None:
    p = random_problem(7)
    _, fastest = brute_force(p, 0.0)
    sol = solve(p, fastest * 0.99)
    assert sol.status == "infeasible" and not sol.widths
    assert sol.min_latency_ms == pytest.approx(fastest)
    assert min_latency(p) == pytest.approx(fastest)


def test_looser_budget_never_lowers_the_objective() -> None:
    p = random_problem(11)
    _, fastest = brute_force(p, 0.0)
    budgets = list(np.linspace(fastest, fastest * 3, 8))
    sols = sweep(p, budgets)
    objs = [s.objective for s in sols]
    assert all(s.status == "optimal" for s in sols)
    assert all(b >= a - 1e-9 for a, b in zip(objs, objs[1:], strict=False))
    assert all(s.predicted_ms <= b + 1e-9 for s, b in zip(sols, budgets, strict=True))


def test_unknown_solver_is_refused_with_the_installed_ones() -> None:
    with pytest.raises(SolverError, match="installed: .*HIGHS"):
        solve(random_problem(0), 10.0, solver="NOPE")


def test_malformed_problem_is_refused() -> None:
    d = SolverDim("a", (1, 2), np.array([1.0, 2.0]))
    with pytest.raises(SolverError, match="table shape"):
        Problem([d], [], [SolverTerm("t", ("a",), np.zeros(3))])
