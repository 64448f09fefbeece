"""Exact solve by enumeration, for a problem whose shared dims have few choices left.

Once every dim that no block owns (a shared width) has a choice, the rest falls apart into
independent parts: the dims and removable blocks linked by terms (a block's private widths,
its removal, the latency and value terms over them). Each part is a list of options (every
combination of its blocks' fates and its dims' choices) with a latency and an importance,
and the whole problem is to pick one option per part within the budget: a multiple-choice
knapsack, solved exactly by merging the parts' Pareto fronts (latency up, importance up)
one part at a time, in two halves that meet in the middle (each point of one half takes the
best point of the other that fits).

Pruning keeps it exact: an option that is slower and keeps no more importance than another of
its part is never needed; a partial point is dropped when even the rest's fastest options
break the budget, or when a valid upper bound on what it can reach does not beat the best
point known. The bound is Lagrangian: for any ``lam >= 0`` the rest keeps at most
``sum over parts of max(value - lam * latency) + lam * (budget left)``; the whole grid of
shared assignments is bounded at once at a few multipliers, and each assignment visited gets
its own best multiplier. Assignments are visited in the order of that bound and the search
stops when it cannot beat the best. "Better" means by more than ``REL_TOL`` (relative), so an
optimum it proves is within that of the true one.

It is used where it is small (few shared assignments, small parts, fronts that stay small,
few assignments worth merging) and says so otherwise (``too_big``, with the best point it
found), so the caller falls back to the MIP.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import numpy as np

from solvers.problem import Problem

MAX_SHARED = 2_000_000  # shared assignments
MAX_OPTIONS = 50000  # options of one part
MAX_FRONT = 200000  # partial points kept after one merge
MAX_HEADS = 400  # shared assignments merged (a few ms each): past it the MIP is the better bet
REL_TOL = 1e-9  # a point must beat the best by this (relative) to count as better
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


def _best_multiplier(fronts: list[tuple[np.ndarray, np.ndarray]], room: float, lam: float,
                     steps: int = 30) -> tuple[float, float]:
    """The budget multiplier that minimises the Lagrangian bound
    ``sum over parts of max(value - mu * latency) + mu * room`` (convex in ``mu``: bisection on
    its slope), and that bound; never worse than at ``lam``."""
    if any(not len(fl) for fl, _ in fronts):
        return lam, -np.inf

    def at(mu: float) -> tuple[float, float]:
        total, used = mu * room, 0.0
        for fl, fv in fronts:
            j = int(np.argmax(fv - mu * fl))
            total += float(fv[j] - mu * fl[j])
            used += float(fl[j])
        return total, room - used  # the bound and its slope

    best_mu, (best_b, slope) = lam, at(lam)
    if slope >= 0:  # the budget is not binding at lam: lower multipliers may be better
        lo, hi = 0.0, lam
    else:
        lo, hi = lam, max(2.0 * lam, 1.0)
        while at(hi)[1] < 0 and hi < 1e12:
            lo, hi = hi, hi * 4.0
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        b, sl = at(mid)
        if b < best_b:
            best_mu, best_b = mid, b
        if sl < 0:
            lo = mid
        else:
            hi = mid
    for mu in (lo, hi):
        b, _ = at(mu)
        if b < best_b:
            best_mu, best_b = mu, b
    return best_mu, best_b


class _OutOfTime(Exception):
    """The deadline passed in the middle of a merge."""


def _merge(half: list[int], pf: list[tuple[np.ndarray, np.ndarray, np.ndarray]], others: list[int],
           mu: float, room: float, thr: float, max_front: int, deadline: float
           ) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]] | None:
    """The Pareto front of the parts ``half`` together (latency, importance, back pointers),
    without points that the rest (the parts still to come and ``others``) cannot lift above
    ``thr`` within ``room``; ``None`` when it grows past the cap."""
    fast_o = sum(float(pf[k][0].min()) for k in others) if all(len(pf[k][0]) for k in others) else np.inf
    lag_o = sum(float(np.max(pf[k][1] - mu * pf[k][0])) for k in others) if np.isfinite(fast_o) else -np.inf
    fast_k = [float(pf[k][0].min()) if len(pf[k][0]) else np.inf for k in half]
    lag_k = [float(np.max(pf[k][1] - mu * pf[k][0])) if len(pf[k][0]) else -np.inf for k in half]
    rest_fast = np.concatenate([np.cumsum(fast_k[::-1])[::-1], [0.0]]) + fast_o
    rest_lag = np.concatenate([np.cumsum(lag_k[::-1])[::-1], [0.0]]) + lag_o
    lat, val = np.zeros(1), np.zeros(1)
    trail: list[tuple[np.ndarray, np.ndarray]] = []
    for step, k in enumerate(half):
        fl, fv, _ = pf[k]
        if len(lat) * len(fl) > 20 * max_front:
            return None
        if time.perf_counter() > deadline:
            raise _OutOfTime
        cl = (lat[:, None] + fl[None, :]).ravel()
        cv = (val[:, None] + fv[None, :]).ravel()
        ok = (cl + rest_fast[step + 1] <= room) & (cv - mu * cl + rest_lag[step + 1] + mu * room > thr)
        pick = np.flatnonzero(ok)
        pick = pick[_front(cl[pick], cv[pick], room)]
        if len(pick) > max_front:
            return None
        trail.append((pick // max(len(fl), 1), pick % max(len(fl), 1)))
        lat, val = cl[pick], cv[pick]
        if not len(pick):
            break
    return lat, val, trail


def _trace(half: list[int], pf: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
           trail: list[tuple[np.ndarray, np.ndarray]], j: int) -> dict[int, int]:
    """The option of every part of ``half`` behind point ``j`` of its merged front."""
    picks: dict[int, int] = {}
    for step in range(len(half) - 1, -1, -1):
        parent, option = trail[step]
        picks[half[step]] = int(pf[half[step]][2][option[j]])
        j = int(parent[j])
    return picks


def _beat(best: float) -> float:
    """What a point must exceed to count as better than ``best``."""
    return best + REL_TOL * max(1.0, abs(best)) if np.isfinite(best) else best


def solve(p: Problem, budget: float, best: float = float("-inf"), lam: float = 0.0,
          deadline: float = float("inf"), max_front: int = MAX_FRONT, max_heads: int = MAX_HEADS) -> Result:
    """The optimum of ``p`` under ``budget`` if it beats ``best``; ``lam``: a budget multiplier
    for the bound (the LP dual of the budget is a good one; any value >= 0 is valid).
    ``max_front``: the most partial points one merge may keep, ``max_heads``: the most shared
    assignments merged, before giving up (``too_big``, with the best point found so far)."""
    if not p.scale > 0:
        return Result("too_big")
    lam = max(0.0, float(lam)) * p.scale  # per unit of the unscaled sum of terms
    split = _split(p)
    if split is None:
        return Result("too_big")
    shared, parts, fixed_lat, fixed_val = split
    dims_by = {d.name: d for d in p.dims}
    sizes = tuple(len(dims_by[n].choices) for n in shared)
    if int(np.prod(sizes)) > MAX_SHARED:
        return Result("too_big")
    cap = (budget - p.offset) / p.scale - p.fixed_ms  # the budget on the unscaled sum of terms

    def spread(ax: tuple[int, ...], arr: np.ndarray) -> np.ndarray:
        """An array over some shared axes (ascending) as one over the whole grid."""
        return np.reshape(arr, [sizes[i] if i in ax else 1 for i in range(len(sizes))])

    # fronts of each part for each assignment of the shared axes it depends on
    fronts: list[dict[tuple[int, ...], tuple[np.ndarray, np.ndarray, np.ndarray, float, float]]] = []
    fast = np.zeros(sizes)
    lag = np.zeros(sizes)
    for part in parts:
        table: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray, np.ndarray, float, float]] = {}
        sub = [sizes[a] for a in part.axes]
        f_arr, g_arr = np.zeros(sub), np.zeros(sub)
        for key in itertools.product(*[range(k) for k in sub]):
            full = dict(zip(part.axes, key, strict=True))
            lat, val = np.zeros(len(part.value)), part.value
            for ax, arr in part.lat:
                lat = lat + arr[tuple(full[a] for a in ax)]
            for ax, arr in part.val:
                val = val + arr[tuple(full[a] for a in ax)]
            idx = _front(lat, val, cap)
            fl, fv = lat[idx], val[idx]
            fa = float(fl.min()) if len(fl) else np.inf
            ga = float(np.max(fv - lam * fl)) if len(fl) else -np.inf
            table[key] = (fl, fv, idx, fa, ga)
            f_arr[key], g_arr[key] = fa, ga
        fronts.append(table)
        fast = fast + spread(part.axes, f_arr)
        lag = lag + spread(part.axes, g_arr)
        if time.perf_counter() > deadline:
            return Result("time_limit")
    lat0 = np.zeros(sizes)
    val0 = np.zeros(sizes)
    for ax, arr in fixed_lat:
        lat0 = lat0 + spread(ax, arr)
    for ax, arr in fixed_val:
        val0 = val0 + spread(ax, arr)
    for i, n in enumerate(shared):
        val0 = val0 + spread((i,), np.asarray(dims_by[n].value, dtype=np.float64))
    fast = fast + lat0
    # the Lagrangian bound of every assignment at a few multipliers around lam, the least kept
    bound = val0 + lag + lam * (cap - lat0)
    for mu in (lam * MU_STEPS if lam > 0 else ()):
        at_mu = val0 + mu * (cap - lat0)
        for k, part in enumerate(parts):
            g = np.full([sizes[a] for a in part.axes], -np.inf)
            for key, (fl, fv, _, _, _) in fronts[k].items():
                if len(fl):
                    g[key] = float(np.max(fv - mu * fl))
            at_mu = at_mu + spread(part.axes, g)
        bound = np.minimum(bound, at_mu)
    feasible = fast <= cap
    if not feasible.any():
        return Result("infeasible")
    heads = np.flatnonzero(feasible.ravel() & (bound.ravel() > _beat(best)))
    heads = heads[np.argsort(-bound.ravel()[heads], kind="stable")]
    found: Result | None = None
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
        here = [fronts[k][tuple(s[a] for a in part.axes)] for k, part in enumerate(parts)]
        mu, tight = _best_multiplier([(h[0], h[1]) for h in here], room, lam)
        tight += float(val0[s])
        if tight <= _beat(best):
            continue
        slack = tight - _beat(best)  # what the parts may lose against their best together
        pf: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for fl, fv, idx, fa, _ in here:
            # an option slower than the room the others leave, or losing more than the slack, is never used
            ga = float(np.max(fv - mu * fl)) if len(fl) else -np.inf
            keep = (fl <= room - (float(fast[s]) - float(lat0[s]) - fa)) & (fv - mu * fl > ga - slack)
            pf.append((fl[keep], fv[keep], idx[keep]))
        order = sorted(range(len(parts)), key=lambda k: len(pf[k][0]))
        halves = (order[0::2], order[1::2])  # merged apart, then met in the middle
        thr = _beat(best) - float(val0[s])
        try:
            merged = [_merge(half, pf, [k for k in order if k not in half], mu, room, thr, max_front, deadline)
                      for half in halves]
        except _OutOfTime:
            return cut_short("time_limit")
        if any(m is None for m in merged):
            return cut_short("too_big")
        (la, va, ta), (lb, vb, tb) = merged  # type: ignore[misc]
        if not len(la) or not len(lb):
            continue
        # B's front has importance rising with latency: each A point takes B's last one that fits
        jb = np.searchsorted(lb, room - la, side="right") - 1
        ok = np.flatnonzero(jb >= 0)
        if not len(ok):
            continue
        tot = va[ok] + vb[jb[ok]]
        pick = int(np.argmax(tot))
        total = float(val0[s]) + float(tot[pick])
        if total <= _beat(best):
            continue
        picks = _trace(halves[0], pf, ta, int(ok[pick])) | _trace(halves[1], pf, tb, int(jb[ok[pick]]))
        widths = {n: dims_by[n].choices[i] for n, i in zip(shared, s, strict=True)}
        gone: list[str] = []
        for k, o in picks.items():
            part = parts[k]
            for n in part.dims:
                c = int(part.choice[n][o])
                widths[n] = dims_by[n].choices[c] if c >= 0 else dims_by[n].choices[-1]
            gone += [b for b in part.blocks if part.removed[b][o]]
        best = total
        found = Result("optimal", widths, tuple(b.name for b in p.blocks if b.name in gone), total)
    return found if found is not None else Result("optimal")
