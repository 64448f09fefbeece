"""Everything the prune job asks of the target engine: tables, profiling, whole-model timing, export.

Calibration, what the measurements are fitted to, lives with the latency models
(:mod:`mdp_trt.latency`)."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from mdp_trt.errors import PlanError
from mdp_trt.models import Adapter
from mdp_trt.space import Plan, PruningSpace
from profilers.timing import Comparison

if TYPE_CHECKING:
    from mdp_trt.part import Subject

PROTOCOL = "rounds-q25-v1"
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
        self.engine = get_engine(engine, **kw, **clock_options(engine, clock))
        self.clock = clock_of(self.engine)
        self.identity: dict[str, Any] = asdict(self.engine.identity())
        self.table_path = table_path or default_table_path(device_label(), model_name, engine, precision,
                                                           batch_size, resolution, clock=self.clock)
        self.table = LatencyTable.open(self.table_path, self.engine.identity())
        self._noted = False
        self.progress = progress
        self.log = log

    def points(self, adapter: Adapter, space: PruningSpace) -> dict[str, dict[tuple[int, ...], float]]:
        """Profile what the table lacks for ``space``; every term signature's measured points."""
        from profilers.profile import profile_space, term_points

        stats = profile_space(space, lambda t, w: adapter.term_module(space, t, w), self.engine, self.table,
                              progress=self.progress)
        self.log(f"latency table {self.table_path}: {stats}")
        note = self.table.read_only_note()
        if note and not self._noted:  # said once, and only when the table serves (it lacks nothing)
            print(note, file=sys.stderr, flush=True)
            self._noted = True
        return {sig: term_points(self.table, sig) for sig in {t.signature for t in space.terms}}

    def measure_plans(self, subject: Subject, space: PruningSpace, plans: Sequence[Plan]) -> list[float]:
        """Whole-model latency of each plan applied to ``subject``, cached in the table: the ones
        not measured yet are measured together, side by side in the same rounds (:meth:`compare`),
        so calibration points share one machine state like the closed loop's dense and pruned models."""
        keys = [f"model/{subject.tag}{space.space_id}/{plan_key(p)}" for p in plans]
        found: dict[str, float] = {}
        for key in keys:
            rec = self.table.kv_get(key)
            if rec is not None and rec.get("protocol") == PROTOCOL:
                found[key] = float(rec["median_ms"])
        todo = [(k, p) for k, p in zip(keys, plans, strict=True) if k not in found]
        if todo:
            todo = list(dict(todo).items())  # one measurement per distinct plan
            shape = (self.engine.identity().batch_size, *space.input_size)
            comp = self.compare([subject.cut(p, space=space) for _, p in todo], shape)
            for (key, plan), ms in zip(todo, comp.ms, strict=True):
                found[key] = ms
                self.table.kv_set(key, {"median_ms": ms, "widths": plan.widths, "removed": list(plan.removed),
                                        "protocol": PROTOCOL, "reliable": comp.reliable})
        return [found[k] for k in keys]

    def measured_points(self, space: PruningSpace, tag: str = "") -> list[tuple[Plan, float]]:
        """(plan, measured ms) of every whole model of this space (and subject ``tag``) measured so far."""
        out = []
        for key in self.table.kv_keys(f"model/{tag}{space.space_id}/"):
            rec = self.table.kv_get(key)
            if not isinstance(rec, dict) or rec.get("protocol") != PROTOCOL:
                continue  # measured by an older protocol
            try:
                plan = space.plan(rec["widths"], rec["removed"])
            except (PlanError, KeyError, TypeError):
                continue  # measured under a finer grid or another restriction of the space
            out.append((plan, float(rec["median_ms"])))
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
            return [compare(runners, threads=threads or 1) for _ in range(times)]
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
