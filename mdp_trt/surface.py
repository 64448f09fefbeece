"""Latency surface: the latency model the solver uses.

For every latency term of a space, an array over the choices of the dims it depends on,
filled from measured points of the term's subgraph (its signature). Values come from
measurement at the exact widths; only widths that were never measured are interpolated,
and the surface counts them. Nothing is smoothed: the steps that real engines show at
alignment boundaries stay in the array.

Model latency = calibration(sum over kept terms), where the calibration is an affine fit of
whole-model measurements against the raw sum (it absorbs what terms leave out: pooling,
adds, launch gaps, fusion across term borders).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from mdp_trt.errors import TableError
from mdp_trt.space import Plan, PruningSpace, Term

Points = Mapping[str, Mapping[tuple[int, ...], float]]


@dataclass
class Calibration:
    """``measured ~= scale * raw + offset``, fitted on whole-model measurements."""

    scale: float = 1.0
    offset: float = 0.0
    plans: int = 0
    fit_median_abs_pct_err: float | None = None
    raw_median_abs_pct_err: float | None = None

    def __call__(self, raw: float | np.ndarray) -> float | np.ndarray:
        return self.scale * raw + self.offset

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, float | int | None]) -> Calibration:
        try:
            return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})  # type: ignore[arg-type]
        except TypeError as exc:
            raise TableError(f"corrupt calibration record: {exc}") from exc

    @classmethod
    def fit(cls, raw: Sequence[float], measured: Sequence[float],
            weights: Sequence[float] | None = None) -> Calibration:
        """Weighted least-squares affine fit; a pure scale when there are fewer than three points."""
        r = np.asarray(raw, dtype=np.float64)
        m = np.asarray(measured, dtype=np.float64)
        w = np.ones_like(r) if weights is None else np.asarray(weights, dtype=np.float64)
        if len(r) == 0:
            return cls()
        if len(r) < 3 or np.ptp(r) <= 1e-12:
            scale, offset = float(np.dot(w * r, m) / np.dot(w * r, r)), 0.0
        else:
            scale, offset = (float(v) for v in np.polyfit(r, m, 1, w=np.sqrt(w)))
        cal = cls(scale, offset, len(r))
        cal.fit_median_abs_pct_err = float(np.median(pct_err(cal(r), m)))
        cal.raw_median_abs_pct_err = float(np.median(pct_err(r, m)))
        return cal


def pct_err(pred: np.ndarray | Sequence[float], measured: np.ndarray | Sequence[float]) -> np.ndarray:
    """Absolute percentage error of predictions against measurements."""
    p = np.asarray(pred, dtype=np.float64)
    m = np.asarray(measured, dtype=np.float64)
    return 100.0 * np.abs(p - m) / m


def grid(space: PruningSpace, term: Term) -> list[tuple[int, ...]]:
    """Every width combination of a term over its dims' choices."""
    return list(itertools.product(*(space.dim(d).choices for d in term.dims)))


class LatencySurface:
    """Per-term latency arrays over the dims' choices, plus the calibration."""

    def __init__(self, space: PruningSpace, arrays: dict[str, np.ndarray],
                 interpolated: dict[str, int], calibration: Calibration | None = None) -> None:
        self.space = space
        self.arrays = arrays
        self.interpolated = interpolated
        self.calibration = calibration or Calibration()
        self._index = {d.name: {w: i for i, w in enumerate(d.choices)} for d in space.dims}

    @classmethod
    def from_points(cls, space: PruningSpace, points: Points) -> LatencySurface:
        """Fill every term's array from measured points (``signature -> widths -> ms``)."""
        arrays: dict[str, np.ndarray] = {}
        interpolated: dict[str, int] = {}
        cache: dict[tuple[str, tuple[tuple[int, ...], ...]], tuple[np.ndarray, int]] = {}
        for term in space.terms:
            axes = tuple(space.dim(d).choices for d in term.dims)
            key = (term.signature, axes)
            if key not in cache:
                measured = points.get(term.signature)
                if not measured:
                    raise TableError(
                        f"the latency table has no measurements for term {term.name} "
                        f"({term.signature}); profile the model with this table first"
                    )
                cache[key] = _fill(axes, measured)
            arrays[term.name], interpolated[term.name] = cache[key]
        return cls(space, arrays, interpolated)

    @property
    def interpolated_points(self) -> int:
        """Grid points (over distinct terms) whose value is interpolated, not measured."""
        seen: dict[str, int] = {}
        for t in self.space.terms:
            seen[t.signature + str([self.space.dim(d).choices for d in t.dims])] = self.interpolated[t.name]
        return sum(seen.values())

    def term_ms(self, term: Term, plan: Plan) -> float:
        idx = tuple(self._index[d][plan.widths[d]] for d in term.dims)
        return float(self.arrays[term.name][idx])

    def raw(self, plan: Plan) -> float:
        """Uncalibrated sum over the terms of kept blocks and the fixed parts."""
        return sum(self.term_ms(t, plan) for t in self.space.kept_terms(plan))

    def predict(self, plan: Plan) -> float:
        """Calibrated latency of ``plan`` in milliseconds."""
        return float(self.calibration(self.raw(plan)))

    def per_block(self, plan: Plan) -> dict[str, float]:
        """Uncalibrated latency of every block (and ``fixed`` for stem and head) under ``plan``."""
        out: dict[str, float] = {}
        for t in self.space.kept_terms(plan):
            k = t.block or "fixed"
            out[k] = out.get(k, 0.0) + self.term_ms(t, plan)
        return out


def _fill(axes: tuple[tuple[int, ...], ...], measured: Mapping[tuple[int, ...], float]
          ) -> tuple[np.ndarray, int]:
    shape = tuple(len(a) for a in axes)
    out = np.empty(shape, dtype=np.float64)
    missing: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for idx in itertools.product(*(range(n) for n in shape)):
        w = tuple(axes[k][i] for k, i in enumerate(idx))
        v = measured.get(w)
        if v is None:
            missing.append((idx, w))
        else:
            out[idx] = v
    if missing:
        values = _interpolate(measured, [w for _, w in missing])
        for (idx, _), v in zip(missing, values, strict=True):
            out[idx] = v
    return out, len(missing)


def _interpolate(measured: Mapping[tuple[int, ...], float], queries: list[tuple[int, ...]]) -> np.ndarray:
    """Linear interpolation on the measured grid, nearest value outside it."""
    pts = np.array(list(measured.keys()), dtype=np.float64)
    vals = np.array(list(measured.values()), dtype=np.float64)
    q = np.array(queries, dtype=np.float64)
    if pts.ndim == 1:
        pts = pts[:, None]
    if pts.shape[1] == 0:
        return np.full(len(q), float(vals[0]))
    coords = [np.unique(pts[:, k]) for k in range(pts.shape[1])]
    if len(pts) == int(np.prod([len(c) for c in coords])) and all(len(c) >= 2 for c in coords):
        from scipy.interpolate import RegularGridInterpolator

        cube = np.empty([len(c) for c in coords])
        pos = [{v: i for i, v in enumerate(c)} for c in coords]
        for p, v in zip(pts, vals, strict=True):
            cube[tuple(pos[k][p[k]] for k in range(len(p)))] = v
        clipped = np.stack([np.clip(q[:, k], coords[k][0], coords[k][-1]) for k in range(q.shape[1])], axis=1)
        return RegularGridInterpolator(coords, cube)(clipped)
    # Scattered points: piecewise-linear on a triangulation, nearest outside the hull.
    if pts.shape[1] == 1:
        order = np.argsort(pts[:, 0])
        return np.interp(q[:, 0], pts[order, 0], vals[order])
    from scipy.interpolate import griddata

    out = griddata(pts, vals, q, method="linear") if len(pts) > pts.shape[1] else np.full(len(q), np.nan)
    bad = np.isnan(out)
    if bad.any():
        out[bad] = griddata(pts, vals, q[bad], method="nearest")
    return out


def linear_surface(surface: LatencySurface) -> LatencySurface:
    """The HALP-style latency model MDP argues against, on the same measurements: per term,
    ``a + b * out`` fitted at dense input width, where ``out`` is the product of the term's
    output-side widths (all dims but the first; the only dim of a one-dim term)."""
    space = surface.space
    arrays: dict[str, np.ndarray] = {}
    for t in space.terms:
        arr = surface.arrays[t.name]
        axes = [np.array(space.dim(d).choices, dtype=np.float64) for d in t.dims]
        if len(axes) <= 1:
            x = axes[0] if axes else np.zeros(1)
            y = arr.reshape(-1)
        else:
            grids = np.meshgrid(*axes[1:], indexing="ij")
            x = np.prod(np.stack([g.ravel() for g in grids]), axis=0)
            y = arr[-1].ravel()  # first dim (the input width) at its dense size
        b, a = np.polyfit(x, y, 1) if np.ptp(x) > 0 else (0.0, float(np.mean(y)))
        full = np.meshgrid(*axes, indexing="ij") if axes else []
        out = np.prod(np.stack(full[1:]), axis=0) if len(full) > 1 else (full[0] if full else np.zeros(()))
        arrays[t.name] = a + b * out
    return LatencySurface(space, arrays, dict(surface.interpolated), Calibration())


def sample_plans(space: PruningSpace, n: int, seed: int) -> list[Plan]:
    """``n`` plans spread over the latency range: a global keep ratio per plan, jittered per dim,
    and some removed blocks. Different seeds give disjoint plans for calibration and evaluation."""
    rng = random.Random(seed)
    removable = [b.name for b in space.blocks if b.removable]
    plans: list[Plan] = []
    for i in range(n):
        ratio = 0.25 + 0.75 * (i + rng.random()) / n
        widths = {}
        for d in space.dims:
            target = ratio * (0.75 + 0.5 * rng.random()) * d.size
            widths[d.name] = min(d.choices, key=lambda c, t=target: abs(c - t))
        k = rng.randint(0, max(0, int(len(removable) * (1 - ratio) * 0.6)))
        plans.append(space.plan(widths, rng.sample(removable, k)))
    return plans


def calibrate(surface: LatencySurface, plans: Sequence[Plan], measure: Callable[[Plan], float]
              ) -> tuple[Calibration, list[float]]:
    """Fit the surface's calibration to whole-model measurements of ``plans``; returns it and them."""
    measured = [measure(p) for p in plans]
    cal = Calibration.fit([surface.raw(p) for p in plans], measured)
    surface.calibration = cal
    return cal, measured
