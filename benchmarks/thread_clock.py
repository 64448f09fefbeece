"""Does the thread clock hold beside other processes on this CPU?

    python -m benchmarks.thread_clock [--model resnet18] [--resolution 128] [--spinners 0 1 2 0]
        [--rounds 12] [--runs 20] [--out runs/thread-clock]

A dense timm model and a plan of it (every dim at the middle of its choices), exported to
ONNX, run in plain ONNX Runtime sessions on one thread, timed by the calling thread's CPU
time: dense and pruned alternate over ``--rounds`` rounds of ``--runs`` runs each (the 25th
percentile of a round is its value), once per entry of ``--spinners`` with that many
processes spinning beside them. Prints per pass the median dense and pruned ms and the
paired speedup, with the load average. Where the figures beside spinners match the quiet
passes, a neighbour does not slow the measured thread on this CPU; where they do not (a
hardware sibling, a shared cache), it does.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

SPIN = "while True:\n    pass\n"


def export_pair(name: str, res: int, out: Path) -> tuple[Path, Path]:
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


def session(path: Path) -> Callable[[], Any]:
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    feed = {inp.name: np.random.default_rng(0).random([int(d) for d in inp.shape]).astype(np.float32)}
    return lambda: sess.run(None, feed)


def round_ms(run: Callable[[], Any], n: int) -> float:
    import numpy as np

    values = []
    for _ in range(n):
        t = time.thread_time()
        run()
        values.append(time.thread_time() - t)
    return float(np.quantile(values, 0.25)) * 1e3


def one_pass(runs: Sequence[Callable[[], Any]], spinners: int, rounds: int, n: int) -> dict[str, float]:
    procs = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(spinners)]
    try:
        time.sleep(1.0 if spinners else 0.0)
        ms: list[list[float]] = [[], []]
        for r in range(rounds):
            for i in ((0, 1) if r % 2 == 0 else (1, 0)):
                ms[i].append(round_ms(runs[i], n))
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
    return {"spinners": spinners, "dense_ms": statistics.median(ms[0]), "pruned_ms": statistics.median(ms[1]),
            "speedup": statistics.median(a / b for a, b in zip(*ms, strict=True)), "load": os.getloadavg()[0]}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.thread_clock", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--resolution", type=int, default=128)
    ap.add_argument("--spinners", type=int, nargs="+", default=[0, 1, 2, 0])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("runs/thread-clock"))
    args = ap.parse_args(argv)
    if min(args.spinners) < 0 or args.rounds < 1 or args.runs < 2:
        from mdp_trt.errors import MdpError

        raise MdpError("--spinners must be >= 0, --rounds >= 1 and --runs >= 2")
    runs = [session(p) for p in export_pair(args.model, args.resolution, args.out)]
    for run in runs:
        for _ in range(10):
            run()
    print(f"{args.model}@{args.resolution}, ONNX Runtime, 1 thread, thread clock, {os.cpu_count()} CPUs")
    for k in args.spinners:
        r = one_pass(runs, k, args.rounds, args.runs)
        print(f"spinners {k}: dense {r['dense_ms']:.3f} ms, pruned {r['pruned_ms']:.3f} ms, "
              f"speedup {r['speedup']:.3f}x, load {r['load']:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    from mdp_trt.cli import run_cli

    sys.exit(run_cli(main))
