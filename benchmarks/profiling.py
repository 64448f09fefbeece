"""What profiling costs: a complete latency table from scratch, then a rerun over it.

    python -m benchmarks.profiling [--models resnet50 deit_small_patch16_224]
        [--engine onnxruntime] [--resolution 224] [--batch-size 1] [--max-choices 16] [--out DIR]

For each model: wall time of a profile into an empty table, with the number of latency
terms, distinct signatures (subgraphs actually measured), grid points and measurements,
and where the time went (building term modules, export + engine preparation, engine compiles
where the engine reports them (openvino), timing, which includes reading the boundary costs:
probes on onnxruntime, a second compile with the per-node profile on openvino), and how many
points were measured again because they read above a larger point of their subgraph;
then the wall time of the same profile again over the complete table (nothing to measure).
Tables go to a temporary folder unless ``--out`` keeps them.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEFAULT_MODELS = ("resnet50", "deit_small_patch16_224")


def profile_cost(model_name: str, engine_name: str, out_dir: Path, resolution: int = 224,
                 batch_size: int = 1, threads: int | None = None, progress: bool = True,
                 max_choices: int = 16) -> dict[str, Any]:
    """Profile one model into a fresh table under ``out_dir``, then again over the full table."""
    import torch

    from mdp_trt.api import create_model, space_of
    from mdp_trt.models import SpaceConfig, adapter_for
    from profilers.engines import get_engine
    from profilers.profile import profile_space
    from profilers.table import LatencyTable

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    model = create_model(model_name, pretrained=False, resolution=resolution).eval()
    space = space_of(model, SpaceConfig(resolution=resolution, max_choices=max_choices))
    adapter = adapter_for(model)
    setup_s = time.perf_counter() - t0
    engine = get_engine(engine_name, batch_size=batch_size, resolution=resolution, threads=threads)
    path = out_dir / f"{model_name}-{engine_name}-{engine.precision}-bs{batch_size}-r{resolution}.sqlite"
    if path.exists():
        path.unlink()

    def term_module(t: Any, w: tuple[int, ...]) -> Any:
        return adapter.term_module(space, t, w)

    with torch.no_grad(), LatencyTable.open(path, engine.identity()) as table:
        first = profile_space(space, term_module, engine, table, progress=progress)
        t1 = time.perf_counter()
        again = profile_space(space, term_module, engine, table, progress=progress)
        rerun_s = time.perf_counter() - t1
        rows = len(table)
    return {
        "model": model_name,
        "engine": engine.identity().describe(),
        "setup_s": setup_s,
        "first": first.to_dict(),
        "max_choices": max_choices,
        "rerun_s": rerun_s,
        "rerun_measured": again.measured,
        "table_rows": rows,
        "table": str(path),
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profiling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    p.add_argument("--engine", default="onnxruntime", help="onnxruntime (default), openvino, tensorrt or torch")
    p.add_argument("--resolution", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--max-choices", type=int, default=16, help="at most this many widths per dim (the prune default)")
    p.add_argument("--out", type=Path, default=None, help="keep the tables in this folder")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="mdp-profiling-") as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        for name in args.models:
            r = profile_cost(name, args.engine, out, args.resolution, args.batch_size, args.threads,
                             progress=not args.no_progress, max_choices=args.max_choices)
            results.append(r)
            f = r["first"]
            print(f"{name} on {r['engine']} ({platform.node()}, {platform.processor() or platform.machine()}):")
            print(f"  profile from scratch: {f['seconds']:.1f} s wall; {f['terms']} terms, "
                  f"{f['signatures']} distinct signatures, {f['grid_points']} grid points, "
                  f"{f['measured']} measurements")
            per = f["seconds"] / max(1, f["measured"])
            compiled = f", engine compile {f['compile_s']:.1f} s" if f.get("compile_s") else ""
            print(f"    time per measurement {per * 1e3:.0f} ms: build {f['build_s']:.1f} s, export + "
                  f"prepare {f['prepare_s']:.1f} s{compiled}, timing {f['measure_s']:.1f} s")
            if f.get("rechecked"):
                print(f"    {f['rechecked']} points read above a larger point and were measured again "
                      f"({f['lowered']} read lower the second time)")
            print(f"  rerun over the complete table: {r['rerun_s']:.2f} s, {r['rerun_measured']} measured")
            sys.stdout.flush()
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    from mdp_trt.cli import run_cli

    sys.exit(run_cli(main))
