"""Exact mixed-integer program: widths and kept blocks that keep the most importance under a budget.

The program itself is in :mod:`solvers.matrix`. Before the final solve, exact reductions
shrink it (HiGHS only; other solvers get the whole program):

1. drop dominated choices (:func:`solvers.reduce.dominated`);
2. solve the LP relaxation; a small MIP over the choices the LP uses gives a feasible
   point, improved greedily (cheapest importance per millisecond that still fits);
3. fix by bounds: a choice (or a block's removal) whose Lagrangian bound from the LP duals is
   below the incumbent cannot be part of a better point, so it is dropped; repeat 2-3 on the
   smaller problem while it shrinks;
4. solve the MIP on what is left, started from the incumbent.

Every point at least as good as the incumbent survives step 3, so the final optimum is the
optimum of the original problem, with the final solver's proven gap.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import cvxpy as cp
import numpy as np

from solvers import backends
from solvers.matrix import Matrix, build, decode, encode
from solvers.problem import Problem, Solution, SolverError
from solvers.reduce import Restriction, dominated, lift, restrict

MIP_SOLVERS = ("HIGHS", "SCIP", "GUROBI", "CPLEX", "MOSEK", "XPRESS", "CBC", "GLPK_MI", "SCIPY")
MAX_ROUNDS = 4
SUPPORT_EPS = 1e-9


def mip_solvers() -> list[str]:
    """Installed solvers that take integer variables (HiGHS through highspy, others through CVXPY)."""
    return [s for s in MIP_SOLVERS if s in cp.installed_solvers()]


def _check_solver(solver: str) -> None:
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


def _size(p: Problem) -> int:
    return sum(len(d.choices) for d in p.dims) + len(p.removable())


def greedy_fill(p: Problem, widths: dict[str, int], removed: Iterable[str], budget_ms: float
                ) -> dict[str, int]:
    """Widen dims of a feasible point while the budget allows, best importance per millisecond
    first (removed blocks stay removed)."""
    gone = set(removed)
    dims = {d.name: d for d in p.dims}
    idx = {n: dims[n].choices.index(w) for n, w in widths.items()}
    live = [t for t in p.terms if t.block not in gone and not any(dims[n].block in gone for n in t.dims)]
    uses: dict[str, list[tuple[np.ndarray, int, tuple[str, ...]]]] = {d.name: [] for d in p.dims}
    for t in live:
        for axis, n in enumerate(t.dims):
            uses[n].append((np.asarray(t.table, dtype=np.float64), axis, t.dims))
    slack = budget_ms - p.latency({n: dims[n].choices[i] for n, i in idx.items()}, gone)
    while True:
        best: tuple[float, str, int, float] | None = None
        for d in p.dims:
            if d.block in gone or idx[d.name] == len(d.choices) - 1:
                continue
            row = np.zeros(len(d.choices))
            for table, axis, names in uses[d.name]:
                sel = tuple(slice(None) if k == axis else idx[n] for k, n in enumerate(names))
                row = row + table[sel]
            cur = idx[d.name]
            dlat = p.scale * (row[cur + 1:] - row[cur])
            dval = np.asarray(d.value, dtype=np.float64)[cur + 1:] - float(d.value[cur])
            fits = dlat <= slack
            if not fits.any():
                continue
            ratio = np.where(fits, dval / np.maximum(dlat, 1e-300), -np.inf)
            k = int(np.argmax(ratio))
            if dval[k] > 0 and (best is None or ratio[k] > best[0]):
                best = (float(ratio[k]), d.name, cur + 1 + k, float(dlat[k]))
        if best is None:
            break
        _, name, new, dlat_ = best
        idx[name] = new
        slack -= dlat_
    out = {n: dims[n].choices[i] for n, i in idx.items()}
    return out if p.latency(out, gone) <= budget_ms else dict(widths)


def _solution(p: Problem, widths: dict[str, int], removed: tuple[str, ...], budget_ms: float,
              gap: float | None, solver: str, t0: float, message: str = "") -> Solution:
    pred = p.latency(widths, removed)
    sol = Solution("optimal", widths, removed, pred, p.objective(widths, removed), gap,
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
    """The smallest latency any point of the problem reaches."""
    _check_solver(solver)
    m = build(p)
    run = backends.mip(m, None, solver, time_limit_s, False)
    if run.status != "optimal":
        raise SolverError(f"minimum latency: solver status {run.status}")
    return p.latency(*decode(p, m, run.col))


def solve(p: Problem, budget_ms: float, solver: str = "HIGHS", time_limit_s: float = 60.0,
          verbose: bool = False, reduce: bool = True) -> Solution:
    """The plan keeping the most importance with predicted latency within ``budget_ms``.

    ``reduce``: apply the exact reductions of the module docstring (HiGHS only) before the
    final solve; off, the whole program goes to the solver.
    """
    _check_solver(solver)
    t0 = time.perf_counter()
    deadline = t0 + time_limit_s
    chain = _Chain(p)
    incumbent: tuple[float, dict[str, int], tuple[str, ...]] | None = None
    if reduce:
        chain.apply(dominated(p))
    if reduce and solver == "HIGHS":
        for _ in range(MAX_ROUNDS):
            q = chain.current
            m = build(q)
            rx = backends.relax(m, budget_ms, max(deadline - time.perf_counter(), 1.0))
            if rx.status == "infeasible":  # no point at all, the LP relaxation proves it
                return Solution("infeasible", solver=solver, solve_s=time.perf_counter() - t0,
                                min_latency_ms=min_latency(p, solver, time_limit_s),
                                message="the budget is below the smallest achievable latency")
            if rx.status != "optimal":
                return Solution("error", solver=solver, solve_s=time.perf_counter() - t0,
                                message=f"LP relaxation: {rx.status}")
            r = _support(q, m, rx.col)
            small = restrict(q, r)
            ms = build(small)
            run = backends.mip(ms, budget_ms, solver, max(deadline - time.perf_counter(), 1.0), False)
            if run.status == "optimal":
                w, rem = lift(q, r, *decode(small, ms, run.col))
                w = greedy_fill(q, w, rem, budget_ms)
                w, rem = chain.lift(w, rem)
                v = p.objective(w, rem)
                if p.latency(w, rem) <= budget_ms and (incumbent is None or v > incumbent[0]):
                    incumbent = (v, w, rem)
            if incumbent is None:
                break
            before = _size(q)
            chain.apply(_fixing(q, m, rx, incumbent[0] - 1e-9 * max(1.0, abs(incumbent[0]))))
            if _size(chain.current) > 0.9 * before:
                break
    q = chain.current
    m = build(q)
    start = None
    if incumbent is not None:
        start = encode(q, m, incumbent[1], tuple(b for b in incumbent[2] if b in m.removed_col))
    run = backends.mip(m, budget_ms, solver, max(deadline - time.perf_counter(), 1.0), verbose, start=start)
    if run.status != "optimal":
        if incumbent is not None and run.status == "time_limit":
            sol = _solution(p, incumbent[1], incumbent[2], budget_ms, None, solver, t0,
                            "time limit: best point found, not proven optimal")
            sol.status = "time_limit"
            return sol
        sol = _failed(run, solver, t0)
        if sol.status == "infeasible":
            sol.min_latency_ms = min_latency(p, solver, time_limit_s)
        return sol
    widths, removed = chain.lift(*decode(q, m, run.col))
    if incumbent is not None and p.objective(widths, removed) < incumbent[0]:
        widths, removed = incumbent[1], incumbent[2]
    sol = _solution(p, widths, removed, budget_ms, run.gap, solver, t0, run.message)
    return sol
