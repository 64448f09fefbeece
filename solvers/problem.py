"""The solver's input and output: plain arrays and names, no torch, no CVXPY types."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace

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
class SolverExcess:
    """A charge on a second sum over the same terms past a threshold: ``ms_per_unit * max(0,
    sum of kept terms' tables - threshold)`` (weights that outgrow a cache: ``tables`` are the
    terms' parameters). ``tables`` maps a term's name to an array of its table's shape; a term
    left out counts 0."""

    tables: dict[str, np.ndarray]
    threshold: float
    ms_per_unit: float


@dataclass
class Problem:
    """Predicted latency = ``scale * (fixed_ms + sum of kept terms) + offset`` (+ the excess
    charge, where ``excess`` is given); importance = the dims' values + the kept blocks' values
    + the kept value terms."""

    dims: list[SolverDim]
    blocks: list[SolverBlock]
    terms: list[SolverTerm]
    fixed_ms: float = 0.0
    scale: float = 1.0
    offset: float = 0.0
    values: list[SolverValue] = field(default_factory=list)
    excess: SolverExcess | None = None

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

        if self.excess is not None:
            shapes = {t.name: np.shape(t.table) for t in self.terms}
            for name, table in self.excess.tables.items():
                if name not in shapes:
                    raise SolverError(f"excess: unknown term {name}")
                if np.shape(table) != shapes[name]:
                    raise SolverError(f"excess of term {name}: table shape {np.shape(table)}, expected {shapes[name]}")
            if not (self.excess.ms_per_unit >= 0 and np.isfinite(self.excess.ms_per_unit)):
                raise SolverError(f"excess: ms_per_unit {self.excess.ms_per_unit} is not a finite charge >= 0")
            if not np.isfinite(self.excess.threshold):
                raise SolverError(f"excess: threshold {self.excess.threshold} is not finite")
            if not self.scale > 0:
                raise SolverError(f"excess needs a positive scale, not {self.scale}")

    def removable(self) -> set[str]:
        return {b.name for b in self.blocks if b.removable}

    def latency(self, widths: dict[str, int], removed: Iterable[str] = ()) -> float:
        """Predicted latency of a point, computed directly from the tables."""
        total, extra = self._sums(widths, removed)
        out = self.scale * total + self.offset
        if self.excess is not None:
            out += self.excess.ms_per_unit * max(0.0, extra - self.excess.threshold)
        return out

    def _sums(self, widths: dict[str, int], removed: Iterable[str]) -> tuple[float, float]:
        dims = {d.name: d for d in self.dims}
        gone = set(removed)
        total, extra = self.fixed_ms, 0.0
        tables = self.excess.tables if self.excess is not None else {}
        for t in self.terms:
            if t.block in gone or any(dims[n].block in gone for n in t.dims):
                continue
            idx = tuple(dims[n].choices.index(widths[n]) for n in t.dims)
            total += float(np.asarray(t.table)[idx])
            if t.name in tables:
                extra += float(np.asarray(tables[t.name])[idx])
        return total, extra

    def without_excess(self) -> Problem:
        """The problem without the excess charge: its latency is never above this one's."""
        return replace(self, excess=None)

    def excess_folded(self) -> Problem:
        """The problem with the excess charged as if always past its threshold (a sum over
        terms, possibly negative below it): its latency is never above this one's, and equal
        to it wherever the sum is past the threshold."""
        if self.excess is None:
            return self
        e = self.excess
        k = e.ms_per_unit / self.scale
        terms = [replace(t, table=np.asarray(t.table, dtype=np.float64) + k * np.asarray(e.tables[t.name]))
                 if t.name in e.tables else t for t in self.terms]
        return replace(self, terms=terms, offset=self.offset - e.ms_per_unit * e.threshold, excess=None)

    def excess_problem(self) -> Problem:
        """The excess tables as the latency tables (scale 1, no offset): the same program
        columns, its latency the excess sum."""
        tables = self.excess.tables if self.excess is not None else {}
        terms = [replace(t, table=np.asarray(tables.get(t.name, np.zeros(np.shape(t.table))), dtype=np.float64))
                 for t in self.terms]
        return replace(self, terms=terms, fixed_ms=0.0, scale=1.0, offset=0.0, excess=None)

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
