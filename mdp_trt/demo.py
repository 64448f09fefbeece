"""``make demo``: the main job end to end on the embedded default (ONNX Runtime on the CPU).

Trains a ResNet-18 briefly on Fashion-MNIST (cached under the output directory), then runs
``python -m mdp_trt.prune`` on it with a 2x target measured on ONNX Runtime: profile, calibrate,
Taylor importance, exact solve, surgery, closed-loop validation, fine-tuning, report.
Falls back to synthetic data when the Fashion-MNIST files are not installed.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from mdp_trt.cli import run_cli
from mdp_trt.data import FASHION_MNIST_DIR, DataSpec, evaluate, loaders
from profilers.engines import CLOCKS, resolve_clock

MODEL = "resnet18"
RESOLUTION = 64


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mdp_trt.demo", description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("runs/demo"))
    ap.add_argument("--target", default="2x")
    ap.add_argument("--train-limit", type=int, default=12000)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--clock", default="auto", choices=CLOCKS,
                    help="auto (default: the engine thread's CPU time, the latency on an idle core), wall "
                         "or cpu")
    args = ap.parse_args(argv)

    from mdp_trt.api import create_model
    from mdp_trt.finetune import TrainConfig, train
    from mdp_trt.prune_command import main as prune_main
    from profilers.table import default_table_path

    torch.manual_seed(0)
    data = "fashion-mnist" if (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file() else "synthetic"
    if data == "synthetic":
        print("Fashion-MNIST is not installed (Debian package dataset-fashion-mnist): using synthetic data",
              file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    ckpt = args.out / f"{MODEL}-{data}-r{RESOLUTION}.pt"
    if not ckpt.is_file():
        model = create_model(MODEL, num_classes=10, in_chans=1)
        train_loader, val_loader = loaders(data, DataSpec(1, RESOLUTION, 10), 128, args.train_limit, 2000)
        train(model, train_loader.dataset, TrainConfig(epochs=args.epochs, batch_size=128, lr=2e-3),
              desc="train dense model")
        print(f"dense model trained: top-1 {evaluate(model, val_loader):.2f}% on 2000 test images",
              file=sys.stderr)
        torch.save(model.state_dict(), ckpt)
    code = prune_main([
        "--model", MODEL, "--checkpoint", str(ckpt), "--num-classes", "10", "--in-chans", "1",
        "--resolution", str(RESOLUTION), "--engine", "onnxruntime", "--clock", args.clock,
        "--engine-target", args.target,
        "--data", data, "--train-limit", str(args.train_limit), "--val-limit", "2000",
        "--importance-batches", "8", "--finetune-epochs", "1", "--max-choices", "8",
        "--lut", str(default_table_path(".", MODEL, "onnxruntime", "fp32", 1, RESOLUTION, root=args.out,
                                        clock=resolve_clock("onnxruntime", args.clock))),
        "--out", str(args.out / "result"), "--force",
    ])
    if data == "synthetic":
        print("note: Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist): the accuracy "
              "figures above are on synthetic data and mean nothing")
    return code


if __name__ == "__main__":
    sys.exit(run_cli(main))
