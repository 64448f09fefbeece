"""Profile a model's latency terms on an engine into a latency table.

    python -m mdp_trt.profile --model resnet50 --engine onnxruntime --precision fp32 \\
        --batch-size 1 --resolution 224 [--out PATH] [--gpu LABEL] [--shard i/n]
    python -m mdp_trt.profile merge OUT IN [IN ...]

The table goes to ``luts/<label>/<model>-<engine>-<precision>-bs<batch>-r<res>.sqlite``
unless ``--out`` says otherwise (a shard ``i/n`` adds ``.shard-i-of-n`` to the default
name). ``<label>`` is ``cpu`` or the GPU model (``a100``, ``h100``...); a ``--gpu`` label
that does not name the device the engine runs on stops the run. A table that exists is
extended, and only under the engine identity it was measured with. A killed run loses
nothing it measured: run the same command again to finish it.

``merge`` joins tables of one identity (shards measured on identical GPUs) into OUT.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mdp_trt.errors import MdpError


def _parser() -> argparse.ArgumentParser:
    from profilers.engines import DEFAULT_ENGINE, ENGINES

    p = argparse.ArgumentParser(prog="python -m mdp_trt.profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="timm model name, e.g. resnet50, deit_small_patch16_224")
    p.add_argument("--engine", default=DEFAULT_ENGINE, help=f"one of {', '.join(ENGINES)} (default {DEFAULT_ENGINE})")
    p.add_argument("--precision", default=None, help="fp32, fp16 or bf16 (default: the engine's)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--resolution", type=int, default=None,
                   help="square input side (default: the model's own)")
    p.add_argument("--out", type=Path, default=None, help="table file (default: luts/<label>/...)")
    p.add_argument("--gpu", default=None,
                   help="device label for the table's folder, checked against the device (default: detected)")
    p.add_argument("--shard", default="0/1", help="measure only shard i of n (numbered from 0)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (onnxruntime, openvino: default 1)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:<index> (default: the engine's)")
    p.add_argument("--clock", default="auto", choices=("auto", "wall", "cpu"),
                   help="auto (default: onnxruntime or openvino on one CPU thread is timed by that thread's CPU time, "
                        "the latency on an idle core; other engines by the wall clock), wall, or cpu")
    p.add_argument("--max-choices", type=int, default=None, help="at most this many widths per dim (default 16)")
    p.add_argument("--min-step", type=int, default=None, help="channel alignment step (default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffled measuring order")
    p.add_argument("--luts", type=Path, default=Path("luts"), help="root folder of default table paths")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the run's figures as JSON")
    return p


def _merge(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m mdp_trt.profile merge",
                                description="Merge latency tables of one engine identity into OUT.")
    p.add_argument("out", type=Path)
    p.add_argument("inputs", type=Path, nargs="+")
    args = p.parse_args(argv)
    from profilers.table import merge

    counts = merge(args.inputs, args.out)
    print(f"{args.out}: {counts['added']} rows added from {counts['inputs']} table(s), "
          f"{counts['duplicates']} duplicate(s) skipped")
    return 0


def _native_resolution(model: torch.nn.Module) -> int:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if not size:
        raise MdpError(f"{type(model).__name__} declares no input size; give --resolution")
    return int(size[-1])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "merge":
        return _merge(argv[1:])
    args = _parser().parse_args(argv)

    from profilers.device_label import check_label, device_label
    from profilers.engines import clock_of, clock_options, get_engine, precisions_of
    from profilers.table import LatencyTable, default_table_path, parse_shard, shard_path

    precisions_of(args.engine)  # unknown engine: fail before building anything
    shard = parse_shard(args.shard)
    if args.batch_size < 1:
        raise MdpError(f"--batch-size must be >= 1, got {args.batch_size}")

    from mdp_trt.api import create_model, space_of
    from mdp_trt.models import SpaceConfig, adapter_for
    from profilers.profile import profile_space

    torch.set_num_threads(max(1, args.threads or 1))
    model = create_model(args.model, pretrained=False, resolution=args.resolution).eval()
    resolution = args.resolution or _native_resolution(model)
    engine = get_engine(args.engine, precision=args.precision, batch_size=args.batch_size,
                        resolution=resolution, threads=args.threads, device=args.device,
                        **clock_options(args.engine, args.clock))
    label = check_label(args.gpu, engine.device) if args.gpu else device_label(engine.device)
    cfg: dict[str, int] = {"resolution": resolution}
    if args.max_choices is not None:
        cfg["max_choices"] = args.max_choices
    if args.min_step is not None:
        cfg["min_step"] = args.min_step
    space = space_of(model, SpaceConfig(**cfg))
    adapter = adapter_for(model)
    out = args.out
    if out is None:
        out = default_table_path(label, args.model, args.engine, engine.precision, args.batch_size,
                                 resolution, root=args.luts, clock=clock_of(engine))
        if shard != (0, 1):
            out = shard_path(out, shard)
    identity = engine.identity()
    print(f"profiling {args.model} ({len(space.terms)} terms) on {identity.describe()} -> {out}",
          file=sys.stderr)
    made: list[Any] = []

    def sentinel() -> Any:
        from profilers.sentinel import make_sentinel

        made.append(make_sentinel(engine))
        return made[-1]

    with torch.no_grad(), LatencyTable.open(out, identity) as table:
        try:
            stats = profile_space(space, lambda t, w: adapter.term_module(space, t, w), engine, table,
                                  shard=shard, progress=not args.no_progress, seed=args.seed,
                                  sentinel=sentinel)
        finally:
            for s in made:
                s.close()
        note = table.read_only_note()  # a read-only table that lacks points fails above instead
        if note:
            print(note, file=sys.stderr)
    if args.json:
        print(json.dumps({"table": str(out), **stats.to_dict(), "identity": identity.to_dict()}, indent=2))
    else:
        print(f"{out}: {stats}")
    return 0


if __name__ == "__main__":
    from mdp_trt.cli import run_cli

    sys.exit(run_cli(main))
