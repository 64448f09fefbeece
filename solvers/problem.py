"""The solver's input and output: plain arrays and names, no torch, no CVXPY types."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np


class SolverError(ValueError):
    """A request the solver cannot take: unknown solver name, malformed problem."""


@dataclass
class SolverDim:
    """One width. ``value[i]`` is the importance kept at ``choices[i]`` (cumulative top-k).
    ``block`` names the removable block that owns it, or ``None`` for a shared width."""

    name: str
    choices: tuple[int, ...]
    value: np.ndarray
    block: str | None = None


@dataclass
class SolverBlock:
    """``value`` is the importance lost by removing the block, beyond its private dims'."""

    name: str
    removable: bool
    value: float = 0.0


@dataclass
class SolverTerm:
    """Latency (ms) over the choices of up to three dims; counts only while ``block`` is kept."""

    name: str
    dims: tuple[str, ...]
    table: np.ndarray
    block: str | None = None


@dataclass
class SolverValue:
    """Importance over the choices of ``dim`` that counts only while ``block`` is kept (and
    while ``dim`` exists): a block's share of a shared width, which depends on the width kept."""

    name: str
    dim: str
    table: np.ndarray
    block: str


@dataclass
class Problem:
    """Predicted latency = ``scale * (fixed_ms + sum of kept terms) + offset``; importance =
    the dims' values + the kept blocks' values + the kept value terms."""

    dims: list[SolverDim]
    blocks: list[SolverBlock]
    terms: list[SolverTerm]
    fixed_ms: float = 0.0
    scale: float = 1.0
    offset: float = 0.0
    values: list[SolverValue] = field(default_factory=list)

    def __post_init__(self) -> None:
        names = {d.name: d for d in self.dims}
        blocks = {b.name for b in self.blocks}
        for d in self.dims:
            if len(d.value) != len(d.choices):
                raise SolverError(f"dim {d.name}: {len(d.value)} values for {len(d.choices)} choices")
            if d.block is not None and d.block not in blocks:
                raise SolverError(f"dim {d.name}: unknown block {d.block}")
        for t in self.terms:
            if len(t.dims) > 3:
                raise SolverError(f"term {t.name}: at most three dims")
            if len(set(t.dims)) != len(t.dims):
                raise SolverError(f"term {t.name}: a dim named twice")
            shape = tuple(len(names[n].choices) for n in t.dims if n in names)
            if len(shape) != len(t.dims):
                raise SolverError(f"term {t.name}: unknown dims {[n for n in t.dims if n not in names]}")
            if np.shape(t.table) != shape:
                raise SolverError(f"term {t.name}: table shape {np.shape(t.table)}, expected {shape}")
            if t.block is not None and t.block not in blocks:
                raise SolverError(f"term {t.name}: unknown block {t.block}")
        for v in self.values:
            if v.dim not in names:
                raise SolverError(f"value term {v.name}: unknown dim {v.dim}")
            if v.block not in blocks:
                raise SolverError(f"value term {v.name}: unknown block {v.block}")
            if np.shape(v.table) != (len(names[v.dim].choices),):
                raise SolverError(f"value term {v.name}: table shape {np.shape(v.table)}, "
                                  f"expected {(len(names[v.dim].choices),)}")

    def removable(self) -> set[str]:
        return {b.name for b in self.blocks if b.removable}

    def latency(self, widths: dict[str, int], removed: Iterable[str] = ()) -> float:
        """Predicted latency of a point, computed directly from the tables."""
        dims = {d.name: d for d in self.dims}
        gone = set(removed)
        total = self.fixed_ms
        for t in self.terms:
            if t.block in gone or any(dims[n].block in gone for n in t.dims):
                continue
            idx = tuple(dims[n].choices.index(widths[n]) for n in t.dims)
            total += float(np.asarray(t.table)[idx])
        return self.scale * total + self.offset

    def objective(self, widths: dict[str, int], removed: Iterable[str] = ()) -> float:
        """Importance kept by a point."""
        gone = set(removed)
        total = 0.0
        for d in self.dims:
            if d.block not in gone:
                total += float(d.value[d.choices.index(widths[d.name])])
        total += sum(b.value for b in self.blocks if b.removable and b.name not in gone)
        dims = {d.name: d for d in self.dims}
        for v in self.values:
            d = dims[v.dim]
            if v.block not in gone and d.block not in gone:
                total += float(np.asarray(v.table)[d.choices.index(widths[v.dim])])
        return total


@dataclass
class Solution:
    """``status``: ``optimal``, ``infeasible`` (then ``min_latency_ms`` says what is reachable),
    ``time_limit`` or ``error`` (then ``message`` says why). A plan when optimal, and on a time
    limit the best point found (``gap``: its relative distance to the proven bound), when any.
    ``nodes`` and ``lp_iterations``: HiGHS branch-and-bound nodes and simplex iterations over
    every call of the solve, a measure of its work that does not depend on the machine's load."""

    status: str
    widths: dict[str, int] = field(default_factory=dict)
    removed: tuple[str, ...] = ()
    predicted_ms: float = float("nan")
    objective: float = float("nan")
    gap: float | None = None
    solve_s: float = 0.0
    solver: str = ""
    min_latency_ms: float | None = None
    message: str = ""
    nodes: int = 0
    lp_iterations: int = 0
