"""Everything the prune job asks of the target engine: tables, profiling, whole-model timing, export."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn

from mdp_trt.errors import PlanError
from mdp_trt.models import adapter_for
from mdp_trt.space import Plan, PruningSpace
from mdp_trt.surface import (
    Calibration,
    LatencySurface,
    fit_calibration,
    linear_surface,
    sample_plans,
)
from profilers.timing import Comparison

PROTOCOL = "rounds-q25-sentinel-dense-v3"
"""Whole-model measurements kept in a table are reused only when taken by this protocol."""


def plan_key(plan: Plan) -> str:
    """A short fingerprint of a plan's widths and removed blocks."""
    text = json.dumps([sorted(plan.widths.items()), sorted(plan.removed)])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


class Lab:
    """One engine setting, its latency table, and the measurements made with them."""

    def __init__(self, engine: str, precision: str, batch_size: int, resolution: int, threads: int | None,
                 table_path: Path | None, model_name: str, progress: bool = True,
                 log: Callable[[str], None] = lambda s: None, clock: str = "auto") -> None:
        from profilers.device_label import device_label
        from profilers.engines import clock_of, clock_options, get_engine
        from profilers.table import LatencyTable, default_table_path

        kw: dict[str, Any] = {"precision": precision, "batch_size": batch_size, "resolution": resolution}
        if threads is not None:
            kw["threads"] = threads
        kw.update(clock_options(engine, clock))
        self.engine = get_engine(engine, **kw)
        self.clock = clock_of(self.engine)
        self.identity: dict[str, Any] = asdict(self.engine.identity())
        self.table_path = table_path or default_table_path(device_label(), model_name, engine, precision,
                                                           batch_size, resolution, clock=self.clock)
        self.table = LatencyTable.open(self.table_path, self.engine.identity())
        self._noted = False
        self.progress = progress
        self.log = log
        self._sentinel: Any = None

    @property
    def sentinel(self) -> Any:
        """The engine's :class:`~profilers.timing.Sentinel`, made (and calibrated) on first use."""
        if self._sentinel is None:
            from profilers.sentinel import make_sentinel

            self._sentinel = make_sentinel(self.engine)
        return self._sentinel

    def surface(self, model: nn.Module, space: PruningSpace, calibration: Calibration | None = None,
                calibration_plans: int = 8, seed: int = 0) -> LatencySurface:
        """Profile what the table lacks for ``space``, build the surface, calibrate it (once per space)."""
        from profilers.profile import profile_space, term_points

        adapter = adapter_for(model)
        stats = profile_space(space, lambda t, w: adapter.term_module(space, t, w), self.engine, self.table,
                              progress=self.progress, sentinel=lambda: self.sentinel)
        self.log(f"latency table {self.table_path}: {stats}")
        note = self.table.read_only_note()
        if note and not self._noted:  # said once, and only when the table serves (it lacks nothing)
            print(note, file=sys.stderr, flush=True)
            self._noted = True
        points = {sig: term_points(self.table, sig) for sig in {t.signature for t in space.terms}}
        surf = LatencySurface.from_points(space, points)
        if calibration is not None:
            surf.calibration = calibration
            return surf
        # Whole-model measurements are kept in the table, so the fit is redone every time (it
        # follows the current calibration code) and only unmeasured plans cost engine time.
        plans = self.calibration_plans(space, calibration_plans, seed)
        cal = fit_calibration(surf, plans, self.measure_plans(model, space, plans))
        surf.calibration = cal
        self.table.kv_set(f"calibration/{space.space_id}", cal.to_dict())  # for inspection
        traffic = f" {cal.ms_per_mparam:+.3f} ms per M weights" if cal.ms_per_mparam else ""
        traffic += f" {cal.ms_per_gflop:+.3f} ms per GFLOP" if cal.ms_per_gflop else ""
        self.log(f"calibration ({cal.form}) on {cal.plans} plans: x{cal.scale:.3f}{traffic} {cal.offset:+.3f} ms, "
                 f"median error {cal.raw_median_abs_pct_err:.1f}% raw -> {cal.fit_median_abs_pct_err:.1f}% fitted")
        return surf

    def linear(self, model: nn.Module, space: PruningSpace, surface: LatencySurface, calibration_plans: int = 8,
               seed: int = 0) -> LatencySurface:
        """The linear latency model on the same measurements, calibrated on the same plans."""
        lin = linear_surface(surface)
        plans = self.calibration_plans(space, calibration_plans, seed)
        lin.calibration = fit_calibration(lin, plans, self.measure_plans(model, space, plans), traffic=False,
                                          flops=False)
        return lin

    @staticmethod
    def calibration_plans(space: PruningSpace, n: int, seed: int = 0) -> list[Plan]:
        """The dense plan and ``n - 1`` spread plans (seeds apart from any evaluation plans)."""
        return [space.full_plan(), *sample_plans(space, max(1, n - 1), seed=10_000 + seed)]

    def measure_plan(self, model: nn.Module, space: PruningSpace, plan: Plan) -> float:
        """Whole-model latency of ``plan`` applied to ``model``; cached in the table."""
        return self.measure_plans(model, space, [plan])[0]

    def measure_plans(self, model: nn.Module, space: PruningSpace, plans: Sequence[Plan]) -> list[float]:
        """Whole-model latency of each plan, cached in the table.

        The ones not measured yet are measured together, side by side in the same rounds
        (:meth:`compare`), with the dense model among them: each plan is kept as its speedup
        over the dense model of its own group, and its latency is the table's dense reference
        (the quietest dense figure of any group) over that speedup. A group measured while
        the machine was slower throughout (an episode that no spread reveals: on the 2-vCPU
        Xeon VM one group of eight resnet50 plans read 30% slow while the others agreed
        within 5%) then moves no plan against the others."""
        from mdp_trt.api import apply_plan

        prefix = f"model/{space.space_id}/"
        full = space.full_plan()
        keys = [prefix + plan_key(p) for p in plans]
        found: dict[str, float] = {}  # key -> speedup over the dense model
        for key in keys:
            rec = self.table.kv_get(key)
            if rec is not None and rec.get("protocol") == PROTOCOL:
                found[key] = float(rec["speedup"])
        full_key = prefix + plan_key(full)
        todo = list({k: p for k, p in zip(keys, plans, strict=True) if k not in found and k != full_key}.items())
        ref_key = prefix + "dense-reference"
        ref = self.table.kv_get(ref_key)
        if todo or not isinstance(ref, dict) or ref.get("protocol") != PROTOCOL:
            shape = (self.engine.identity().batch_size, *space.input_size)
            comp = self.compare([apply_plan(model, p, space=space) for p in [full, *(p for _, p in todo)]],
                                shape)
            for (key, plan), speedup, ms in zip(todo, comp.ratios[1:], comp.ms[1:], strict=True):
                found[key] = speedup
                self.table.kv_set(key, {"speedup": speedup, "median_ms": ms, "widths": plan.widths,
                                        "removed": list(plan.removed), "protocol": PROTOCOL,
                                        "reliable": comp.reliable})
            if not isinstance(ref, dict) or ref.get("protocol") != PROTOCOL or comp.ms[0] < float(ref["median_ms"]):
                ref = {"median_ms": comp.ms[0], "protocol": PROTOCOL, "reliable": comp.reliable}
                self.table.kv_set(ref_key, ref)
        found[full_key] = 1.0
        dense_ms = float(ref["median_ms"])
        return [dense_ms / found[k] for k in keys]

    def measured_points(self, space: PruningSpace) -> list[tuple[Plan, float]]:
        """(plan, measured ms) of every whole model of this space measured so far."""
        prefix = f"model/{space.space_id}/"
        ref = self.table.kv_get(prefix + "dense-reference")
        if not isinstance(ref, dict) or ref.get("protocol") != PROTOCOL:
            return []
        out = [(space.full_plan(), float(ref["median_ms"]))]
        for key in self.table.kv_keys(prefix):
            rec = self.table.kv_get(key)
            if not isinstance(rec, dict) or rec.get("protocol") != PROTOCOL or "speedup" not in rec:
                continue  # measured by an older protocol, or the reference itself
            try:
                plan = space.plan(rec["widths"], rec["removed"])
            except (PlanError, KeyError, TypeError):
                continue  # measured under a finer grid or another restriction of the space
            out.append((plan, float(ref["median_ms"]) / float(rec["speedup"])))
        return out

    def measure(self, modules: Sequence[nn.Module], input_shape: tuple[int, ...]) -> list[float]:
        """Latency in ms of each module on the engine, measured side by side (:meth:`compare`)."""
        return self.compare(modules, input_shape).ms

    def measure_rounds(self, modules: Sequence[nn.Module], input_shape: tuple[int, ...],
                       rounds: int) -> list[list[float]]:
        """:meth:`measure` ``rounds`` times over the same engine sessions: per round, each
        module's ms."""
        return [c.ms for c in self._compare(modules, input_shape, rounds)]

    def compare(self, modules: Sequence[nn.Module], input_shape: tuple[int, ...]) -> Comparison:
        """``modules`` measured side by side in interleaved rounds by the one estimator that
        interference cannot inflate (:func:`profilers.timing.compare`), with its verdict on
        whether the figures can be trusted."""
        return self._compare(modules, input_shape, 1)[0]

    def _compare(self, modules: Sequence[nn.Module], input_shape: tuple[int, ...], times: int
                 ) -> list[Comparison]:
        from profilers.timing import compare, usable_cores

        threads = getattr(self.engine, "threads", None)
        if threads == 0:  # the engine's own choice: every core
            threads = usable_cores()
        runners = [self.engine.prepare(m.eval(), input_shape) for m in modules]
        try:
            return [compare(runners, threads=threads or 1, sentinel=self.sentinel) for _ in range(times)]
        finally:
            for r in runners:
                r.close()

    def export(self, model: nn.Module, input_shape: tuple[int, ...], out: Path) -> list[str]:
        """``model.onnx``, and the engine's own form when it saves one (``save_engine``, to
        ``model`` + its ``engine_suffix``: ``model.engine`` for TensorRT, ``model.xml`` and
        ``model.bin`` for OpenVINO); returns the file names."""
        from profilers.export import export_onnx

        export_onnx(model.eval(), input_shape, out / "model.onnx")
        files = ["model.onnx"]
        save = getattr(self.engine, "save_engine", None)
        if callable(save):
            suffix = getattr(self.engine, "engine_suffix", ".engine")
            written = save(out / "model.onnx", input_shape, out / f"model{suffix}")
            files += [Path(p).name for p in (written if isinstance(written, list) else [written])]
        return files
