"""Whole-model measurement on a busy machine: the estimator, its verdict, and what the prune
command reports and returns when a measurement cannot be trusted."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time

import pytest
from helpers_timing import FakeClock as Clock

from mdp_trt.report import EXIT_CODES, markdown, outcome, summary_line, verdict
from profilers.timing import AB, Budget, Comparison, CpuMeter, compare, robust_spread, usable_cores

FAST = Budget(warmup_ms=0.0, warmup_iters=1, repeats=9, iters=8, max_spread=0.03, max_rounds=3)


class Interfered:
    """Takes ``ms`` per call, plus ``extra_ms`` whenever ``hit(call index)`` says another
    process took the core: interference only ever adds time."""

    def __init__(self, clock: Clock, ms: float, hit, extra_ms: float) -> None:
        self.clock, self.ms, self.hit, self.extra = clock, ms, hit, extra_ms
        self.i = 0

    def __call__(self) -> None:
        self.clock.now += (self.ms + (self.extra if self.hit(self.i) else 0.0)) / 1e3
        self.i += 1


class QuietMeter:
    def __init__(self, cores: float = 0.0) -> None:
        self.cores = cores

    def others_cores(self) -> float | None:
        return self.cores


def _compare(runners, clock, meter_cores: float = 0.0, budget: Budget = FAST) -> Comparison:
    return compare(runners, budget, clock=clock, meter=lambda: QuietMeter(meter_cores))


def test_sporadic_interference_does_not_move_the_estimate() -> None:
    clock = Clock()
    # Every third sample of the dense model and every fifth of the pruned one is preempted.
    dense = Interfered(clock, 4.0, lambda i: i % 3 == 0, 6.0)
    pruned = Interfered(clock, 2.0, lambda i: i % 5 == 0, 6.0)
    c = _compare([dense, pruned], clock)
    assert c.ms == pytest.approx([4.0, 2.0])
    assert c.ratios[1] == pytest.approx(2.0)
    assert c.reliable and c.attempts == 1 and c.reason == ""
    # A plain median would have been fooled by the same samples on the dense model.
    naive = Interfered(Clock(), 4.0, lambda i: i % 3 == 0, 6.0)
    samples = []
    for _ in range(72):
        t0 = naive.clock.now
        naive()
        samples.append((naive.clock.now - t0) * 1e3)
    assert sum(samples) / len(samples) > 5.5


def test_rounds_disturbed_throughout_are_outvoted() -> None:
    clock = Clock()
    # Three whole rounds of 8 samples (after one warm-up call) run 50% slower.
    slow = {2, 5, 6}
    dense = Interfered(clock, 3.0, lambda i: i > 0 and (i - 1) // 8 in slow, 1.5)
    c = _compare([dense], clock)
    assert c.ms[0] == pytest.approx(3.0)
    assert c.reliable


def test_interference_everywhere_is_unreliable_after_remeasuring() -> None:
    clock = Clock()
    import random

    rng = random.Random(0)
    steady = Interfered(clock, 2.0, lambda i: False, 0.0)

    def call() -> None:  # every sample takes 1-3x its time
        clock.now += 2.0 * (1 + 2 * rng.random()) / 1e3

    c = _compare([call, steady], clock)
    assert not c.reliable and c.attempts == FAST.max_rounds
    assert "spread" in c.reason


def test_noisy_rounds_are_outnumbered_instead_of_given_up() -> None:
    # Every sample takes up to 30% more than its time, at random: 9 rounds leave the speedup
    # less certain than asked, so more rounds are taken until it is; without them it stays so.
    import random

    def noisy(clock: Clock, ms: float, seed: int):
        rng = random.Random(seed)

        def call() -> None:
            clock.now += ms * (1 + 0.3 * rng.random()) / 1e3
        return call

    clock = Clock()
    more = dataclasses.replace(FAST, max_repeats=81)
    c = _compare([noisy(clock, 4.0, 1), noisy(clock, 2.0, 2)], clock, budget=more)
    assert c.reliable and c.reason == "" and c.attempts == 1, c.reason
    assert 9 < len(c.rounds) <= 81 and len(c.rounds) % 9 == 0
    assert c.error <= 1.2533 * 0.03 / 3 and c.error > 0
    assert c.ratios[1] == pytest.approx(2.0, rel=0.02)
    # Without more rounds per attempt, each attempt adds its 9 to the last one's ...
    few = _compare([noisy(clock, 4.0, 1), noisy(clock, 2.0, 2)], clock)
    assert not few.reliable and len(few.rounds) == 9 * FAST.max_rounds and few.attempts == FAST.max_rounds
    assert "uncertain by" in few.reason and "over 27 rounds" in few.reason and few.error > c.error
    # ... but where the wall clock also says the cores were busy, no more rounds are taken (they
    # could not make it reliable) and each attempt starts afresh.
    busy = _compare([noisy(clock, 4.0, 1), noisy(clock, 2.0, 2)], clock, meter_cores=float(usable_cores()),
                    budget=more)
    assert not busy.reliable and len(busy.rounds) == 9 and "cores busy" in busy.reason
    assert busy.attempts == FAST.max_rounds
    with pytest.raises(ValueError):
        Budget(repeats=9, max_repeats=5)


def test_wall_clock_on_a_busy_machine_is_unreliable_but_thread_time_is_not() -> None:
    cores = usable_cores()
    clock = Clock()
    steady = Interfered(clock, 1.0, lambda i: False, 0.0)
    busy = _compare([steady], clock, meter_cores=float(cores))
    assert not busy.reliable and "cores busy" in busy.reason and busy.attempts == FAST.max_rounds
    quiet = _compare([steady], clock, meter_cores=0.0)
    assert quiet.reliable

    class ThreadTimed:
        clock_name = "thread-cpu"

        def __call__(self) -> None:
            pass

        def timed(self, iters: int) -> list[float]:
            return [1.0] * iters

    # The thread's CPU time does not count waiting: other processes on the spare cores are fine,
    # more than those share the measured thread's core (or its sibling) and slow it.
    spare = _compare([ThreadTimed()], clock, meter_cores=float(cores - 1))
    assert spare.reliable and spare.clock == "thread-cpu" and spare.others_cores == cores - 1
    crowded = _compare([ThreadTimed()], clock, meter_cores=float(cores) + 0.5)
    assert not crowded.reliable and "sibling" in crowded.reason and "profilers.neighbours" in crowded.reason
    # where a probe of this CPU found busy cores do not slow the thread, they are no reason
    probed = compare([ThreadTimed()], FAST, clock=clock, meter=lambda: QuietMeter(float(cores) + 0.5),
                     busy_cores_slow_thread=False)
    assert probed.reliable and probed.reason == ""
    # the wall clock still counts waiting for a core, probe or not
    walled = compare([steady], FAST, clock=clock, meter=lambda: QuietMeter(float(cores)), busy_cores_slow_thread=False)
    assert not walled.reliable and "cores busy" in walled.reason


def test_robust_spread() -> None:
    assert robust_spread([1.0, 1.0, 1.0]) == 0.0
    assert robust_spread([1.0, 1.0, 1.0, 1.0, 9.0]) == 0.0  # one outlier does not count
    assert robust_spread([0.9, 1.0, 1.1, 0.95, 1.05]) == pytest.approx(0.1 / 1.349, rel=1e-6)
    assert AB.repeats >= 5 and AB.max_rounds >= 2


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux /proc")
def test_cpu_meter_sees_another_process_and_not_itself() -> None:
    m = CpuMeter()
    t0 = time.process_time()
    while time.process_time() - t0 < 0.3:  # this process's own work does not count
        pass
    mine = m.others_cores()
    assert mine is not None and mine >= 0.0
    child = subprocess.Popen([sys.executable, "-c", "import time\nt=time.time()\nwhile time.time()-t<1.0: pass"])
    m = CpuMeter()
    child.wait()
    seen = m.others_cores()
    assert seen is not None and seen > 0.5


def _report(measured: float, reliable: bool = True) -> dict:
    return {"model": "m", "target": {"text": "2x", "budget_ms": 10.0}, "pruned_ms": measured, "dense_ms": 20.0,
            "speedup": 20.0 / measured, "tolerance_pct": 3.0, "predicted_ms": 10.0,
            "params_before": 2_000_000, "params_after": 1_000_000, "flops_before": 4e9, "flops_after": 2e9,
            "engine": {"engine": "onnxruntime", "version": "v", "device": "cpu", "precision": "fp32",
                       "batch_size": 1, "resolution": 32, "threads": 1},
            "measurement": {"reliable": reliable, "reason": "" if reliable else "rounds spread by 9.0%",
                            "clock": "host", "spread": [0.01, 0.09], "ratio_spread": 0.05, "rounds": 9,
                            "attempts": 3, "others_cores": 1.9, "load_avg": 4.0}}


@pytest.mark.parametrize("measured, reliable, kind, code", [
    (10.1, True, "on target", 0), (11.0, True, "missed", 3), (8.0, True, "over-pruned", 4),
    (10.0, False, "unreliable", 5), (8.0, False, "unreliable", 5)])
def test_outcome_verdict_and_exit_code(measured: float, reliable: bool, kind: str, code: int) -> None:
    r = _report(measured, reliable)
    assert outcome(r) == kind and EXIT_CODES[kind] == code
    v = verdict(r)
    assert kind in v or (kind == "missed" and "missed" in v)
    if not reliable:
        assert "on target" not in v and "over-pruned" not in v and "rounds spread" in v
        assert summary_line(r).startswith("unreliable:") and "rounds spread" in summary_line(r)
    assert verdict(r) in markdown(r)
