"""Exact mixed-integer program: widths and kept blocks that keep the most importance under a budget.

The program itself is in :mod:`solvers.matrix`. Before the final solve, exact reductions
shrink it (HiGHS only; other solvers get the whole program):

1. drop dominated choices (:func:`solvers.reduce.dominated`);
2. solve the LP relaxation (dual simplex the first time, primal simplex after: on these
   programs its duals fix far more in step 3); a small MIP over the choices the LP uses gives
   a feasible point, improved by local search (one or two dims moved at a time);
3. fix by bounds: a choice (or a block's removal) whose Lagrangian bound from the LP duals is
   below the incumbent cannot be part of a better point, so it is dropped; repeat 2-3 on the
   smaller problem while it shrinks;
4. where the shared widths have few choices left, enumerate them and solve the rest exactly
   by merging Pareto fronts (:mod:`solvers.decompose`); otherwise solve the MIP on what is
   left, started from the incumbent.

Every point at least as good as the incumbent survives step 3, so the final optimum is the
optimum of the original problem, with the final solver's proven gap.

``time_limit_s`` holds for the whole solve: every HiGHS call gets only the time left, the
steps between them check the clock, and on the limit the best point found so far is returned
(status ``time_limit``) with its gap to the best proven bound.
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Iterable
from dataclasses import replace

import numpy as np
import scipy.sparse as sp

from solvers import backends, decompose
from solvers.matrix import Matrix, build, decode, encode
from solvers.problem import Problem, Solution, SolverError
from solvers.reduce import Restriction, dominated, lift, restrict

MIP_SOLVERS = ("HIGHS", "SCIP", "GUROBI", "CPLEX", "MOSEK", "XPRESS", "CBC", "GLPK_MI", "SCIPY")
MAX_ROUNDS = 8
SUPPORT_EPS = 1e-9
# HiGHS presolve on the final MIP: a cost on a small reduced program, a large gain on a big one
# (measured: resnet50 at 50% of dense, ~2.5k columns left, 0.15 s slower with it; hard budgets
# with ~10k columns left, 4x faster with it).
PRESOLVE_ABOVE_COLUMNS = 4000
ENUMERATED = "proven optimal by enumeration of the shared widths"
EARLY_FRONT = 20000  # the enumeration between LP rounds gives up early: the rounds may shrink it a lot
SHARED_FEW = 1000
SUPPORT_MIP_S = 0.5  # the MIP over the LP's support only makes an incumbent: its best point by then will do
EARLY_HEADS = 60  # shared assignments merged there (a few ms each)
MIN_CALL_S = 0.005  # no solver call is started with less time than this left
NO_POINT = "time limit before any feasible point was found"
FIRST_POINT_S = 0.02  # improving the point made without a solve, when the limit left no time at all


def mip_solvers() -> list[str]:
    """Installed solvers that take integer variables (HiGHS through highspy, others through CVXPY)."""
    import cvxpy as cp

    installed = set(cp.installed_solvers())
    if importlib.util.find_spec("highspy") is not None:
        installed.add("HIGHS")
    return [s for s in MIP_SOLVERS if s in installed]


def _check_solver(solver: str) -> None:
    if solver == "HIGHS" and importlib.util.find_spec("highspy") is not None:
        return  # the common case, without asking CVXPY to probe every solver it knows
    if solver not in mip_solvers():
        raise SolverError(f"solver {solver!r} is not an installed mixed-integer solver; "
                          f"installed: {', '.join(mip_solvers()) or 'none'}")


class _Chain:
    """Restrictions applied one after another, to lift a point back to the original problem."""

    def __init__(self, p: Problem) -> None:
        self.steps: list[tuple[Problem, Restriction]] = []
        self.current = p

    def apply(self, r: Restriction) -> None:
        self.steps.append((self.current, r))
        self.current = restrict(self.current, r)

    def lift(self, widths: dict[str, int], removed: Iterable[str]) -> tuple[dict[str, int], tuple[str, ...]]:
        out = (dict(widths), tuple(removed))
        for q, r in reversed(self.steps):
            out = lift(q, r, *out)
        return out


def _support(p: Problem, m: Matrix, col: np.ndarray) -> Restriction:
    """The choices between the smallest and largest one the LP point uses; blocks it keeps or
    removes outright are decided."""
    allowed = {}
    for d in p.dims:
        used = np.flatnonzero(col[m.dim_cols[d.name]] > SUPPORT_EPS)
        lo, hi = (int(used.min()), int(used.max())) if len(used) else (len(d.choices) - 1,) * 2
        allowed[d.name] = tuple(range(lo, hi + 1))
    kept = {b for b, c in m.removed_col.items() if col[c] < SUPPORT_EPS}
    removed = {b for b, c in m.removed_col.items() if col[c] > 1 - SUPPORT_EPS}
    return Restriction(allowed, kept, removed)


def _fixing(p: Problem, m: Matrix, rx: backends.Relaxation, threshold: float) -> Restriction:
    """Drop what cannot reach ``threshold``: choices whose bound when chosen is lower, removals
    likewise; a block whose bound when kept is lower is decided removed."""
    allowed = {}
    for d in p.dims:
        bound = rx.bound_one[m.dim_cols[d.name]]
        ok = np.flatnonzero(bound >= threshold)
        allowed[d.name] = tuple(int(i) for i in ok) if len(ok) else (int(np.argmax(bound)),)
    kept = {b for b, c in m.removed_col.items() if rx.bound_one[c] < threshold}
    removed = {b for b, c in m.removed_col.items() if rx.bound_zero[c] < threshold and b not in kept}
    return Restriction(allowed, kept, removed)


def _shared_grid(p: Problem) -> int:
    """Assignments of the dims no block owns: what the enumeration has to go through."""
    return int(np.prod([float(len(d.choices)) for d in p.dims if d.block is None]))


def _size(p: Problem) -> int:
    return sum(len(d.choices) for d in p.dims) + len(p.removable())


def local_search(p: Problem, widths: dict[str, int], removed: Iterable[str], budget_ms: float,
                 max_moves: int = 200, deadline: float = float("inf")) -> dict[str, int]:
    """Improve a feasible point by the best move that still fits the budget: one dim to another
    choice, or two dims at once (removed blocks stay removed); stops at ``deadline``."""
    gone = set(removed)
    dims = [d for d in p.dims if d.block not in gone]
    if not dims:
        return dict(widths)
    pos = {d.name: k for k, d in enumerate(dims)}
    idx = [d.choices.index(widths[d.name]) for d in dims]
    owner = {d.name: d.block for d in p.dims}
    live = [(tuple(pos[n] for n in t.dims), np.asarray(t.table, dtype=np.float64)) for t in p.terms
            if t.block not in gone and not any(owner[n] in gone for n in t.dims)]
    shared: dict[tuple[int, int], list[int]] = {}  # dim pairs with a term in common
    for k, (ax, _) in enumerate(live):
        for a in range(len(ax)):
            for b in range(a + 1, len(ax)):
                shared.setdefault((min(ax[a], ax[b]), max(ax[a], ax[b])), []).append(k)
    values = [np.asarray(d.value, dtype=np.float64).copy() for d in dims]
    for v in p.values:  # with the blocks fixed, a value term is part of its dim's value
        if v.block not in gone and v.dim in pos:
            values[pos[v.dim]] += np.asarray(v.table, dtype=np.float64)
    first = np.cumsum([0] + [len(d.choices) for d in dims])
    item_dim = np.concatenate([np.full(len(d.choices), k) for k, d in enumerate(dims)])
    apart = np.ones((len(dims), len(dims)), dtype=bool)
    np.fill_diagonal(apart, False)
    for a, b in shared:
        apart[a, b] = apart[b, a] = False
    apart_items = apart[np.ix_(item_dim, item_dim)]

    def point() -> dict[str, int]:
        return {**widths, **{d.name: d.choices[idx[k]] for k, d in enumerate(dims)}}

    def cut(k: int, keep: tuple[int, ...]) -> np.ndarray:
        ax, table = live[k]
        return table[tuple(slice(None) if a in keep else idx[a] for a in ax)]

    for _ in range(max_moves):
        if time.perf_counter() > deadline:
            break
        slack = budget_ms - p.latency(point(), gone)
        rows = [np.zeros(len(d.choices)) for d in dims]
        for k, (ax, _) in enumerate(live):
            for a in ax:
                rows[a] += cut(k, (a,))
        dl = np.concatenate([p.scale * (r - r[idx[k]]) for k, r in enumerate(rows)])
        dv = np.concatenate([v - v[idx[k]] for k, v in enumerate(values)])
        moves: list[tuple[float, dict[int, int]]] = []
        single = np.where(dl <= slack, dv, -np.inf)
        s1 = int(np.argmax(single))
        moves.append((float(single[s1]), {int(item_dim[s1]): int(s1 - first[item_dim[s1]])}))
        pair = np.where((dl[:, None] + dl[None, :] <= slack) & apart_items, dv[:, None] + dv[None, :], -np.inf)
        p1, p2 = (int(x) for x in np.unravel_index(int(np.argmax(pair)), pair.shape))
        moves.append((float(pair[p1, p2]), {int(item_dim[p1]): int(p1 - first[item_dim[p1]]),
                                            int(item_dim[p2]): int(p2 - first[item_dim[p2]])}))
        for (a, b), ks in shared.items():  # joint change of the terms the two dims share
            joint = np.zeros((len(dims[a].choices), len(dims[b].choices)))
            for k in ks:
                ax = live[k][0]
                sl = cut(k, (a, b))
                joint += sl if ax.index(a) < ax.index(b) else sl.T
            joint = joint - joint[idx[a]][None, :] - joint[:, idx[b]][:, None] + joint[idx[a], idx[b]]
            lat = dl[first[a]:first[a + 1], None] + dl[None, first[b]:first[b + 1]] + p.scale * joint
            gain = np.where(lat <= slack, dv[first[a]:first[a + 1], None] + dv[None, first[b]:first[b + 1]], -np.inf)
            u, w = (int(x) for x in np.unravel_index(int(np.argmax(gain)), gain.shape))
            moves.append((float(gain[u, w]), {a: u, b: w}))
        best_gain, move = max(moves, key=lambda m: m[0])
        if not best_gain > 1e-12 * max(1.0, float(np.abs(dv).max())):
            break
        before = list(idx)
        for a, c in move.items():
            idx[a] = c
        if p.latency(point(), gone) > budget_ms:  # rounding; keep the last feasible point
            idx = before
            break
    return point()


def _solution(p: Problem, widths: dict[str, int], removed: tuple[str, ...], budget_ms: float,
              gap: float | None, solver: str, t0: float, message: str = "", status: str = "optimal"
              ) -> Solution:
    """The plan as a result; the dims of a removed block report their widest choice."""
    widths = {d.name: d.choices[-1] if d.block in removed else widths[d.name] for d in p.dims}
    pred = p.latency(widths, removed)
    sol = Solution(status, widths, removed, pred, p.objective(widths, removed), gap,
                   time.perf_counter() - t0, solver, message=message)
    if pred > budget_ms * (1 + 1e-9) + 1e-12:  # never trust a point the solver calls optimal blindly
        sol.status, sol.message = "error", f"solver point predicts {pred:.6g} ms over the budget {budget_ms:.6g} ms"
    return sol


def _failed(run: backends.Run, solver: str, t0: float) -> Solution:
    if run.status == "infeasible":
        return Solution("infeasible", solver=solver, solve_s=time.perf_counter() - t0,
                        message="the budget is below the smallest achievable latency")
    return Solution(run.status, solver=solver, solve_s=time.perf_counter() - t0, message=run.message)


def min_latency(p: Problem, solver: str = "HIGHS", time_limit_s: float = 60.0) -> float:
    """The smallest latency any point of the problem reaches: from the parts' fastest options
    where the problem splits into small parts (:func:`solvers.decompose.min_latency`), else by
    a MIP."""
    _check_solver(solver)
    if p.excess is not None:
        return _min_latency_excess(p, solver, time_limit_s)
    fastest = decompose.min_latency(restrict(p, dominated(p)))  # dropping dominated choices keeps it
    if fastest is not None:
        return fastest
    m = build(p)
    run = backends.mip(m, None, solver, time_limit_s, False)
    if run.status != "optimal":
        raise SolverError(f"minimum latency: solver status {run.status}")
    return p.latency(*decode(p, m, run.col))


def _min_latency_excess(p: Problem, solver: str, time_limit_s: float) -> float:
    """The smallest latency with an excess charge ``k * max(0, X - C)``: the least of the
    smallest ``L`` with ``X <= C`` and the smallest ``L + k * (X - C)`` with ``X >= C``."""
    e = p.excess
    assert e is not None
    q = p.without_excess()
    m = build(q)
    row, const = _excess_row(p, m)
    below = _with_row(m, row, e.threshold - const)
    past = replace(_with_row(m, -row, const - e.threshold), latency=m.latency + e.ms_per_unit * row,
                   latency0=m.latency0 + e.ms_per_unit * (const - e.threshold))
    t0 = time.perf_counter()
    found = []
    for mm in (below, past):
        run = backends.mip(mm, None, solver, max(MIN_CALL_S, time_limit_s - (time.perf_counter() - t0)), False)
        if run.status == "optimal":
            found.append(p.latency(*decode(q, mm, run.col)))
        elif run.status != "infeasible":
            raise SolverError(f"minimum latency: solver status {run.status}")
    if not found:
        raise SolverError("minimum latency: no point at all")
    return min(found)


class _Clock:
    """The deadline of one solve."""

    def __init__(self, t0: float, limit_s: float) -> None:
        self.deadline = t0 + max(0.0, float(limit_s))

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def out(self) -> bool:
        return self.left() < MIN_CALL_S


def _gap(value: float, bound: float) -> float | None:
    """Relative gap of a point to a proven bound (HiGHS's definition), ``None`` without a bound."""
    if not np.isfinite(bound):
        return None
    return max(0.0, bound - value) / max(abs(value), 1e-12)


def _first_point(p: Problem, budget_ms: float, deadline: float) -> tuple[dict[str, int], tuple[str, ...]] | None:
    """A feasible point without any solve, for when the clock runs out before the first one:
    the narrowest widths with every block kept, else with every removable block removed,
    improved by local search for the time left before ``deadline``."""
    narrow = {d.name: d.choices[0] for d in p.dims}
    for removed in ((), tuple(b.name for b in p.blocks if b.removable)):
        if p.latency(narrow, removed) <= budget_ms:
            return local_search(p, narrow, removed, budget_ms, deadline=deadline), removed
    return None


def solve(p: Problem, budget_ms: float, solver: str = "HIGHS", time_limit_s: float = 60.0,
          verbose: bool = False, reduce: bool = True) -> Solution:
    """The plan keeping the most importance with predicted latency within ``budget_ms``.

    ``reduce``: apply the exact reductions of the module docstring (HiGHS only) before the
    final solve; off, the whole program goes to the solver. ``time_limit_s``: for the whole
    call (see the module docstring); on the limit the best point found comes back with status
    ``time_limit`` and its gap, or no point when none was found in time.
    """
    _check_solver(solver)
    effort = _Effort()
    if p.excess is None:
        sol = _solve(p, budget_ms, solver, time_limit_s, verbose, reduce, effort)
    else:
        sol = _solve_excess(p, budget_ms, solver, time_limit_s, verbose, reduce, effort)
    sol.nodes, sol.lp_iterations = effort.nodes, effort.iterations
    return sol


def _excess_row(p: Problem, m: Matrix) -> tuple[np.ndarray, float]:
    """The excess sum of ``p`` over the columns of ``m`` (built from ``p`` without its excess):
    ``row @ col + const``."""
    x = build(p.excess_problem())
    if x.n != m.n:
        raise AssertionError(f"excess program has {x.n} columns, the latency program {m.n}")
    return x.latency, x.latency0


def _with_row(m: Matrix, row: np.ndarray, rhs: float) -> Matrix:
    """``m`` with one more constraint ``row @ col <= rhs``."""
    return replace(m, ub=sp.vstack([m.ub, sp.csr_matrix(row.reshape(1, -1))]).tocsr(),
                   ub_rhs=np.append(m.ub_rhs, rhs))


def _solve_excess(p: Problem, budget_ms: float, solver: str, time_limit_s: float, verbose: bool,
                  reduce: bool, effort: _Effort) -> Solution:
    """The plan under ``budget_ms`` where latency carries an excess charge ``k * max(0, X - C)``.

    Latency within the budget means both ``L <= budget`` and ``L + k * (X - C) <= budget``
    (``L``: the latency without the charge). Each alone is a relaxation of one knapsack row,
    which :func:`_solve` solves exactly with all its reductions; where the optimum of either
    meets the other, it is the optimum. Otherwise (the budget falls where the charge starts)
    the program with both rows goes to the MIP solver whole, started from the best point found."""
    t0 = time.perf_counter()
    clock = _Clock(t0, time_limit_s)
    best: tuple[float, dict[str, int], tuple[str, ...]] | None = None
    plain = p.without_excess()
    for q in (plain, p.excess_folded()):
        sol = _solve(q, budget_ms, solver, clock.left(), verbose, reduce, effort)
        if sol.status == "infeasible":  # a relaxation without a point: none at all
            return _infeasible(p, solver, t0, clock)
        if sol.widths and p.latency(sol.widths, sol.removed) <= budget_ms:
            if sol.status == "optimal":
                return _solution(p, sol.widths, sol.removed, budget_ms, sol.gap, solver, t0, sol.message)
            if best is None or sol.objective > best[0]:
                best = (sol.objective, sol.widths, sol.removed)
        if clock.out():
            break
    if not clock.out():
        e = p.excess
        assert e is not None
        m = build(plain)
        row, const = _excess_row(p, m)
        m = _with_row(m, m.latency + e.ms_per_unit * row,
                      budget_ms - m.latency0 - e.ms_per_unit * (const - e.threshold))
        start = encode(plain, m, best[1], best[2]) if best is not None else None
        run = backends.mip(m, budget_ms, solver, clock.left(), verbose, start=start)
        effort.add(run)
        if run.status == "infeasible":
            return _infeasible(p, solver, t0, clock)
        if run.col.size and run.status in ("optimal", "time_limit"):
            w, rem = decode(plain, m, run.col)
            fits = p.latency(w, rem) <= budget_ms
            if fits and (best is None or p.objective(w, rem) >= best[0]):
                best = (p.objective(w, rem), w, rem)
            if run.status == "optimal":  # a point over the budget once recomputed is reported as an error
                point = best if best is not None else (p.objective(w, rem), w, rem)
                return _solution(p, point[1], point[2], budget_ms, run.gap, solver, t0, run.message)
        elif run.status not in ("optimal", "time_limit"):
            return _failed(run, solver, t0)
    if best is None:
        return Solution("time_limit", solver=solver, solve_s=time.perf_counter() - t0, message=NO_POINT)
    return _solution(p, best[1], best[2], budget_ms, None, solver, t0,
                     "time limit: best point found, not proven optimal", status="time_limit")


class _Effort:
    """HiGHS's nodes and simplex iterations summed over the calls of one solve."""

    def __init__(self) -> None:
        self.nodes = 0
        self.iterations = 0

    def add(self, run: backends.Run | backends.Relaxation) -> None:
        self.nodes += run.nodes if isinstance(run, backends.Run) else 0
        self.iterations += run.iterations


def _solve(p: Problem, budget_ms: float, solver: str, time_limit_s: float, verbose: bool, reduce: bool,
           effort: _Effort) -> Solution:
    t0 = time.perf_counter()
    clock = _Clock(t0, time_limit_s)
    chain = _Chain(p)
    incumbent: tuple[float, dict[str, int], tuple[str, ...]] | None = None
    bound = np.inf  # proven upper bound on the objective of the original problem
    lam = 0.0  # the LP's budget multiplier, for the enumeration's bound
    tried: tuple[object, ...] = ()  # the last LP-support problem solved: the same support need not be redone

    def offer(w: dict[str, int], rem: tuple[str, ...]) -> bool:
        """Keep the point if it fits the budget (recomputed from the tables) and is the best so
        far; whether it fits."""
        nonlocal incumbent
        v = p.objective(w, rem)
        if p.latency(w, rem) > budget_ms:
            return False
        if incumbent is None or v > incumbent[0]:
            incumbent = (v, w, rem)
        return True

    def enumerated(found: decompose.Result) -> bool:
        """Whether the enumeration proved the incumbent (or the point it found) optimal: a point
        over the budget once recomputed (rounding) proves nothing."""
        fits = offer(*chain.lift(found.widths, found.removed)) if found.widths else True
        return found.status == "optimal" and fits

    def out_of_time(message: str = "") -> Solution:
        if incumbent is None and (first := _first_point(p, budget_ms, clock.deadline + FIRST_POINT_S)) is not None:
            offer(*first)
        if incumbent is None:
            return Solution("time_limit", solver=solver, solve_s=time.perf_counter() - t0,
                            message=message or NO_POINT)
        return _solution(p, incumbent[1], incumbent[2], budget_ms, _gap(incumbent[0], max(bound, incumbent[0])),
                         solver, t0, "time limit: best point found, not proven optimal", status="time_limit")

    if reduce:
        chain.apply(dominated(p, clock.deadline))
    if reduce and solver == "HIGHS":
        for round_ in range(MAX_ROUNDS):
            if clock.out():
                break
            q = chain.current
            m = build(q)
            rx = backends.relax(m, budget_ms, clock.left(), primal=round_ > 0)
            effort.add(rx)
            if rx.status == "infeasible":  # no point at all, the LP relaxation proves it
                return _infeasible(p, solver, t0, clock)
            if rx.status == "time_limit":
                break
            if rx.status != "optimal":
                return Solution("error", solver=solver, solve_s=time.perf_counter() - t0,
                                message=f"LP relaxation: {rx.status}")
            # the LP bound of a reduced problem holds for every point better than the incumbent
            bound = min(bound, max(rx.bound, incumbent[0] if incumbent is not None else -np.inf))
            lam = rx.budget_dual
            r = _support(q, m, rx.col)
            small = restrict(q, r)
            ms = build(small)
            key = (tuple(d.choices for d in small.dims), tuple(sorted(small.removable())))
            if key != tried and not clock.out():
                run = backends.mip(ms, budget_ms, solver, min(clock.left(), SUPPORT_MIP_S), False)
                effort.add(run)
                tried = key
                if run.col.size and run.status in ("optimal", "time_limit"):
                    w, rem = lift(q, r, *decode(small, ms, run.col))
                    if q.latency(w, rem) <= budget_ms:
                        w = local_search(q, w, rem, budget_ms, deadline=clock.deadline)
                    offer(*chain.lift(w, rem))
            if incumbent is None:
                break
            before = _size(q)
            chain.apply(_fixing(q, m, rx, incumbent[0] - 1e-9 * max(1.0, abs(incumbent[0]))))
            if clock.out():
                break
            # a cheap try at the enumeration before another LP (which may cost more than it)
            found = decompose.solve(chain.current, budget_ms, incumbent[0], lam, clock.deadline, EARLY_FRONT,
                                    EARLY_HEADS)
            if enumerated(found):
                return _solution(p, incumbent[1], incumbent[2], budget_ms, 0.0, solver, t0, ENUMERATED)
            # stop once fixing stalls; after the first LP only when the shared widths are few (the
            # enumeration copes): dual simplex's duals fix little, primal simplex's far more
            if _size(chain.current) > 0.95 * before and (round_ > 0 or _shared_grid(chain.current) <= SHARED_FEW):
                break
    if clock.out():
        return out_of_time()
    q = chain.current
    if reduce and solver == "HIGHS":
        best = incumbent[0] if incumbent is not None else -np.inf
        found = decompose.solve(q, budget_ms, best, lam, clock.deadline)
        if enumerated(found):
            if incumbent is None:  # nothing better than nothing: no point at all
                return _infeasible(p, solver, t0, clock)
            return _solution(p, incumbent[1], incumbent[2], budget_ms, 0.0, solver, t0, ENUMERATED)
        if found.status == "infeasible" and incumbent is None:
            return _infeasible(p, solver, t0, clock)
        if found.status == "time_limit" or clock.out():
            return out_of_time()
        if incumbent is not None and incumbent[0] > best:  # a better incumbent fixes more
            m = build(q)
            rx = backends.relax(m, budget_ms, clock.left(), primal=True)
            effort.add(rx)
            if rx.status == "optimal":
                chain.apply(_fixing(q, m, rx, incumbent[0] - 1e-9 * max(1.0, abs(incumbent[0]))))
                q = chain.current
    m = build(q)
    start = None
    if incumbent is not None:
        start = encode(q, m, incumbent[1], tuple(b for b in incumbent[2] if b in m.removed_col))
    run = backends.mip(m, budget_ms, solver, clock.left(), verbose, start=start,
                       presolve=m.n > PRESOLVE_ABOVE_COLUMNS or not reduce)
    effort.add(run)
    point = None
    if run.col.size and run.status in ("optimal", "time_limit"):
        point = chain.lift(*decode(q, m, run.col))
        offer(*point)
    if run.status == "time_limit":
        if np.isfinite(run.bound):
            bound = min(bound, max(run.bound, incumbent[0] if incumbent is not None else -np.inf))
        return out_of_time()
    if run.status == "infeasible":
        return _infeasible(p, solver, t0, clock)
    if run.status != "optimal" or point is None:
        return _failed(run, solver, t0)
    w, rem = (incumbent[1], incumbent[2]) if incumbent is not None else point  # no incumbent: over budget
    return _solution(p, w, rem, budget_ms, run.gap, solver, t0, run.message)


def _infeasible(p: Problem, solver: str, t0: float, clock: _Clock) -> Solution:
    """No point within the budget; the smallest reachable latency when there is time to find it."""
    sol = Solution("infeasible", solver=solver, solve_s=time.perf_counter() - t0,
                   message="the budget is below the smallest achievable latency")
    if not clock.out():
        with contextlib.suppress(SolverError):  # out of time for it: the status stands without it
            sol.min_latency_ms = min_latency(p, solver, clock.left())
    sol.solve_s = time.perf_counter() - t0
    return sol
