"""Does a busy neighbour core slow this thread's own CPU time? A probe of the host, kept per CPU.

The thread-CPU-time clock does not count time spent waiting for a core, but on some hosts a
process on another core still slows the measured thread itself: on a 2-vCPU Intel Xeon VM
(family 6 model 207) dense and pruned resnet18 at 128 px ran 1.71x and 1.78x slower by their
own CPU time beside two spinning processes (the two vCPUs share a core on the host), while on
a 2-vCPU AMD EPYC VM (family 25 model 17) they stayed within the quiet runs' 5%
(``benchmarks.thread_clock``, README). The estimator (:func:`profilers.timing.compare`) has to
assume the worst where it does not know, and marks thread-clock figures taken while other
processes held the free cores unreliable. This probe tells it, for the CPU it runs on:

    python -m profilers.neighbours            # once, on a quiet machine

times a small fixed block (:mod:`profilers.sentinel`) on ONNX Runtime by the thread's CPU time
in alternating blocks, alone and with a spinning process on every other core, and stores the
ratio (``inflation``) in the user's cache (``$MDP_TRT_HOST_CACHE``, else
``$XDG_CACHE_HOME/mdp_trt/host.json``), keyed by the CPU's model name, family, model and core
count. Only a probe whose quiet blocks were quiet (other processes below
:data:`QUIET_CORES` cores) is stored: on a busy machine the quiet side cannot be read, and the
probe says so and stores nothing. Where the stored inflation is at most
:data:`INFLATION_LIMIT`, busy neighbour cores no longer make thread-clock figures unreliable
(:func:`busy_cores_slow_thread`); spread, sentinel and load still do.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mdp_common.errors import MdpError
from profilers.timing import CpuMeter, usable_cores

PROBE_VERSION = 1
INFLATION_LIMIT = 1.05
"""Largest slowdown of the measured thread beside busy cores that is taken as none: the
quiet passes of one ``benchmarks.thread_clock`` run differ by 1-2%, two runs by up to 5%."""
QUIET_CORES = 0.3
"""Most cores other processes may keep busy during the probe's quiet blocks."""
SPIN = "while True:\n    pass\n"


@dataclass
class Probe:
    """One probe of this host: the block's ms alone and beside busy cores, by the thread clock."""

    cpu: str
    quiet_ms: float
    busy_ms: float
    inflation: float
    others_quiet: float
    spinners: int
    when: float
    version: int = PROBE_VERSION

    @property
    def slows(self) -> bool:
        return self.inflation > INFLATION_LIMIT


def cpu_key() -> str:
    """The CPU as the guest sees it: model name (:func:`~profilers.engines.base.cpu_name`),
    family, model, usable cores."""
    from profilers.engines.base import cpu_name

    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            k, _, v = line.partition(":")
            k = k.strip()
            if k in ("cpu family", "model") and k not in fields:
                fields[k] = v.strip()
    except OSError:
        pass
    return (f"{cpu_name()} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')}), "
            f"{usable_cores()} cores")


def cache_path() -> Path:
    env = os.environ.get("MDP_TRT_HOST_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mdp_trt" / "host.json"


def load(cpu: str | None = None, path: Path | None = None) -> Probe | None:
    """The stored probe of this CPU (``cpu``), or None: none stored, another version, unreadable."""
    path = path or cache_path()
    try:
        data = json.loads(path.read_text())
        rec = data[cpu or cpu_key()]
        probe = Probe(**rec)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return probe if probe.version == PROBE_VERSION else None


def save(probe: Probe, path: Path | None = None) -> Path:
    """Store ``probe`` under its CPU (other CPUs' records kept); written whole, then renamed."""
    path = path or cache_path()
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data[probe.cpu] = asdict(probe)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    return path


def busy_cores_slow_thread(cpu: str | None = None, path: Path | None = None) -> bool:
    """Whether other processes on the free cores must be taken to slow the measured thread:
    True unless a stored probe of this CPU found they do not."""
    probe = load(cpu, path)
    return True if probe is None else probe.slows


def spinners(n: int) -> list[subprocess.Popen[bytes]]:
    """``n`` processes that keep one core busy each, until killed (:func:`stop`)."""
    return [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(n)]


def stop(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def measure(timed: Callable[[int], Sequence[float]], *, blocks: int = 4, iters: int = 60, block_ms: float = 500.0,
            spin: Callable[[int], Any] = spinners, end: Callable[[Any], None] = stop,
            meter: Callable[[], CpuMeter] = CpuMeter, settle_s: float = 0.3,
            cpu: str | None = None) -> tuple[Probe | None, str]:
    """Probe with ``timed(iters)`` (per-iteration ms by the thread clock) in ``blocks`` pairs
    of blocks (each at least ``iters`` iterations and ``block_ms`` long), alone then beside a
    spinner on every other core. Returns the probe, or None
    and why not (a machine busy during the quiet blocks, a single core)."""
    n = usable_cores() - 1
    if n < 1:
        return None, "a single core: no neighbour to probe"
    quiet: list[float] = []
    busy: list[float] = []
    others: list[float] = []
    warm = timed(iters)  # warm-up; blocks of at least ``block_ms`` (the meter counts in 10 ms ticks)
    iters = max(iters, int(np.ceil(block_ms / max(float(np.median(warm)), 1e-6))))
    for _ in range(blocks):
        m = meter()
        quiet.append(float(np.quantile(timed(iters), 0.25)))
        o = m.others_cores()
        others.append(0.0 if o is None else o)
        procs = spin(n)
        try:
            time.sleep(settle_s)
            busy.append(float(np.quantile(timed(iters), 0.25)))
        finally:
            end(procs)
    busiest = max(others)
    if busiest > QUIET_CORES:
        return None, (f"other processes kept {busiest:.1f} cores busy while the probe ran alone "
                      f"(at most {QUIET_CORES} allowed): probe again on a quiet machine")
    q, b = float(np.median(quiet)), float(np.median(busy))
    return Probe(cpu=cpu or cpu_key(), quiet_ms=q, busy_ms=b, inflation=b / q, others_quiet=busiest,
                 spinners=n, when=time.time()), ""


def onnxruntime_timed() -> Callable[[int], Sequence[float]]:
    """The sentinel's block on ONNX Runtime, one thread, timed by the thread clock."""
    from profilers.engines import get_engine
    from profilers.sentinel import CHANNELS, reference_module

    engine = get_engine("onnxruntime", threads=1, clock="cpu")
    runner = engine.prepare(reference_module(), (1, CHANNELS, 56, 56))
    timed = runner.timed

    def run(iters: int) -> Sequence[float]:
        out = timed(iters)
        assert out is not None
        return out

    return run


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m profilers.neighbours", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--show", action="store_true", help="print the stored probe of this CPU; measure nothing")
    ap.add_argument("--if-missing", action="store_true", help="probe only where no probe of this CPU is stored")
    ap.add_argument("--blocks", type=int, default=4)
    args = ap.parse_args(argv)
    if args.blocks < 1:
        raise MdpError("--blocks must be >= 1")
    cpu = cpu_key()
    if args.if_missing and load(cpu) is not None:
        args.show = True
    if args.show:
        probe = load(cpu)
        print(f"{cpu}: " + ("no probe stored" if probe is None else
                            f"inflation {probe.inflation:.3f} ({probe.quiet_ms:.3f} -> {probe.busy_ms:.3f} ms), "
                            f"busy cores {'slow' if probe.slows else 'do not slow'} the measured thread"))
        return 0
    probe, why = measure(onnxruntime_timed(), blocks=args.blocks, cpu=cpu)
    if probe is None:
        print(f"{cpu}: not probed: {why}", file=sys.stderr)
        return 3
    path = save(probe)
    print(f"{cpu}: block {probe.quiet_ms:.3f} ms alone, {probe.busy_ms:.3f} ms beside {probe.spinners} busy "
          f"core(s): x{probe.inflation:.3f}; busy cores {'slow' if probe.slows else 'do not slow'} the "
          f"measured thread (limit x{INFLATION_LIMIT}); stored in {path}")
    return 0


if __name__ == "__main__":
    from mdp_common.cli import run_cli

    sys.exit(run_cli(main))
