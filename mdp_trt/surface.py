"""Latency surface: the latency model the solver uses.

For every latency term of a space, an array over the choices of the dims it depends on,
filled from measured points of the term's subgraph (its signature). Values come from
measurement at the exact widths; only widths that were never measured are interpolated,
and the surface counts them. Nothing is smoothed: the steps that real engines show at
alignment boundaries stay in the array.

Model latency = scale * (sum of kept terms' latency) + offset, fitted on whole-model
measurements by relative error (it absorbs what terms leave out: pooling, adds, launch
gaps, fusion across term borders). A third part may charge the kept terms' parameters:
weight traffic, for engines where a term timed alone keeps its weights in cache while inside
the whole model they stream from memory; it is kept when it lowers the leave-one-out error
(:func:`fit_calibration`). Every part but one is a sum
over terms, so the calibrated model stays additive: :meth:`LatencySurface.calibrated_arrays`
gives per-term arrays that sum, plus the offset, to :meth:`LatencySurface.predict`; the
solver takes exactly those. The one that is not, weights spilling out of cache, charges the
kept terms' parameters past a knee: the solver takes it as a second row over the same terms.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from mdp_trt.errors import TableError
from mdp_trt.space import Plan, PruningSpace, Term

Points = Mapping[str, Mapping[tuple[int, ...], float]]
"""Term signature (or a term's name, for points of that term alone) -> widths -> ms."""

MIN_TRAFFIC_POINTS = 5
"""Fewest whole-model measurements the three-parameter (weight-traffic) fit is tried on."""

MIN_SPILL_POINTS = 6
"""Fewest whole-model measurements the four-parameter (weights spilling out of cache) fit is
tried on."""

SPILL_KNEES = 64
"""Knees tried by the spill fit, evenly between the calibration plans' fewest and most parameters."""

RESOLUTION = 1e-3
"""Leave-one-out errors closer than this (relative, root mean square) are the same: no
whole-model measurement repeats to better than 0.1%, and where both fits leave rounding error
alone (latency exactly affine in the terms) the one-standard-error rule would compare
rounding: an exactly affine toy chose FLOPs plus terms on one CPU and not on another."""


def _clearly_better(base: np.ndarray, cand: np.ndarray) -> bool:
    """Whether leave-one-out errors ``cand`` beat ``base`` by more than the noise of so few
    folds: the mean of the paired differences of squared errors exceeds its standard error
    (the one-standard-error rule), and the root mean squares differ by more than
    :data:`RESOLUTION`. A margin on the root mean square alone let a fit with a
    part more win on a handful of folds: on resnet50 at 224 px on OpenVINO (AMD EPYC box, 8
    plans) the weight-traffic fit left 2.14% against the affine fit's 2.61%, one standard
    error of their difference apart, and gave 4.39% / 8.59% on 30 plans against 3.44% / 6.51%.
    Where a part matters the evidence is plain: on resnet50 at 224 px on OpenVINO (Intel Xeon
    box) weight traffic left 1.37% against 1.92%, two standard errors apart, and gave 2.37% /
    9.47% against 3.98% / 11.41%."""
    if len(base) != len(cand) or len(base) < 2:
        return False
    if _rms(base) - _rms(cand) <= RESOLUTION:
        return False
    diff = np.square(base) - np.square(cand)
    return bool(diff.mean() > diff.std(ddof=1) / np.sqrt(len(diff)))


@dataclass
class Calibration:
    """``measured ~= scale * raw + ms_per_mparam * mparams + ms_per_gflop * gflops + offset
    + ms_per_spilled_mparam * max(0, mparams - spill_mparams)``, fitted on whole-model
    measurements (``raw``: the sum of kept terms' latency; ``mparams``, ``gflops``: the sums of
    their parameters in millions and of their GFLOPs). ``scale`` is 0 where FLOPs alone predict
    better than the terms. The last part (form ``spill``) charges the weights past a knee: a
    term timed alone runs with its weights in cache, a whole model whose weights outgrow the
    cache streams them from memory on every inference, so past the knee each million
    parameters costs the same again (resnet18 at 64 px, AMD EPYC box: whole models 1.01-1.13x
    the sum of their terms under 2M parameters, 1.8-2.3x at 6-12M). It is not a sum over
    terms; the solver takes it as a second latency row (:class:`solvers.SolverExcess`).
    Records written before a part existed read it as 0. ``form`` names the candidate chosen
    (:func:`fit_calibration`)."""

    scale: float = 1.0
    offset: float = 0.0
    plans: int = 0
    fit_median_abs_pct_err: float | None = None
    raw_median_abs_pct_err: float | None = None
    ms_per_mparam: float = 0.0
    ms_per_gflop: float = 0.0
    form: str = "affine"
    ms_per_spilled_mparam: float = 0.0
    spill_mparams: float = 0.0

    def __call__(self, raw: float | np.ndarray, mparams: float | np.ndarray = 0.0,
                 gflops: float | np.ndarray = 0.0) -> float | np.ndarray:
        out = self.scale * raw + self.ms_per_mparam * mparams + self.ms_per_gflop * gflops + self.offset
        if self.ms_per_spilled_mparam:
            out = out + self.spilled(mparams)
        return out

    def spilled(self, mparams: float | np.ndarray) -> float | np.ndarray:
        """The spill part alone: the charge for the parameters past the knee."""
        past = np.maximum(0.0, np.asarray(mparams, dtype=np.float64) - self.spill_mparams)
        charge = self.ms_per_spilled_mparam * past
        return float(charge) if np.ndim(charge) == 0 else charge

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, float | int | None]) -> Calibration:
        try:
            return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})  # type: ignore[arg-type]
        except TypeError as exc:
            raise TableError(f"corrupt calibration record: {exc}") from exc

    @classmethod
    def fit(cls, raw: Sequence[float], measured: Sequence[float], weights: Sequence[float] | None = None,
            mparams: Sequence[float] | None = None, min_traffic_points: int = MIN_TRAFFIC_POINTS,
            gflops: Sequence[float] | None = None, use_raw: bool = True, spill: bool = False) -> Calibration:
        """Least-squares fit of the relative error (each point weighted by ``weights``).

        With ``mparams`` (weight traffic) or ``gflops`` and at least ``min_traffic_points``
        points, that part is fitted too; it is dropped (affine fit) when a coefficient would
        come out negative. ``spill=True`` with ``mparams`` and at least :data:`MIN_SPILL_POINTS`
        points fits the spill part instead of weight traffic (the knee by least squares over
        :data:`SPILL_KNEES` values); dropped likewise. ``use_raw=False`` with ``gflops`` fits
        FLOPs alone (scale 0). With fewer than three points, or no spread in ``raw``, a pure
        scale.
        """
        r = np.asarray(raw, dtype=np.float64)
        m = np.asarray(measured, dtype=np.float64)
        w = np.ones_like(r) if weights is None else np.asarray(weights, dtype=np.float64)
        if len(r) == 0:
            return cls()
        w = w / m**2  # relative error: a 1 ms miss on a 10 ms model counts as much as 10 ms on 100 ms
        zero = np.zeros_like(r)
        p = zero if mparams is None else np.asarray(mparams, dtype=np.float64)
        g = zero if gflops is None else np.asarray(gflops, dtype=np.float64)
        cal: Calibration | None = None
        if not use_raw and gflops is not None and len(r) >= 3 and np.ptp(g) > 1e-12:
            slope, offset = _wls(np.stack([g, np.ones_like(r)], axis=1), m, w)
            if slope > 0:
                cal = cls(0.0, offset, len(r), ms_per_gflop=slope, form="flops")
        if cal is None and (len(r) < 3 or np.ptp(r) <= 1e-12):
            cal = cls(float(np.dot(w * r, m) / np.dot(w * r, r)), 0.0, len(r), form="scale")
        if cal is None and spill and mparams is not None and len(r) >= max(MIN_SPILL_POINTS, min_traffic_points):
            cal = _fit_spill(cls, r, m, w, p)
        if cal is None and not spill and len(r) >= min_traffic_points:
            for extra, name in ((p, "traffic"), (g, "flops+terms")):
                if (extra is p and mparams is None) or (extra is g and gflops is None) or np.ptp(extra) <= 1e-12:
                    continue
                scale, coef, offset = _wls(np.stack([r, extra, np.ones_like(r)], axis=1), m, w)
                if scale > 0 and coef >= 0:
                    cal = cls(scale, offset, len(r), form=name,
                              **({"ms_per_mparam": coef} if name == "traffic" else {"ms_per_gflop": coef}))
                break
        if cal is None:
            scale, offset = _wls(np.stack([r, np.ones_like(r)], axis=1), m, w)
            cal = cls(scale, offset, len(r))
        if cal.scale < 0 or (cal.scale == 0 and cal.form != "flops"):
            # Measurements that do not grow with the model (noise on tiny models, a loaded
            # machine): latency cannot fall as terms grow, so keep the proportional fit, which
            # is positive for positive sums and measurements.
            cal = cls(float(np.dot(w * r, m) / np.dot(w * r, r)), 0.0, len(r), form="scale")
        cal.fit_median_abs_pct_err = float(np.median(pct_err(cal(r, p, g), m)))
        cal.raw_median_abs_pct_err = float(np.median(pct_err(r, m)))
        return cal


def _fit_spill(cls: type[Calibration], r: np.ndarray, m: np.ndarray, w: np.ndarray, p: np.ndarray
               ) -> Calibration | None:
    """``scale * raw + k * max(0, mparams - knee) + offset`` by weighted least squares, the
    knee the best of :data:`SPILL_KNEES` values strictly inside the plans' range of parameters
    (at its ends the part is zero or plain weight traffic); ``None`` where no knee gives a
    positive scale and charge."""
    if np.ptp(p) <= 1e-12:
        return None
    best: tuple[float, tuple[float, ...], float] | None = None
    for knee in np.linspace(p.min(), p.max(), SPILL_KNEES + 2)[1:-1]:
        x = np.stack([r, np.maximum(0.0, p - knee), np.ones_like(r)], axis=1)
        coef = _wls(x, m, w)
        if coef[0] <= 0 or coef[1] <= 0:
            continue
        sse = float(np.dot(w, np.square(x @ np.asarray(coef) - m)))
        if best is None or sse < best[0]:
            best = (sse, coef, float(knee))
    if best is None:
        return None
    (scale, k, offset), knee = best[1], best[2]
    return cls(scale, offset, len(r), form="spill", ms_per_spilled_mparam=k, spill_mparams=knee)


def _wls(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, ...]:
    sw = np.sqrt(w)
    coef, *_ = np.linalg.lstsq(x * sw[:, None], y * sw, rcond=None)
    return tuple(float(c) for c in coef)


def pct_err(pred: ArrayLike, measured: ArrayLike) -> np.ndarray:
    """Absolute percentage error of predictions against measurements."""
    p = np.asarray(pred, dtype=np.float64)
    m = np.asarray(measured, dtype=np.float64)
    return 100.0 * np.abs(p - m) / m


def grid(space: PruningSpace, term: Term) -> list[tuple[int, ...]]:
    """Every width combination of a term over its dims' choices."""
    return list(itertools.product(*(space.dim(d).choices for d in term.dims)))


class LatencySurface:
    """Per-term latency arrays over the dims' choices, plus the calibration.

    ``mparams`` holds, per term and over the same axes, the parameters (millions) of the
    term's subgraph: the weight traffic the calibration may charge for. Counted from the
    model adapter's term modules when first needed; ``None`` for a space no adapter builds.
    """

    def __init__(self, space: PruningSpace, arrays: dict[str, np.ndarray],
                 interpolated: dict[str, int], calibration: Calibration | None = None,
                 mparams: dict[str, np.ndarray] | None = None, gflops: dict[str, np.ndarray] | None = None
                 ) -> None:
        self.space = space
        self.arrays = arrays
        self.interpolated = interpolated
        self.calibration = calibration or Calibration()
        self._mparams = mparams
        self._gflops = gflops
        self._calibrated: tuple[tuple[float, float, float], dict[str, np.ndarray]] | None = None
        self.calibration_plans: list[Plan] = []
        """The plans the calibration was fitted on, where it was fitted here (not given)."""
        self._index = {d.name: {w: i for i, w in enumerate(d.choices)} for d in space.dims}

    @classmethod
    def from_points(cls, space: PruningSpace, points: Points) -> LatencySurface:
        """Fill every term's array from measured points (``signature -> widths -> ms``); a
        term's own name, where given, takes precedence over its signature (a term whose
        surroundings in the model change what part of its measurement it costs there)."""
        arrays: dict[str, np.ndarray] = {}
        interpolated: dict[str, int] = {}
        cache: dict[tuple[str, tuple[tuple[int, ...], ...]], tuple[np.ndarray, int]] = {}
        for term in space.terms:
            axes = tuple(space.dim(d).choices for d in term.dims)
            key = (term.name if term.name in points else term.signature, axes)
            if key not in cache:
                measured = points.get(key[0])
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

    @property
    def mparams(self) -> dict[str, np.ndarray] | None:
        """Parameters (millions) per term over its grid; ``None`` when no adapter knows the space."""
        if self._mparams is None:
            self._mparams = term_mparams(self.space)
        return self._mparams

    @property
    def gflops(self) -> dict[str, np.ndarray] | None:
        """GFLOPs per term over its grid; ``None`` when no adapter knows the space."""
        if self._gflops is None:
            self._gflops = term_gflops(self.space)
        return self._gflops

    def _at(self, arrays: Mapping[str, np.ndarray], term: Term, plan: Plan) -> float:
        return float(arrays[term.name][tuple(self._index[d][plan.widths[d]] for d in term.dims)])

    def term_ms(self, term: Term, plan: Plan) -> float:
        return self._at(self.arrays, term, plan)

    def raw(self, plan: Plan) -> float:
        """Uncalibrated sum over the terms of kept blocks and the fixed parts."""
        return sum(self.term_ms(t, plan) for t in self.space.kept_terms(plan))

    def plan_mparams(self, plan: Plan) -> float:
        """Parameters (millions) of the kept terms: the weight traffic of one inference."""
        mp = self.mparams
        if mp is None:
            return 0.0
        return sum(self._at(mp, t, plan) for t in self.space.kept_terms(plan))

    def plan_gflops(self, plan: Plan) -> float:
        """GFLOPs of the kept terms."""
        gf = self.gflops
        if gf is None:
            return 0.0
        return sum(self._at(gf, t, plan) for t in self.space.kept_terms(plan))

    def _charged_counts(self) -> tuple[dict[str, np.ndarray] | None, dict[str, np.ndarray] | None]:
        """The per-term parameters and GFLOPs the calibration charges for (``None`` for a count
        no part of it charges); an error where it charges what no model adapter counts."""
        cal = self.calibration
        by_params = bool(cal.ms_per_mparam or cal.ms_per_spilled_mparam)
        mp = self.mparams if by_params else None
        gf = self.gflops if cal.ms_per_gflop else None
        if (by_params and mp is None) or (cal.ms_per_gflop and gf is None):
            raise TableError(f"the calibration charges parameters or FLOPs, but no model adapter counts "
                             f"them for {self.space.family} terms")
        return mp, gf

    def calibrated_arrays(self) -> dict[str, np.ndarray]:
        """Per term, ``scale * latency + ms_per_mparam * parameters + ms_per_gflop * GFLOPs``:
        what the solver sums.

        Their sum over a plan's kept terms plus ``calibration.offset`` (plus the spill part,
        where the calibration has one) is :meth:`predict`.
        """
        cal = self.calibration
        key = (cal.scale, cal.ms_per_mparam, cal.ms_per_gflop)
        if self._calibrated is None or self._calibrated[0] != key:
            mp, gf = self._charged_counts()
            out = {}
            for name, a in self.arrays.items():
                v = cal.scale * a
                if mp is not None and cal.ms_per_mparam:
                    v = v + cal.ms_per_mparam * mp[name]
                if gf is not None:
                    v = v + cal.ms_per_gflop * gf[name]
                out[name] = v
            self._calibrated = (key, out)
        return self._calibrated[1]

    def predict(self, plan: Plan) -> float:
        """Calibrated latency of ``plan`` in milliseconds."""
        arrays = self.calibrated_arrays()
        spill = self.spill_arrays()
        total = weights = 0.0
        for t in self.space.kept_terms(plan):
            total += self._at(arrays, t, plan)
            if spill is not None:
                weights += self._at(spill, t, plan)
        if spill is not None:
            total += float(self.calibration.spilled(weights))
        return total + self.calibration.offset

    def spill_arrays(self) -> dict[str, np.ndarray] | None:
        """Per term, the parameters (millions) the spill part sums before its knee; ``None``
        where the calibration has no spill part."""
        return self._charged_counts()[0] if self.calibration.ms_per_spilled_mparam else None

    def per_block(self, plan: Plan) -> dict[str, float]:
        """Uncalibrated latency of every block (and ``fixed`` for stem and head) under ``plan``."""
        out: dict[str, float] = {}
        for t in self.space.kept_terms(plan):
            k = t.block or "fixed"
            out[k] = out.get(k, 0.0) + self.term_ms(t, plan)
        return out


def _per_term(space: PruningSpace, fill: Callable[[Any, Term, tuple[tuple[int, ...], ...]], np.ndarray]
              ) -> dict[str, np.ndarray] | None:
    """An array over every term's grid from ``fill(adapter, term, axes)``, computed once per
    signature and grid; ``None`` when no registered adapter builds ``space``'s family."""
    from mdp_trt.models import adapters

    adapter = next((a for a in adapters() if a.family == space.family), None)
    if adapter is None:
        return None
    out: dict[str, np.ndarray] = {}
    cache: dict[tuple[str, tuple[tuple[int, ...], ...]], np.ndarray] = {}
    for term in space.terms:
        axes = tuple(space.dim(d).choices for d in term.dims)
        key = (term.signature, axes)
        if key not in cache:
            cache[key] = fill(adapter, term, axes)
        out[term.name] = cache[key]
    return out


def term_gflops(space: PruningSpace) -> dict[str, np.ndarray] | None:
    """GFLOPs of every term's subgraph over its grid (a multiply-add counts as two), counted
    by :func:`mdp_trt.flops.count_flops` at the corners of each term's grid and filled in
    multilinearly: convolutions, linear layers and attention products are linear in each
    width, so this is exact for them. ``None`` when no adapter builds the space."""
    from mdp_trt.flops import count_flops

    def fill(adapter: Any, term: Term, axes: tuple[tuple[int, ...], ...]) -> np.ndarray:
        ends = [(a[0], a[-1]) if a[-1] > a[0] else (a[0],) for a in axes]
        corners = {}
        for c in itertools.product(*ends):
            module, shape = adapter.term_module(space, term, c)
            corners[c] = count_flops(module, (1, *shape)) / 1e9
        arr = np.empty(tuple(len(a) for a in axes), dtype=np.float64)
        for idx in itertools.product(*(range(len(a)) for a in axes)):
            t = [(axes[k][i] - e[0]) / (e[-1] - e[0]) if len(e) > 1 else 0.0
                 for k, (i, e) in enumerate(zip(idx, ends, strict=True))]
            arr[idx] = sum(v * float(np.prod([1.0 if len(e) == 1 else (tk if ck == e[1] else 1.0 - tk)
                                              for tk, ck, e in zip(t, c, ends, strict=True)]))
                           for c, v in corners.items())
        return arr

    return _per_term(space, fill)


def term_mparams(space: PruningSpace) -> dict[str, np.ndarray] | None:
    """Parameters (millions) of every term's subgraph over its grid, from the model adapter's
    ``term_module`` built on the meta device (no memory, no initialisation); ``None`` when no
    registered adapter builds ``space``'s family."""
    import torch

    def fill(adapter: Any, term: Term, axes: tuple[tuple[int, ...], ...]) -> np.ndarray:
        arr = np.empty(tuple(len(a) for a in axes), dtype=np.float64)
        for idx in itertools.product(*(range(len(a)) for a in axes)):
            with torch.device("meta"):
                module, _ = adapter.term_module(space, term, tuple(axes[k][i] for k, i in enumerate(idx)))
            arr[idx] = sum(p.numel() for p in module.parameters()) / 1e6
        return arr

    return _per_term(space, fill)


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
    return LatencySurface(space, arrays, dict(surface.interpolated), Calibration(), surface._mparams)


def sample_plans(space: PruningSpace, n: int, seed: int) -> list[Plan]:
    """``n`` plans spread over the latency range: a global keep ratio per plan, jittered per dim,
    and some removed blocks. Different seeds give disjoint plans for calibration and evaluation.

    The first plan sits at the bottom of the range (the lowest ratio, the most removed blocks),
    so that even a small calibration set reaches the smallest models instead of extrapolating
    to them."""
    rng = random.Random(seed)
    removable = [b.name for b in space.blocks if b.removable]
    plans: list[Plan] = []
    for i in range(n):
        u = rng.random()
        ratio = 0.25 + 0.75 * (i + (u if i else 0.0)) / n
        widths = {}
        for d in space.dims:
            target = ratio * (0.75 + 0.5 * rng.random()) * d.size
            widths[d.name] = min((abs(c - target), c) for c in d.choices)[1]  # the nearest, the smaller on a tie
        most = max(0, int(len(removable) * (1 - ratio) * 0.6))
        removed = rng.sample(removable, rng.randint(0, most))
        if i == 0:  # fill up to the most removed blocks without drawing: later plans stay the same
            removed += [b for b in removable if b not in removed][:most - len(removed)]
        plans.append(space.plan(widths, removed))
    return plans


def calibrate(surface: LatencySurface, plans: Sequence[Plan], measure: Callable[[Plan], float],
              traffic: bool | None = None) -> tuple[Calibration, list[float]]:
    """Fit the surface's calibration to whole-model measurements of ``plans``; returns it and them."""
    measured = [measure(p) for p in plans]
    cal = fit_calibration(surface, plans, measured, traffic=traffic)
    surface.calibration = cal
    return cal, measured


def fit_calibration(surface: LatencySurface, plans: Sequence[Plan], measured: Sequence[float],
                    weights: Sequence[float] | None = None, traffic: bool | None = None,
                    flops: bool | None = None, spill: bool | None = None) -> Calibration:
    """The calibration of ``surface`` fitted to measured whole-model latencies of ``plans``.

    Candidates: affine in the sum of terms; plus weight traffic (parameters); plus weights
    spilled out of cache (parameters past a knee, :class:`Calibration`); plus FLOPs; and FLOPs
    alone. ``traffic`` / ``spill`` / ``flops``: ``True`` fits that part, ``False`` leaves it out,
    ``None`` (the default) lets the leave-one-out error over ``plans`` decide (root mean
    square of the relative errors, so a bad tail counts), the affine fit staying unless
    another is clearly better (:func:`_clearly_better`: by more than the noise of so few
    folds). So the calibrated surface is never knowingly
    worse than a predictor proportional to FLOPs: where FLOPs explain whole-model latency better than the measured
    terms, the fit says so (``form``) and uses them. Every candidate is a sum over terms, so
    the solver sees the same model. Where the parts matter depends on the engine, CPU and
    input size (README, "Latency model accuracy").
    """
    raw = [surface.raw(p) for p in plans]
    wanted = traffic is not False or spill is not False
    mparams = [surface.plan_mparams(p) for p in plans] if wanted and surface.mparams else None
    gflops = [surface.plan_gflops(p) for p in plans] if flops is not False and surface.gflops else None
    if traffic is True and mparams is not None:
        return Calibration.fit(raw, measured, weights, mparams)
    if spill is True and mparams is not None:
        return Calibration.fit(raw, measured, weights, mparams, spill=True)
    if flops is True and gflops is not None:
        return Calibration.fit(raw, measured, weights, gflops=gflops)
    cands: dict[str, dict[str, Any]] = {"affine": {}}
    if mparams is not None and traffic is not False:
        cands["traffic"] = {"mparams": mparams}
    if mparams is not None and spill is not False:
        cands["spill"] = {"mparams": mparams, "spill": True}
    if gflops is not None:
        cands["flops+terms"] = {"gflops": gflops}
        cands["flops"] = {"gflops": gflops, "use_raw": False}
    if len(cands) == 1:
        return Calibration.fit(raw, measured, weights)
    errs = {name: _loo_errs(raw, measured, weights, kw) for name, kw in cands.items()}
    better = [k for k in cands if k != "affine" and _clearly_better(errs["affine"], errs[k])]
    best = min(better, key=lambda k: _rms(errs[k])) if better else "affine"
    return Calibration.fit(raw, measured, weights, **cands[best])


def _rms(errs: np.ndarray) -> float:
    """Root mean square of leave-one-out errors (:func:`_loo_errs`; inf: none, too few points)."""
    return float(np.sqrt(np.mean(np.square(errs)))) if len(errs) else float("inf")


def _loo_errs(raw: Sequence[float], measured: Sequence[float], weights: Sequence[float] | None,
              parts: Mapping[str, Any]) -> np.ndarray:
    """Leave-one-out relative errors of a calibration fit with ``parts``, one per held-out
    plan (none: too few points).

    Only interior plans are held out: never the fastest or the slowest one measured. The
    calibration plans span the plans the solver chooses among (the dense model and the
    smallest plan are always in them), so the fit is used to interpolate; holding out an end
    tests an extrapolation that is never made, and on 8 plans that one error decides the mean.
    On resnet18 at 224 px (AMD EPYC box) holding out the smallest plan (2.2 ms) cost the affine
    fit 18.1% and FLOPs alone 1.2%, so FLOPs alone were chosen: 5.76% / 20.62% on 30 plans
    (FLOPs, proportional, 5.96% / 18.75%) where the affine fit gives 2.85% / 7.07%."""
    n = len(raw)
    if n <= MIN_TRAFFIC_POINTS:
        return np.zeros(0)
    ends = {int(np.argmin(measured)), int(np.argmax(measured))}
    errs = []
    for i in (i for i in range(n) if i not in ends):
        rest = [j for j in range(n) if j != i]

        def pick(v: Sequence[float] | None, idx: Sequence[int]) -> list[float] | None:
            return None if v is None else [v[j] for j in idx]

        kw: dict[str, Any] = {k: (pick(v, rest) if isinstance(v, list) else v) for k, v in parts.items()}
        cal = Calibration.fit(pick(raw, rest) or [], pick(measured, rest) or [], pick(weights, rest), **kw)
        pred = cal(raw[i], parts["mparams"][i] if "mparams" in parts else 0.0,
                   parts["gflops"][i] if "gflops" in parts else 0.0)
        errs.append((float(pred) - measured[i]) / measured[i])
    return np.asarray(errs, dtype=np.float64)
