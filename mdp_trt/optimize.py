"""From a space, a latency surface and importance to the solver's plain arrays, and back to a plan."""

from __future__ import annotations

from mdp_trt.models import Importance
from mdp_trt.space import Plan, PruningSpace
from mdp_trt.surface import LatencySurface
from solvers import Problem, Solution, SolverBlock, SolverDim, SolverTerm, solve


def problem(space: PruningSpace, surface: LatencySurface, importance: Importance) -> Problem:
    """The solver's view: cumulative importance per choice, calibrated latency arrays per term.

    The arrays already carry the calibration's scale and weight-traffic charge
    (:meth:`LatencySurface.calibrated_arrays`), so the problem's scale is 1 and only the
    offset is left; its latency of a plan equals ``surface.predict(plan)``."""
    dims = [SolverDim(d.name, d.choices, importance.cumulative(d.name, d.choices), d.block) for d in space.dims]
    blocks = [SolverBlock(b.name, b.removable, float(importance.blocks.get(b.name, 0.0))) for b in space.blocks]
    arrays = surface.calibrated_arrays()
    terms = [SolverTerm(t.name, t.dims, arrays[t.name], t.block) for t in space.terms]
    return Problem(dims, blocks, terms, fixed_ms=0.0, scale=1.0, offset=surface.calibration.offset)


def solve_plan(space: PruningSpace, surface: LatencySurface, importance: Importance, budget_ms: float,
               solver: str = "HIGHS", time_limit_s: float = 120.0) -> tuple[Plan | None, Solution]:
    """Best plan under ``budget_ms``; ``None`` with the solver's status when there is none."""
    sol = solve(problem(space, surface, importance), budget_ms, solver=solver, time_limit_s=time_limit_s)
    if sol.status != "optimal":
        return None, sol
    widths = {d.name: sol.widths.get(d.name, d.size) for d in space.dims}
    for b in sol.removed:  # private widths of removed blocks are irrelevant; keep them valid
        for name in space.block(b).dims:
            if widths[name] not in space.dim(name).choices:
                widths[name] = space.dim(name).choices[0]
    plan = space.plan(widths, sol.removed)
    plan.meta.update(predicted_ms=sol.predicted_ms, objective=sol.objective, budget_ms=budget_ms,
                     solver=sol.solver, solve_s=sol.solve_s, gap=sol.gap)
    return plan, sol
