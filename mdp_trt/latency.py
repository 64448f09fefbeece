"""Latency models the solver can be given, and their calibration on whole-model measurements.

A latency model turns the measured terms of a space (a :class:`LatencySurface` read from the
table) into the per-term arrays the solver sums, and fits their calibration to whole-model
measurements. ``surface`` is MDP's (the measured arrays, calibrated with the parts the
leave-one-out error keeps); ``linear`` is the ablation (``a + b * out`` per term, affine
calibration only). The job picks one by name and never asks which it has.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from mdp_trt.errors import MdpError
from mdp_trt.space import Plan, PruningSpace
from mdp_trt.surface import (
    Calibration,
    LatencySurface,
    fit_calibration,
    linear_surface,
    sample_plans,
)

if TYPE_CHECKING:
    from mdp_trt.engine_io import Lab
    from mdp_trt.part import Subject


class LatencyModel(Protocol):
    name: str

    def build(self, measured: LatencySurface) -> LatencySurface:
        """The model's arrays from the measured surface (uncalibrated)."""
        ...

    def fit(self, surface: LatencySurface, plans: Sequence[Plan], measured: Sequence[float],
            weights: Sequence[float] | None = None) -> Calibration:
        """The calibration of ``surface`` on whole-model measurements of ``plans``."""
        ...


class SurfaceModel:
    """The measured surface; its calibration's form is chosen by leave-one-out error."""

    name = "surface"

    def build(self, measured: LatencySurface) -> LatencySurface:
        return measured

    def fit(self, surface: LatencySurface, plans: Sequence[Plan], measured: Sequence[float],
            weights: Sequence[float] | None = None) -> Calibration:
        return fit_calibration(surface, plans, measured, weights)


class LinearModel:
    """The linear-in-output-channels model, for ablations; it keeps an affine calibration."""

    name = "linear"

    def build(self, measured: LatencySurface) -> LatencySurface:
        return linear_surface(measured)

    def fit(self, surface: LatencySurface, plans: Sequence[Plan], measured: Sequence[float],
            weights: Sequence[float] | None = None) -> Calibration:
        return fit_calibration(surface, plans, measured, weights, traffic=False, flops=False, spill=False)


LATENCY_MODELS: dict[str, type[SurfaceModel] | type[LinearModel]] = {"surface": SurfaceModel, "linear": LinearModel}


def latency_model(name: str) -> LatencyModel:
    try:
        return LATENCY_MODELS[name]()
    except KeyError:
        raise MdpError(f"unknown latency model {name!r}; accepted: {', '.join(LATENCY_MODELS)}") from None


def calibration_plans(space: PruningSpace, n: int, seed: int = 0) -> list[Plan]:
    """The dense plan and ``n - 1`` spread plans (seeds apart from any evaluation plans)."""
    return [space.full_plan(), *sample_plans(space, max(1, n - 1), seed=10_000 + seed)]


KNEE_PLANS = 2
"""Whole models measured beside the calibration plans where the fit has a spill knee, one at a
time, each where the knee now lies between the plans measured (:func:`refine_knee`)."""

KNEE_POOL = 64
"""Spread plans the knee plans are chosen from."""


def refine_knee(surface: LatencySurface, plans: list[Plan], measured: list[float], cal: Calibration,
                model: LatencyModel, measure: Callable[[Plan], float], seed: int = 0,
                n: int = KNEE_PLANS) -> tuple[list[Plan], list[float], Calibration]:
    """Where ``cal`` charges weights spilled past a knee (form ``spill``), locate the knee by
    measuring up to ``n`` more whole models there, refitting after each.

    The knee is fitted between the calibration plans' parameter counts, and spread plans leave
    gaps: on resnet18 at 64 px (AMD EPYC box) none of 8 calibration plans had 2-4.5M
    parameters, where the whole model starts to cost twice its terms, so the knee came out at
    1.7M and 30 other plans read 6.8% / 22.1% off (median / p95); two plans measured around the
    knee moved it to 2.5M: 4.7% / 11.0%. Each new plan is the one of :data:`KNEE_POOL` spread plans
    whose parameter count is nearest (in ratio) to the geometric middle of the widest gap
    around the knee (:func:`_knee_pick`); it stops once the fit has no knee or no such plan
    lies strictly inside those gaps.
    Returns the plans, their measurements and the calibration, all extended."""
    from mdp_trt.engine_io import plan_key

    plans, measured = list(plans), list(measured)
    seen = {plan_key(p) for p in plans}
    pool = [(surface.plan_mparams(p), p) for p in sample_plans(surface.space, KNEE_POOL, seed=20_000 + seed)
            if plan_key(p) not in seen]
    for _ in range(n):
        if cal.form != "spill" or not pool:
            break
        pick = _knee_pick(sorted({surface.plan_mparams(p) for p in plans}), cal.spill_mparams, pool)
        if pick is None:
            break
        pool.remove(pick)
        plans.append(pick[1])
        measured.append(measure(pick[1]))
        cal = model.fit(surface, plans, measured)
    return plans, measured, cal


def _knee_pick(have: list[float], knee: float, pool: list[tuple[float, Plan]]) -> tuple[float, Plan] | None:
    """The (parameters, plan) of ``pool`` nearest (in ratio) to the geometric middle of the
    widest gap, in ratio, among the gap between the measured parameter counts ``have`` that
    holds the knee and the gaps either side of it (a fit is indifferent to where in an empty
    gap the knee lies, so the neighbouring gaps are as uncertain as its own); ``None`` where no
    pool plan lies strictly inside any of them."""
    if len(have) < 2:
        return None
    at = next((i for i in range(len(have) - 1) if have[i] <= knee < have[i + 1]), len(have) - 2)
    gaps = [(have[i], have[i + 1]) for i in (at - 1, at, at + 1) if 0 <= i < len(have) - 1]
    for lo, hi in sorted(gaps, key=lambda g: -np.log(g[1] / g[0]) if g[0] > 0 else -np.inf):
        inside = [c for c in pool if lo < c[0] < hi]
        if inside:
            mid = float(np.sqrt(lo * hi)) if lo > 0 else (lo + hi) / 2
            return min(inside, key=lambda c: abs(np.log(c[0] / mid)))
    return None


def calibrated(lab: Lab, subject: Subject, space: PruningSpace, model: LatencyModel,
               calibration: Calibration | None = None, n_plans: int = 8, seed: int = 0) -> LatencySurface:
    """``model`` over ``space``, profiled where the table lacks terms, and calibrated: with
    ``calibration`` as given, else fitted on ``n_plans`` whole models of ``subject``.

    Whole-model measurements are kept in the table, so the fit is redone every time (it
    follows the current calibration code) and only unmeasured plans cost engine time. For a
    part of a larger model the measurements are of the whole model: the offset takes in the
    latency of everything outside the part (the user's head), a fixed part of every plan.
    """
    # The whole-model layout is read off the module as the adapter rebuilds it at full width,
    # the form every measurement runs (some timm modules cannot be exported as they are).
    dense = subject.dense(space, whole=False)
    surf = model.build(LatencySurface.from_points(space, lab.points(subject.adapter, space, dense)))
    if calibration is not None:
        surf.calibration = calibration
        return surf
    plans = calibration_plans(space, n_plans, seed)
    measured = lab.measure_plans(subject, space, plans)
    cal = model.fit(surf, plans, measured)
    plans, measured, cal = refine_knee(surf, plans, measured, cal, model,
                                       lambda p: lab.measure_plans(subject, space, [p])[0], seed)
    surf.calibration = cal
    surf.calibration_plans = plans
    suffix = "" if model.name == "surface" else f"/{model.name}"
    lab.table.kv_set(f"calibration/{subject.tag}{space.space_id}{suffix}", cal.to_dict())  # for inspection
    traffic = f" {cal.ms_per_mparam:+.3f} ms per M weights" if cal.ms_per_mparam else ""
    traffic += f" {cal.ms_per_gflop:+.3f} ms per GFLOP" if cal.ms_per_gflop else ""
    traffic += (f" {cal.ms_per_spilled_mparam:+.3f} ms per M weights past {cal.spill_mparams:.2f}M"
                if cal.ms_per_spilled_mparam else "")
    lab.log(f"calibration ({cal.form}) on {cal.plans} plans: x{cal.scale:.3f}{traffic} {cal.offset:+.3f} ms, "
            f"median error {cal.raw_median_abs_pct_err:.1f}% raw -> {cal.fit_median_abs_pct_err:.1f}% fitted")
    return surf
