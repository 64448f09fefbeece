"""Run a :class:`~solvers.matrix.Matrix`: HiGHS through highspy (LP with duals, MIP with a
start point), any other mixed-integer solver through CVXPY."""

from __future__ import annotations

import functools
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from solvers.matrix import Matrix

REL_GAP = 1e-7
# HiGHS stops some time after its limit (presolve probing, a node's LP): it gets this share of
# the time left, so that the caller's limit holds.
HIGHS_SHARE = 0.8
HIGHS_RESERVE_S = 0.05
# HiGHS's MIP presolve probing does not look at the clock often (0.3 s over a 0.4 s limit on a
# 20k-column program here): off when less time than this is left.
PROBING_ABOVE_S = 5.0
PRESOLVE_PROBING = 1 << 15  # its bit in presolve_rule_off
# HiGHS's primal heuristics: sub-MIPs and LPs that look for better points. Given a start that
# is already (near) optimal they are wasted work (resnet50 with block shares at 20% of dense:
# 31k simplex iterations with them, 13k without, same 47 nodes), so off when a start is given.
HEURISTICS = ("mip_heuristic_run_rins", "mip_heuristic_run_rens", "mip_heuristic_run_root_reduced_cost",
              "mip_heuristic_run_feasibility_jump")


@dataclass
class Run:
    """``status``: optimal, infeasible, time_limit or error. ``objective`` includes the constant;
    ``bound`` is the proven bound on it, where known."""

    status: str
    col: np.ndarray
    objective: float = float("nan")
    bound: float = float("nan")
    gap: float | None = None
    message: str = ""
    nodes: int = 0  # HiGHS branch-and-bound nodes and simplex iterations: effort that timing noise leaves alone
    iterations: int = 0


def _effort(h: Any) -> tuple[int, int]:
    """Branch-and-bound nodes and simplex iterations of a HiGHS run (0 where not reported)."""
    info = h.getInfo()
    return max(0, int(info.mip_node_count)), max(0, int(info.simplex_iteration_count))


def _rows(m: Matrix, budget: float | None) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    blocks = [m.eq, m.ub]
    lo = [m.eq_rhs, np.full(len(m.ub_rhs), -np.inf)]
    hi = [m.eq_rhs, m.ub_rhs]
    if budget is not None:
        blocks.append(sp.csr_matrix(m.latency.reshape(1, -1)))
        lo.append(np.array([-np.inf]))
        hi.append(np.array([budget - m.latency0]))
    return sp.vstack(blocks).tocsr(), np.concatenate(lo), np.concatenate(hi)


@functools.cache
def _banner_swallowed() -> bool:
    """HiGHS prints a banner on the C-level stdout when its first instance in a process is made,
    before any option can turn output off; make that first instance with stdout on /dev/null,
    so the output of the programs that solve stays theirs."""
    import highspy

    sys.stdout.flush()
    saved, null = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    try:
        highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)
    return True


def _highs(m: Matrix, budget: float | None, integral: bool, time_limit_s: float, verbose: bool,
           start: np.ndarray | None = None, presolve: bool = True, primal: bool = False
           ) -> tuple[Any, sp.csr_matrix, np.ndarray, np.ndarray]:
    import highspy

    t_in = time.perf_counter()
    a, lo, hi = _rows(m, budget)
    csc = a.tocsc()
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = m.n, a.shape[0]
    if budget is None:  # minimum latency
        lp.col_cost_ = m.latency
        lp.sense_ = highspy.ObjSense.kMinimize
    else:
        lp.col_cost_ = m.value
        lp.sense_ = highspy.ObjSense.kMaximize
    lp.col_lower_ = np.zeros(m.n)
    lp.col_upper_ = np.ones(m.n)
    lp.row_lower_, lp.row_upper_ = lo, hi
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = csc.indptr, csc.indices, csc.data
    if integral:
        lp.integrality_ = [highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous
                           for i in m.integer]
    _banner_swallowed()
    h = highspy.Highs()
    h.setOptionValue("output_flag", bool(verbose))
    h.setOptionValue("mip_rel_gap", REL_GAP)
    h.setOptionValue("presolve", "on" if presolve else "off")
    if primal:
        h.setOptionValue("simplex_strategy", 4)
    h.passModel(lp)
    if start is not None:
        idx = np.flatnonzero(m.integer)
        h.setSolution(len(idx), idx.astype(np.int32), np.asarray(start, dtype=np.float64)[idx])
        for name in HEURISTICS:
            h.setOptionValue(name, False)
    left = float(time_limit_s) - (time.perf_counter() - t_in)  # building the model took some of it
    h.setOptionValue("time_limit", max(1e-3, HIGHS_SHARE * left - HIGHS_RESERVE_S))
    if integral and presolve and left < PROBING_ABOVE_S:
        h.setOptionValue("presolve_rule_off", PRESOLVE_PROBING)  # probing overruns a short limit
    h.run()
    return h, a, lo, hi


def _status(h: Any) -> str:
    import highspy

    s = h.getModelStatus()
    if s == highspy.HighsModelStatus.kOptimal:
        return "optimal"
    if s == highspy.HighsModelStatus.kInfeasible:
        return "infeasible"
    if s in (highspy.HighsModelStatus.kTimeLimit, highspy.HighsModelStatus.kIterationLimit):
        return "time_limit"
    return "error"


@dataclass
class Relaxation:
    """The LP relaxation under a budget, with a bound valid for every point of the box for
    each column forced to one (``bound_one``) or to zero (``bound_zero``)."""

    status: str
    col: np.ndarray
    bound: float
    bound_one: np.ndarray
    bound_zero: np.ndarray
    budget_dual: float = 0.0  # the multiplier of the budget row in those bounds (>= 0)
    iterations: int = 0  # simplex iterations


def relax(m: Matrix, budget: float, time_limit_s: float, primal: bool = False) -> Relaxation:
    """LP relaxation and Lagrangian bounds from its row duals (recomputed here, so valid for
    whatever duals the LP returns). ``primal``: primal simplex, whose duals fix far more choices
    than dual simplex's on these programs, though it is slower on a large LP (measured on
    resnet50 at 50% of dense: 0.9k columns left instead of 5.2k after the second round)."""
    h, a, lo, hi = _highs(m, budget, False, time_limit_s, False, presolve=False, primal=primal)
    status = _status(h)
    empty = np.zeros(0)
    _, iterations = _effort(h)
    if status != "optimal":
        return Relaxation(status, empty, float("nan"), empty, empty, iterations=iterations)
    sol = h.getSolution()
    col = np.asarray(sol.col_value)
    best: tuple[float, np.ndarray, float] | None = None
    for sign in (1.0, -1.0):
        y = sign * np.asarray(sol.row_dual)
        y = np.where((y > 0) & ~np.isfinite(hi), 0.0, y)
        y = np.where((y < 0) & ~np.isfinite(lo), 0.0, y)
        rows = np.where(y > 0, y * np.where(np.isfinite(hi), hi, 0.0), y * np.where(np.isfinite(lo), lo, 0.0))
        d = m.value - a.T @ y
        bound = float(rows.sum() + np.maximum(d, 0.0).sum())
        if best is None or bound < best[0]:
            best = (bound, d, float(y[-1]))  # the budget row is the last (see _rows)
    assert best is not None
    bound, d, lam = best
    bound += m.value0
    return Relaxation("optimal", col, bound, bound - np.maximum(d, 0.0) + d, bound - np.maximum(d, 0.0),
                      max(lam, 0.0), iterations)


def mip(m: Matrix, budget: float | None, solver: str, time_limit_s: float, verbose: bool,
        start: np.ndarray | None = None, presolve: bool = True) -> Run:
    """Maximise importance under ``budget``, or minimise latency when ``budget`` is ``None``."""
    if solver != "HIGHS":
        return _cvxpy(m, budget, solver, time_limit_s, verbose)
    h, *_ = _highs(m, budget, True, time_limit_s, verbose, start=start, presolve=presolve)
    status = _status(h)
    nodes, iterations = _effort(h)
    if status not in ("optimal", "time_limit") or not h.getSolution().value_valid:
        return Run(status if status != "time_limit" else "time_limit", np.zeros(0),
                   message=f"HiGHS status {h.modelStatusToString(h.getModelStatus())}", nodes=nodes,
                   iterations=iterations)
    info = h.getInfo()
    const = m.value0 if budget is not None else m.latency0
    gap = float(info.mip_gap)
    return Run(status, np.asarray(h.getSolution().col_value), float(info.objective_function_value) + const,
               float(info.mip_dual_bound) + const, gap if np.isfinite(gap) else None, nodes=nodes,
               iterations=iterations)


def _cvxpy(m: Matrix, budget: float | None, solver: str, time_limit_s: float, verbose: bool) -> Run:
    import cvxpy as cp

    a, lo, hi = _rows(m, budget)
    ints, conts = np.flatnonzero(m.integer), np.flatnonzero(~m.integer)
    xb = cp.Variable(len(ints), boolean=True)
    xc = cp.Variable(len(conts), nonneg=True) if len(conts) else None

    def lin(mat: Any) -> Any:
        out = mat[:, ints] @ xb
        return out + mat[:, conts] @ xc if xc is not None else out

    cons: list[Any] = []
    eq = np.isfinite(lo) & (lo == hi)
    if eq.any():
        cons.append(lin(a[np.flatnonzero(eq)]) == lo[eq])
    up = ~eq & np.isfinite(hi)
    if up.any():
        cons.append(lin(a[np.flatnonzero(up)]) <= hi[up])
    if xc is not None:
        cons.append(xc <= 1)
    if budget is None:
        obj: Any = cp.Minimize(m.latency[ints] @ xb + (m.latency[conts] @ xc if xc is not None else 0))
    else:
        obj = cp.Maximize(m.value[ints] @ xb + (m.value[conts] @ xc if xc is not None else 0))
    prob = cp.Problem(obj, cons)
    try:
        prob.solve(solver=solver, verbose=verbose, **_time_limit_options(solver, time_limit_s))
    except cp.SolverError as exc:
        return Run("error", np.zeros(0), message=str(exc))
    if prob.status in ("infeasible", "infeasible_inaccurate"):
        return Run("infeasible", np.zeros(0))
    if prob.status not in ("optimal", "optimal_inaccurate") or xb.value is None:
        return Run("time_limit" if "limit" in str(prob.status) else "error", np.zeros(0),
                   message=f"{solver} status {prob.status}")
    col = np.zeros(m.n)
    col[ints] = xb.value
    if xc is not None:
        col[conts] = xc.value
    const = m.value0 if budget is not None else m.latency0
    return Run("optimal", col, float(prob.value) + const, float(prob.value) + const, None,
               "" if prob.status == "optimal" else "solver reported optimal_inaccurate")


def _time_limit_options(solver: str, time_limit_s: float) -> dict[str, Any]:
    """The time-limit option of a solver through CVXPY, where it has a documented one."""
    t = max(1e-3, float(time_limit_s))
    options: dict[str, dict[str, Any]] = {
        "SCIPY": {"scipy_options": {"time_limit": t}},
        "SCIP": {"scip_params": {"limits/time": t}},
        "GUROBI": {"TimeLimit": t},
        "CPLEX": {"cplex_params": {"timelimit": t}},
        "MOSEK": {"mosek_params": {"MSK_DPAR_OPTIMIZER_MAX_TIME": t}},
        "CBC": {"maximumSeconds": t},
    }
    return options.get(solver, {})
