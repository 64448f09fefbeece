"""Many budgets from one latency model, without re-profiling: importance kept against latency."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from solvers.mip import solve
from solvers.problem import Problem, Solution


def sweep(p: Problem, budgets: Sequence[float], solver: str = "HIGHS", time_limit_s: float = 60.0
          ) -> list[Solution]:
    """One exact solve per budget (ascending budgets give non-decreasing objectives)."""
    return [solve(p, b, solver=solver, time_limit_s=time_limit_s) for b in budgets]


def plot_sweep(budgets: Sequence[float], solutions: Sequence[Solution], path: str | Path,
               title: str = "") -> None:
    """PNG of importance kept against predicted latency, infeasible budgets marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [(b, s) for b, s in zip(budgets, solutions, strict=True) if s.status == "optimal"]
    bad = [b for b, s in zip(budgets, solutions, strict=True) if s.status != "optimal"]
    fig, ax = plt.subplots(figsize=(6, 4))
    if ok:
        ax.plot([s.predicted_ms for _, s in ok], [s.objective for _, s in ok], "o-", label="optimal plan")
        ax.plot([b for b, _ in ok], [s.objective for _, s in ok], "x", alpha=0.5, label="budget")
    for b in bad:
        ax.axvline(b, color="r", alpha=0.3, lw=0.8)
    ax.set_xlabel("predicted latency (ms)")
    ax.set_ylabel("importance kept")
    ax.set_title(title or f"{len(ok)} feasible budgets, {len(bad)} infeasible (red)")
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
