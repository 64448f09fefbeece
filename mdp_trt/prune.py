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
import glob
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from mdp_trt.cli import run_cli
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


def main(argv: Sequence[str] | None = None) -> int:
    """The command; its exit status says the outcome (see :data:`mdp_trt.report.EXIT_CODES`)."""
    import json

    from mdp_trt.finetune import is_main
    from mdp_trt.report import EXIT_CODES, outcome, summary_line

    args = build_parser().parse_args(argv)
    result = run(args)
    if not is_main():
        return 0
    report = json.loads((result / "report.json").read_text())
    print(f"report: {result / 'report.md'}")
    print(summary_line(report))
    return EXIT_CODES[outcome(report)]


def _log(args: argparse.Namespace, msg: str) -> None:
    if not args.quiet:
        print(msg, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> Path:
    """The whole job; returns the output directory. Everything is written to a temporary
    directory beside ``--out`` and renamed at the end, so an interrupted run leaves nothing.

    Under torchrun the first process does the job and the others only join its fine-tuning."""
    from mdp_trt import pipeline
    from mdp_trt.finetune import init_distributed, is_main, share
    from mdp_trt.target import parse_target

    target = parse_target(args.engine_target)
    out = args.out
    if out.exists() and not out.is_dir():
        raise MdpError(f"--out {out} is a file; give the path of a directory to create")
    if out.exists() and any(out.iterdir()) and not args.force:
        raise MdpError(f"output directory {out} exists and is not empty (use --force to replace it)")
    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise MdpError(f"checkpoint {args.checkpoint} does not exist")
    if args.data not in ("synthetic", "fashion-mnist") and not Path(args.data).is_dir():
        raise MdpError(f"dataset path {args.data} does not exist (or use --data fashion-mnist|synthetic)")
    if args.steps < 1 or args.max_rounds < 1:
        raise MdpError("--steps and --max-rounds must be at least 1")
    torch.manual_seed(args.seed)
    distributed = init_distributed()
    if distributed and not is_main():
        pipeline.follow(args)
        return out

    tmp = _temp_dir(out)
    try:
        report = pipeline.prune(args, target, tmp, log=lambda s: _log(args, s))
        from mdp_trt import report as report_mod

        report_mod.write(report, tmp)
        try:
            (tmp / OWNER).unlink()
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        except OSError as exc:
            raise MdpError(f"cannot move the results into {out}: {exc}") from exc
    finally:
        if distributed:
            share(None)  # the job is over (done or failed): the other processes stop waiting
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


OWNER = ".owner"
"""File in a temporary output directory naming the host and process that write it."""


def _temp_dir(out: Path) -> Path:
    """A new temporary directory beside ``out`` (``.<out>.<random>``), marked with its owner;
    those left by dead processes of this host (``kill -9``) are removed first."""
    from profilers.export import current_umask

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_dirs(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        (tmp / OWNER).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp's private mode would stay on the renamed result
    except OSError as exc:
        raise MdpError(f"cannot create the output directory {out}: {exc}") from exc
    return tmp


def remove_stale_temp_dirs(out: Path) -> list[Path]:
    """Remove the temporary directories of ``out`` whose owner (a process of this host) is dead;
    never one of a live process, of another host, or without an owner file. Returns them."""
    removed = []
    for d in sorted(Path(p) for p in glob.glob(glob.escape(str(out.parent / f".{out.name}.")) + "*")):
        try:
            host, pid = (d / OWNER).read_text().split()
            alive = host != socket.gethostname() or _alive(int(pid))
        except (OSError, ValueError):
            continue
        if not alive:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (of any user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


if __name__ == "__main__":
    sys.exit(run_cli(main))

