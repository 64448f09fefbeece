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
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from mdp_trt.errors import TableError
from mdp_trt.space import PruningSpace, Term
from profilers.engines.base import Engine
from profilers.table import LatencyTable, in_shard
from profilers.timing import PROFILE, Budget, measure

TermModuleFn = Callable[[Term, tuple[int, ...]], tuple[nn.Module, tuple[int, ...]]]
"""``(term, widths) -> (module, input shape without the batch)``."""

Key = tuple[str, tuple[int, ...]]


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
    build_s: float = 0.0
    prepare_s: float = 0.0
    measure_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        return (f"{self.terms} terms, {self.signatures} distinct signatures, {self.grid_points} grid "
                f"points ({self.in_shard} in this shard): {self.measured} measured, {self.reused} "
                f"reused, in {self.seconds:.1f} s (build {self.build_s:.1f} s, export+prepare "
                f"{self.prepare_s:.1f} s, timing {self.measure_s:.1f} s)")


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
                  budget: Budget = PROFILE) -> ProfileStats:
    """Measure what ``table`` lacks of ``space``'s grid (this shard's part of it).

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

    def one(key: Key) -> None:
        sig, widths = key
        if key in table:  # committed by another run since the grid was read
            stats.reused += 1
            return
        t0 = time.perf_counter()
        module, shape = term_module(points[key], widths)
        t1 = time.perf_counter()
        runner = engine.prepare(module, (batch, *shape))
        t2 = time.perf_counter()
        try:
            timing = measure(runner, budget)
        finally:
            runner.close()
        t3 = time.perf_counter()
        table.put(sig, widths, timing)
        stats.measured += 1
        stats.build_s += t1 - t0
        stats.prepare_s += t2 - t1
        stats.measure_s += t3 - t2

    if progress and todo:
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
            task = bar.add_task(f"profiling {space.model} on {identity.engine}", total=len(todo))
            for key in todo:
                one(key)
                bar.advance(task)
    else:
        for key in todo:
            one(key)
    stats.seconds = time.perf_counter() - start
    return stats
