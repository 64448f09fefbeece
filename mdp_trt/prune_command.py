"""``python -m mdp_trt.prune``: importance, solve, surgery, closed-loop validation, fine-tune, report.

    python -m mdp_trt.prune --model resnet50 --engine onnxruntime --engine-target 2x --out runs/r50

The target is a speedup over the dense model (``2x``), a share of its latency (``50%``) or
milliseconds (``3.2ms``), all measured on the engine. Without a matching latency table the
model is profiled first; a table measured under another identity is refused.

Exit status: 0 on target; 3 target missed (slower than the budget beyond the tolerance);
4 over-pruned (faster beyond it); 5 the measurement could not be trusted (a busy machine
under the wall clock, rounds that disagree), so no verdict; 1 bad input; 2 bad arguments.
The outputs are written in every one of the cases 0, 3, 4 and 5.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from mdp_trt.cli import run_cli
from mdp_trt.config import PruneConfig
from mdp_trt.errors import MdpError


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m mdp_trt.prune", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    m = ap.add_argument_group("model")
    m.add_argument("--model", required=True, help="timm model name")
    src = m.add_mutually_exclusive_group()
    src.add_argument("--pretrained", action="store_true", help="timm's pretrained weights")
    src.add_argument("--checkpoint", type=Path, help="state dict to load into the timm model")
    m.add_argument("--num-classes", type=int, default=None, help="classifier size (default: timm's)")
    m.add_argument("--in-chans", type=int, default=None, help="input channels (default: timm's)")
    e = ap.add_argument_group("engine")
    e.add_argument("--engine", default="onnxruntime",
                   help="onnxruntime (default), openvino, tensorrt or torch")
    e.add_argument("--engine-target", required=True, metavar="T", help="2x, 50%% or 3.2ms")
    e.add_argument("--precision", default="fp32")
    e.add_argument("--batch-size", type=int, default=1)
    e.add_argument("--resolution", type=int, default=None, help="input side in pixels (default: the model's)")
    e.add_argument("--threads", type=int, default=None, help="engine threads (CPU engines)")
    e.add_argument("--clock", default="auto", choices=("auto", "wall", "cpu"),
                   help="auto (default: onnxruntime or openvino on one CPU thread is timed by that thread's CPU time, "
                        "the latency on an idle core; other engines by the wall clock), wall, or cpu")
    e.add_argument("--lut", type=Path, default=None, help="latency table (default: luts/<device>/...)")
    e.add_argument("--max-choices", type=int, default=16, help="at most this many widths per dim")
    e.add_argument("--calibration-plans", type=int, default=8)
    e.add_argument("--tolerance", type=float, default=3.0, help="closed-loop tolerance in %% of the target")
    e.add_argument("--max-rounds", type=int, default=6, help="closed-loop solves at most")
    e.add_argument("--solver", default="HIGHS")
    e.add_argument("--latency-model", default="surface", choices=("surface", "linear"),
                   help="surface (default) or the linear-in-output-channels model, for ablations")
    e.add_argument("--kinds", default=None,
                   help="comma-separated dim kinds to prune (channels,heads,qk,v,mlp,embed; default all)")
    e.add_argument("--no-block-removal", action="store_true", help="keep every block")
    d = ap.add_argument_group("data and training")
    d.add_argument("--data", default="synthetic", help="ImageFolder DIR, fashion-mnist or synthetic")
    d.add_argument("--importance", default="taylor", choices=("taylor", "magnitude", "random"))
    d.add_argument("--importance-batches", type=int, default=16)
    d.add_argument("--train-batch-size", type=int, default=64)
    d.add_argument("--finetune-epochs", type=float, default=0.0)
    d.add_argument("--lr", type=float, default=1e-3)
    d.add_argument("--steps", type=int, default=1, help="prune-then-fine-tune steps towards the target")
    d.add_argument("--train-limit", type=int, default=None, help="use at most this many training images")
    d.add_argument("--val-limit", type=int, default=None, help="evaluate on at most this many images")
    d.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True, help="output directory (must not exist, or --force)")
    ap.add_argument("--force", action="store_true", help="replace an existing output directory")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def config_of(args: argparse.Namespace) -> PruneConfig:
    """The typed options of a parsed command line."""
    return PruneConfig(
        model=args.model, target=args.engine_target, pretrained=args.pretrained, checkpoint=args.checkpoint,
        num_classes=args.num_classes, in_chans=args.in_chans, engine=args.engine, precision=args.precision,
        batch_size=args.batch_size, resolution=args.resolution, threads=args.threads, clock=args.clock,
        lut=args.lut, max_choices=args.max_choices, calibration_plans=args.calibration_plans,
        tolerance=args.tolerance, max_rounds=args.max_rounds, solver=args.solver,
        latency_model=args.latency_model, kinds=tuple(args.kinds.split(",")) if args.kinds else None,
        no_block_removal=args.no_block_removal, data=args.data, importance=args.importance,
        importance_batches=args.importance_batches, train_batch_size=args.train_batch_size,
        finetune_epochs=args.finetune_epochs, lr=args.lr, steps=args.steps, train_limit=args.train_limit,
        val_limit=args.val_limit, seed=args.seed, quiet=args.quiet, out=args.out, force=args.force)


def main(argv: Sequence[str] | None = None) -> int:
    """The command; its exit status says the outcome (see :data:`mdp_trt.report.EXIT_CODES`)."""
    import json

    from mdp_trt.finetune import is_main
    from mdp_trt.report import EXIT_CODES, outcome, summary_line

    config = config_of(build_parser().parse_args(argv))
    result = run(config)
    if not is_main():
        return 0
    report = json.loads((result / "report.json").read_text())
    print(f"report: {result / 'report.md'}")
    print(summary_line(report))
    return EXIT_CODES[outcome(report)]


def run(config: PruneConfig) -> Path:
    """The whole job; returns the output directory (``config.out``). Everything is written to a
    temporary directory beside it and renamed at the end, so an interrupted run leaves nothing.

    Under torchrun the first process does the job and the others only join its fine-tuning."""
    from mdp_trt import pipeline
    from mdp_trt.finetune import finish_distributed, init_distributed, is_main, share
    from mdp_trt.outdir import check_out, written_into
    from mdp_trt.part import Subject
    from mdp_trt.target import parse_target

    target = parse_target(config.target)
    if config.out is None:
        raise MdpError("no output directory (--out)")
    out = config.out
    check_out(out, config.force)
    if config.checkpoint is not None and not config.checkpoint.is_file():
        raise MdpError(f"checkpoint {config.checkpoint} does not exist")
    if config.data not in ("synthetic", "fashion-mnist") and not Path(config.data).is_dir():
        raise MdpError(f"dataset path {config.data} does not exist (or use --data fashion-mnist|synthetic)")
    config.check()
    torch.manual_seed(config.seed)
    distributed = init_distributed()
    if distributed and not is_main():
        try:
            pipeline.follow(config)
        finally:
            finish_distributed()
        return out

    def log(msg: str) -> None:
        if not config.quiet:
            print(msg, file=sys.stderr, flush=True)

    try:
        with written_into(out, config.force) as tmp:
            subject = Subject(pipeline.build_model(config))
            pipeline.run(config, subject, log=log, target=target).write(tmp)
    finally:
        if distributed:
            share(None)  # the job is over (done or failed): the other processes stop waiting
            finish_distributed()
    return out


if __name__ == "__main__":
    sys.exit(run_cli(main))
