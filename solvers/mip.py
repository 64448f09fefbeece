"""Exact mixed-integer program: widths and kept blocks that keep the most importance under a budget.

Formulation (built with CVXPY, solved by HiGHS by default):
- one-hot binaries ``x_d`` over each dim's choices; a dim private to a removable block gets
  one more state, "removed", tied to the block's keep/remove one-hot ``k_b``;
- a term over several dims uses a continuous joint variable ``z >= 0`` over the product of
  their states, constrained by its marginals (summing ``z`` over all axes but one gives that
  dim's one-hot vector). For one-hot marginals the only feasible ``z`` is the indicator of
  the chosen cell, so the linearisation is exact, and its LP relaxation is far tighter than
  McCormick envelopes. A term of a removable block with no private dim takes ``k_b`` as an
  extra axis; a removed state contributes no latency;
- maximise kept importance subject to ``scale * (fixed + sum of terms) + offset <= budget``.
A shared dim that appears in most terms (a ViT's embedding width) can instead be enumerated
outside the program: one smaller solve per choice with that dim fixed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import cvxpy as cp
import numpy as np
import scipy.sparse as sp

from solvers.problem import Problem, Solution, SolverDim, SolverError, SolverTerm

MIP_SOLVERS = ("HIGHS", "SCIP", "GUROBI", "CPLEX", "MOSEK", "XPRESS", "CBC", "GLPK_MI", "SCIPY")
REL_GAP = 1e-7


def mip_solvers() -> list[str]:
    """Installed CVXPY solvers that take integer variables."""
    return [s for s in MIP_SOLVERS if s in cp.installed_solvers()]


def _marginal(shape: tuple[int, ...], axis: int) -> sp.csr_matrix:
    n = int(np.prod(shape))
    rows = np.unravel_index(np.arange(n), shape)[axis]
    return sp.csr_matrix((np.ones(n), (rows, np.arange(n))), shape=(shape[axis], n))


@dataclass
class _Model:
    x: dict[str, cp.Variable]
    keep: dict[str, cp.Variable]
    constraints: list[Any]
    importance: Any
    latency: Any


def _build(p: Problem) -> _Model:
    removable = p.removable()
    dims = {d.name: d for d in p.dims}
    cons: list[Any] = []
    keep = {b: cp.Variable(2, boolean=True, name=f"keep[{b}]") for b in sorted(removable)}  # [kept, removed]
    cons += [cp.sum(k) == 1 for k in keep.values()]
    x: dict[str, cp.Variable] = {}
    importance: Any = 0.0
    for d in p.dims:
        private = d.block in removable
        x[d.name] = cp.Variable(len(d.choices) + int(private), boolean=True, name=d.name)
        cons.append(cp.sum(x[d.name]) == 1)
        value = np.asarray(d.value, dtype=np.float64)
        if private:
            cons.append(x[d.name][-1] == keep[d.block][1])  # type: ignore[index]
            value = np.append(value, 0.0)
        importance = importance + value @ x[d.name]
    for b in p.blocks:
        if b.removable and b.value:
            importance = importance + float(b.value) * keep[b.name][0]
    latency: Any = float(p.fixed_ms)
    for t in p.terms:
        table = np.asarray(t.table, dtype=np.float64)
        axes: list[cp.Variable] = []
        for k, name in enumerate(t.dims):
            axes.append(x[name])
            if dims[name].block in removable:
                pad = [(0, 0)] * table.ndim
                pad[k] = (0, 1)
                table = np.pad(table, pad)
        if t.block in removable and not any(dims[n].block == t.block for n in t.dims):
            table = np.stack([table, np.zeros_like(table)], axis=-1)
            axes.append(keep[t.block])  # type: ignore[index]
        if not axes:
            latency = latency + float(table)
        elif len(axes) == 1:
            latency = latency + table @ axes[0]
        else:
            z = cp.Variable(table.size, nonneg=True, name=f"z[{t.name}]")
            cons += [_marginal(table.shape, a) @ z == v for a, v in enumerate(axes)]
            latency = latency + table.ravel() @ z
    return _Model(x, keep, cons, importance, p.scale * latency + p.offset)


def _point(p: Problem, m: _Model) -> tuple[dict[str, int], tuple[str, ...]]:
    removed = tuple(b for b, k in m.keep.items() if k.value is not None and k.value[1] > 0.5)
    widths = {}
    for d in p.dims:
        i = int(np.argmax(np.asarray(m.x[d.name].value)))
        widths[d.name] = d.choices[min(i, len(d.choices) - 1)]
    return widths, removed


def _check_solver(solver: str) -> None:
    if solver not in mip_solvers():
        raise SolverError(f"solver {solver!r} is not an installed mixed-integer solver; "
                          f"installed: {', '.join(mip_solvers()) or 'none'}")


def _run(prob: cp.Problem, solver: str, time_limit_s: float, verbose: bool) -> float | None:
    """Solve; returns the proven relative gap where the solver reports it."""
    opts: dict[str, Any] = {}
    if solver == "HIGHS":
        opts = {"time_limit": float(time_limit_s), "mip_rel_gap": REL_GAP, "output_flag": verbose}
    prob.solve(solver=solver, verbose=verbose, **opts)
    stats = prob.solver_stats.extra_stats if prob.solver_stats is not None else None
    gap = getattr(stats, "mip_gap", None)
    return float(gap) if gap is not None and np.isfinite(gap) else None


def min_latency(p: Problem, solver: str = "HIGHS", time_limit_s: float = 60.0) -> float:
    """The smallest latency any point of the problem reaches."""
    _check_solver(solver)
    m = _build(p)
    prob = cp.Problem(cp.Minimize(m.latency), m.constraints)
    _run(prob, solver, time_limit_s, False)
    if prob.status not in ("optimal", "optimal_inaccurate"):
        raise SolverError(f"minimum latency: solver status {prob.status}")
    return p.latency(*_point(p, m))


def _solve_direct(p: Problem, budget_ms: float, solver: str, time_limit_s: float, verbose: bool) -> Solution:
    t0 = time.perf_counter()
    m = _build(p)
    prob = cp.Problem(cp.Maximize(m.importance), [*m.constraints, m.latency <= budget_ms])
    try:
        gap = _run(prob, solver, time_limit_s, verbose)
    except cp.SolverError as exc:
        return Solution("error", solver=solver, solve_s=time.perf_counter() - t0, message=str(exc))
    status = prob.status
    if status in ("infeasible", "infeasible_inaccurate"):
        return Solution("infeasible", solver=solver, solve_s=time.perf_counter() - t0,
                        message="the budget is below the smallest achievable latency")
    if status == "user_limit" or (status not in ("optimal", "optimal_inaccurate")):
        return Solution("time_limit" if "limit" in str(status) else "error", solver=solver,
                        solve_s=time.perf_counter() - t0, message=f"solver status {status}")
    widths, removed = _point(p, m)
    pred = p.latency(widths, removed)
    sol = Solution("optimal", widths, removed, pred, p.objective(widths, removed), gap,
                   time.perf_counter() - t0, solver)
    if pred > budget_ms * (1 + 1e-9) + 1e-12:  # never trust a point the solver calls optimal blindly
        sol.status, sol.message = "error", f"solver point predicts {pred:.6g} ms over the budget {budget_ms:.6g} ms"
    elif status == "optimal_inaccurate":
        sol.message = "solver reported optimal_inaccurate; the point was checked against the budget"
    return sol


def fix_dim(p: Problem, name: str, index: int) -> Problem:
    """The problem with dim ``name`` fixed at its ``index``-th choice (tables sliced, value folded)."""
    d = next(d for d in p.dims if d.name == name)
    if d.block is not None:
        raise SolverError(f"only shared dims can be enumerated; {name} belongs to {d.block}")
    dims = [SolverDim(q.name, q.choices, q.value, q.block) for q in p.dims if q.name != name]
    fixed = float(p.fixed_ms)
    terms = []
    for t in p.terms:
        if name not in t.dims:
            terms.append(t)
            continue
        table = np.take(np.asarray(t.table), index, axis=t.dims.index(name))
        rest = tuple(n for n in t.dims if n != name)
        if rest or t.block is not None:
            terms.append(SolverTerm(t.name, rest, table, t.block))
        else:
            fixed += float(table)
    # The fixed dim's importance is a constant: carry it as a one-choice dummy dim.
    dims.append(SolverDim(f"{name}#fixed", (d.choices[index],), np.array([float(d.value[index])])))
    return Problem(dims, p.blocks, terms, fixed, p.scale, p.offset)


def auto_enumerate(p: Problem) -> str | None:
    """A shared dim used by most terms (e.g. a ViT embedding width), worth enumerating."""
    counts = {d.name: sum(d.name in t.dims for t in p.terms) for d in p.dims if d.block is None}
    if not counts:
        return None
    name, n = max(counts.items(), key=lambda kv: kv[1])
    three = sum(len(t.dims) == 3 and name in t.dims for t in p.terms)
    return name if n >= 0.5 * len(p.terms) and three > 0 else None


def solve(p: Problem, budget_ms: float, solver: str = "HIGHS", time_limit_s: float = 60.0,
          verbose: bool = False, enumerate_dim: str | None | bool = None) -> Solution:
    """The plan keeping the most importance with predicted latency within ``budget_ms``.

    ``enumerate_dim``: a shared dim to enumerate outside the program, ``"auto"`` to pick one
    when it pays (a dim in most terms, among them three-dim ones), or ``None``/``False``.
    """
    _check_solver(solver)
    name = auto_enumerate(p) if enumerate_dim == "auto" else (enumerate_dim or None)
    t0 = time.perf_counter()
    if not name:
        sol = _solve_direct(p, budget_ms, solver, time_limit_s, verbose)
    else:
        d = next(d for d in p.dims if d.name == name)
        best: Solution | None = None
        gaps: list[float] = []
        for i in range(len(d.choices)):
            sub = _solve_direct(fix_dim(p, name, i), budget_ms, solver, time_limit_s, verbose)
            if sub.status in ("error", "time_limit"):
                return sub
            if sub.status == "optimal":
                gaps.append(sub.gap or 0.0)
                sub.widths = {k: v for k, v in sub.widths.items() if k != f"{name}#fixed"}
                sub.widths[name] = d.choices[i]
                if best is None or sub.objective > best.objective + 1e-12:
                    best = sub
        sol = best if best is not None else Solution("infeasible", solver=solver,
                                                     message="the budget is below the smallest achievable latency")
        if best is not None:
            sol.gap = max(gaps) if gaps else None
            sol.message = f"{name} enumerated over {len(d.choices)} choices"
    sol.solve_s = time.perf_counter() - t0
    if sol.status == "infeasible":
        sol.min_latency_ms = min_latency(p, solver, time_limit_s)
    return sol
