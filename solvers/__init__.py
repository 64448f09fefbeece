"""Exact multi-dimensional pruning solver over plain arrays (no torch)."""

from solvers.mip import min_latency, mip_solvers, solve
from solvers.problem import (
           Problem,
           Solution,
           SolverBlock,
           SolverDim,
           SolverError,
           SolverExcess,
           SolverTerm,
           SolverValue,
)
from solvers.sweep import plot_sweep, sweep

__all__ = ["Problem", "Solution", "SolverBlock", "SolverDim", "SolverError", "SolverExcess", "SolverTerm", "SolverValue",
           "min_latency", "mip_solvers", "plot_sweep", "solve", "sweep"]
