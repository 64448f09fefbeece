"""Profile a pruning space: measure every latency term on its grid of widths into a table.

The grid of a term is every combination of its dims' choices. Terms with the same
signature run the same subgraph, so points are de-duplicated by (signature, widths) across
all terms. Points already in the table are reused; the rest are measured in a shuffled
(seeded) order so that slow drift of a shared machine spreads over the whole grid instead
of biasing one region of it. Each measurement is committed as soon as it is taken, and each
point is looked up again just before it is measured, so a second run on the same table
reuses what another run has committed meanwhile.

The subgraph of a term comes from a callable (the model adapter's ``term_module``), so this
module knows nothing of model families, importance or plans.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from mdp_common.errors import TableError
from mdp_common.space import PruningSpace, Term
from profilers.engines.base import Engine
from profilers.table import LatencyTable, in_shard, parse_widths, widths_key
from profilers.timing import PROFILE, Budget, Clock, Sentinel, Timing, measure, measure_interleaved

if TYPE_CHECKING:  # torch is loaded by whoever builds the modules, not by this module
    from torch import nn

TermModuleFn: TypeAlias = "Callable[[Term, tuple[int, ...]], tuple[nn.Module, tuple[int, ...]]]"
"""``(term, widths) -> (module, input shape without the batch)``."""

Key = tuple[str, tuple[int, ...]]

SIDES, COST, PROBE = "boundary-sides/", "boundary-cost/", "boundary-probe/"
"""Table records (kv) of boundary costs: per signature, which edges the engine converts; per
grid point, the cost at the input and at the output (``{"into": ms, "out_of": ms}``; a plain
float in older tables, both together); per tensor shape (batch left out), the probe's latency."""
RECHECK = "recheck-paired/"
"""Per grid point measured again because it read above a point that dominates it, side by
side with that point: the reading before, the one kept after, the point it was measured
beside and the ratio of the two (``{"before": ms, "after": ms, "beside": widths, "ratio": r}``),
so it is checked once. (Tables of earlier versions hold ``recheck/`` records of a recheck
measured alone; those points are checked again this way.)"""


def term_points(table: LatencyTable, signature: str, keep: tuple[bool, bool] = (False, False)
                ) -> dict[tuple[int, ...], float]:
    """A term's latency at every measured point with its boundary cost taken off: what the
    subgraph costs inside a whole model rather than timed alone (see :func:`profile_space`).

    ``keep`` says, for the term's input and its output, whether the whole model converts
    there too (a layout change the engine makes inside the model, e.g. ONNX Runtime around a
    squeeze-excitation gate): that side's cost is then part of the term and stays. Points
    recorded before costs were kept by side carry one figure for both; it is taken off whole
    whatever ``keep`` says (as before; only tables from that time have them). Never below a
    tenth of the measurement, so noise in a probe cannot make a term free."""
    points = table.points(signature)
    prefix = f"{COST}{signature}/"
    keys = table.kv_keys(prefix)
    if not keys:
        return points
    cost = {parse_widths(k[len(prefix):]): _cost(table.kv_get(k), keep) for k in keys}
    return {w: max(v - cost.get(w, 0.0), 0.1 * v) for w, v in points.items()}


def _cost(rec: Any, keep: tuple[bool, bool]) -> float:
    """What a boundary-cost record takes off: a plain float (both sides, an older record) as
    it is; a per-side record without the sides the whole model pays too."""
    if not isinstance(rec, dict):
        return float(rec)
    return (0.0 if keep[0] else float(rec["into"])) + (0.0 if keep[1] else float(rec["out_of"]))


@dataclass
class ProfileStats:
    """What a profile run covered and where its time went."""

    terms: int
    signatures: int
    grid_points: int
    in_shard: int
    reused: int
    measured: int
    seconds: float
    probes: int = 0
    """Boundary probes measured (tensor shapes at the edges of standalone subgraphs)."""
    build_s: float = 0.0
    prepare_s: float = 0.0
    compile_s: float = 0.0
    """Engine compiles (a runner's ``compile_s``, e.g. OpenVINO's), not counted in ``prepare_s``."""
    measure_s: float = 0.0
    remeasured: int = 0
    """Points measured again because the sentinel read loud around them."""
    loud: int = 0
    """Points that stayed loud after every retry (kept: the quietest of their measurements)."""
    rechecked: int = 0
    """Points measured again because they read above a point with every width at least theirs."""
    lowered: int = 0
    """Rechecked points whose new reading was lower (kept: interference only adds time)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        compiled = f", compile {self.compile_s:.1f} s" if self.compile_s else ""
        return (f"{self.terms} terms, {self.signatures} distinct signatures, {self.grid_points} grid "
                f"points ({self.in_shard} in this shard): {self.measured} measured, {self.reused} "
                f"reused, {self.probes} boundary probes, in {self.seconds:.1f} s (build {self.build_s:.1f} s, "
                f"export+prepare {self.prepare_s:.1f} s{compiled}, timing {self.measure_s:.1f} s)"
                + (f"; {self.remeasured} re-measured after a loud moment" if self.remeasured else "")
                + (f", {self.loud} still loud" if self.loud else "")
                + (f"; {self.rechecked} above a larger point measured again, {self.lowered} lower"
                   if self.rechecked else ""))


def suspects(points: dict[tuple[int, ...], float], tolerance: float) -> list[tuple[int, ...]]:
    """The widths whose latency reads more than ``tolerance`` above that of some point whose
    every width is at least as large: a subgraph that does no less work measured faster.

    Real engines do show such steps (a kernel chosen at one width and not at the next), and
    a measurement taken while something else ran reads high; only a second measurement tells
    them apart. Largest excess first."""
    return _suspects(points, _dominated(points), tolerance)


def _suspects(points: dict[tuple[int, ...], float], refs: dict[tuple[int, ...], tuple[int, ...]],
              tolerance: float) -> list[tuple[int, ...]]:
    """:func:`suspects`, given each point's fastest dominating point (:func:`_dominated`)."""
    out = [(points[k] / points[ref] - 1.0, k) for k, ref in refs.items()]
    return [k for excess, k in sorted(out, key=lambda e: -e[0]) if excess > tolerance]


def _dominated(points: dict[tuple[int, ...], float]) -> dict[tuple[int, ...], tuple[int, ...]]:
    """Per point with another point whose every width is at least as large: the fastest such."""
    if len(points) < 2:
        return {}
    keys = list(points)
    arr = np.array(keys, dtype=np.int64)
    vals = np.array([points[k] for k in keys], dtype=np.float64)
    out: dict[tuple[int, ...], tuple[int, ...]] = {}
    for i, k in enumerate(keys):
        dom = np.all(arr >= arr[i], axis=1)
        dom[i] = False
        if dom.any():
            idx = np.flatnonzero(dom)
            out[k] = keys[int(idx[np.argmin(vals[idx])])]
    return out


def _scaled(t: Timing, factor: float) -> Timing:
    """``t`` with every latency figure times ``factor``."""
    ms = {f: getattr(t, f) * factor for f in ("median_ms", "mean_ms", "p90_ms", "p95_ms", "p99_ms", "min_ms",
                                               "max_ms")}
    return replace(t, **ms, per_repeat_ms=[v * factor for v in t.per_repeat_ms])


def grid_points(space: PruningSpace) -> dict[Key, Term]:
    """Every distinct (signature, widths) of the space, with the first term that has it."""
    points: dict[Key, Term] = {}
    for term in space.terms:
        choices = [space.dim(d).choices for d in term.dims]
        for widths in itertools.product(*choices):
            points.setdefault((term.signature, tuple(widths)), term)
    return points


def profile_space(space: PruningSpace, term_module: TermModuleFn, engine: Engine, table: LatencyTable,
                  shard: tuple[int, int] = (0, 1), progress: bool = True, seed: int = 0,
                  budget: Budget = PROFILE, sentinel: Callable[[], Sentinel] | None = None,
                  tries: int = 2, wait_s: float = 1.0, clock: Clock = time.perf_counter,
                  recheck: float | None = 0.08) -> ProfileStats:
    """Measure what ``table`` lacks of ``space``'s grid (this shard's part of it).

    ``sentinel`` makes the :class:`~profilers.timing.Sentinel` that guards every point (made
    only when something is to be measured): a point is measured once the sentinel reads
    quiet (waiting at most ``wait_s``) and measured again, up to ``tries`` times, while the
    sentinel read loud around it; the quietest try is kept. At the end, points whose
    readings are loud by the final floor (the quietest the machine was) are measured again.

    ``recheck``: then every point of the shard that reads more than this fraction above a
    point of its signature with every width at least as large (:func:`suspects`) is measured
    once more, interleaved with the fastest such point, and kept at the lower of its reading
    and that point's latency times their ratio (interference only ever adds time, and a slow
    spell of the machine, minutes long on a shared VM, slows both alike; a real step of the
    engine reads the same ratio again and stays). Each point is rechecked once (a
    ``recheck-paired/`` record), judged against measured readings only (a point lowered by a
    ratio makes no suspects and is no reference: ratios never chain), so a complete table is
    rechecked by the first run that reads it and a later run measures nothing; not on a
    read-only table. ``None``: no recheck.

    Raises :class:`TableError` when the table belongs to another engine identity, or when
    the space was built for another input resolution than the engine's.
    """
    start = time.perf_counter()
    identity = engine.identity()
    diff = table.identity.differences(identity)
    if diff:
        raise TableError(f"latency table {table.path} belongs to another engine identity ({'; '.join(diff)})")
    res = identity.resolution
    if res is not None and tuple(space.input_size[1:]) != (res, res):
        raise TableError(f"the space of {space.model} is built for input {space.input_size}, "
                         f"the engine and table for resolution {res}")
    points = grid_points(space)
    mine = [k for k in points if in_shard(k[0], k[1], shard)]
    have = table.keys()
    todo = sorted(k for k in mine if k not in have)
    if todo and table.read_only:
        raise TableError(f"latency table {table.path} is read-only and lacks {len(todo)} of the "
                         f"{len(mine)} grid points of {space.model}: they cannot be measured into it; "
                         "profile into a writable table")
    random.Random(seed).shuffle(todo)
    stats = ProfileStats(
        terms=len(space.terms),
        signatures=len({t.signature for t in space.terms}),
        grid_points=len(points),
        in_shard=len(mine),
        reused=len(mine) - len(todo),
        measured=0,
        seconds=0.0,
    )
    batch = identity.batch_size
    sides_of: dict[str, tuple[int, int]] = {}
    edge_costs = getattr(engine, "edge_costs", None)
    has_boundaries = callable(getattr(engine, "boundary_sides", None)) or callable(edge_costs)

    def boundary(sig: str, module: nn.Module, shape: tuple[int, ...], runner: Any) -> tuple[float, float]:
        """The cost of the layout conversions the engine adds to this subgraph timed alone, at
        its input and at its output: what the engine's own per-node profile says, where it
        has one (``edge_costs``: openvino); else half of a probe (which converts both ways)
        per conversion, of the input's shape for those into the engine's layout and of the
        output's for those out of it. 0 where there are none."""
        from profilers.export import export_onnx

        if sig not in sides_of:
            rec = table.kv_get(SIDES + sig)
            if rec is None:
                if any(k[0] == sig for k in have):  # measured before boundaries were: leave as it was
                    rec = {"into": 0, "out_of": 0}
                elif callable(edge_costs):  # the engine measures them itself, per point
                    rec = {"into": 1, "out_of": 1}
                else:
                    into, out_of = engine.boundary_sides(export_onnx(module, shape))  # type: ignore[attr-defined]
                    rec = {"into": into, "out_of": out_of}
                table.kv_set(SIDES + sig, rec)
            sides_of[sig] = (int(rec["into"]), int(rec["out_of"]))
        into, out_of = sides_of[sig]
        if callable(edge_costs):
            if not (into or out_of):
                return 0.0, 0.0
            onnx = getattr(runner, "onnx", None) or export_onnx(module, shape)  # the runner's own export
            got = edge_costs(onnx, shape)
            return float(got[0]), float(got[1])
        out_shapes = getattr(runner, "output_shapes", None) or []
        if not out_shapes:
            out_of = 0
        return into * probe(shape) / 2, (out_of * probe(tuple(out_shapes[0])) / 2 if out_of else 0.0)

    def probe(shape: tuple[int, ...]) -> float:
        key = PROBE + widths_key(shape[1:])
        known = table.kv_get(key)
        if known is not None:
            return float(known)
        graph = engine.boundary_probe(shape)  # type: ignore[attr-defined]
        if graph is None:
            table.kv_set(key, 0.0)
            return 0.0
        runner = engine.prepare_onnx(graph, shape)
        try:
            timing, _ = timed(runner)
        finally:
            runner.close()
        table.kv_set(key, timing.median_ms)
        stats.probes += 1
        return timing.median_ms

    guard: Sentinel | None = None

    def guarded() -> None:
        nonlocal guard
        if guard is None and sentinel is not None:
            guard = sentinel()

    if todo:
        guarded()
    marks: dict[Key, float] = {}

    def timed(runner: Any) -> tuple[Timing, float]:
        """The runner measured under ``budget``; with a sentinel, the quietest of up to
        ``tries`` measurements and the sentinel's louder reading around it."""
        if guard is None:
            return measure(runner, budget, clock=clock), 0.0
        best: tuple[Timing, float] | None = None
        for _ in range(tries):
            guard.wait(clock() + wait_s, wall=clock)
            before = guard.last_ms
            timing = measure(runner, budget, clock=clock)
            mark = max(before, guard.sample())
            if best is None or mark < best[1]:
                best = (timing, mark)
            if guard.loudness(mark) <= guard.tolerance:
                break
        assert best is not None
        return best

    def prepared(key: Key) -> tuple[nn.Module, tuple[int, ...], Any, float]:
        """The point's subgraph built and prepared on the engine (that time counted), and
        the moment its timing starts."""
        t0 = time.perf_counter()
        module, shape = term_module(points[key], key[1])
        t1 = time.perf_counter()
        runner = engine.prepare(module, (batch, *shape))
        t2 = time.perf_counter()
        compile_s = float(getattr(runner, "compile_s", 0.0))
        stats.build_s += t1 - t0
        stats.prepare_s += t2 - t1 - compile_s
        stats.compile_s += compile_s
        return module, shape, runner, t2

    def one(key: Key, again: bool = False) -> None:
        sig, widths = key
        if key in table and not again:  # committed by another run since the grid was read
            stats.reused += 1
            return
        module, shape, runner, t2 = prepared(key)
        try:
            timing, mark = timed(runner)
            cost = boundary(sig, module, (batch, *shape), runner) if has_boundaries else (0.0, 0.0)
        finally:
            runner.close()
        if again:
            old = marks[key]
            stats.remeasured += 1
            if mark >= old:  # no quieter than before: keep the first
                return
        marks[key] = mark
        t3 = time.perf_counter()
        if sum(cost) > 0:
            table.kv_set(f"{COST}{sig}/{widths_key(widths)}", {"into": cost[0], "out_of": cost[1]})
        table.put(sig, widths, timing)
        if not again:
            stats.measured += 1
        stats.measure_s += t3 - t2

    def run(keys: list[Key], what: str, fn: Callable[[Key], None]) -> None:
        if not (progress and keys):
            for key in keys:
                fn(key)
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
        with Progress(*columns, console=Console(stderr=True)) as bar:
            task = bar.add_task(f"{what} {space.model} on {identity.engine}", total=len(keys))
            for key in keys:
                fn(key)
                bar.advance(task)

    refs: dict[str, dict[tuple[int, ...], tuple[int, ...]]] = {}  # per signature: each point's reference

    def recheck_one(key: Key) -> None:
        """Measure a suspect point again side by side with the point above it that read
        fastest (the same rounds, so a slow spell of the machine slows both); keep the lower
        of its reading and that point's reading times their ratio."""
        sig, widths = key
        before = table.get(sig, widths)
        beside = refs[sig].get(widths)
        ref_row = table.get(sig, beside) if beside is not None else None
        if before is None or beside is None or ref_row is None:
            return
        _, _, runner, t2 = prepared(key)
        _, _, ref_runner, _ = prepared((sig, beside))
        try:
            if guard is not None:
                guard.wait(clock() + wait_s, wall=clock)
            timing, ref_timing = measure_interleaved([runner, ref_runner], budget, clock=clock)
        finally:
            runner.close()
            ref_runner.close()
        stats.measure_s += time.perf_counter() - t2
        stats.rechecked += 1
        ratio = timing.median_ms / ref_timing.median_ms
        after = min(before.median_ms, ref_row.median_ms * ratio)
        if after < before.median_ms * (1 - 1e-6):  # a real step gives its own reading back
            table.put(sig, widths, _scaled(timing, after / timing.median_ms))
            stats.lowered += 1
        table.kv_set(f"{RECHECK}{sig}/{widths_key(widths)}",
                     {"before": before.median_ms, "after": after, "beside": list(beside), "ratio": ratio})

    run(todo, "profiling", one)
    if guard is not None:
        loud = [k for k, v in marks.items() if guard.loudness(v) > guard.tolerance]
        for key in loud:
            one(key, again=True)
        stats.loud = sum(guard.loudness(marks[k]) > guard.tolerance for k in loud)
    if recheck is not None and not table.read_only:
        mine_set = set(mine)
        sigs = sorted({k[0] for k in mine})
        records = {k[len(RECHECK):]: table.kv_get(k) for k in table.kv_keys(RECHECK)}
        lowered = {k for k, r in records.items() if isinstance(r, dict) and r.get("after", 0) < r.get("before", 0)}
        check: list[Key] = []
        for sig in sigs:
            # judged against measured readings only: a point lowered by its ratio to another
            # neither makes suspects nor serves as a reference, so ratios never chain
            pts = {w: v for w, v in table.points(sig).items()
                   if (sig, w) in mine_set and f"{sig}/{widths_key(w)}" not in lowered}
            refs[sig] = _dominated(pts)
            check += [(sig, w) for w in _suspects(pts, refs[sig], recheck) if f"{sig}/{widths_key(w)}" not in records]
        if check:
            guarded()
            run(check, "rechecking", recheck_one)
    stats.seconds = time.perf_counter() - start
    return stats
