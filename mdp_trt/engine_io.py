"""Everything the prune job asks of the target engine: tables, profiling, whole-model timing, export.

Calibration, what the measurements are fitted to, lives with the latency models
(:mod:`mdp_trt.latency`)."""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from mdp_trt.errors import PlanError
from mdp_trt.models import Adapter
from mdp_trt.space import Plan, PruningSpace, Term
from profilers.timing import Comparison

if TYPE_CHECKING:
    from mdp_trt.part import Subject

PROTOCOL = "rounds-q25-sentinel-dense-v4-readings"
"""Whole-model measurements kept in a table are reused only when taken by this protocol."""

DENSE_TOLERANCE = 0.08
"""How far above the table's quietest dense reading a group's dense model may read before
that group's readings are left out and its plans measured again (the sentinel's tolerance)."""
READINGS = 2
"""Quiet groups each plan's figure is averaged over. One group's paired speedups share its
dense reading and its minutes on the host: on the AMD EPYC box, resnet18 at 224 px, the same
14 plans measured again in three later groups read their speedups 1.9%, 0.8% and 0.8% lower
on average than in their first groups (the plans of a group move together), and a single
group of calibration plans set 2-3% off the plans it was judged on put resnet18's and
resnet50's medians at 3.6% and 3.2%."""
DENSE_TRIES = 4
"""Groups a plan is measured in at most, counting the first ones."""


def _readings(rec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(rec.get("readings", []))


def _quiet(rec: dict[str, Any], dense_ref: float) -> list[dict[str, Any]]:
    """The readings of a plan taken in groups whose dense model read within the tolerance."""
    limit = dense_ref * (1 + DENSE_TOLERANCE)
    return [r for r in _readings(rec) if float(r["dense_ms"]) <= limit]


def _speedup(rec: dict[str, Any], dense_ref: float) -> float:
    """A plan's speedup over the dense model: the geometric mean over its quiet readings, or
    (none quiet) the reading of its quietest group."""
    quiet = _quiet(rec, dense_ref)
    if quiet:
        return float(math.exp(sum(math.log(float(r["speedup"])) for r in quiet) / len(quiet)))
    return float(min(_readings(rec), key=lambda r: float(r["dense_ms"]))["speedup"])


CONTEXT = "boundary-context/"
"""Table records (kv): per space, the terms whose edges the whole model converts too."""


def onnx_scopes(node: str) -> list[str]:
    """The module paths an exported ONNX node runs in, outermost first, from its name: the
    exporter writes every module it enters as one scope (``/blocks/blocks.1/blocks.1.0/
    conv_pwl/Conv``), each the last of its path's names with the numbered ones after it, so
    each adds its last name. An engine's fused node may carry more names after them
    (``/blocks/blocks.1/blocks.1.0/bn2/act/Mul/QuickGeluFusion/``); [] for a node without
    scopes (one the engine made)."""
    paths: list[str] = []
    for scope in node.split("/")[1:-1]:
        last = scope.rsplit(".", 1)[-1]
        paths.append(f"{paths[-1]}.{last}" if paths else last)
    return paths


def boundary_context(terms: Sequence[Term], scopes: Mapping[str, Iterable[str]], into: Iterable[str],
                     out_of: Iterable[str]) -> dict[str, tuple[bool, bool]]:
    """Per term, whether the whole model converts layout at its input and at its output, from
    the exported names of the nodes fed by a conversion (``into``) and of those feeding one
    (``out_of``); only terms with either. A node is placed in the innermost module of its
    name that a term runs in (``scopes``: term name -> the module paths its nodes run in,
    default its name). The input counts when the node fed is the term's first layer (the
    module named as the term); the output when the node feeding it runs in a module of the
    term that no other term runs in. Names that match nothing leave the term as it was:
    both costs taken off."""
    owner: dict[str, str | None] = {}
    for t in terms:
        for path in {t.name, *scopes.get(t.name, ())}:
            owner[path] = t.name if owner.get(path, t.name) == t.name else None

    def module(node: str) -> str:
        return next((p for p in reversed(onnx_scopes(node)) if p in owner), "")

    first = {module(n) for n in into}
    last = {owner.get(module(n)) for n in out_of}
    out = {}
    for t in terms:
        sides = (t.name in first, t.name in last)
        if any(sides):
            out[t.name] = sides
    return out


def term_scopes(space: PruningSpace) -> dict[str, set[str]]:
    """Term name -> the module paths its nodes run in, for spaces cut from a traced graph;
    {} for others (their terms are then known by name alone)."""
    from mdp_trt.models.generic import Proto

    p = space.handle
    if not isinstance(p, Proto):
        return {}
    return {c.name: {p.t.stack[n][-1] for n in c.nodes if p.t.stack.get(n)} for c in p.cuts}


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
        self.readings = READINGS
        """Quiet groups :meth:`measure_plans` reads each plan in (a benchmark that spreads them
        over time sets 1 for its first sweep)."""
        self._sentinel: Any = None

    @property
    def sentinel(self) -> Any:
        """The engine's :class:`~profilers.timing.Sentinel`, made (and calibrated) on first use."""
        if self._sentinel is None:
            from profilers.sentinel import make_sentinel

            self._sentinel = make_sentinel(self.engine)
        return self._sentinel

    def points(self, adapter: Adapter, space: PruningSpace, model: nn.Module | None = None
               ) -> dict[str, dict[tuple[int, ...], float]]:
        """Profile what the table lacks for ``space``; every term signature's measured points
        with their boundary costs taken off.

        With ``model`` (the dense module ``space`` was built from, as the adapter rebuilds it
        at full width), a conversion the whole model makes at a term's edge too stays in that
        term (:meth:`boundary_context`); such a term's points come under its own name, beside
        its signature's, which :meth:`~mdp_trt.surface.LatencySurface.from_points` reads first."""
        from profilers.profile import profile_space, term_points

        stats = profile_space(space, lambda t, w: adapter.term_module(space, t, w), self.engine, self.table,
                              progress=self.progress, sentinel=lambda: self.sentinel)
        self.log(f"latency table {self.table_path}: {stats}")
        note = self.table.read_only_note()
        if note and not self._noted:  # said once, and only when the table serves (it lacks nothing)
            print(note, file=sys.stderr, flush=True)
            self._noted = True
        out = {sig: term_points(self.table, sig) for sig in {t.signature for t in space.terms}}
        context = self.boundary_context(space, model) if model is not None else {}
        for term in space.terms:
            if term.name in context:
                out[term.name] = term_points(self.table, term.signature, context[term.name])
        return out

    def boundary_context(self, space: PruningSpace, model: nn.Module) -> dict[str, tuple[bool, bool]]:
        """The terms of ``space`` at whose input or output the whole ``model`` changes layout
        too (engines that say where: ``whole_model_conversions``), each with (input, output).

        Read once per table and space from the table (``boundary-context/<space id>``), else
        found on the dense model exported at the table's batch and stored; {} when the
        engine adds no conversions or took no boundary cost off."""
        from profilers.profile import COST

        find = getattr(self.engine, "whole_model_conversions", None)
        if not callable(find) or not self.table.kv_keys(COST):
            return {}
        key = CONTEXT + space.space_id
        rec = self.table.kv_get(key)
        if not isinstance(rec, dict):
            from profilers.export import export_onnx

            into, out_of = find(export_onnx(model, (self.engine.identity().batch_size, *space.input_size)))
            rec = {name: list(sides) for name, sides in
                   boundary_context(space.terms, term_scopes(space), into, out_of).items()}
            self.table.kv_set(key, rec)  # a read-only table keeps it for this run
        return {name: (bool(sides[0]), bool(sides[1])) for name, sides in rec.items()}

    def measure_plans(self, subject: Subject, space: PruningSpace, plans: Sequence[Plan]) -> list[float]:
        """Whole-model latency of each plan applied to ``subject``, cached in the table.

        The ones not measured yet are measured together, side by side in the same rounds
        (:meth:`compare`), with the dense model among them: each plan is kept as its speedup
        over the dense model of its own group, and its latency is the table's dense reference
        (the quietest dense figure of any group) over that speedup. A group measured while
        the machine was slower throughout (an episode that no spread reveals: on the 2-vCPU
        Xeon VM one group of eight resnet50 plans read 30% slow while the others agreed
        within 5%) then moves no plan against the others.

        Such an episode does not slow every model alike, though (a swin_tiny group at 224 px
        on that VM: the dense model 29% slow, its small plans 50%), so the speedup alone does
        not undo it. The dense model of every group is therefore also a sentinel: a group
        whose dense model read more than :data:`DENSE_TOLERANCE` above the reference is loud.
        And the plans of one group move together, by a percent or two, against another group
        (:data:`READINGS`). So each plan is measured until ``readings`` quiet groups have
        read it, in :data:`DENSE_TRIES` groups at most (across calls), and its speedup is the
        geometric mean of its quiet readings (none quiet: its quietest group's). A read-only
        table is used as it is."""
        prefix = f"model/{subject.tag}{space.space_id}/"
        full_key = prefix + plan_key(space.full_plan())
        keys = [prefix + plan_key(p) for p in plans]
        by_key = dict(zip(keys, plans, strict=True))
        found: dict[str, dict[str, Any]] = {}
        for key in keys:
            rec = self.table.kv_get(key)
            if isinstance(rec, dict) and rec.get("protocol") == PROTOCOL and _readings(rec):
                found[key] = rec
        ref_key = prefix + "dense-reference"
        ref = self.table.kv_get(ref_key)
        if not isinstance(ref, dict) or ref.get("protocol") != PROTOCOL:
            ref = None
        shape = (self.engine.identity().batch_size, *space.input_size)
        while True:  # each pass measures, in one group, every plan still short of quiet readings
            todo = [k for k in dict.fromkeys(keys) if k != full_key
                    and (k not in found or (ref is not None and self._due(found[k], float(ref["median_ms"]),
                                                                          self.readings)))]
            if self.table.read_only:
                todo = [k for k in todo if k not in found]
            if not todo and ref is not None:
                break
            again = sum(k in found for k in todo)
            if again:
                self.log(f"{again} plan(s) read in fewer than {self.readings} groups whose dense model was within "
                         f"{DENSE_TOLERANCE:.0%} of its quietest reading: measuring them again")
            comp = self.compare([subject.dense(space) if k == full_key else subject.cut(by_key[k], space=space)
                                 for k in [full_key, *todo]], shape)
            dense_ms = comp.ms[0]
            for key, speedup, ms in zip(todo, comp.ratios[1:], comp.ms[1:], strict=True):
                plan = by_key[key]
                old = found.get(key)
                reading = {"speedup": speedup, "median_ms": ms, "dense_ms": dense_ms, "reliable": comp.reliable}
                found[key] = rec = {"widths": plan.widths, "removed": list(plan.removed), "protocol": PROTOCOL,
                                    "readings": [*(_readings(old) if old else []), reading]}
                self.table.kv_set(key, rec)
            if ref is None or dense_ms < float(ref["median_ms"]):
                ref = {"median_ms": dense_ms, "protocol": PROTOCOL, "reliable": comp.reliable}
                self.table.kv_set(ref_key, ref)
        dense_ref = float(ref["median_ms"])
        return [dense_ref if k == full_key else dense_ref / _speedup(found[k], dense_ref) for k in keys]

    @staticmethod
    def _due(rec: dict[str, Any], dense_ref: float, readings: int) -> bool:
        """Whether a plan is short of quiet readings and has groups left."""
        return len(_quiet(rec, dense_ref)) < readings and len(_readings(rec)) < DENSE_TRIES

    def measured_points(self, space: PruningSpace, tag: str = "") -> list[tuple[Plan, float]]:
        """(plan, measured ms) of every whole model of this space (and subject ``tag``) measured so far."""
        prefix = f"model/{tag}{space.space_id}/"
        ref = self.table.kv_get(prefix + "dense-reference")
        if not isinstance(ref, dict) or ref.get("protocol") != PROTOCOL:
            return []
        dense_ref = float(ref["median_ms"])
        out = [(space.full_plan(), dense_ref)]
        for key in self.table.kv_keys(prefix):
            rec = self.table.kv_get(key)
            if not isinstance(rec, dict) or rec.get("protocol") != PROTOCOL or not _readings(rec):
                continue  # measured by an older protocol, or the reference itself
            try:
                plan = space.plan(rec["widths"], rec["removed"])
            except (PlanError, KeyError, TypeError):
                continue  # measured under a finer grid or another restriction of the space
            out.append((plan, dense_ref / _speedup(rec, dense_ref)))
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
        from profilers.neighbours import busy_cores_slow_thread
        from profilers.timing import compare, usable_cores

        threads = getattr(self.engine, "threads", None)
        if threads == 0:  # the engine's own choice: every core
            threads = usable_cores()
        runners = [self.engine.prepare(m.eval(), input_shape) for m in modules]
        try:
            slow = busy_cores_slow_thread()
            return [compare(runners, threads=threads or 1, sentinel=self.sentinel, busy_cores_slow_thread=slow)
                    for _ in range(times)]
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
