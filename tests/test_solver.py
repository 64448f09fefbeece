"""The exact solver against brute-force enumeration on tiny random instances."""

from __future__ import annotations

import gc
import itertools
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from solvers import (
    Problem,
    Solution,
    SolverBlock,
    SolverDim,
    SolverError,
    SolverTerm,
    SolverValue,
    min_latency,
    mip_solvers,
    plot_sweep,
    solve,
    sweep,
)
from solvers.reduce import dominated


def random_problem(seed: int, values: bool = False) -> Problem:
    """Shared dims, private dims of locked and removable blocks, 0- to 3-dim terms, terms over
    the same dims, a term depending on two removable blocks; odd seeds get dominated choices.

    ``values``: value terms too, blocks' shares of widths (nondecreasing in the width, as a
    share of top-k units is): of shared dims (one with no latency term over it and its block,
    one riding on a joint term), of a dim private to another removable block, of a locked
    block, of the block's own dim, two on one (dim, block)."""
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
        if seed % 2 and "s1" in ds:  # the widest s1 no slower than the one below: that one is dominated
            axis = ds.index("s1")
            table = np.moveaxis(table, axis, 0)
            table[-1] = table[-2]
            table = np.moveaxis(table, 0, axis)
        return SolverTerm(name, ds, table, block)

    terms = [term("stem", ("s0",), None), term("b0.a", ("s0", "b0.p"), "b0"),
             term("b1.a", ("s0", "b1.p", "s1"), "b1"), term("b1.b", ("s1",), "b1"),
             term("b1.c", ("s1", "s0"), "b1"), term("b1.d", (), "b1"),
             term("b2.a", ("b2.p", "s1"), "b2"), term("b2.b", ("s0", "s1"), "b2"),
             term("b2.c", ("s1", "b2.p"), "b2"), term("head", ("s1",), None)]
    if seed % 3 == 0:
        terms.append(term("b1.x", ("b1.p", "b2.p"), "b1"))  # counts only while both are kept
    vterms = []
    if values:
        def share(name: str, dim: str, block: str) -> SolverValue:
            return SolverValue(name, dim, np.cumsum(nrng.random(shape[dim])) * nrng.uniform(0.2, 1.5), block)

        vterms = [share("v0", "s0", "b1"), share("v1", "s1", "b2"), share("v2", "s0", "b2"),
                  share("v3", "b2.p", "b1"), share("v4", "s1", "b0"), share("v5", "b1.p", "b1"),
                  share("v6", "s0", "b1")]
    return Problem(dims, blocks, terms, fixed_ms=0.05, scale=rng.uniform(0.8, 1.2), offset=rng.uniform(0, 0.1),
                   values=vterms)


def big_problem(seed: int, stages: int = 4, per_stage: int = 6, k: int = 16) -> Problem:
    """ResNet-like and too big to enumerate or to solve whole in a second: stages of blocks
    with two private widths of ``k`` choices around a shared width, removable blocks owning a
    share of it, noisy latency over width products."""
    rng = np.random.default_rng(seed)
    work = np.outer(np.arange(1, k + 1), np.arange(1, k + 1)) / k**2

    def dim(name: str, block: str | None = None) -> SolverDim:
        return SolverDim(name, tuple(range(8, 8 * k + 1, 8)), np.cumsum(rng.gamma(1.0, 1.0, k)), block)

    dims: list[SolverDim] = []
    blocks: list[SolverBlock] = []
    terms: list[SolverTerm] = []
    values: list[SolverValue] = []
    prev = None
    for s in range(stages):
        res = f"s{s}.res"
        dims.append(dim(res))
        if prev is not None:
            terms.append(SolverTerm(f"s{s}.down", (prev, res), work * (1 + 0.3 * rng.random((k, k)))))
        for b in range(per_stage):
            name = f"s{s}.b{b}"
            blocks.append(SolverBlock(name, b > 0, float(rng.random())))
            dims += [dim(name + ".a", name), dim(name + ".c", name)]
            terms += [SolverTerm(name + t, ds, work * (1 + 0.3 * rng.random((k, k))), name)
                      for t, ds in ((".1", (res, name + ".a")), (".2", (name + ".a", name + ".c")),
                                    (".3", (name + ".c", res)))]
            if b > 0:
                values.append(SolverValue(name + ".share", res, np.cumsum(rng.gamma(1.0, 0.3, k)), name))
        prev = res
    return Problem(dims, blocks, terms, values=values)


def latency_of(p: Problem, widths: dict[str, int], removed: tuple[str, ...]) -> float:
    """Predicted latency straight from the arrays (independent of the solver's own bookkeeping)."""
    owner = {d.name: d.block for d in p.dims}
    index = {d.name: d.choices.index(widths[d.name]) for d in p.dims}
    total = p.fixed_ms
    for t in p.terms:
        if t.block in removed or any(owner[n] in removed for n in t.dims):
            continue
        total += float(np.asarray(t.table)[tuple(index[n] for n in t.dims)])
    return p.scale * total + p.offset


def objective_of(p: Problem, widths: dict[str, int], removed: tuple[str, ...]) -> float:
    """Importance straight from the arrays; a value term counts while its block and its dim are kept."""
    owner = {d.name: d.block for d in p.dims}
    index = {d.name: d.choices.index(widths[d.name]) for d in p.dims}
    kept = sum(float(d.value[index[d.name]]) for d in p.dims if d.block not in removed)
    kept += sum(float(v.table[index[v.dim]]) for v in p.values
                if v.block not in removed and owner[v.dim] not in removed)
    return kept + sum(b.value for b in p.blocks if b.removable and b.name not in removed)


def brute_force(p: Problem, budget: float,
                latency: Callable[[Problem, dict[str, int], tuple[str, ...]], float] | None = None
                ) -> tuple[float, float]:
    """(best objective under the budget or -inf, smallest latency) by enumeration, latency by
    ``latency`` (default :func:`latency_of`)."""
    latency = latency or latency_of
    removable = [b.name for b in p.blocks if b.removable]
    best, fastest = -np.inf, np.inf
    for k in range(len(removable) + 1):
        for removed in itertools.combinations(removable, k):
            for combo in itertools.product(*(d.choices for d in p.dims)):
                widths = dict(zip([d.name for d in p.dims], combo, strict=True))
                lat = latency(p, widths, removed)
                fastest = min(fastest, lat)
                if lat <= budget:
                    best = max(best, objective_of(p, widths, removed))
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
    assert sol.gap is not None and sol.gap <= 1e-6
    assert sol.objective == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert objective_of(p, sol.widths, sol.removed) == pytest.approx(sol.objective)
    assert latency_of(p, sol.widths, sol.removed) <= budget
    assert sol.predicted_ms == pytest.approx(latency_of(p, sol.widths, sol.removed))


@pytest.mark.parametrize("seed", range(40))
def test_value_terms_agree_with_brute_force(seed: int) -> None:
    """Block-dependent value terms: the plan is the enumerated optimum, with and without the
    reductions, and its objective is the arrays' importance of the plan."""
    p = random_problem(300 + seed, values=True)
    _, fastest = brute_force(p, 0.0)
    full = p.latency({d.name: d.choices[-1] for d in p.dims})
    budget = fastest + random.Random(seed).uniform(0.05, 0.95) * (full - fastest)
    assert_brute_force_optimum(p, budget)


def assert_brute_force_optimum(p: Problem, budget: float) -> dict[bool, Solution]:
    """The solve with and without reductions is the enumerated optimum, its objective the
    arrays' importance of the plan, within budget; returns the solutions by ``reduce``."""
    expected, _ = brute_force(p, budget)
    sols: dict[bool, Solution] = {}
    for reduce in (True, False):
        sol = solve(p, budget, reduce=reduce)
        assert sol.status == "optimal"
        assert sol.objective == pytest.approx(expected, rel=1e-6, abs=1e-9)
        assert objective_of(p, sol.widths, sol.removed) == pytest.approx(sol.objective)
        assert latency_of(p, sol.widths, sol.removed) <= budget
        sols[reduce] = sol
    return sols


@pytest.mark.parametrize(("stages", "per_stage", "k"), [(1, 3, 3), (2, 2, 2)])
@pytest.mark.parametrize("seed", range(6))
def test_block_shares_of_bottlenecks_agree_with_brute_force(seed: int, stages: int, per_stage: int, k: int) -> None:
    """ResNet-like stages (each block's first and last term over the stage width, removable
    blocks owning a share of it): the optimum at tight and loose budgets, with and without the
    reductions, and the whole program's solve reports HiGHS's simplex iterations."""
    p = big_problem(seed, stages, per_stage, k)
    _, fastest = brute_force(p, 0.0)
    full = p.latency({d.name: d.choices[-1] for d in p.dims})
    for share in (0.05, 0.3, 0.7):
        budget = fastest + share * (full - fastest)
        assert assert_brute_force_optimum(p, budget)[False].lp_iterations > 0


def test_value_terms_change_the_plan() -> None:
    """A block whose share of a shared width outweighs the rest is kept, at the width where the
    share pays; without the value term the same budget removes it (the term is not ignored)."""
    s = SolverDim("s", (1, 2), np.array([0.0, 1.0]))
    p_ = SolverDim("b.p", (1,), np.array([0.0]), "b")
    terms = [SolverTerm("t", ("s", "b.p"), np.array([[1.0], [2.0]]), "b"), SolverTerm("u", ("s",), np.array([0.0, 1.5]))]
    blocks = [SolverBlock("b", True, 0.1)]
    plain = Problem([s, p_], blocks, terms)
    shared = Problem([s, p_], blocks, terms, values=[SolverValue("share", "s", np.array([1.5, 3.0]), "b")])
    a, b = solve(plain, 2.0), solve(shared, 2.0)
    assert a.removed == ("b",) and a.widths["s"] == 2 and a.objective == pytest.approx(1.0)
    assert b.removed == () and b.widths["s"] == 1 and b.objective == pytest.approx(1.6)
    assert solve(shared, 3.5).objective == pytest.approx(1.0 + 3.0 + 0.1)


@pytest.mark.parametrize("seed", range(5))
def test_reductions_keep_the_optimum(seed: int) -> None:
    p = random_problem(100 + seed)
    _, fastest = brute_force(p, 0.0)
    budget = fastest * 1.5
    whole, reduced = solve(p, budget, reduce=False), solve(p, budget)
    assert whole.status == reduced.status == "optimal"
    assert reduced.objective == pytest.approx(whole.objective, rel=1e-6)
    assert reduced.widths.keys() == whole.widths.keys() == {d.name for d in p.dims}


@pytest.mark.parametrize("reduce", [True, False])
@pytest.mark.parametrize("seed", [7, 8, 9])
def test_infeasible_budget_reports_smallest_latency(seed: int, reduce: bool) -> None:
    p = random_problem(seed)
    _, fastest = brute_force(p, 0.0)
    sol = solve(p, fastest * 0.99, reduce=reduce)
    assert sol.status == "infeasible" and not sol.widths
    assert sol.min_latency_ms == pytest.approx(fastest)
    assert "smallest achievable latency" in sol.message
    assert min_latency(p) == pytest.approx(fastest)


@pytest.mark.parametrize("seed", [11, 12, 14])
def test_looser_budget_never_lowers_the_objective(seed: int) -> None:
    p = random_problem(seed)
    _, fastest = brute_force(p, 0.0)
    budgets = list(np.linspace(fastest, fastest * 3, 8))
    sols = sweep(p, budgets)
    objs = [s.objective for s in sols]
    assert all(s.status == "optimal" for s in sols)
    assert all(b >= a - 1e-9 for a, b in zip(objs, objs[1:], strict=False))
    assert all(latency_of(p, s.widths, s.removed) <= b for s, b in zip(sols, budgets, strict=True))


@pytest.mark.parametrize("solver", mip_solvers())
@pytest.mark.parametrize("seed", range(3))
def test_every_installed_solver_agrees_with_brute_force(solver: str, seed: int) -> None:
    p = random_problem(200 + seed, values=seed > 0)
    _, fastest = brute_force(p, 0.0)
    budget = fastest * 1.4
    expected, _ = brute_force(p, budget)
    sol = solve(p, budget, solver=solver)
    assert sol.status == "optimal" and sol.solver == solver
    assert sol.objective == pytest.approx(expected, rel=1e-6)
    assert latency_of(p, sol.widths, sol.removed) <= budget


def test_sweep_is_monotone_and_plotted(tmp_path: Path) -> None:
    p = random_problem(13)
    _, fastest = brute_force(p, 0.0)
    budgets = [fastest * 0.9, *np.linspace(fastest, fastest * 3, 6)]
    sols = sweep(p, budgets)
    assert sols[0].status == "infeasible" and sols[0].min_latency_ms == pytest.approx(fastest)
    objs = [s.objective for s in sols[1:]]
    assert all(s.status == "optimal" for s in sols[1:])
    assert all(b >= a - 1e-9 for a, b in zip(objs, objs[1:], strict=False))
    png = tmp_path / "sweep" / "sweep.png"
    plot_sweep(budgets, sols, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dominated_choices_are_dropped_exactly() -> None:
    d = SolverDim("a", (1, 2, 3), np.array([1.0, 2.0, 3.0]))
    e = SolverDim("b", (1, 2), np.array([0.5, 1.0]))
    # choice 2 of "a" is as slow as choice 3 in every context: never worth taking
    table = np.array([[1.0, 2.0], [3.0, 5.0], [3.0, 5.0]])
    p = Problem([d, e], [], [SolverTerm("t", ("a", "b"), table)])
    assert dominated(p).allowed == {"a": (0, 2)}
    sol = solve(p, 4.0)
    assert sol.widths == {"a": 3, "b": 1} and sol.objective == pytest.approx(3.5)


def test_unknown_solver_is_refused_with_the_installed_ones() -> None:
    with pytest.raises(SolverError, match="installed: .*HIGHS"):
        solve(random_problem(0), 10.0, solver="NOPE")


def test_malformed_problem_is_refused() -> None:
    d = SolverDim("a", (1, 2), np.array([1.0, 2.0]))
    with pytest.raises(SolverError, match="table shape"):
        Problem([d], [], [SolverTerm("t", ("a",), np.zeros(3))])
    with pytest.raises(SolverError, match="named twice"):
        Problem([d], [], [SolverTerm("t", ("a", "a"), np.zeros((2, 2)))])


def test_solving_prints_nothing_on_stdout() -> None:
    """HiGHS's start-up banner does not reach the solving program's stdout (a CLI's JSON, say)."""
    import subprocess
    import sys

    code = ("import sys; sys.path.insert(0, 'tests'); from test_solver import random_problem; "
            "from solvers import solve; s = solve(random_problem(0), 1e9); assert s.status == 'optimal'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize(("limit", "reduce"), [(0.05, True), (0.3, True), (1.0, False), (2.0, False)])
def test_time_limit_is_honoured(limit: float, reduce: bool) -> None:
    """The whole call ends within 10% + 0.1 s of the limit, with a plan: the whole program at
    60% of dense does not solve in 2 s here (HiGHS alone took 20 s on it), nor do the
    reductions finish in 0.05 s."""
    p = big_problem(0)
    budget = 0.6 * p.latency({d.name: d.choices[-1] for d in p.dims})
    gc.collect()  # a full collection of the session's half a million objects took 0.2 s in the window
    t0 = time.perf_counter()
    sol = solve(p, budget, time_limit_s=limit, reduce=reduce)
    elapsed = time.perf_counter() - t0
    assert elapsed <= 1.1 * limit + 0.1, f"{elapsed:.3f} s for a {limit} s limit"
    assert sol.status in ("time_limit", "optimal") and sol.widths
    assert latency_of(p, sol.widths, sol.removed) <= budget
    assert objective_of(p, sol.widths, sol.removed) == pytest.approx(sol.objective)


def test_time_limit_returns_the_best_point_with_its_gap() -> None:
    """On a time limit the best point found comes back, status ``time_limit``, with its proven
    gap; with no time at all, still a feasible point (no bound, so no gap)."""
    p = big_problem(1)
    budget = 0.6 * p.latency({d.name: d.choices[-1] for d in p.dims})
    exact = solve(p, budget)
    assert exact.status == "optimal" and exact.gap is not None and exact.gap <= 1e-6
    sol = solve(p, budget, time_limit_s=1.0, reduce=False)
    assert sol.status == "time_limit" and sol.widths and "best point found" in sol.message
    assert sol.gap is not None and sol.gap > 0
    assert latency_of(p, sol.widths, sol.removed) <= budget
    assert sol.objective <= exact.objective + 1e-9
    assert exact.objective <= sol.objective * (1 + sol.gap) + 1e-6  # the gap is a true bound
    none = solve(p, budget, time_limit_s=0.0)
    assert none.status == "time_limit" and none.widths and none.gap is None
    assert latency_of(p, none.widths, none.removed) <= budget
    assert none.objective <= exact.objective + 1e-9


def chain_problem(seed: int, stages: int = 3) -> Problem:
    """Stage widths in a chain (a term over each consecutive pair), each stage with a locked and
    a removable block on its width: the enumeration must eliminate the widths around one."""
    rng = np.random.default_rng(seed)
    dims: list[SolverDim] = []
    blocks: list[SolverBlock] = []
    terms: list[SolverTerm] = []
    values: list[SolverValue] = []
    for s in range(stages):
        res = f"s{s}"
        dims.append(SolverDim(res, (8, 16, 24), np.cumsum(rng.random(3)) * 2))
        if s:
            terms.append(SolverTerm(f"{res}.down", (f"s{s - 1}", res), rng.random((3, 3))))
        for b, removable in enumerate((False, True)):
            name = f"{res}.b{b}"
            blocks.append(SolverBlock(name, removable, float(rng.random())))
            dims.append(SolverDim(name + ".p", (8, 16), np.cumsum(rng.random(2)), name))
            terms.append(SolverTerm(name + ".t", (res, name + ".p"), rng.random((3, 2)) + 0.1, name))
            if removable:
                values.append(SolverValue(name + ".share", res, np.cumsum(rng.random(3)) * 0.5, name))
    return Problem(dims, blocks, terms, values=values)


@pytest.mark.parametrize("seed", range(8))
def test_enumeration_eliminates_a_chain_of_shared_widths(seed: int) -> None:
    """The enumeration alone, shared widths eliminated around the core one: the brute-force
    optimum with its plan, and nothing claimed beyond it."""
    from solvers import decompose

    p = chain_problem(seed)
    _, fastest = brute_force(p, 0.0)
    full = p.latency({d.name: d.choices[-1] for d in p.dims})
    for share in (0.2, 0.5, 0.8):
        budget = fastest + share * (full - fastest)
        expected, _ = brute_force(p, budget)
        found = decompose.solve(p, budget)
        assert found.status == "optimal"
        assert found.value == pytest.approx(expected, rel=1e-9)
        assert objective_of(p, found.widths, found.removed) == pytest.approx(expected, rel=1e-9)
        assert latency_of(p, found.widths, found.removed) <= budget
        assert decompose.solve(p, budget, best=expected).widths == {}  # nothing beats the optimum


@pytest.mark.parametrize("seed", range(6))
def test_smallest_latency_from_the_parts(seed: int) -> None:
    """The least latency from the parts' fastest options, shared widths minimised out: the
    brute-force one, on random problems and on a chain of stage widths."""
    from solvers import decompose

    for p in (random_problem(seed), chain_problem(seed)):
        _, fastest = brute_force(p, 0.0)
        found = decompose.min_latency(p)
        assert found is not None and found == pytest.approx(fastest, rel=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_priced_relaxation_is_the_lp_of_one_point_per_front(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The block-count bound's LP relaxation, for many prices at once, against scipy's LP of
    the same multiple-choice knapsack (one point per front, fractions allowed, importance less
    the price per removed block, total latency within the room)."""
    from scipy.optimize import linprog

    from solvers.decompose import _priced_relaxed

    rng = np.random.default_rng(seed)
    classes = []
    for _ in range(int(rng.integers(1, 5))):
        n = int(rng.integers(1, 25))
        lat = np.sort(np.round(rng.uniform(0.0, 10.0, n), 1))  # ties of latency included
        classes.append((lat, rng.uniform(0.0, 10.0, n), rng.integers(0, 3, n).astype(np.float64)))
    lat = np.concatenate([c[0] for c in classes])
    val = np.concatenate([c[1] for c in classes])
    u = np.concatenate([c[2] for c in classes])
    one = np.zeros((len(classes), len(lat)))
    at = 0
    for f, c in enumerate(classes):
        one[f, at:at + len(c[0])] = 1.0
        at += len(c[0])
    room = float(sum(c[0].min() for c in classes) + rng.uniform(0.0, 12.0))
    prices = rng.normal(0.0, 3.0, 5)
    got = _priced_relaxed(classes, prices, room)
    for nu, g in zip(prices, got, strict=True):
        lp = linprog(-(val - nu * u), A_ub=lat[None, :], b_ub=[room], A_eq=one, b_eq=np.ones(len(classes)),
                     bounds=(0, None), method="highs")
        assert lp.status == 0
        assert g == pytest.approx(-lp.fun, rel=1e-9, abs=1e-9)
    # below the fastest point of every front there is no point at all
    assert np.all(_priced_relaxed(classes, prices, sum(c[0].min() for c in classes) - 0.05) == -np.inf)
    # prices taken one at a time (the memory bound) give the same values
    monkeypatch.setattr("solvers.decompose.PRICE_CELLS", 1)
    assert np.array_equal(_priced_relaxed(classes, prices, room), got)
