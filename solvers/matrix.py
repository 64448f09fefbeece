"""The exact program as plain sparse arrays: columns, one latency row and marginal rows.

Columns:
- one binary per choice of each dim (its one-hot vector), and one binary ``r_b`` per removable
  block, "removed". A dim private to a removable block sums with ``r_b`` to one, so its
  one-hot vector is all zero while the block is removed; any other dim sums to one;
- one continuous joint column ``z >= 0`` per cell of a term over two or three dims, constrained
  by its marginals (summing ``z`` over all axes but one gives that axis's one-hot vector). For
  one-hot marginals the only feasible ``z`` is the indicator of the chosen cell, so the
  linearisation is exact; its LP relaxation is far tighter than McCormick envelopes.

A term counts while every removable block it depends on (its own, and the blocks of its dims)
is kept. With one such block ``b`` the removed cells are left out: the marginal over a dim
private to ``b`` is an equality (both sides are zero once ``b`` is removed), the marginal over a
shared dim is ``<=``, and the total mass of ``z`` is ``1 - r_b``. This is the projection of the
padded program (one more "removed" state per axis, all equalities) onto the kept cells, so the
relaxation is the same with fewer columns. A term depending on two or more removable blocks
keeps the padded form.

Terms over the same dims and blocks are added into one table first, and a term whose dims are
a subset of another's (same blocks) is added into that one's table.

A value term (importance over one dim's choices, counted while a block is kept) is a term of
the same kind with an importance table instead of a latency table: it shares the joint
columns of the latency terms over the same dim and block (a block's share of a shared width
rides on the joint columns of the block's first conv), so it adds no columns where those exist.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from solvers.problem import Problem


@dataclass
class Matrix:
    """Maximise ``value @ col + value0`` s.t. ``latency @ col + latency0 <= budget``,
    ``eq @ col == eq_rhs``, ``ub @ col <= ub_rhs``, ``0 <= col <= 1``, ``col[integer]`` integral."""

    value: np.ndarray
    value0: float
    latency: np.ndarray
    latency0: float
    eq: sp.csr_matrix
    eq_rhs: np.ndarray
    ub: sp.csr_matrix
    ub_rhs: np.ndarray
    integer: np.ndarray
    dim_cols: dict[str, np.ndarray]
    removed_col: dict[str, int]

    @property
    def n(self) -> int:
        return len(self.value)


class _Rows:
    """Sparse rows collected as triplets."""

    def __init__(self) -> None:
        self.r: list[np.ndarray] = []
        self.c: list[np.ndarray] = []
        self.v: list[np.ndarray] = []
        self.rhs: list[float] = []

    def add(self, cols: np.ndarray, vals: np.ndarray, rhs: float) -> None:
        self.r.append(np.full(len(cols), len(self.rhs)))
        self.c.append(np.asarray(cols))
        self.v.append(np.asarray(vals, dtype=np.float64))
        self.rhs.append(rhs)

    def add_many(self, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, rhs: np.ndarray) -> None:
        """Rows numbered ``0..len(rhs)-1`` locally."""
        self.r.append(np.asarray(rows) + len(self.rhs))
        self.c.append(np.asarray(cols))
        self.v.append(np.asarray(vals, dtype=np.float64))
        self.rhs.extend(float(x) for x in rhs)

    def matrix(self, n: int) -> tuple[sp.csr_matrix, np.ndarray]:
        m = len(self.rhs)
        if not self.r:
            return sp.csr_matrix((m, n)), np.zeros(m)
        return (sp.csr_matrix((np.concatenate(self.v), (np.concatenate(self.r), np.concatenate(self.c))),
                              shape=(m, n)), np.array(self.rhs))


@dataclass
class _Term:
    """Latency ``table`` and importance ``value`` over the same cells."""

    dims: tuple[str, ...]
    gates: frozenset[str]
    table: np.ndarray
    value: np.ndarray


def _merge_terms(p: Problem) -> tuple[float, float, list[_Term]]:
    """Constant latency, constant importance and the terms (latency and value terms together)
    grouped by (dims, gating blocks), subsets folded in."""
    removable = p.removable()
    order = {d.name: i for i, d in enumerate(p.dims)}
    owner = {d.name: d.block for d in p.dims}
    groups: dict[tuple[tuple[str, ...], frozenset[str]], _Term] = {}

    def add(dims_in: tuple[str, ...], gate_in: str | None, table_in: np.ndarray, is_value: bool) -> None:
        gates = frozenset({b for b in (gate_in, *(owner[n] for n in dims_in)) if b in removable})
        dims = tuple(sorted(dims_in, key=order.__getitem__))
        table = np.transpose(np.asarray(table_in, dtype=np.float64), [dims_in.index(n) for n in dims])
        key = (dims, gates)
        if key not in groups:
            groups[key] = _Term(dims, gates, np.zeros(table.shape), np.zeros(table.shape))
        if is_value:
            groups[key].value = groups[key].value + table
        else:
            groups[key].table = groups[key].table + table

    for t in p.terms:
        add(t.dims, t.block, t.table, False)
    for v in p.values:
        add((v.dim,), v.block, v.table, True)
    fixed = [t for t in groups.values() if not t.dims and not t.gates]
    const = float(p.fixed_ms) + sum(float(t.table) for t in fixed)
    const_value = sum(float(t.value) for t in fixed)
    terms = [t for t in groups.values() if t.dims or t.gates]
    # Fold a term into a superset term with the same gates (no new columns for it).
    terms.sort(key=lambda t: -len(t.dims))
    kept: list[_Term] = []
    for term in terms:
        host = next((h for h in kept if h.gates == term.gates and set(term.dims) <= set(h.dims)), None)
        if host is None or _linear(term, owner):
            kept.append(term)
            continue
        shape = [k if n in term.dims else 1 for n, k in zip(host.dims, host.table.shape, strict=True)]
        host.table = host.table + term.table.reshape(shape)  # both in the dims' canonical order
        host.value = host.value + term.value.reshape(shape)
    return const, const_value, kept


def _linear(t: _Term, owner: dict[str, str | None]) -> bool:
    """A term that is a linear function of the one-hot columns (no joint columns needed)."""
    if not t.gates:
        return len(t.dims) <= 1
    return len(t.dims) == 0 or (len(t.dims) == 1 and len(t.gates) == 1 and owner[t.dims[0]] in t.gates)


def build(p: Problem) -> Matrix:
    """The exact program of ``p`` (see the module docstring)."""
    removable = p.removable()
    owner = {d.name: d.block for d in p.dims}
    value: list[np.ndarray] = []
    dim_cols: dict[str, np.ndarray] = {}
    removed_col: dict[str, int] = {}
    n = 0
    for d in p.dims:
        dim_cols[d.name] = np.arange(n, n + len(d.choices))
        value.append(np.asarray(d.value, dtype=np.float64))
        n += len(d.choices)
    value0 = 0.0
    for b in sorted(removable):
        removed_col[b] = n
        bval = next(float(x.value) for x in p.blocks if x.name == b)
        value.append(np.array([-bval]))
        value0 += bval
        n += 1
    n_int = n
    eq, ub = _Rows(), _Rows()
    for d in p.dims:
        cols = dim_cols[d.name]
        if d.block in removable:
            eq.add(np.append(cols, removed_col[d.block]), np.ones(len(cols) + 1), 1.0)
        else:
            eq.add(cols, np.ones(len(cols)), 1.0)
    lat_cols: list[np.ndarray] = []
    lat_vals: list[np.ndarray] = []
    obj_cols: list[np.ndarray] = []
    obj_vals: list[np.ndarray] = []
    const, const_value, terms = _merge_terms(p)
    value0 += const_value
    for t in terms:
        if _linear(t, owner):
            if t.dims:
                lat_cols.append(dim_cols[t.dims[0]])
                lat_vals.append(t.table)
                obj_cols.append(dim_cols[t.dims[0]])
                obj_vals.append(t.value)
            else:  # a constant paid (or kept) while the single gating block is kept
                (b,) = t.gates
                const += float(t.table)
                value0 += float(t.value)
                lat_cols.append(np.array([removed_col[b]]))
                lat_vals.append(np.array([-float(t.table)]))
                obj_cols.append(np.array([removed_col[b]]))
                obj_vals.append(np.array([-float(t.value)]))
            continue
        first = n
        if len(t.gates) <= 1:
            n = _joint_projected(t, owner, dim_cols, removed_col, n, eq, ub, lat_cols, lat_vals)
        else:
            n = _joint_padded(t, owner, dim_cols, removed_col, n, eq, lat_cols, lat_vals)
        obj_cols.append(np.arange(first, n))
        obj_vals.append(_joint_value(t, owner, n - first))
    latency = np.zeros(n)
    for c, v in zip(lat_cols, lat_vals, strict=True):
        np.add.at(latency, c, np.ravel(v))
    obj = np.zeros(n)
    obj[:n_int] = np.concatenate(value) if value else np.zeros(0)
    for c, v in zip(obj_cols, obj_vals, strict=True):
        np.add.at(obj, c, np.ravel(v))
    a_eq, b_eq = eq.matrix(n)
    a_ub, b_ub = ub.matrix(n)
    integer = np.zeros(n, dtype=bool)
    integer[:n_int] = True
    return Matrix(obj, value0, p.scale * latency, p.scale * const + p.offset, a_eq, b_eq, a_ub, b_ub,
                  integer, dim_cols, removed_col)


def _marginal_rows(shape: tuple[int, ...], axis: int, first: int) -> tuple[np.ndarray, np.ndarray]:
    """(row within the axis, column) of every cell of a joint block starting at column ``first``."""
    size = int(np.prod(shape))
    rows = np.unravel_index(np.arange(size), shape)[axis]
    return rows, np.arange(first, first + size)


def _joint_projected(t: _Term, owner: dict[str, str | None], dim_cols: dict[str, np.ndarray],
                     removed_col: dict[str, int], n: int, eq: _Rows, ub: _Rows,
                     lat_cols: list[np.ndarray], lat_vals: list[np.ndarray]) -> int:
    shape = t.table.shape
    size = int(np.prod(shape))
    gate = next(iter(t.gates), None)
    private = False
    for axis, name in enumerate(t.dims):
        rows, cols = _marginal_rows(shape, axis, n)
        k = shape[axis]
        target = dim_cols[name]
        all_rows = np.concatenate([rows, np.arange(k)])
        all_cols = np.concatenate([cols, target])
        vals = np.concatenate([np.ones(size), -np.ones(k)])
        if gate is None or owner[name] == gate:
            private = private or gate is not None
            eq.add_many(all_rows, all_cols, vals, np.zeros(k))
        else:
            ub.add_many(all_rows, all_cols, vals, np.zeros(k))
    if gate is not None and not private:  # total mass 1 - r_b
        eq.add(np.append(np.arange(n, n + size), removed_col[gate]), np.ones(size + 1), 1.0)
    lat_cols.append(np.arange(n, n + size))
    lat_vals.append(t.table)
    return n + size


def _joint_value(t: _Term, owner: dict[str, str | None], size: int) -> np.ndarray:
    """The value table laid out as the joint columns: as is (projected form), or padded like
    :func:`_joint_padded` pads the latency table (removed cells keep nothing)."""
    value = t.value
    if len(t.gates) > 1:
        for k, name in enumerate(t.dims):
            if owner[name] in t.gates:
                pad = [(0, 0)] * value.ndim
                pad[k] = (0, 1)
                value = np.pad(value, pad)
        for _ in sorted(t.gates - {owner[name] for name in t.dims}):
            value = np.stack([value, np.zeros_like(value)], axis=-1)
    out = np.ravel(value)
    if len(out) != size:
        raise AssertionError(f"value table of {t.dims}: {len(out)} cells for {size} joint columns")
    return out


def _joint_padded(t: _Term, owner: dict[str, str | None], dim_cols: dict[str, np.ndarray],
                  removed_col: dict[str, int], n: int, eq: _Rows,
                  lat_cols: list[np.ndarray], lat_vals: list[np.ndarray]) -> int:
    """Every axis gets a "removed" state; a gating block without a private dim here gets an
    axis of its own, (kept, removed). All marginals are equalities."""
    axes: list[tuple[np.ndarray, int | None]] = []  # (choice columns, removed column or None)
    table = t.table
    for k, name in enumerate(t.dims):
        b = owner[name]
        if b in t.gates:
            axes.append((dim_cols[name], removed_col[b]))
            pad = [(0, 0)] * table.ndim
            pad[k] = (0, 1)
            table = np.pad(table, pad)
        else:
            axes.append((dim_cols[name], None))
    for b in sorted(t.gates - {owner[name] for name in t.dims}):
        axes.append((np.zeros(0, dtype=int), removed_col[b]))  # kept = 1 - r_b, removed = r_b
        table = np.stack([table, np.zeros_like(table)], axis=-1)
    shape = table.shape
    size = int(np.prod(shape))
    for axis, (cols_choice, rcol) in enumerate(axes):
        rows, cols = _marginal_rows(shape, axis, n)
        k = shape[axis]
        if len(cols_choice) == 0:  # keep axis: row 0 is kept (= 1 - r), row 1 removed (= r)
            eq.add_many(np.concatenate([rows, [0, 1]]), np.concatenate([cols, [rcol, rcol]]),
                        np.concatenate([np.ones(size), [1.0, -1.0]]), np.array([1.0, 0.0]))
            continue
        targets = np.asarray(cols_choice) if rcol is None else np.append(cols_choice, rcol)
        eq.add_many(np.concatenate([rows, np.arange(k)]), np.concatenate([cols, targets]),
                    np.concatenate([np.ones(size), -np.ones(k)]), np.zeros(k))
    lat_cols.append(np.arange(n, n + size))
    lat_vals.append(table)
    return n + size


def decode(p: Problem, m: Matrix, col: np.ndarray) -> tuple[dict[str, int], tuple[str, ...]]:
    """Widths and removed blocks of a solution vector; a removed block's dims report their widest choice."""
    removed = tuple(b for b, c in m.removed_col.items() if col[c] > 0.5)
    widths = {}
    for d in p.dims:
        x = col[m.dim_cols[d.name]]
        widths[d.name] = d.choices[int(np.argmax(x))] if x.max() > 0.5 else d.choices[-1]
    return widths, removed


def encode(p: Problem, m: Matrix, widths: dict[str, int], removed: tuple[str, ...]) -> np.ndarray | None:
    """The integer columns of a point (joint columns left at zero); ``None`` when the point
    uses a choice the problem does not have. A one-choice dim missing from ``widths`` takes it."""
    col = np.zeros(m.n)
    gone = set(removed)
    for b, c in m.removed_col.items():
        col[c] = float(b in gone)
    for d in p.dims:
        if d.block in gone and d.block in m.removed_col:
            continue
        w = widths.get(d.name, d.choices[0] if len(d.choices) == 1 else None)
        if w not in d.choices:
            return None
        col[m.dim_cols[d.name][d.choices.index(w)]] = 1.0
    return col
