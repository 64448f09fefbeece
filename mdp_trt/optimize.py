"""From a space, a latency surface and importance to the solver's plain arrays, and back to a plan."""

from __future__ import annotations

from mdp_trt.models import Importance
from mdp_trt.space import Plan, PruningSpace
from mdp_trt.surface import LatencySurface
from solvers import (
    Problem,
    Solution,
    SolverBlock,
    SolverDim,
    SolverExcess,
    SolverTerm,
    SolverValue,
    solve,
)


def problem(space: PruningSpace, surface: LatencySurface, importance: Importance) -> Problem:
    """The solver's view: cumulative importance per choice, calibrated latency arrays per term.

    The arrays already carry the calibration's scale and weight-traffic charge
    (:meth:`LatencySurface.calibrated_arrays`), so the problem's scale is 1 and only the
    offset is left; a spill part becomes the problem's excess (the terms' parameters past the
    knee). Its latency of a plan equals ``surface.predict(plan)``.

    A removable block's shares of shared dims (``importance.block_shares``) become value terms
    over (block kept, the dim's choice), taken out of the dim's own value, so that removing
    the block loses its share of the units kept; such a block has no fixed value."""
    removable = {b.name for b in space.blocks if b.removable}
    shares = {(b, d): importance.share(b, d, space.dim(d).choices)
              for b, per_dim in importance.block_shares.items() if b in removable for d in per_dim}
    dims = []
    for d in space.dims:
        value = importance.cumulative(d.name, d.choices)
        for (_, dim), v in shares.items():
            if dim == d.name:
                value = value - v
        dims.append(SolverDim(d.name, d.choices, value, d.block))
    blocks = [SolverBlock(b.name, b.removable, 0.0 if b.name in importance.block_shares and b.removable
                          else float(importance.blocks.get(b.name, 0.0))) for b in space.blocks]
    arrays = surface.calibrated_arrays()
    terms = [SolverTerm(t.name, t.dims, arrays[t.name], t.block) for t in space.terms]
    values = [SolverValue(f"{b}>{d}", d, v, b) for (b, d), v in shares.items()]
    spill = surface.spill_arrays()
    excess = None
    if spill is not None:  # weights past the cache: a second row over the same terms
        cal = surface.calibration
        excess = SolverExcess({t.name: spill[t.name] for t in space.terms}, cal.spill_mparams,
                              cal.ms_per_spilled_mparam)
    return Problem(dims, blocks, terms, fixed_ms=0.0, scale=1.0, offset=surface.calibration.offset, values=values,
                   excess=excess)


def solve_plan(space: PruningSpace, surface: LatencySurface, importance: Importance, budget_ms: float,
               solver: str = "HIGHS", time_limit_s: float = 120.0) -> tuple[Plan | None, Solution]:
    """Best plan under ``budget_ms``; ``None`` with the solver's status when there is none.

    A plan cut short by the time limit (the best point found, not proven optimal) is a plan
    too: ``plan.meta`` records the solver's status and gap, so the caller can tell."""
    sol = solve(problem(space, surface, importance), budget_ms, solver=solver, time_limit_s=time_limit_s)
    if sol.status not in ("optimal", "time_limit") or not sol.widths:
        return None, sol
    widths = {d.name: sol.widths.get(d.name, d.size) for d in space.dims}
    for b in sol.removed:  # private widths of removed blocks are irrelevant; keep them valid
        for name in space.block(b).dims:
            if widths[name] not in space.dim(name).choices:
                widths[name] = space.dim(name).choices[0]
    plan = space.plan(widths, sol.removed)
    plan.meta.update(predicted_ms=sol.predicted_ms, objective=sol.objective, budget_ms=budget_ms,
                     solver=sol.solver, solve_s=sol.solve_s, gap=sol.gap, solver_status=sol.status)
    return plan, sol
