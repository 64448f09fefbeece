"""Does engine-aware pruning matter? Pruned models measured on every engine beside their dense model.

    python -m benchmarks.cross_engine runs/r18-ort runs/r18-ov [--engines onnxruntime openvino]
        [--clock auto] [--json] [--out table.md]

Each argument is the output folder of ``python -m mdp_trt.prune`` (its ``pruned.pt``,
``model.onnx`` and ``report.json``). For every engine named, each model architecture's dense
model (the timm architecture of ``pruned.pt``, freshly initialised: this measures latency,
not accuracy) and the pruned models made from it are prepared on one engine setting and
measured side by side by the estimator the prune command uses (:func:`profilers.timing.compare`:
short interleaved rounds, speedups paired round by round), with its verdict on whether the
figures can be trusted. So one table gives the dense latency on each engine and the speedup
on each engine of the plan made for the other (for one engine, it is an A/B of dense
against pruned, as a check of the prune command's own figure).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mdp_trt.errors import MdpError


def load_run(path: Path, batch_size: int) -> dict[str, Any]:
    """A prune output folder: its report, pruned model, input shape and architecture."""
    from benchmarks.engine import onnx_input_shape
    from mdp_trt.api import load_pruned

    for name in ("report.json", "pruned.pt", "model.onnx"):
        if not (path / name).is_file():
            raise MdpError(f"{path} is not an output folder of mdp_trt.prune: it has no {name}")
    try:
        report = json.loads((path / "report.json").read_text())
    except (OSError, ValueError) as exc:
        raise MdpError(f"cannot read {path / 'report.json'}: {exc}") from exc
    pruned = load_pruned(path / "pruned.pt")
    return {"path": str(path), "report": report, "pruned": pruned, "arch": pruned.mdp_arch,
            "shape": onnx_input_shape(path / "model.onnx", batch_size)}


def dense_of(arch: dict[str, Any]) -> Any:
    """The dense timm model of an architecture record, freshly initialised, in eval mode."""
    import timm

    return timm.create_model(arch["name"], pretrained=False, **arch.get("kwargs", {})).eval()


def measure_runs(runs: Sequence[dict[str, Any]], engine_names: Sequence[str], clock: str = "auto",
                 precision: str = "fp32", threads: int | None = None) -> list[dict[str, Any]]:
    """Per run: on each engine, the dense and pruned ms and the paired speedup, all of one
    architecture's models measured side by side (:func:`profilers.timing.compare`)."""
    import torch

    from profilers.engines import clock_options, get_engine
    from profilers.timing import compare

    groups: dict[str, list[int]] = {}
    for i, run in enumerate(runs):
        groups.setdefault(json.dumps([run["arch"], run["shape"]], sort_keys=True), []).append(i)
    rows: list[dict[str, Any]] = [{"run": r["path"], "model": r["report"].get("model", r["arch"]["name"]),
                                   "made_for": r["report"].get("engine", {}).get("engine", "?"),
                                   "prune_speedup": r["report"].get("speedup"), "engines": {}} for r in runs]
    for name in engine_names:
        for members in groups.values():
            shape = tuple(runs[members[0]]["shape"])
            kw: dict[str, Any] = dict(clock_options(name, clock))
            if threads is not None:
                kw["threads"] = threads
            engine = get_engine(name, precision=precision, batch_size=shape[0], resolution=shape[-1], **kw)
            modules = [dense_of(runs[members[0]]["arch"]), *(runs[i]["pruned"] for i in members)]
            with torch.no_grad():
                runners = [engine.prepare(m, shape) for m in modules]
            try:
                comp = compare(runners, threads=max(1, getattr(engine, "threads", None) or 1))
            finally:
                for r in runners:
                    r.close()
            for j, i in enumerate(members, start=1):
                rows[i]["engines"][name] = {"identity": engine.identity().to_dict(), "dense_ms": comp.ms[0],
                                            "pruned_ms": comp.ms[j], "speedup": comp.ratios[j],
                                            "clock": comp.clock, "reliable": comp.reliable,
                                            "reason": comp.reason}
    return rows


def table(rows: Sequence[dict[str, Any]], engine_names: Sequence[str]) -> str:
    """Markdown: per run, dense ms and speedup on each engine."""
    head = "| model | plan made for | prune's own speedup | " + " | ".join(
        f"dense ms ({e}) | speedup on {e}" for e in engine_names) + " |"
    lines = [head, "|" + "---|" * (3 + 2 * len(engine_names))]
    for r in rows:
        own = f"{r['prune_speedup']:.2f}x" if isinstance(r["prune_speedup"], (int, float)) else "?"
        cells = [f"{c['dense_ms']:.3f} | {c['speedup']:.2f}x" + ("" if c["reliable"] else " (unreliable)")
                 for c in (r["engines"][e] for e in engine_names)]
        lines.append(f"| {r['model']} | {r['made_for']} | {own} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from profilers.engines import CLOCKS, ENGINES

    p = argparse.ArgumentParser(prog="python -m benchmarks.cross_engine", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, nargs="+", help="output folders of mdp_trt.prune")
    p.add_argument("--engines", nargs="+", default=["onnxruntime", "openvino"],
                   help=f"engines to measure on, of {', '.join(ENGINES)} (default onnxruntime openvino)")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: the engines' own, 1)")
    p.add_argument("--clock", default="auto", choices=CLOCKS,
                   help="auto (default: onnxruntime or openvino on one CPU thread by that thread's CPU "
                        "time, other engines by the wall clock), wall, or cpu")
    p.add_argument("--batch-size", type=int, default=1, help="batch of symbolic batch axes")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    unknown = [e for e in args.engines if e not in ENGINES]
    if unknown:
        raise MdpError(f"unknown engine(s) {unknown}; accepted: {', '.join(ENGINES)}")
    runs = [load_run(path, args.batch_size) for path in args.runs]
    rows = measure_runs(runs, args.engines, args.clock, args.precision, args.threads)
    text = table(rows, args.engines)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(json.dumps(rows, indent=2) if args.json else text)
    return 0


if __name__ == "__main__":
    from mdp_trt.cli import run_cli

    sys.exit(run_cli(main))
