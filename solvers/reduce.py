"""Exact reductions of a problem: fewer choices, blocks whose fate is decided, dominated choices."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from solvers.problem import Problem, SolverBlock, SolverDim, SolverTerm, SolverValue

KEPT_SUFFIX = "#kept"


@dataclass
class Restriction:
    """The choices (indices) each dim may still take, and blocks whose removal is decided."""

    allowed: dict[str, tuple[int, ...]] = field(default_factory=dict)
    kept: set[str] = field(default_factory=set)
    removed: set[str] = field(default_factory=set)


def restrict(p: Problem, r: Restriction) -> Problem:
    """The problem on the allowed choices only. A block decided kept becomes locked (its value
    carried by a one-choice dim); a block decided removed loses its private dims and every term
    or value term that depends on it. Points of the result are points of ``p`` with the same latency and
    importance (see :func:`lift`)."""
    dims_by = {d.name: d for d in p.dims}
    gone = set(r.removed)
    dims: list[SolverDim] = []
    for d in p.dims:
        if d.block in gone:
            continue
        idx = r.allowed.get(d.name, tuple(range(len(d.choices))))
        dims.append(SolverDim(d.name, tuple(d.choices[i] for i in idx),
                              np.asarray(d.value, dtype=np.float64)[list(idx)], d.block))
    blocks = []
    for b in p.blocks:
        if b.removable and b.name in r.kept:
            blocks.append(SolverBlock(b.name, False, 0.0))
            dims.append(SolverDim(b.name + KEPT_SUFFIX, (1,), np.array([float(b.value)])))
        elif b.name in gone:
            blocks.append(SolverBlock(b.name, False, 0.0))
        else:
            blocks.append(b)
    terms = []
    for t in p.terms:
        if t.block in gone or any(dims_by[n].block in gone for n in t.dims):
            continue
        table = np.asarray(t.table)
        for axis, n in enumerate(t.dims):
            if n in r.allowed:
                table = np.take(table, list(r.allowed[n]), axis=axis)
        terms.append(SolverTerm(t.name, t.dims, table, t.block))
    values = []
    for v in p.values:
        if v.block in gone or dims_by[v.dim].block in gone:
            continue
        table = np.asarray(v.table, dtype=np.float64)
        if v.dim in r.allowed:
            table = table[list(r.allowed[v.dim])]
        values.append(SolverValue(v.name, v.dim, table, v.block))
    return Problem(dims, blocks, terms, p.fixed_ms, p.scale, p.offset, values)


def lift(p: Problem, r: Restriction, widths: Mapping[str, int], removed: Iterable[str]
         ) -> tuple[dict[str, int], tuple[str, ...]]:
    """A point of the restricted problem as a point of ``p``: a removed block's dims report
    their widest choice."""
    gone = set(removed) | set(r.removed)
    out = {}
    for d in p.dims:
        out[d.name] = widths[d.name] if d.name in widths else d.choices[-1]
    return out, tuple(b.name for b in p.blocks if b.name in gone)


def dominated(p: Problem, deadline: float = float("inf")) -> Restriction:
    """Drop a choice when another choice of the same dim keeps at least as much importance (its
    own value, and every value term's over it on its own, since each counts or not with its
    block) and is no slower in every term for every choice of the term's other dims. Swapping
    the dropped choice for the other never raises latency nor lowers importance, whatever the
    rest of the point, so an optimum survives. Of equal choices the widest is kept. Comparisons
    are exact. Past ``deadline`` the dims not yet looked at keep all their choices."""
    allowed: dict[str, tuple[int, ...]] = {}
    for d in p.dims:
        if time.perf_counter() > deadline:
            break
        slices = [(np.moveaxis(np.asarray(t.table, dtype=np.float64), t.dims.index(d.name), 0))
                  for t in p.terms if d.name in t.dims]
        # a value term is a latency-like column with its sign flipped: more importance is better
        slices += [-np.asarray(v.table, dtype=np.float64) for v in p.values if v.dim == d.name]
        flat = np.concatenate([s.reshape(len(d.choices), -1) for s in slices], axis=1) if slices \
            else np.zeros((len(d.choices), 0))
        value = np.asarray(d.value, dtype=np.float64)
        alive = list(range(len(d.choices)))
        for i in range(len(d.choices)):
            for j in alive:
                if j == i:
                    continue
                if (value[j] >= value[i] and np.all(flat[j] <= flat[i])
                        and (j > i or value[j] > value[i] or np.any(flat[j] < flat[i]))):
                    alive.remove(i)
                    break
        if len(alive) < len(d.choices):
            allowed[d.name] = tuple(alive)
    return Restriction(allowed)
