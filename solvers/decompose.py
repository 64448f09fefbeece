"""Exact solve by enumeration over the shared widths.

Once every dim that no block owns (a shared width) has a choice, the rest falls apart into
independent parts: the dims and removable blocks linked by terms (a block's private widths,
its removal, the latency and value terms over them). Each part is a list of options (every
combination of its blocks' fates and its dims' choices) with a latency and an importance,
and the whole problem is to pick one option per part within the budget: a multiple-choice
knapsack, solved exactly by merging the parts' Pareto fronts (latency up, importance up).

The shared widths are not enumerated jointly: one of them (the core, the width most parts
depend on) is, and every other one is eliminated around it, the fewest cells first (a
stage's blocks merged once per stage width, then the width maximised out: the union of the
fronts over its choices, a front over the widths that remain). In a chain of stage widths
that leaves fronts over the core width only. Each core choice is then solved by merging the
fronts in two halves that meet in the middle (each point of one half takes the best point of
the other that fits).

Pruning keeps it exact: an option that is slower and keeps no more importance than another of
its part is never needed; a partial point is dropped when even the rest's fastest options
break the budget, or when a valid upper bound on what it can reach does not beat the best
point known: a Lagrangian one while eliminating (``sum over the rest of max(value - lam *
latency) + lam * budget left``, the rest maximised over the widths still free), and at a core
choice the LP relaxation of the rest at the latency left (its fronts' hulls, steepest segment
first). The LP keeps blocks in part, and a fraction of one large block is most of its gap
(1-2% on Swin's stages of identical blocks), so a core choice is solved once per total of
removed blocks that its bound leaves open, with a price on each removed block that makes
that bound nearly the least (LP with the count fixed). Core choices are visited in the order
of their bound and the search stops when it cannot beat the best. "Better" means by more than ``REL_TOL`` (relative), so an optimum it
proves is within that of the true one.

It is used where it is small (small parts, fronts that stay small, few core choices worth
merging) and says so otherwise (``too_big``, with the best point it found), so the caller
falls back to the MIP.
"""

from __future__ import annotations

import functools
import itertools
import time
from dataclasses import dataclass, field

import numpy as np

from solvers.problem import Problem

MAX_OPTIONS = 50000  # options of one part
MAX_FRONT = 200000  # partial points kept after one merge
MAX_HEADS = 400  # shared assignments merged (a few ms each): past it the MIP is the better bet
REL_TOL = 1e-9  # a point must beat the best by this (relative) to count as better
MAX_CELLS = 1 << 16  # assignments of the axes one elimination step spans
REFINE_ROUNDS = 3  # finer grids of the price of a removed block, per count
REFINE_POINTS = 17  # prices on each (the bracket shrinks eightfold a round)
GOLDEN = (5 ** 0.5 - 1) / 2  # golden-section ratio
SMALL_HULL = 96  # fronts up to this many points get their hull at once, not point by point
PRICE_CELLS = 1 << 21  # prices x points x points of one front that a priced relaxation holds at once
MULTIPLIER_STEPS = 14  # refinements of the budget multiplier, when the caller has none
MU_STEPS = np.array([0.25, 0.5, 0.7, 0.85, 1.15, 1.3, 1.6, 2.0, 3.0])  # multipliers tried on the whole grid, times lam


@dataclass
class _Part:
    dims: list[str]
    blocks: list[str]
    choice: dict[str, np.ndarray]  # per dim, choice index per option (-1: its block is removed)
    removed: dict[str, np.ndarray]  # per block, removed per option
    value: np.ndarray  # importance per option that no shared dim changes
    lat: list[tuple[tuple[int, ...], np.ndarray]] = field(default_factory=list)  # (shared axes, (*their choices, option))
    val: list[tuple[tuple[int, ...], np.ndarray]] = field(default_factory=list)
    axes: tuple[int, ...] = ()  # every shared axis the part depends on


@dataclass
class Result:
    """``status``: ``optimal`` (the point is the optimum, or no point beats ``best`` when
    ``widths`` is empty), ``infeasible``, ``too_big`` or ``time_limit`` (nothing proven; a
    point, when given, is the best one found)."""

    status: str
    widths: dict[str, int] = field(default_factory=dict)
    removed: tuple[str, ...] = ()
    value: float = float("-inf")


class _Find:
    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, a: str) -> str:
        self.parent.setdefault(a, a)
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(b)] = self.find(a)


def _options(p: Problem, dims: list[str], blocks: list[str]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None:
    """Every combination of the blocks' fates and the living dims' choices, or ``None`` past the cap."""
    owner = {d.name: d.block for d in p.dims}
    size = {d.name: len(d.choices) for d in p.dims}
    patterns = list(itertools.product((False, True), repeat=len(blocks)))
    total = 0
    for pat in patterns:
        gone = {b for b, r in zip(blocks, pat, strict=True) if r}
        total += int(np.prod([size[n] for n in dims if owner[n] not in gone]))
        if total > MAX_OPTIONS:
            return None
    choice: dict[str, list[np.ndarray]] = {n: [] for n in dims}
    removed: dict[str, list[np.ndarray]] = {b: [] for b in blocks}
    for pat in patterns:
        gone = {b for b, r in zip(blocks, pat, strict=True) if r}
        alive = [n for n in dims if owner[n] not in gone]
        grid = np.indices([size[n] for n in alive]).reshape(len(alive), -1) if alive else np.zeros((0, 1), int)
        count = grid.shape[1]
        for n in dims:
            choice[n].append(grid[alive.index(n)] if n in alive else np.full(count, -1))
        for b, r in zip(blocks, pat, strict=True):
            removed[b].append(np.full(count, r))
    return ({n: np.concatenate(v) for n, v in choice.items()}, {b: np.concatenate(v) for b, v in removed.items()})


def _split(p: Problem) -> tuple[list[str], list[_Part], list[tuple[tuple[int, ...], np.ndarray]],
                                list[tuple[tuple[int, ...], np.ndarray]]] | None:
    """Shared dims, the parts, and the latency and importance that depend on shared dims only."""
    removable = p.removable()
    owner = {d.name: d.block for d in p.dims}
    shared = [d.name for d in p.dims if d.block is None]
    axis = {n: i for i, n in enumerate(shared)}
    uf = _Find()
    for d in p.dims:
        if d.block is not None:
            uf.find("d:" + d.name)
            if d.block in removable:
                uf.union("d:" + d.name, "b:" + d.block)
    for b in removable:
        uf.find("b:" + b)

    def nodes(dims: tuple[str, ...], block: str | None) -> list[str]:
        out = ["d:" + n for n in dims if n not in axis]
        out += ["b:" + b for b in {block, *(owner[n] for n in dims)} if b in removable]
        return out

    for t in p.terms:
        ns = nodes(t.dims, t.block)
        for a in ns[1:]:
            uf.union(ns[0], a)
    for v in p.values:
        ns = nodes((v.dim,), v.block)
        for a in ns[1:]:
            uf.union(ns[0], a)
    groups: dict[str, list[str]] = {}
    for node in list(uf.parent):
        groups.setdefault(uf.find(node), []).append(node)
    parts: list[_Part] = []
    part_of: dict[str, int] = {}
    dims_by = {d.name: d for d in p.dims}
    for members in groups.values():
        dims = [m[2:] for m in members if m.startswith("d:")]
        blocks = sorted(m[2:] for m in members if m.startswith("b:"))
        found = _options(p, dims, blocks)
        if found is None:
            return None
        choice, removed = found
        n = len(next(iter(removed.values()))) if removed else len(next(iter(choice.values())))
        value = np.zeros(n)
        for name in dims:
            c = choice[name]
            value += np.where(c >= 0, np.asarray(dims_by[name].value, dtype=np.float64)[np.maximum(c, 0)], 0.0)
        for blk in p.blocks:
            if blk.name in removed:
                value += np.where(removed[blk.name], 0.0, float(blk.value))
        for m in members:
            part_of[m] = len(parts)
        parts.append(_Part(dims, blocks, choice, removed, value))
    fixed_lat: list[tuple[tuple[int, ...], np.ndarray]] = []
    fixed_val: list[tuple[tuple[int, ...], np.ndarray]] = []

    def place(dims: tuple[str, ...], block: str | None, table: np.ndarray, is_value: bool) -> None:
        ns = nodes(dims, block)
        sh = sorted((n for n in dims if n in axis), key=axis.__getitem__)
        order = [dims.index(n) for n in sh] + [dims.index(n) for n in dims if n not in axis]
        t = np.transpose(np.asarray(table, dtype=np.float64), order)
        ax = tuple(axis[n] for n in sh)
        if not ns:
            (fixed_val if is_value else fixed_lat).append((ax, t))
            return
        part = parts[part_of[ns[0]]]
        idx = [np.maximum(part.choice[n], 0) for n in dims if n not in axis]
        cells = t[(Ellipsis, *idx)] if idx else np.broadcast_to(t[..., None], (*t.shape, len(part.value)))
        alive = np.ones(len(part.value), dtype=bool)
        for b in {block, *(owner[n] for n in dims)}:
            if b in removable:
                alive &= ~part.removed[b]
        (part.val if is_value else part.lat).append((ax, cells * alive))

    for t in p.terms:
        place(t.dims, t.block, t.table, False)
    for v in p.values:
        place((v.dim,), v.block, v.table, True)
    for part in parts:
        part.axes = tuple(sorted({a for ax, _ in part.lat + part.val for a in ax}))
    return shared, parts, fixed_lat, fixed_val


def _front(lat: np.ndarray, val: np.ndarray, limit: float) -> np.ndarray:
    """Indices of the Pareto front within ``limit``, by latency up (importance strictly up)."""
    ok = np.flatnonzero(lat <= limit)
    order = ok[np.argsort(lat[ok])]  # equal latencies may keep a dominated point: harmless
    v = val[order]
    best = np.maximum.accumulate(v)
    keep = np.ones(len(order), dtype=bool)
    keep[1:] = v[1:] > best[:-1]
    return order[keep]


@functools.cache
def _upper(n: int) -> np.ndarray:
    """The pairs ``i < j`` of ``n`` points, as a mask."""
    return np.triu(np.ones((n, n), dtype=bool), 1)


def _vertices(fl: np.ndarray, fv: np.ndarray) -> np.ndarray:
    """Indices of the vertices of a front's upper concave hull (latency up, importance up),
    from its fastest point; of equal latencies only the last (most importance) counts."""
    if not len(fl):
        return np.zeros(0, dtype=np.int64)
    cand = np.flatnonzero(np.append(fl[1:] != fl[:-1], True))
    x, y = fl[cand], fv[cand]
    if 2 < len(cand) <= SMALL_HULL and bool(np.all(y[1:] > y[:-1])):
        # at once: a point of a front is a vertex when every chord to it from the left is
        # steeper than every chord from it to the right
        with np.errstate(divide="ignore", invalid="ignore"):
            slope = (y[None, :] - y[:, None]) / (x[None, :] - x[:, None])  # [i, j]: from i to j
        upper = _upper(len(cand))
        into = np.where(upper, slope, np.inf).min(axis=0)
        out = np.where(upper, slope, -np.inf).max(axis=1)
        return cand[into > out]
    xs, ys = x.tolist(), y.tolist()  # Python floats: the loop runs on scalars
    hull: list[int] = []
    for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (ys[b] - ys[a]) * (x - xs[a]) <= (y - ys[a]) * (xs[b] - xs[a]):
                hull.pop()
            else:
                break
        if not hull or y > ys[hull[-1]]:
            hull.append(i)
    return cand[np.array(hull, dtype=np.int64)]


def _hull(fl: np.ndarray, fv: np.ndarray, h: np.ndarray | None = None) -> tuple[float, float, np.ndarray, np.ndarray]:
    """The fastest point of a front and the segments of its upper concave hull from there
    (latency and importance steps, steepest first); ``h``: its vertices, when known."""
    if not len(fl):
        return np.inf, -np.inf, np.zeros(0), np.zeros(0)
    h = _vertices(fl, fv) if h is None else h
    return float(fl[h[0]]), float(fv[h[0]]), np.diff(fl[h]), np.diff(fv[h])


def _priced_relaxed(classes: list[tuple[np.ndarray, np.ndarray, np.ndarray]], nus: np.ndarray,
                    room: float) -> np.ndarray:
    """The LP relaxation of picking one point of each front within ``room`` when a point with
    ``u`` removed blocks loses ``nu * u`` of its importance, for each of ``nus`` at once (the
    value of :class:`_Relaxed` over the fronts' hulls so shifted). ``classes``: per front, its
    points by latency up (latencies, importances, ``u``); only the hull vertices of each
    ``u`` apart matter, the others may be left out."""
    nus = np.asarray(nus, dtype=np.float64)
    k = len(nus)
    if not classes:  # nothing to pick: no latency, no importance
        return np.full(k, 0.0 if room >= 0 else -np.inf)
    if any(not len(c[0]) for c in classes):
        return np.full(k, -np.inf)
    per = max(1, PRICE_CELLS // max(len(c[0]) for c in classes) ** 2)
    if k > per:  # the hull test holds prices x points x points at once
        return np.concatenate([_priced_relaxed(classes, nus[i:i + per], room) for i in range(0, k, per)])
    base_l = 0.0
    base_v = np.zeros(k)
    rows = np.arange(k)
    dls, dvs, slopes = [], [], []
    for fl, fv, fu in classes:
        n = len(fl)
        w = fv[None, :] - nus[:, None] * fu[None, :]  # [nu, point]
        # of equal latencies only the most important counts; then the front: importance strictly up
        starts = np.flatnonzero(np.append(True, fl[1:] != fl[:-1]))
        top = np.repeat(np.maximum.reduceat(w, starts, axis=1), np.diff(np.append(starts, n)), axis=1)
        run = np.maximum.accumulate(w, axis=1)
        valid = w >= top
        valid[:, 1:] &= w[:, 1:] > run[:, :-1]
        # a vertex of the upper concave hull: every chord into it from the left steeper than
        # every chord out of it to the right (among valid points)
        with np.errstate(divide="ignore", invalid="ignore"):
            slope = (w[:, None, :] - w[:, :, None]) / (fl[None, :] - fl[:, None])[None]  # [nu, i, j]: i to j
        pair = _upper(n)[None] & valid[:, :, None] & valid[:, None, :]
        into = np.where(pair, slope, np.inf).min(axis=1)
        out = np.where(pair, slope, -np.inf).max(axis=2)
        vert = valid & (into > out)
        first = np.argmax(vert, axis=1)
        base_l += float(fl[first[0]])  # the fastest valid point: the same for every price
        base_v += w[rows, first]
        # each vertex but the first closes the segment from the vertex before it
        idx = np.where(vert, np.arange(n)[None, :], -1)
        prev = np.maximum.accumulate(idx, axis=1)
        prev = np.concatenate([np.full((k, 1), -1), prev[:, :-1]], axis=1)
        seg = vert & (prev >= 0)
        pv = np.where(prev >= 0, prev, 0)
        dl = np.where(seg, fl[None, :] - fl[pv], 0.0)
        dv = np.where(seg, w - np.take_along_axis(w, pv, axis=1), 0.0)
        dls.append(dl)
        dvs.append(dv)
        with np.errstate(divide="ignore", invalid="ignore"):
            slopes.append(np.where(seg, dv / np.where(seg, dl, 1.0), -np.inf))
    dl, dv, sl = (np.concatenate(x, axis=1) for x in (dls, dvs, slopes))
    order = np.argsort(-sl, axis=1, kind="stable")  # steepest first, the padding last
    dl, dv, sl = (np.take_along_axis(x, order, axis=1) for x in (dl, dv, sl))
    cum_l = np.concatenate([np.zeros((k, 1)), np.cumsum(dl, axis=1)], axis=1)
    cum_v = np.concatenate([np.zeros((k, 1)), np.cumsum(dv, axis=1)], axis=1)
    x = room - base_l
    if x < 0:
        return np.full(k, -np.inf)
    full = (cum_l[:, 1:] <= x).sum(axis=1)  # segments taken whole
    m = dl.shape[1]  # one column per point of every front: at least one
    part = np.where(full < m, (x - cum_l[rows, full]) * sl[rows, np.minimum(full, m - 1)], 0.0)
    return base_v + cum_v[rows, full] + part


class _Relaxed:
    """The LP relaxation of picking one point of each of some fronts: the most importance
    within a latency, for any latency at once (the fastest points, then the hull segments of
    all fronts, steepest first). An upper bound on every choice of one point per front."""

    def __init__(self, hulls: list[tuple[float, float, np.ndarray, np.ndarray]]) -> None:
        self.base_l = sum(h[0] for h in hulls)
        self.base_v = sum(h[1] for h in hulls)
        dl = np.concatenate([h[2] for h in hulls]) if hulls else np.zeros(0)
        dv = np.concatenate([h[3] for h in hulls]) if hulls else np.zeros(0)
        order = np.argsort(-dv / dl, kind="stable")
        self.cum_l = np.concatenate([[0.0], np.cumsum(dl[order])])
        self.cum_v = np.concatenate([[0.0], np.cumsum(dv[order])])

    def __call__(self, room: np.ndarray | float) -> np.ndarray:
        x = np.asarray(room, dtype=np.float64) - self.base_l
        out = self.base_v + np.interp(x, self.cum_l, self.cum_v)
        return np.where(x >= 0, out, -np.inf)


class _OutOfTime(Exception):
    """The deadline passed in the middle of a merge."""


def _front_by(lat: np.ndarray, val: np.ndarray, count: np.ndarray, limit: float) -> np.ndarray:
    """:func:`_front` among the points of each count apart (grouped by count, latency up)."""
    out = [np.flatnonzero(count == u) for u in np.unique(count)]
    out = [g[_front(lat[g], val[g], limit)] for g in out]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def _merge(half: list[int], pf: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], others: list[int],
           hulls: list[tuple[float, float, np.ndarray, np.ndarray]], room: float, thr: float, target: int,
           max_front: int, deadline: float
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]] | None:
    """The fronts of the parts ``half`` together, one per count of removed blocks (latency,
    importance, count, back pointers), without points that the rest (the parts still to come
    and ``others``, bounded by their LP relaxation at the latency left) cannot lift above
    ``thr`` within ``room``, nor bring to ``target`` removed blocks; ``None`` past the cap."""
    lat, val, cnt = np.zeros(1), np.zeros(1), np.zeros(1, dtype=np.int64)
    trail: list[tuple[np.ndarray, np.ndarray]] = []
    for step, k in enumerate(half):
        fl, fv, _, fc = pf[k]
        if len(lat) * len(fl) > 20 * max_front:
            return None
        if time.perf_counter() > deadline:
            raise _OutOfTime
        later = half[step + 1:] + others
        rest = _Relaxed([hulls[j] for j in later])
        lo = sum(int(pf[j][3].min()) for j in later if len(pf[j][3]))
        hi = sum(int(pf[j][3].max()) for j in later if len(pf[j][3]))
        cl = (lat[:, None] + fl[None, :]).ravel()
        cv = (val[:, None] + fv[None, :]).ravel()
        cc = (cnt[:, None] + fc[None, :]).ravel()
        pick = np.flatnonzero((cl + rest.base_l <= room) & (cc + lo <= target) & (cc + hi >= target))
        pick = pick[cv[pick] + rest(room - cl[pick]) > thr]
        pick = pick[_front_by(cl[pick], cv[pick], cc[pick], room)]
        if len(pick) > max_front:
            return None
        trail.append((pick // max(len(fl), 1), pick % max(len(fl), 1)))
        lat, val, cnt = cl[pick], cv[pick], cc[pick]
        if not len(pick):
            break
    return lat, val, cnt, trail


def _refs(half: list[int], pf: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
          trail: list[tuple[np.ndarray, np.ndarray]], j: int) -> dict[int, int]:
    """The reference of every factor of ``half`` behind point ``j`` of its merged front."""
    picks: dict[int, int] = {}
    for step in range(len(half) - 1, -1, -1):
        parent, option = trail[step]
        picks[half[step]] = int(pf[half[step]][2][option[j]])
        j = int(parent[j])
    return picks


def _beat(best: float) -> float:
    """What a point must exceed to count as better than ``best``."""
    return best + REL_TOL * max(1.0, abs(best)) if np.isfinite(best) else best


@dataclass
class _Factor:
    """Pareto fronts (latency, importance, reference) over the assignments of some shared axes
    (ascending). A part's options (``part``; the reference is the option), the latency and
    importance of the shared dims alone (one point per assignment), or ``members`` merged with
    ``axis`` maximised out (-1: none; the reference is the point's position, ``picks`` says which
    value of ``axis`` and which point of each member it comes from). ``covers``: the leaves in it;
    ``removed``: the removed blocks behind each point."""

    axes: tuple[int, ...]
    fronts: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray, np.ndarray]]
    covers: frozenset[int]
    removed: dict[tuple[int, ...], np.ndarray]
    part: int | None = None
    axis: int = -1
    members: list[_Factor] = field(default_factory=list)
    picks: dict[tuple[int, ...], tuple[np.ndarray, list[np.ndarray]]] = field(default_factory=dict)

    def table(self, sizes: tuple[int, ...], mu: float) -> tuple[np.ndarray, np.ndarray]:
        """Per assignment: the best ``importance - mu * latency`` and the least latency."""
        g = np.full([sizes[a] for a in self.axes], -np.inf)
        f = np.full([sizes[a] for a in self.axes], np.inf)
        for key, (fl, fv, _) in self.fronts.items():
            if len(fl):
                g[key], f[key] = float(np.max(fv - mu * fl)), float(fl.min())
        return g, f


def _spread(ax: tuple[int, ...], arr: np.ndarray, onto: tuple[int, ...], sizes: tuple[int, ...]) -> np.ndarray:
    """An array over axes ``ax`` (a subsequence of ``onto``) broadcast onto ``onto``."""
    return np.reshape(arr, [sizes[a] if a in ax else 1 for a in onto])


def _optimum(tables: list[tuple[tuple[int, ...], np.ndarray]], keep: tuple[int, ...], sizes: tuple[int, ...],
             maximise: bool) -> np.ndarray | None:
    """The max (or min) of the sum of ``tables`` over every axis not in ``keep``, as an array
    over ``keep``, by eliminating one axis at a time; ``None`` when a step spans too many cells."""
    by_axes: dict[tuple[int, ...], np.ndarray] = {}
    for ax, arr in tables:
        by_axes[ax] = by_axes[ax] + arr if ax in by_axes else arr
    work = list(by_axes.items())
    free = sorted({a for ax, _ in work for a in ax} - set(keep))

    def span(a: int) -> tuple[int, ...]:
        return tuple(sorted({b for ax, _ in work if a in ax for b in ax}))

    while free:
        a = min(free, key=lambda x: int(np.prod([sizes[b] for b in span(x)])))
        onto = span(a)
        if int(np.prod([sizes[b] for b in onto])) > MAX_CELLS:
            return None
        total = sum((_spread(ax, arr, onto, sizes) for ax, arr in work if a in ax), np.zeros([1] * len(onto)))
        reduced = (np.max if maximise else np.min)(total, axis=onto.index(a))
        work = [(ax, arr) for ax, arr in work if a not in ax] + [(tuple(b for b in onto if b != a), reduced)]
        free.remove(a)
    out = np.zeros([sizes[a] for a in keep])
    for ax, arr in work:
        out = out + _spread(ax, arr, keep, sizes)
    return out


def _combine(fronts: list[tuple[np.ndarray, np.ndarray]], rest_fast: float, rest_lag: float, mu: float,
             cap: float, thr: float, max_front: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]] | None:
    """The Pareto front of the sum of ``fronts`` (one point of each), without points that the
    rest (fastest ``rest_fast``, Lagrangian ``rest_lag`` at ``mu``) cannot lift above ``thr``
    within ``cap``: latency, importance and the point of each front; ``None`` past ``max_front``."""
    order = sorted(range(len(fronts)), key=lambda k: len(fronts[k][0]))
    none = np.zeros(0, dtype=np.int64)
    if any(not len(fronts[k][0]) for k in order):
        return np.zeros(0), np.zeros(0), [none] * len(fronts)
    fast = [float(fronts[k][0].min()) for k in order]
    lag = [float(np.max(fronts[k][1] - mu * fronts[k][0])) for k in order]
    after_fast = np.concatenate([np.cumsum(fast[::-1])[::-1], [0.0]]) + rest_fast
    after_lag = np.concatenate([np.cumsum(lag[::-1])[::-1], [0.0]]) + rest_lag
    lat, val = np.zeros(1), np.zeros(1)
    idx: dict[int, np.ndarray] = {}
    for step, k in enumerate(order):
        fl, fv = fronts[k]
        if len(lat) * len(fl) > 20 * max_front:
            return None
        cl = (lat[:, None] + fl[None, :]).ravel()
        cv = (val[:, None] + fv[None, :]).ravel()
        ok = (cl + after_fast[step + 1] <= cap) & (cv - mu * cl + after_lag[step + 1] + mu * cap > thr)
        pick = np.flatnonzero(ok)
        pick = pick[_front(cl[pick], cv[pick], cap)]
        if len(pick) > max_front:
            return None
        idx = {j: arr[pick // len(fl)] for j, arr in idx.items()}
        idx[k] = pick % len(fl)
        lat, val = cl[pick], cv[pick]
    return lat, val, [idx[k] for k in range(len(fronts))]


def _join(members: list[_Factor], axis: int, leaves: list[tuple[tuple[int, ...], np.ndarray, np.ndarray]],
          sizes: tuple[int, ...], mu: float, cap: float, thr: float, max_front: int, deadline: float
          ) -> _Factor | None:
    """``members`` merged at every assignment of their axes, then ``axis`` maximised out (a
    union of fronts; -1: none). Points that the leaves outside the members cannot lift above
    ``thr`` are dropped. ``None`` when too big."""
    span = tuple(sorted({a for m in members for a in m.axes}))
    if int(np.prod([sizes[a] for a in span])) > MAX_CELLS:
        return None
    covers = frozenset().union(*(m.covers for m in members))
    rest = [leaves[i] for i in range(len(leaves)) if i not in covers]
    lag = _optimum([(ax, g) for ax, g, _ in rest], span, sizes, True)
    fast = _optimum([(ax, f) for ax, _, f in rest], span, sizes, False)
    if lag is None or fast is None:
        return None
    out_axes = tuple(a for a in span if a != axis)
    gathered: dict[tuple[int, ...], list[tuple[int, np.ndarray, np.ndarray, list[np.ndarray], np.ndarray]]] = {}
    for key in itertools.product(*[range(sizes[a]) for a in span]):
        if time.perf_counter() > deadline:
            raise _OutOfTime
        full = dict(zip(span, key, strict=True))
        here = [m.fronts[tuple(full[a] for a in m.axes)] for m in members]
        res = _combine([(h[0], h[1]) for h in here], float(fast[key]), float(lag[key]), mu, cap, thr, max_front)
        if res is None:
            return None
        gone = sum((m.removed[tuple(full[a] for a in m.axes)][i] for m, i in zip(members, res[2], strict=True)),
                   np.zeros(len(res[0]), dtype=np.int64))
        gathered.setdefault(tuple(full[a] for a in out_axes), []).append((full.get(axis, -1), *res, gone))
    fronts: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    picks: dict[tuple[int, ...], tuple[np.ndarray, list[np.ndarray]]] = {}
    removed: dict[tuple[int, ...], np.ndarray] = {}
    for key, items in gathered.items():
        lat = np.concatenate([it[1] for it in items])
        val = np.concatenate([it[2] for it in items])
        which = np.concatenate([np.full(len(it[1]), it[0]) for it in items])
        pts = [np.concatenate([it[3][j] for it in items]) for j in range(len(members))]
        keep = _front(lat, val, cap)
        if len(keep) > max_front:
            return None
        fronts[key] = (lat[keep], val[keep], np.arange(len(keep)))
        picks[key] = (which[keep], [x[keep] for x in pts])
        removed[key] = np.concatenate([it[4] for it in items])[keep]
    return _Factor(out_axes, fronts, covers, removed, axis=axis, members=members, picks=picks)


def _trace(f: _Factor, key: tuple[int, ...], ref: int, shared: dict[int, int], options: dict[int, int]) -> None:
    """The shared axes' values and the parts' options behind point ``ref`` of ``f`` at ``key``."""
    if f.part is not None:
        options[f.part] = ref
        return
    if not f.members:
        return
    full = dict(zip(f.axes, key, strict=True))
    which, pts = f.picks[key]
    if f.axis >= 0:
        full[f.axis] = shared[f.axis] = int(which[ref])
    for m, pt in zip(f.members, pts, strict=True):
        mkey = tuple(full[a] for a in m.axes)
        _trace(m, mkey, int(m.fronts[mkey][2][int(pt[ref])]), shared, options)


def _core(factors: list[_Factor], n_axes: int) -> int:
    """The shared axis most parts depend on: the others are eliminated around it."""
    count = [sum(a in f.axes for f in factors if f.part is not None) for a in range(n_axes)]
    return int(np.argmax(count))


def _eliminate(factors: list[_Factor], core: tuple[int, ...], leaves: list[tuple[tuple[int, ...], np.ndarray, np.ndarray]],
               sizes: tuple[int, ...], mu: float, cap: float, thr: float, max_front: int, deadline: float
               ) -> list[_Factor] | None:
    """Every axis outside ``core`` maximised out of the factors, the fewest cells first; factors
    over the same axes are merged first (a stage's blocks once per width, not once per
    assignment of the other widths)."""
    work = list(factors)
    free = sorted({a for f in work for a in f.axes} - set(core))

    def span(a: int) -> int:
        return int(np.prod([sizes[b] for b in {b for f in work if a in f.axes for b in f.axes}]))

    while free:
        a = min(free, key=span)
        bucket = [f for f in work if a in f.axes]
        work = [f for f in work if a not in f.axes]
        groups: dict[tuple[int, ...], list[_Factor]] = {}
        for f in bucket:
            groups.setdefault(f.axes, []).append(f)
        joined = []
        for group in groups.values():
            one = group[0] if len(group) == 1 else _join(group, -1, leaves, sizes, mu, cap, thr, max_front, deadline)
            if one is None:
                return None
            joined.append(one)
        message = _join(joined, a, leaves, sizes, mu, cap, thr, max_front, deadline)
        if message is None:
            return None
        work.append(message)
        free.remove(a)
    return work


def solve(p: Problem, budget: float, best: float = float("-inf"), lam: float | None = None,
          deadline: float = float("inf"), max_front: int = MAX_FRONT, max_heads: int = MAX_HEADS) -> Result:
    """The optimum of ``p`` under ``budget`` if it beats ``best``; ``lam``: a budget multiplier
    for the bound (the LP dual of the budget is a good one; any value >= 0 is valid; ``None``:
    the one of the least Lagrangian bound, found on the parts' fronts).
    ``max_front``: the most partial points one merge may keep, ``max_heads``: the most shared
    assignments merged, before giving up (``too_big``, with the best point found so far)."""
    if not p.scale > 0:
        return Result("too_big")
    lam = None if lam is None else max(0.0, float(lam)) * p.scale  # per unit of the unscaled sum of terms
    split = _split(p)
    if split is None:
        return Result("too_big")
    shared, parts, fixed_lat, fixed_val = split
    dims_by = {d.name: d for d in p.dims}
    sizes = tuple(len(dims_by[n].choices) for n in shared)
    cap = (budget - p.offset) / p.scale - p.fixed_ms  # the budget on the unscaled sum of terms
    thr0 = _beat(best)
    factors: list[_Factor] = []
    for k, part in enumerate(parts):
        table: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for key in itertools.product(*[range(sizes[a]) for a in part.axes]):
            full = dict(zip(part.axes, key, strict=True))
            lat, val = np.zeros(len(part.value)), part.value
            for ax, arr in part.lat:
                lat = lat + arr[tuple(full[a] for a in ax)]
            for ax, arr in part.val:
                val = val + arr[tuple(full[a] for a in ax)]
            idx = _front(lat, val, cap)
            table[key] = (lat[idx], val[idx], idx)
        gone = {key: sum((part.removed[b][ref].astype(np.int64) for b in part.blocks),
                         np.zeros(len(ref), dtype=np.int64)) for key, (_, _, ref) in table.items()}
        factors.append(_Factor(part.axes, table, frozenset({k}), gone, part=k))
        if time.perf_counter() > deadline:
            return Result("time_limit")
    # the latency and importance of the shared dims alone, one table per set of axes
    scalar: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}
    for ax, arr, is_value in ([(ax, arr, False) for ax, arr in fixed_lat] + [(ax, arr, True) for ax, arr in fixed_val]
                              + [((i,), np.asarray(dims_by[n].value, dtype=np.float64), True)
                                 for i, n in enumerate(shared)]):
        lat, val = scalar.get(ax, (np.zeros([sizes[a] for a in ax]), np.zeros([sizes[a] for a in ax])))
        scalar[ax] = (lat + arr, val) if not is_value else (lat, val + arr)
    core = (_core(factors, len(shared)),) if shared else ()
    lat0, val0 = np.zeros([sizes[a] for a in core]), np.zeros([sizes[a] for a in core])
    for ax, (lat, val) in scalar.items():
        if set(ax) <= set(core):
            lat0, val0 = lat0 + _spread(ax, lat, core, sizes), val0 + _spread(ax, val, core, sizes)
            continue
        one = {key: (np.array([lat[key]]), np.array([val[key]]), np.zeros(1, dtype=np.int64))
               for key in itertools.product(*[range(sizes[a]) for a in ax])}
        factors.append(_Factor(ax, one, frozenset({len(factors)}), {key: np.zeros(1, dtype=np.int64) for key in one}))
    if lam is None:
        lam = _multiplier(factors, core, lat0, val0, sizes, cap)
    # bounds on what lies outside a merge: every factor, and the shared dims of the core alone
    leaves = [(f.axes, *f.table(sizes, lam)) for f in factors] + [(core, val0 - lam * lat0, lat0)]
    try:
        elim = _eliminate(factors, core, leaves, sizes, lam, cap, thr0, max_front, deadline)
    except _OutOfTime:
        return Result("time_limit")
    if elim is None:
        return Result("too_big")
    return _heads(p, shared, parts, core, elim, lat0, val0, sizes, cap, best, lam, deadline, max_front, max_heads)


def _multiplier(factors: list[_Factor], core: tuple[int, ...], lat0: np.ndarray, val0: np.ndarray,
                sizes: tuple[int, ...], cap: float) -> float:
    """The budget multiplier of the least Lagrangian bound (``max over every point of value -
    mu * latency, + mu * budget``, convex in ``mu``): a log grid, then golden sections
    around its best; 0 where the bound cannot be computed."""
    def bound(mu: float) -> float:
        tables = [(f.axes, f.table(sizes, mu)[0]) for f in factors] + [(core, val0 - mu * lat0)]
        out = _optimum(tables, (), sizes, True)
        return np.inf if out is None else float(out) + mu * cap

    top = bound(0.0)
    if not np.isfinite(top) or cap <= 0:
        return 0.0
    grid = (abs(top) + 1.0) / cap * np.geomspace(1e-4, 1e2, 13)
    at = [bound(float(mu)) for mu in grid]
    j = int(np.argmin(at))
    if top <= at[j]:
        return 0.0
    a, b = np.log(grid[max(j - 1, 0)]), np.log(grid[min(j + 1, len(grid) - 1)])
    mu, least = float(grid[j]), at[j]
    for _ in range(MULTIPLIER_STEPS):
        m1, m2 = b - GOLDEN * (b - a), a + GOLDEN * (b - a)
        f1, f2 = bound(float(np.exp(m1))), bound(float(np.exp(m2)))
        if min(f1, f2) < least:
            mu, least = (float(np.exp(m1)), f1) if f1 <= f2 else (float(np.exp(m2)), f2)
        if f1 <= f2:
            b = m2
        else:
            a = m1
    return mu


def min_latency(p: Problem) -> float | None:
    """The least latency of any point, exactly: each part's fastest option at every assignment
    of the shared widths it depends on, minimised over the shared widths one at a time;
    ``None`` where a part or a step of the minimisation is too big (the MIP's job then)."""
    split = _split(p)
    if split is None:
        return None
    shared, parts, fixed_lat, _ = split
    dims_by = {d.name: d for d in p.dims}
    sizes = tuple(len(dims_by[n].choices) for n in shared)
    tables = list(fixed_lat)
    for part in parts:
        fastest = np.zeros([sizes[a] for a in part.axes])
        for key in itertools.product(*[range(sizes[a]) for a in part.axes]):
            full = dict(zip(part.axes, key, strict=True))
            lat = np.zeros(len(part.value))
            for ax, arr in part.lat:
                lat = lat + arr[tuple(full[a] for a in ax)]
            fastest[key] = lat.min()
        tables.append((part.axes, fastest))
    total = _optimum(tables, (), sizes, False)
    return None if total is None else p.scale * (p.fixed_ms + float(total)) + p.offset


def _heads(p: Problem, shared: list[str], parts: list[_Part], core: tuple[int, ...], factors: list[_Factor], lat0: np.ndarray,
           val0: np.ndarray, all_sizes: tuple[int, ...], cap: float, best: float, lam: float, deadline: float,
           max_front: int, max_heads: int) -> Result:
    """Every assignment of the ``core`` axes worth it, best bound first: the factors' fronts
    merged in two halves that meet in the middle."""
    dims_by = {d.name: d for d in p.dims}
    sizes = tuple(all_sizes[a] for a in core)
    pos = {a: i for i, a in enumerate(core)}
    axes = [tuple(pos[a] for a in f.axes) for f in factors]

    def spread(ax: tuple[int, ...], arr: np.ndarray) -> np.ndarray:
        return _spread(ax, arr, tuple(range(len(sizes))), sizes)

    fast = lat0.copy()
    lag = np.zeros(sizes)
    for f, ax in zip(factors, axes, strict=True):
        g, fa = f.table(all_sizes, lam)
        fast, lag = fast + spread(ax, fa), lag + spread(ax, g)
    # the Lagrangian bound of every assignment at a few multipliers around lam, the least kept
    bound = val0 + lag + lam * (cap - lat0)
    for mu in (lam * MU_STEPS if lam > 0 else ()):
        at_mu = val0 + mu * (cap - lat0)
        for f, ax in zip(factors, axes, strict=True):
            at_mu = at_mu + spread(ax, f.table(all_sizes, mu)[0])
        bound = np.minimum(bound, at_mu)
    feasible = fast <= cap
    if not feasible.any():
        return Result("infeasible")
    heads = np.flatnonzero(feasible.ravel() & (bound.ravel() > _beat(best)))
    heads = heads[np.argsort(-bound.ravel()[heads], kind="stable")]
    found: Result | None = None

    def plan(s: tuple[int, ...], refs: dict[int, int], total: float) -> Result:
        """The widths and removed blocks behind the point of each factor (``refs``) at ``s``."""
        values = {a: s[pos[a]] for a in core}
        options: dict[int, int] = {}
        for k, point in refs.items():
            _trace(factors[k], tuple(s[a] for a in axes[k]), point, values, options)
        widths = {n: dims_by[n].choices[values[i]] for i, n in enumerate(shared)}
        gone: list[str] = []
        for k, o in options.items():
            part = parts[k]
            for n in part.dims:
                c = int(part.choice[n][o])
                widths[n] = dims_by[n].choices[c] if c >= 0 else dims_by[n].choices[-1]
            gone += [b for b in part.blocks if part.removed[b][o]]
        return Result("optimal", widths, tuple(b.name for b in p.blocks if b.name in gone), total)

    def cut_short(status: str) -> Result:
        """Nothing proven; the best point found so far comes along (an incumbent for the caller)."""
        return Result(status, found.widths, found.removed, found.value) if found is not None else Result(status)

    for done, flat in enumerate(heads):
        s = tuple(int(i) for i in np.unravel_index(int(flat), sizes))
        if bound[s] <= _beat(best):
            break
        if time.perf_counter() > deadline:
            return cut_short("time_limit")
        if done >= max_heads:
            return cut_short("too_big")
        room = cap - float(lat0[s])
        here = [f.fronts[tuple(s[a] for a in ax)] for f, ax in zip(factors, axes, strict=True)]
        verts = [_vertices(h[0], h[1]) for h in here]
        if float(_Relaxed([_hull(h[0], h[1], v) for h, v in zip(here, verts, strict=True)])(room)) \
                <= _beat(best) - float(val0[s]):
            continue
        picked = _greedy(here, verts, room) if not np.isfinite(best) else None  # a first point to beat
        if picked is not None:
            total = float(val0[s]) + sum(float(h[1][i]) for h, i in zip(here, picked, strict=True))
            if total > _beat(best):
                best = total
                found = plan(s, {k: int(h[2][i]) for k, (h, i) in enumerate(zip(here, picked, strict=True))}, total)
        counts = [f.removed[tuple(s[a] for a in ax)] for f, ax in zip(factors, axes, strict=True)]
        for target, nu, bound_c in _count_bounds(here, counts, room, _beat(best) - float(val0[s])):
            if bound_c <= _beat(best) - float(val0[s]):  # a point found at another count beats it
                continue
            thr = _beat(best) - float(val0[s]) - nu * target  # on importance less nu per removed block
            if time.perf_counter() > deadline:
                return cut_short("time_limit")
            shifted = [(fl, fv - nu * fc, ref, fc) for (fl, fv, ref), fc in zip(here, counts, strict=True)]
            hulls = [_hull(f[0], f[1]) for f in shifted]
            lo = sum(int(fc.min()) for fc in counts if len(fc))
            hi = sum(int(fc.max()) for fc in counts if len(fc))
            pf: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
            for k, (fl, fv, ref, fc) in enumerate(shifted):
                # an option that the others cannot lift above the best within the room left, or
                # bring to the target count, is never used
                others = _Relaxed(hulls[:k] + hulls[k + 1:])
                o_lo = lo - (int(fc.min()) if len(fc) else 0)
                o_hi = hi - (int(fc.max()) if len(fc) else 0)
                keep = ((fl + others.base_l <= room) & (fv + others(room - fl) > thr)
                        & (fc + o_lo <= target) & (fc + o_hi >= target))
                pf.append((fl[keep], fv[keep], ref[keep], fc[keep]))
            hulls = [_hull(f[0], f[1]) for f in pf]
            order = sorted(range(len(factors)), key=lambda k: len(pf[k][0]))
            halves = (order[0::2], order[1::2])  # merged apart, then met in the middle
            try:
                merged = [_merge(half, pf, [k for k in order if k not in half], hulls, room, thr, target,
                                 max_front, deadline) for half in halves]
            except _OutOfTime:
                return cut_short("time_limit")
            if any(m is None for m in merged):
                return cut_short("too_big")
            (la, va, ca, ta), (lb, vb, cb, tb) = merged  # type: ignore[misc]
            pair = _meet(la, va, ca, lb, vb, cb, room, target)
            if pair is None:
                continue
            ia, ib, tot = pair
            total = float(val0[s]) + tot + nu * target
            if total <= _beat(best):
                continue
            best = total
            found = plan(s, _refs(halves[0], pf, ta, ia) | _refs(halves[1], pf, tb, ib), total)
    return found if found is not None else Result("optimal")


def _greedy(here: list[tuple[np.ndarray, np.ndarray, np.ndarray]], verts: list[np.ndarray], room: float
            ) -> list[int] | None:
    """A point of each front within ``room`` together (its index), or ``None`` when even the
    fastest ones break it: from the fastest hull vertices, each front's next hull segment taken,
    steepest first, while it fits (the LP relaxation's point, less its fractional segment and
    what a skipped segment blocks); ``verts``: the fronts' hull vertices."""
    if any(not len(v) for v in verts):
        return None
    left = room - sum(float(h[0][v[0]]) for h, v in zip(here, verts, strict=True))
    if left < 0:
        return None
    segs = [(float(h[1][v[i + 1]] - h[1][v[i]]) / float(h[0][v[i + 1]] - h[0][v[i]]), k, i)
            for k, (h, v) in enumerate(zip(here, verts, strict=True)) for i in range(len(v) - 1)]
    at = [0] * len(here)
    blocked = [False] * len(here)
    for _, k, i in sorted(segs, key=lambda x: -x[0]):
        if blocked[k]:
            continue
        fl, v = here[k][0], verts[k]
        step = float(fl[v[i + 1]] - fl[v[i]])
        if step <= left:
            at[k], left = i + 1, left - step
        else:
            blocked[k] = True
    return [int(v[a]) for v, a in zip(verts, at, strict=True)]


def _count_bounds(here: list[tuple[np.ndarray, np.ndarray, np.ndarray]], counts: list[np.ndarray], room: float,
                  thr: float) -> list[tuple[int, float, float]]:
    """The totals of removed blocks worth a merge, best bound first: (count, multiplier, bound).

    The number of removed blocks is an integer, the LP relaxation's is not (a block kept in
    part, a large share of one block's importance above any plan). For each count the bound
    is the LP relaxation with a price ``nu`` on each removed block, ``min over nu of
    LP(importance - nu * removed) + nu * count``: any ``nu`` gives a valid bound; a grid of prices,
    then finer grids around each count's best, make it nearly the least (all counts' prices
    evaluated together, :func:`_priced_relaxed`)."""
    lo = sum(int(c.min()) for c in counts if len(c))
    hi = sum(int(c.max()) for c in counts if len(c))
    classes = []  # per front: the hull vertices of its points of each count, by latency
    for (fl, fv, _), fc in zip(here, counts, strict=True):
        g = [np.flatnonzero(fc == u) for u in np.unique(fc)]
        pick = np.concatenate([k[_vertices(fl[k], fv[k])] for k in g]) if g else np.zeros(0, dtype=np.int64)
        pick = pick[np.argsort(fl[pick], kind="stable")]
        classes.append((fl[pick], fv[pick], fc[pick].astype(np.float64)))
    if lo == hi:
        at0 = float(_priced_relaxed(classes, np.zeros(1), room)[0])
        return [(lo, 0.0, at0)] if at0 > thr else []
    span = max((float(fv.max() - fv.min()) for fv in (h[1] for h in here) if len(fv)), default=1.0)
    grid = span * np.concatenate([-np.geomspace(1.0, 1e-3, 12), [0.0], np.geomspace(1e-3, 1.0, 12)])
    at = _priced_relaxed(classes, grid, room)
    targets = np.arange(lo, hi + 1)
    f = at[None, :] + grid[None, :] * targets[:, None]  # [count, price]
    j = np.argmin(f, axis=1)
    bound = f[np.arange(len(targets)), j]
    nu = grid[j]
    left = np.flatnonzero(bound > thr)
    a = grid[np.maximum(j - 1, 0)]
    b = grid[np.minimum(j + 1, len(grid) - 1)]
    for _ in range(REFINE_ROUNDS):  # the bound is convex in nu: a finer grid inside the bracket
        if not len(left):
            break
        t = np.linspace(0.0, 1.0, REFINE_POINTS)
        cand = a[left, None] + (b[left] - a[left])[:, None] * t[None, :]  # [count left, price]
        val = _priced_relaxed(classes, cand.ravel(), room).reshape(cand.shape) + cand * targets[left, None]
        jj = np.argmin(val, axis=1)
        rows = np.arange(len(left))
        better = val[rows, jj] < bound[left]
        bound[left] = np.where(better, val[rows, jj], bound[left])
        nu[left] = np.where(better, cand[rows, jj], nu[left])
        step = (b[left] - a[left]) / (REFINE_POINTS - 1)
        a[left], b[left] = cand[rows, jj] - step, cand[rows, jj] + step
        left = left[bound[left] > thr]
    out = [(int(targets[i]), float(nu[i]), float(bound[i])) for i in np.flatnonzero(bound > thr)]
    return sorted(out, key=lambda x: -x[2])


def _meet(la: np.ndarray, va: np.ndarray, ca: np.ndarray, lb: np.ndarray, vb: np.ndarray, cb: np.ndarray,
          room: float, target: int) -> tuple[int, int, float] | None:
    """The best pair of a point of each half within ``room`` and ``target`` removed blocks
    together: (its index in each half, its importance); each half's points of one count have
    importance rising with latency, so each point of A takes B's last one that fits."""
    best: tuple[int, int, float] | None = None
    for u in np.unique(ca):
        ia = np.flatnonzero(ca == u)
        ib = np.flatnonzero(cb == target - u)
        if not len(ia) or not len(ib):
            continue
        j = np.searchsorted(lb[ib], room - la[ia], side="right") - 1
        ok = np.flatnonzero(j >= 0)
        if not len(ok):
            continue
        tot = va[ia[ok]] + vb[ib[j[ok]]]
        k = int(np.argmax(tot))
        if best is None or float(tot[k]) > best[2]:
            best = (int(ia[ok[k]]), int(ib[j[ok[k]]]), float(tot[k]))
    return best
