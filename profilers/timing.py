"""One timing protocol for every engine.

Warm up by time and by count, then take several repeats of many iterations. The result is
the median of the repeat medians (robust to a burst of noise in one repeat), with p90/p99,
mean, min, max and the coefficient of variation over all samples. When the repeat medians
disagree by more than the budget allows, more repeats are taken (a bounded number of times).

A runner is any callable that runs one inference and returns when its result is ready.
Runners on a device with its own clock (CUDA) may also offer ``timed(iters)``, returning the
device time of each of ``iters`` back-to-back inferences in milliseconds; the protocol uses
it unless host timing is asked for. Host timing uses a monotonic clock that tests replace
with a fake one.

:func:`measure_interleaved` times several runners round-robin, repeat by repeat, so slow
drift of a shared machine does not favour one of them. :func:`compare` is the protocol for
whole models side by side (dense against pruned, calibration plans): short interleaved
rounds, an estimator that interference cannot inflate, and a verdict on its reliability.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

Clock = Callable[[], float]
"""Seconds from a monotonic clock (``time.perf_counter``)."""


@dataclass(frozen=True)
class Budget:
    """How much time and how many iterations one measurement may take.

    Warm-up runs until both ``warmup_ms`` and ``warmup_iters`` are reached (and stops at
    ``warmup_max_iters``). Each repeat runs ``iters`` iterations, or, when ``iters`` is None,
    as many as fit in ``repeat_ms`` judged from the warm-up, kept within
    ``[min_iters, max_iters]``. When the repeat medians spread (their coefficient of
    variation) exceeds ``max_spread``, ``repeats`` more are taken, at most ``max_rounds - 1``
    times; the result pools every repeat.
    """

    warmup_ms: float = 5.0
    warmup_iters: int = 2
    warmup_max_iters: int = 1000
    repeats: int = 3
    iters: int | None = None
    repeat_ms: float = 5.0
    min_iters: int = 3
    max_iters: int = 200
    max_spread: float = 0.05
    max_rounds: int = 2
    max_repeats: int | None = None
    """:func:`compare` only: an attempt whose median is less certain than ``repeats`` rounds
    spread by ``max_spread`` would make it takes ``repeats`` more rounds, up to this many."""

    def __post_init__(self) -> None:
        if self.max_repeats is not None and self.max_repeats < self.repeats:
            raise ValueError(f"invalid timing budget {self}")
        if self.repeats < 1 or self.min_iters < 1 or self.max_iters < self.min_iters:
            raise ValueError(f"invalid timing budget {self}")
        if self.iters is not None and self.iters < 1:
            raise ValueError(f"invalid timing budget {self}")
        if self.max_rounds < 1 or self.warmup_iters < 0:
            raise ValueError(f"invalid timing budget {self}")


PROFILE = Budget()
"""Fast budget for the many small subgraphs of a latency table (tens of ms per point)."""

WHOLE_MODEL = Budget(warmup_ms=200.0, warmup_iters=5, repeats=5, repeat_ms=100.0,
                     min_iters=5, max_iters=2000, max_spread=0.02, max_rounds=2)
"""Stricter budget for whole models timed on their own (:func:`measure_interleaved`'s default)."""


@dataclass
class Timing:
    """Statistics of one measurement, in milliseconds per inference."""

    median_ms: float
    mean_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float
    cv: float
    """Coefficient of variation (population std / mean) over all samples."""
    samples: int
    repeats: int
    spread: float = 0.0
    """Coefficient of variation of the repeat medians: how well the median is pinned down."""
    rounds: int = 1
    clock: str = "host"
    """``host`` (wall clock around each call) or ``device`` (the engine's own events)."""
    per_repeat_ms: list[float] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(repeats: Sequence[Sequence[float]], rounds: int = 1, clock: str = "host") -> Timing:
    """Statistics of per-iteration samples grouped by repeat (median of repeat medians)."""
    groups = [np.asarray(r, dtype=np.float64) for r in repeats if len(r)]
    if not groups:
        raise ValueError("no samples to summarize")
    medians = np.array([float(np.median(g)) for g in groups])
    pooled = np.concatenate(groups)
    mean = float(pooled.mean())
    cv = float(pooled.std() / mean) if mean > 0 else 0.0
    mmean = float(medians.mean())
    spread = float(medians.std() / mmean) if len(medians) > 1 and mmean > 0 else 0.0
    p90, p95, p99 = (float(v) for v in np.percentile(pooled, [90, 95, 99]))
    return Timing(
        median_ms=float(np.median(medians)),
        mean_ms=mean,
        p90_ms=p90,
        p95_ms=p95,
        p99_ms=p99,
        min_ms=float(pooled.min()),
        max_ms=float(pooled.max()),
        cv=cv,
        samples=int(pooled.size),
        repeats=len(groups),
        spread=spread,
        rounds=rounds,
        clock=clock,
        per_repeat_ms=[float(m) for m in medians],
    )


class _Timer:
    """Runs one runner for a number of iterations and returns per-iteration milliseconds."""

    def __init__(self, runner: Callable[[], Any], clock: Clock, use_device: bool) -> None:
        self.runner = runner
        self.clock = clock
        timed = getattr(runner, "timed", None) if use_device else None
        self.device = timed if callable(timed) else None

    @property
    def kind(self) -> str:
        if self.device is None:
            return "host"
        return str(getattr(self.runner, "clock_name", "device"))

    def run(self, iters: int) -> list[float]:
        if self.device is not None:
            out = self.device(iters)
            if out is not None:
                return [float(v) for v in out]
            self.device = None
        samples = []
        clock, runner = self.clock, self.runner
        for _ in range(iters):
            t0 = clock()
            runner()
            samples.append((clock() - t0) * 1e3)
        return samples

    def warmup(self, budget: Budget) -> float:
        """Warm up; returns the median warm-up iteration time (ms) for sizing repeats."""
        samples: list[float] = []
        start = self.clock()
        while len(samples) < budget.warmup_max_iters:
            enough_count = len(samples) >= budget.warmup_iters
            enough_time = (self.clock() - start) * 1e3 >= budget.warmup_ms
            if enough_count and enough_time and samples:
                break
            samples.extend(self.run(1))
        # The first iterations carry one-off costs; size the repeats from the later half.
        tail = samples[len(samples) // 2:] or samples
        return float(np.median(tail))


def _iters_for(budget: Budget, est_ms: float) -> int:
    if budget.iters is not None:
        return budget.iters
    if est_ms <= 0 or not math.isfinite(est_ms):
        return budget.max_iters
    n = round(budget.repeat_ms / est_ms)
    return max(budget.min_iters, min(budget.max_iters, n))


def measure(runner: Callable[[], Any], budget: Budget = PROFILE, *, clock: Clock = time.perf_counter,
            device_clock: bool = True) -> Timing:
    """Time one runner under ``budget``; see the module docstring for the protocol."""
    return measure_interleaved([runner], budget, clock=clock, device_clock=device_clock)[0]


def measure_interleaved(runners: Sequence[Callable[[], Any]], budget: Budget = WHOLE_MODEL, *,
                        clock: Clock = time.perf_counter, device_clock: bool = True) -> list[Timing]:
    """Time several runners round-robin: repeat k of each runs before repeat k+1 of any.

    The order within a round rotates from one repeat to the next, so no runner always goes
    first. Each runner gets its own iteration count (from its own warm-up) and its own
    re-measurement rounds.
    """
    if not runners:
        return []
    timers = [_Timer(r, clock, device_clock) for r in runners]
    iters = [_iters_for(budget, t.warmup(budget)) for t in timers]
    groups: list[list[list[float]]] = [[] for _ in timers]
    rounds = [0] * len(timers)
    active = list(range(len(timers)))
    while active:
        for i in active:
            rounds[i] += 1
        for rep in range(budget.repeats):
            shift = rep % len(active)
            for i in active[shift:] + active[:shift]:
                groups[i].append(timers[i].run(iters[i]))
        still = []
        for i in active:
            t = summarize(groups[i])
            if t.spread > budget.max_spread and rounds[i] < budget.max_rounds:
                still.append(i)
        active = still
    return [summarize(g, rounds=r, clock=t.kind) for g, r, t in zip(groups, rounds, timers, strict=True)]


def measure_for(runner: Callable[[], Any], warmup_ms: float, duration_s: float, *,
                clock: Clock = time.perf_counter, device_clock: bool = True,
                repeats: int = 10) -> Timing:
    """trtexec-style: warm up for ``warmup_ms``, then run for about ``duration_s`` seconds.

    The run is split into ``repeats`` repeats of equal iteration counts sized from the
    warm-up, so the same median-of-medians statistics apply.
    """
    if warmup_ms < 0 or duration_s <= 0 or repeats < 1:
        raise ValueError("warm-up must be >= 0 ms and duration > 0 s")
    budget = Budget(warmup_ms=warmup_ms, warmup_iters=1, warmup_max_iters=10**9, repeats=repeats,
                    repeat_ms=duration_s * 1e3 / repeats, min_iters=1, max_iters=10**9,
                    max_spread=math.inf, max_rounds=1)
    return measure(runner, budget, clock=clock, device_clock=device_clock)


# -- whole models side by side: an estimator that interference cannot inflate ---------------

AB = Budget(warmup_ms=200.0, warmup_iters=5, repeats=9, repeat_ms=50.0, min_iters=8, max_iters=400,
            max_spread=0.03, max_rounds=3, max_repeats=81)
"""Whole models compared side by side: 9 short rounds each, more (up to 81) while the medians
are less certain than 9 rounds spread by 3% would make them, at most 3 attempts when unreliable.

Beside two spinning processes on a 2-vCPU AMD EPYC (family 26 model 2) the rounds of resnet18
at 64 px spread by 6-10% by the thread's CPU time: 9 rounds left its speedup uncertain by 3-4%,
and the closed loop, keeping the round nearest its budget, kept one that read 7% low.

A round lasts at least 50 ms and 8 runs, so the quantile it reports is taken over enough
samples for a short model: with 25 ms, a pruned resnet18 at 64 px (2.8 ms, 9 samples a round)
spread by 3.5% between rounds beside two spinning processes (AMD EPYC, thread CPU time)."""

ROUND_QUANTILE = 0.25
"""Each round's value is this quantile of its samples: a preempted sample only ever adds time."""


@dataclass
class Comparison:
    """Several models measured side by side in many short interleaved rounds.

    ``ms[i]`` is model i's estimate: the median over rounds of each round's lower quartile.
    Interference (another process taking the core, a cache flush) only ever adds time, so a
    low quantile within a round discards preempted samples and the median over rounds
    discards rounds that were disturbed throughout. ``ratios[i]`` is model 0's time over
    model i's, paired round by round (dense over pruned: the speedup), so slow drift of the
    machine cancels. ``spread`` is the robust relative spread (IQR / 1.349 / median) of each
    model's round values, ``ratio_spread`` that of the paired ratios. ``others_cores`` is how
    many cores other processes kept busy meanwhile (None where /proc/stat cannot be read).
    """

    ms: list[float]
    ratios: list[float]
    spread: list[float]
    ratio_spread: float
    rounds: list[list[float]]
    clock: str
    others_cores: float | None
    load_avg: float | None
    attempts: int
    reliable: bool
    reason: str = ""
    loud_rounds: int = 0
    """Rounds left out because the sentinel read loud around them (see :class:`Sentinel`)."""
    sentinel_floor_ms: float | None = None
    error: float = 0.0
    """The worst relative standard error of a median (a model's or a speedup's) over the rounds."""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rounds"] = len(self.rounds)
        return d


FLOOR_QUANTILE = 0.05
"""The sentinel's floor: this quantile of its readings."""


class Sentinel:
    """A small fixed workload timed between measurements, to tell a quiet machine from a loud one.

    On a shared or virtualised host the same model's time moves by 20-50% for seconds at a
    time, with nothing else of ours running: on a 2-vCPU Intel Xeon VM, dense efficientnet_b0
    by its own thread's CPU time ran 11.8 ms and, minutes later, 16.3 ms (no steal time, the
    other vCPU idle), the hardware sibling being used from outside the VM. Such an episode
    covers every round of a short comparison, so spread cannot reveal it. The sentinel can:
    its time is compared with its ``floor`` (the quietest it has been), and a measurement is
    kept only when the sentinel was within ``tolerance`` of the floor just before and just
    after it. ``wait`` returns once the machine is quiet again, or at a deadline.
    """

    def __init__(self, runner: Callable[[], Any], *, clock: Clock = time.perf_counter,
                 device_clock: bool = True, floor_ms: float | None = None, tolerance: float = 0.08,
                 iters: int = 8) -> None:
        self.timer = _Timer(runner, clock, device_clock)
        self.clock = clock
        self.known_floor_ms = floor_ms
        self.floor_ms = floor_ms
        self.tolerance = tolerance
        self.iters = iters
        self.last_ms = math.nan
        self.readings: list[float] = []
        self.runner = runner

    @property
    def samples(self) -> int:
        return len(self.readings)

    def close(self) -> None:
        close = getattr(self.runner, "close", None)
        if callable(close):
            close()

    def sample(self) -> float:
        """One reading (the lower quartile of a few iterations, ms).

        The floor is the 5th percentile of every reading so far (never above a floor given
        at construction): a low quantile rather than the minimum, which would keep falling
        with the number of readings until no reading is ever quiet."""
        ms = float(np.quantile(self.timer.run(self.iters), ROUND_QUANTILE))
        self.last_ms = ms
        self.readings.append(ms)
        n = len(self.readings)
        if n <= 64 or n % 32 == 0 or (self.floor_ms is not None and ms < self.floor_ms / (1 + self.tolerance)):
            floor = float(np.quantile(self.readings, FLOOR_QUANTILE))
            if self.known_floor_ms is not None:
                floor = min(floor, self.known_floor_ms)
            self.floor_ms = floor
        return ms

    def calibrate(self, seconds: float = 1.0, *, wall: Clock = time.perf_counter) -> float:
        """Warm up and read for about ``seconds`` so the floor starts near the quiet time."""
        self.timer.warmup(Budget(warmup_ms=20.0, warmup_iters=5))
        end = wall() + seconds
        while True:
            self.sample()
            if wall() >= end:
                break
        assert self.floor_ms is not None
        return self.floor_ms

    def loudness(self, ms: float | None = None) -> float:
        """How far a reading (the last by default) is above the floor, as a fraction."""
        v = self.last_ms if ms is None else ms
        if self.floor_ms is None or not self.floor_ms > 0 or not math.isfinite(v):
            return math.inf
        return v / self.floor_ms - 1.0

    def quiet(self) -> bool:
        """Read once: is the machine as quiet as it has been?"""
        self.sample()
        return self.loudness() <= self.tolerance

    def wait(self, deadline: float, *, wall: Clock = time.perf_counter) -> bool:
        """Read until quiet (True) or until the wall clock passes ``deadline`` (False)."""
        while True:
            if self.quiet():
                return True
            if wall() >= deadline:
                return False


MEDIAN_SE = math.sqrt(math.pi / 2)
"""The standard error of a median of n normal values is this times their deviation / sqrt(n)."""


def _uncertainty(rounds: Sequence[Sequence[float]]) -> tuple[float, float]:
    """(the worst robust spread of a model's round values or of the paired ratios to model 0,
    the relative standard error of a median that spread gives over these rounds)."""
    per_model = np.asarray(rounds, dtype=np.float64).T
    worst = max([robust_spread(v) for v in per_model]
                + [robust_spread(per_model[0] / v) for v in per_model[1:]])
    return worst, MEDIAN_SE * worst / math.sqrt(len(rounds))


def _quiet_rounds(rounds: list[list[float]], marks: list[float], sentinel: Sentinel | None,
                  repeats: int) -> tuple[list[list[float]] | None, int]:
    """(the rounds the sentinel read quiet around, or all without one; None when fewer than
    half of ``repeats`` (and 3) were quiet, how many were loud)."""
    if sentinel is None:
        return rounds, 0
    quiet = [r for r, v in zip(rounds, marks, strict=True) if sentinel.loudness(v) <= sentinel.tolerance]
    return (quiet if len(quiet) >= max(3, (repeats + 1) // 2) else None), len(rounds) - len(quiet)


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity where the OS tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def robust_spread(values: Sequence[float]) -> float:
    """IQR / 1.349 / median: the coefficient of variation of a normal sample, robust to outliers."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return 0.0
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return float((q3 - q1) / 1.349 / med) if med > 0 else 0.0


class CpuMeter:
    """CPU time other processes used while it ran, from ``/proc/stat`` and this process's own
    ``/proc/self/stat`` (Linux); ``others_cores()`` is None elsewhere."""

    def __init__(self) -> None:
        self._start = _cpu_snapshot()

    def others_cores(self) -> float | None:
        end = _cpu_snapshot()
        if self._start is None or end is None:
            return None
        (t0, busy0, mine0), (t1, busy1, mine1) = self._start, end
        if t1 <= t0:
            return None
        return max(0.0, ((busy1 - busy0) - (mine1 - mine0)) / (t1 - t0))


def _cpu_snapshot() -> tuple[float, float, float] | None:
    """(wall s, busy CPU s of the whole machine, CPU s of this process), or None."""
    try:
        ticks = os.sysconf("SC_CLK_TCK")
        with open("/proc/stat") as f:
            fields = [float(x) for x in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            mine = f.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    return time.monotonic(), busy / ticks, (float(mine[11]) + float(mine[12])) / ticks


def _busy_reason(kind: str, others: float | None, cores: int, threads: int, busy_cores_slow_thread: bool) -> str:
    """Why other processes' CPU time makes a measurement on this clock unreliable ("": it
    does not); see :func:`compare`."""
    if others is None:
        return ""
    if kind == "host" and others > cores - threads + 0.25:
        return (f"other processes kept {others:.1f} of {cores} cores busy, and the wall "
                f"clock counts waiting for a core ({threads} thread(s) needed)")
    if kind == "thread-cpu" and busy_cores_slow_thread and others > cores - threads:
        return (f"other processes kept {others:.1f} of {cores} cores busy: more than the "
                f"{cores - threads} left to them, so they shared the measured thread's core "
                "(or its hardware sibling and caches), which slows its CPU time on some CPUs "
                "(`python -m profilers.neighbours` on a quiet machine tells whether on this one)")
    return ""


def compare(runners: Sequence[Callable[[], Any]], budget: Budget = AB, *, threads: int = 1,
            clock: Clock = time.perf_counter, device_clock: bool = True,
            meter: Callable[[], CpuMeter] = CpuMeter, sentinel: Sentinel | None = None,
            wait_s: float = 30.0, wall: Clock = time.perf_counter,
            busy_cores_slow_thread: bool = True) -> Comparison:
    """Measure ``runners`` side by side (see :class:`Comparison`), re-measuring when unreliable.

    An attempt is reliable when every model's median and every speedup (the paired ratios)
    is as certain as ``budget.repeats`` rounds spread by ``budget.max_spread`` make it (the
    relative standard error of a median, :data:`MEDIAN_SE` * spread / sqrt(rounds): 1.25% for
    9 rounds at 3%), and other processes left the engine's cores alone. While it is less
    certain, ``repeats`` more rounds are taken, up to ``budget.max_repeats`` (or ``wait_s``
    seconds), unless other processes' CPU time already makes the attempt unreliable: a noisy
    machine costs time, not the verdict. An attempt that ends less certain
    than asked, with nothing else wrong, hands its rounds to the next one, which adds to them:
    beside two spinning processes on a 2-vCPU Intel Xeon VM the paired speedup of resnet18 at
    128 px spread by 7-10% over 81 rounds, a median uncertain by 1.3-1.6%, and three fresh
    attempts of 81 rounds each left all six rounds of a prune unreliable. On a
    host (wall) clock: ``others_cores <= cores - threads + 0.25``, since a wall clock cannot
    tell computing from waiting for the core. On the thread-CPU-time clock waiting does not
    count, but a neighbour on the same core, or on its hardware sibling, still slows the
    thread itself: on a 2-vCPU Intel Xeon VM, dense and pruned resnet18 at 128 px ran 1.71x
    and 1.78x slower by their own CPU time beside two spinning processes than alone, and
    their speedup read 8% lower. So ``others_cores <= cores - threads`` there, unless
    ``busy_cores_slow_thread`` is False: a probe of this CPU found they do not
    (:mod:`profilers.neighbours`; an AMD EPYC VM, for one). Device clocks
    judge spread only. Up to ``budget.max_rounds`` attempts; the first reliable one is
    returned, else the last, marked unreliable with the reason.

    With a :class:`Sentinel`, each round starts once the sentinel reads quiet and is kept
    only if it read quiet before and after the round, judged by the floor at the end (a
    round taken before the quietest reading was seen can still be dropped). Rounds are run
    until ``budget.repeats`` are quiet or ``wait_s`` seconds of an attempt have passed; an
    attempt with fewer than half of them quiet is unreliable ("the machine stayed loud").
    """
    if not runners:
        raise ValueError("nothing to compare")
    timers = [_Timer(r, clock, device_clock) for r in runners]
    limit = MEDIAN_SE * budget.max_spread / math.sqrt(budget.repeats)
    iters = [_iters_for(budget, t.warmup(budget)) for t in timers]
    kind = timers[0].kind
    cores = usable_cores()
    result: Comparison | None = None
    carried: tuple[list[list[float]], list[float]] = ([], [])
    for attempt in range(1, budget.max_rounds + 1):
        m = meter()
        rounds: list[list[float]] = list(carried[0])
        marks: list[float] = list(carried[1])  # the sentinel's louder reading around each round
        deadline = wall() + wait_s
        need = len(rounds) + budget.repeats
        most = len(rounds) + (budget.max_repeats or budget.repeats)
        while True:
            if sentinel is None:
                done = len(rounds) >= need
            else:
                quiet = sum(sentinel.loudness(v) <= sentinel.tolerance for v in marks)
                done = quiet >= need or bool(rounds and wall() >= deadline)
            if done:
                if need >= most or wall() >= deadline:
                    break
                if _busy_reason(kind, m.others_cores(), cores, threads, busy_cores_slow_thread):
                    break  # unreliable whatever more rounds would say
                kept, _ = _quiet_rounds(rounds, marks, sentinel, budget.repeats)
                if kept is not None and len(kept) >= 2 and _uncertainty(kept)[1] <= limit:
                    break
                need += budget.repeats  # less certain than asked: more rounds
                continue
            if sentinel is not None:
                sentinel.wait(deadline, wall=wall)
                before = sentinel.last_ms
            shift = len(rounds) % len(timers)
            row = [0.0] * len(timers)
            for i in list(range(shift, len(timers))) + list(range(shift)):
                row[i] = float(np.quantile(timers[i].run(iters[i]), ROUND_QUANTILE))
            rounds.append(row)
            if sentinel is not None:
                marks.append(max(before, sentinel.sample()))
        others = m.others_cores()
        reasons: list[str] = []
        quiet_kept, loud = _quiet_rounds(rounds, marks, sentinel, budget.repeats)
        kept = rounds if quiet_kept is None else quiet_kept
        if quiet_kept is None:
            assert sentinel is not None
            reasons.append(f"the machine stayed loud: a reference workload ran more than "
                           f"{100 * sentinel.tolerance:.0f}% above its quietest time around "
                           f"{loud} of {len(rounds)} rounds")
        per_model = np.asarray(kept).T
        ratios = [per_model[0] / per_model[i] for i in range(len(timers))]
        spread = [robust_spread(v) for v in per_model]
        ratio_spread = max((robust_spread(r) for r in ratios[1:]), default=0.0)
        worst, error = _uncertainty(kept)
        uncertain = error > limit
        if uncertain:
            reasons.append(f"rounds spread by {100 * worst:.1f}% over {len(kept)} rounds: the median is "
                           f"uncertain by {100 * error:.1f}% (limit {100 * limit:.1f}%)")
        busy = _busy_reason(kind, others, cores, threads, busy_cores_slow_thread)
        if busy:
            reasons.append(busy)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        result = Comparison(ms=[float(np.median(v)) for v in per_model],
                            ratios=[float(np.median(r)) for r in ratios], spread=spread,
                            ratio_spread=ratio_spread, rounds=kept, clock=kind, others_cores=others,
                            load_avg=load, attempts=attempt, reliable=not reasons, reason="; ".join(reasons),
                            loud_rounds=loud, error=error,
                            sentinel_floor_ms=None if sentinel is None else sentinel.floor_ms)
        if result.reliable:
            break
        # Less certain than asked and nothing else wrong: the next attempt adds to these rounds
        # (they are as good as its own), else it starts afresh.
        carried = (rounds, marks) if uncertain and len(reasons) == 1 else ([], [])
    assert result is not None
    return result
