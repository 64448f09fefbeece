"""Does the prune command tell the truth on a busy machine?

    python -m benchmarks.busy [--models resnet18@128 deit_tiny_patch16_224@224] [--busy 2]
        [--wall-threads 2] [--demo CLONE] [--out runs/busy] [--json]

For every model: start ``--busy`` processes that spin on the CPU (by default one per core),
run ``python -m mdp_trt.prune --engine onnxruntime --engine-target 2x`` beside them (the
default clock: thread CPU time on one thread), and, with ``--wall-threads N``, the same
with ``--threads N --clock wall``, whose honest outcome on a loaded machine is either a
landed target or "unreliable". Then the spinners stop, and an independent A/B of the dense
and pruned ONNX files (plain ONNX Runtime sessions, ``sess.run`` on numpy inputs, dense and
pruned alternating in blocks, the calling thread's CPU time on one thread or the wall clock
for the multi-threaded run) gives the speedup to check the report against. With ``--demo CLONE``,
``make demo`` runs in that fresh clone beside the spinners first, checked the same way
against its trained dense checkpoint. Before any spinner starts, the host is probed
(:mod:`profilers.neighbours`: does a busy core slow the measured thread's own CPU time on this
CPU?) where no probe of its CPU is stored, as a user would once on a quiet machine; the prune
runs (and the demo in its clone, which shares the user's cache) read that probe. Prints a
table and writes ``busy_machine.json`` / ``.md`` under ``--results``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mdp_trt.cli import run_cli
from mdp_trt.errors import MdpError
from profilers.neighbours import spinners, stop

BAND = (1.94, 2.2)


def _load() -> float:
    return os.getloadavg()[0]


def export_dense(name: str, res: int, path: Path) -> None:
    """The dense model as the prune command builds it (random initialisation) in ONNX."""
    from mdp_trt.api import create_model
    from profilers.export import export_onnx

    export_onnx(create_model(name, resolution=res).eval(), (1, 3, res, res), path)


def ab(paths: Sequence[Path], threads: int, wall: bool, rounds: int = 15, block_ms: float = 150.0
       ) -> dict[str, Any]:
    """Independent interleaved A/B: per block, each model's median; per model the median of its
    block medians; speedup = median over blocks of first / second."""
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sessions = []
    for p in paths:
        s = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
        inp = s.get_inputs()[0]
        x = np.random.default_rng(0).standard_normal(inp.shape).astype(np.float32)
        sessions.append((s, {inp.name: x}))
    clock = time.perf_counter_ns if wall else time.thread_time_ns

    def once(s: Any, feed: dict[str, Any]) -> float:
        t0 = clock()
        s.run(None, feed)
        return (clock() - t0) / 1e6

    iters = []
    for s, feed in sessions:
        for _ in range(5):
            once(s, feed)
        est = statistics.median(once(s, feed) for _ in range(5))
        iters.append(max(3, int(block_ms / max(est, 1e-3))))
    blocks: list[list[float]] = [[] for _ in sessions]
    for r in range(rounds):
        order = range(len(sessions)) if r % 2 == 0 else reversed(range(len(sessions)))
        for i in order:
            s, feed = sessions[i]
            blocks[i].append(statistics.median(once(s, feed) for _ in range(iters[i])))
    ms = [statistics.median(b) for b in blocks]
    speedup = statistics.median(a / b for a, b in zip(blocks[0], blocks[1], strict=True))
    return {"ms": ms, "speedup": speedup, "rounds": rounds, "threads": threads,
            "clock": "wall" if wall else "thread-cpu"}


def prune_once(name: str, res: int, out: Path, extra: Sequence[str]) -> dict[str, Any]:
    """One prune run as a subprocess; its exit status, wall time, last line and report."""
    cmd = [sys.executable, "-m", "mdp_trt.prune", "--model", name, "--resolution", str(res),
           "--engine", "onnxruntime", "--engine-target", "2x", "--lut", str(out.with_suffix(".sqlite")),
           "--out", str(out), "--force", "--quiet", *extra]
    t0, load0 = time.time(), _load()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    rec: dict[str, Any] = {"command": " ".join(cmd[1:]), "exit": proc.returncode, "wall_s": time.time() - t0,
                           "load_start": load0, "load_end": _load(),
                           "last_line": (proc.stdout.strip().splitlines() or [""])[-1]}
    if proc.returncode not in (0, 3, 4, 5):
        rec["stderr"] = proc.stderr[-2000:]
        return rec
    rep = json.loads((out / "report.json").read_text())
    rec.update(dense_ms=rep["dense_ms"], pruned_ms=rep["pruned_ms"], speedup=rep["speedup"],
               predicted_ms=rep["predicted_ms"], measurement=rep["measurement"], outcome=rec["last_line"].split(":")[0],
               rounds=len(rep["rounds"]))
    return rec


def demo_once(clone: Path, out: Path) -> dict[str, Any]:
    """``make demo`` in a fresh clone beside the spinners, then the same A/B on its files."""
    import torch

    from mdp_trt.api import create_model
    from profilers.export import export_onnx

    t0, load0 = time.time(), _load()
    proc = subprocess.run(["make", "demo"], cwd=clone, capture_output=True, text=True)
    rec: dict[str, Any] = {"model": "demo (resnet18, Fashion-MNIST)", "resolution": 64, "setting": "make demo",
                           "command": f"make demo (in a fresh clone, {clone})", "exit": proc.returncode,
                           "wall_s": time.time() - t0, "load_start": load0, "load_end": _load(),
                           "last_line": (proc.stdout.strip().splitlines() or [""])[-1]}
    result = clone / "runs" / "demo" / "result"
    if not (result / "report.json").is_file():
        rec["stderr"] = (proc.stderr + proc.stdout)[-2000:]
        return rec
    rep = json.loads((result / "report.json").read_text())
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.split(":")[0] in
             ("on target", "missed", "over-pruned", "unreliable")]
    rec.update(dense_ms=rep["dense_ms"], pruned_ms=rep["pruned_ms"], speedup=rep["speedup"],
               predicted_ms=rep["predicted_ms"], measurement=rep["measurement"],
               outcome=lines[-1].split(":")[0] if lines else "?", rounds=len(rep["rounds"]))
    ckpt = next((clone / "runs" / "demo").glob("resnet18-*-r64.pt"))
    dense = out / "demo-dense.onnx"
    model = create_model("resnet18", num_classes=10, in_chans=1, checkpoint=ckpt).eval()
    with torch.no_grad():
        export_onnx(model, (1, 1, 64, 64), dense)
    rec["ab_load"] = _load()
    rec["ab"] = ab([dense, result / "model.onnx"], 1, False)
    rec["report_vs_ab_pct"] = 100 * (rec["speedup"] / rec["ab"]["speedup"] - 1)
    rec["ab_in_band"] = BAND[0] <= rec["ab"]["speedup"] <= BAND[1]
    return rec


def run(args: argparse.Namespace) -> dict[str, Any]:
    from profilers.engines.base import cpu_name

    args.out.mkdir(parents=True, exist_ok=True)
    probe = probe_host(args.probe)
    rows = []
    if args.demo is not None:
        procs = spinners(args.busy)
        try:
            time.sleep(2.0)
            rec = demo_once(args.demo.resolve(), args.out)
        finally:
            stop(procs)
        rows.append(rec)
        print(_row_text(rec), file=sys.stderr, flush=True)
    for spec in args.models:
        name, _, res_text = spec.partition("@")
        res = int(res_text or 224)
        settings: list[tuple[str, list[str], int, bool]] = [("thread clock, 1 thread", [], 1, False)]
        if args.wall_threads:
            settings.append((f"wall clock, {args.wall_threads} threads",
                             ["--threads", str(args.wall_threads), "--clock", "wall", *shlex.split(args.wall_extra)], args.wall_threads,
                             True))
        dense = args.out / f"{name}-r{res}-dense.onnx"
        export_dense(name, res, dense)
        for label, extra, threads, wall in settings:
            tag = "wall" if wall else "cpu"
            out = args.out / f"{name}-r{res}-2x-{tag}"
            procs = spinners(args.busy)
            try:
                time.sleep(2.0)
                rec = prune_once(name, res, out, extra)
            finally:
                stop(procs)
            rec.update(model=name, resolution=res, setting=label)
            if "speedup" in rec:
                time.sleep(5.0)
                rec["ab_load"] = _load()
                rec["ab"] = ab([dense, out / "model.onnx"], threads, wall)
                ind = rec["ab"]["speedup"]
                rec["report_vs_ab_pct"] = 100 * (rec["speedup"] / ind - 1)
                rec["ab_in_band"] = BAND[0] <= ind <= BAND[1]
            rows.append(rec)
            print(_row_text(rec), file=sys.stderr, flush=True)
    return {"cpu": cpu_name(), "machine": platform.machine(), "cores": os.cpu_count(), "busy": args.busy,
            "host_probe": probe, "rows": rows}


def probe_host(probe: bool) -> dict[str, Any] | None:
    """The host probe of this CPU (:mod:`profilers.neighbours`), taken now, before any spinner,
    where none is stored and ``probe``; None where there is none."""
    from dataclasses import asdict

    from profilers import neighbours

    found = neighbours.load()
    if found is None and probe:
        found, why = neighbours.measure(neighbours.onnxruntime_timed())
        if found is None:
            print(f"host not probed: {why}", file=sys.stderr, flush=True)
        else:
            neighbours.save(found)
    if found is not None:
        print(f"host probe: busy cores x{found.inflation:.3f} on the measured thread "
              f"({'slow it' if found.slows else 'do not slow it'})", file=sys.stderr, flush=True)
    return None if found is None else asdict(found)


def ab_again(res: dict[str, Any], out: Path) -> None:
    """The independent A/B of every row again, with nothing else running (the spinners are
    long gone): each row's ``ab`` is replaced by it, the first one kept as ``ab_during_run``."""
    for r in res["rows"]:
        if "ab" not in r:
            continue
        if r["setting"] == "make demo":
            paths = [out / "demo-dense.onnx", Path(r["command"].split("clone, ")[1].rstrip(")")) / "runs" / "demo"
                     / "result" / "model.onnx"]
        else:
            tag = "wall" if r["ab"]["clock"] == "wall" else "cpu"
            paths = [out / f"{r['model']}-r{r['resolution']}-dense.onnx",
                     out / f"{r['model']}-r{r['resolution']}-2x-{tag}" / "model.onnx"]
        r.setdefault("ab_during_run", r["ab"])
        r["ab_load"] = _load()
        r["ab"] = ab(paths, r["ab"]["threads"], r["ab"]["clock"] == "wall")
        r["report_vs_ab_pct"] = 100 * (r["speedup"] / r["ab"]["speedup"] - 1)
        r["ab_in_band"] = BAND[0] <= r["ab"]["speedup"] <= BAND[1]
        print(_row_text(r), file=sys.stderr, flush=True)


def _row_text(r: dict[str, Any]) -> str:
    if "speedup" not in r:
        return f"{r['model']}@{r['resolution']} {r['setting']}: exit {r['exit']}: {r.get('stderr', '')[-300:]}"
    return (f"{r['model']}@{r['resolution']} {r['setting']}: exit {r['exit']}, report {r['speedup']:.2f}x, "
            f"independent A/B {r['ab']['speedup']:.2f}x ({r['report_vs_ab_pct']:+.1f}%), {r['wall_s']:.0f} s, "
            f"load {r['load_start']:.1f}-{r['load_end']:.1f}; {r['last_line']}")


def markdown(res: dict[str, Any]) -> str:
    probe = res.get("host_probe")
    host = ("no host probe stored" if not probe else
            f"host probe: busy cores x{probe['inflation']:.3f} on the measured thread's CPU time")
    lines = [f"CPU: {res['cpu']} ({res['cores']} cores), {res['busy']} spinning processes beside each prune run; "
             f"{host}.", "",
             "| model | setting | exit | outcome | report speedup | independent A/B | report vs A/B | in [1.94, 2.2] | "
             "dense / pruned (A/B, ms) | load during prune | load during A/B | prune wall time |",
             "|---|---|---:|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in res["rows"]:
        if "speedup" not in r:
            lines.append(f"| {r['model']}@{r['resolution']} | {r['setting']} | {r['exit']} | failed | | | | | | | | |")
            continue
        a = r["ab"]
        lines.append(f"| {r['model']}@{r['resolution']} | {r['setting']} | {r['exit']} | {r['outcome']} | "
                     f"{r['speedup']:.2f}x | {a['speedup']:.2f}x | {r['report_vs_ab_pct']:+.1f}% | "
                     f"{'yes' if r['ab_in_band'] else 'no'} | {a['ms'][0]:.2f} / {a['ms'][1]:.2f} | "
                     f"{r['load_start']:.1f}-{r['load_end']:.1f} | {r.get('ab_load', float('nan')):.1f} | "
                     f"{r['wall_s']:.0f} s |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.busy", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["resnet18@128", "deit_tiny_patch16_224@224"])
    ap.add_argument("--demo", type=Path, default=None,
                    help="also run `make demo` in this fresh clone of the repository beside the spinners")
    ap.add_argument("--busy", type=int, default=os.cpu_count() or 2, help="spinning processes (default: one per core)")
    ap.add_argument("--wall-threads", type=int, default=2, help="also prune with --threads N --clock wall (0: skip)")
    ap.add_argument("--wall-extra", default="", help="more prune options for the wall-clock runs, one string "
                    "(--wall-extra='--max-choices 8')")
    ap.add_argument("--no-probe", dest="probe", action="store_false",
                    help="do not probe the host first (profilers.neighbours) where no probe of its CPU is stored")
    ap.add_argument("--out", type=Path, default=Path("runs/busy"))
    ap.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--ab-again", action="store_true",
                    help="only repeat the independent A/B of every row of the results JSON (on a quiet machine)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.busy < 0:
        raise MdpError("--busy must be >= 0")
    if args.ab_again:
        res = json.loads((args.results / "busy_machine.json").read_text())
        ab_again(res, args.out)
    else:
        res = run(args)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "busy_machine.json").write_text(json.dumps(res, indent=2) + "\n")
    (args.results / "busy_machine.md").write_text(markdown(res))
    print(json.dumps(res, indent=2) if args.json else markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
