"""Latency models the solver can be given, and their calibration on whole-model measurements.

A latency model turns the measured terms of a space (a :class:`LatencySurface` read from the
table) into the per-term arrays the solver sums, and fits their calibration to whole-model
measurements. ``surface`` is MDP's (the measured arrays, calibrated with the parts the
leave-one-out error keeps); ``linear`` is the ablation (``a + b * out`` per term, affine
calibration only). The job picks one by name and never asks which it has.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

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
        return fit_calibration(surface, plans, measured, weights, traffic=False, flops=False)


LATENCY_MODELS: dict[str, type[SurfaceModel] | type[LinearModel]] = {"surface": SurfaceModel, "linear": LinearModel}


def latency_model(name: str) -> LatencyModel:
    try:
        return LATENCY_MODELS[name]()
    except KeyError:
        raise MdpError(f"unknown latency model {name!r}; accepted: {', '.join(LATENCY_MODELS)}") from None


def calibration_plans(space: PruningSpace, n: int, seed: int = 0) -> list[Plan]:
    """The dense plan and ``n - 1`` spread plans (seeds apart from any evaluation plans)."""
    return [space.full_plan(), *sample_plans(space, max(1, n - 1), seed=10_000 + seed)]


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
    cal = model.fit(surf, plans, lab.measure_plans(subject, space, plans))
    surf.calibration = cal
    suffix = "" if model.name == "surface" else f"/{model.name}"
    lab.table.kv_set(f"calibration/{subject.tag}{space.space_id}{suffix}", cal.to_dict())  # for inspection
    traffic = f" {cal.ms_per_mparam:+.3f} ms per M weights" if cal.ms_per_mparam else ""
    traffic += f" {cal.ms_per_gflop:+.3f} ms per GFLOP" if cal.ms_per_gflop else ""
    lab.log(f"calibration ({cal.form}) on {cal.plans} plans: x{cal.scale:.3f}{traffic} {cal.offset:+.3f} ms, "
            f"median error {cal.raw_median_abs_pct_err:.1f}% raw -> {cal.fit_median_abs_pct_err:.1f}% fitted")
    return surf
