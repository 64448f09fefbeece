"""Does the thread clock hold beside other processes on this CPU?

    python -m benchmarks.thread_clock [--model resnet18] [--resolution 128] [--spinners 0 1 2 0]
        [--rounds 15] [--out runs/thread-clock]

A dense timm model and a plan of it (every dim at the middle of its choices), exported to
ONNX, measured by the busy-machine benchmark's independent A/B (:func:`benchmarks.busy.ab`:
plain ONNX Runtime sessions on one thread, dense and pruned alternating in ``--rounds``
blocks, the calling thread's CPU time), once per entry of ``--spinners`` with that many
processes spinning beside them (:func:`profilers.neighbours.spinners`). Prints per pass the
dense and pruned ms and the paired speedup, with the load average. Where the figures beside
spinners match the quiet passes, a neighbour does not slow the measured thread on this CPU;
where they do not (a hardware sibling, a shared cache), it does.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.busy import ab
from profilers.neighbours import spinners, stop


def export_pair(name: str, res: int, out: Path) -> tuple[Path, Path]:
    """The dense model and its mid plan in ONNX under ``out`` (kept for the next run)."""
    from mdp_trt.api import apply_plan, create_model, space_of
    from mdp_trt.models import SpaceConfig
    from profilers.export import export_onnx

    dense_path, pruned_path = out / f"{name}-r{res}-dense.onnx", out / f"{name}-r{res}-mid.onnx"
    if not (dense_path.is_file() and pruned_path.is_file()):
        out.mkdir(parents=True, exist_ok=True)
        model = create_model(name, resolution=res).eval()
        space = space_of(model, SpaceConfig(resolution=res))
        plan = space.plan({d.name: d.choices[len(d.choices) // 2] for d in space.dims})
        export_onnx(model, (1, 3, res, res), dense_path)
        export_onnx(apply_plan(model, plan, space=space).eval(), (1, 3, res, res), pruned_path)
    return dense_path, pruned_path


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.thread_clock", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--spinners", type=int, nargs="+", default=[0, 1, 2, 0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", type=Path, default=Path("runs/thread-clock"))
    args = ap.parse_args(argv)
    if min(args.spinners) < 0 or args.rounds < 1:
        from mdp_trt.errors import MdpError

        raise MdpError("--spinners must be >= 0 and --rounds >= 1")
    paths = export_pair(args.model, args.resolution, args.out)
    print(f"{args.model}@{args.resolution}, ONNX Runtime, 1 thread, thread clock, {os.cpu_count()} CPUs")
    for k in args.spinners:
        procs = spinners(k)
        try:
            time.sleep(1.0 if k else 0.0)
            r = ab(paths, threads=1, wall=False, rounds=args.rounds)
        finally:
            stop(procs)
        print(f"spinners {k}: dense {r['ms'][0]:.3f} ms, pruned {r['ms'][1]:.3f} ms, "
              f"speedup {r['speedup']:.3f}x, load {os.getloadavg()[0]:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    from mdp_trt.cli import run_cli

    sys.exit(run_cli(main))
