"""Prune the timm backbone inside a small segmentation model, with the model's own loss and data.

    python examples/backbone_segmentation.py            # resnet18 at 64 px, 2x on ONNX Runtime

The model is a timm ResNet without its classifier (``num_classes=0, global_pool=''``: it
returns its last feature map) and a tiny convolutional head that predicts a mask per pixel,
upsampled to the input. The task: Fashion-MNIST's garments against the background (mask =
pixel above a threshold), or random shapes where the dataset is not installed. The model is
trained briefly on the CPU, then ``mdp_trt.prune(model, "2x", part="backbone", ...)`` prunes
the backbone only: importance from the segmentation loss on the whole model, latency measured
on the whole model (the head is a fixed part of it), the backbone's output width kept so the
head still fits. It prints the whole model's measured speedup and the masks' IoU before and
after (no fine-tuning: fine-tune the returned model in your own loop).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

import mdp_trt
from mdp_trt.data import FASHION_MNIST_DIR, DataSpec, fashion_mnist
from mdp_trt.pipeline import PruneResult

THRESHOLD = 0.3
"""A pixel belongs to the garment when its intensity (0..1) is above this."""


class SegModel(nn.Module):
    """A timm backbone's last feature map, a 1x1-conv head, upsampled to one logit per pixel."""

    def __init__(self, backbone: str = "resnet18", in_chans: int = 1, hidden: int = 32) -> None:
        super().__init__()
        self.backbone = timm.create_model(backbone, num_classes=0, global_pool="", in_chans=in_chans)
        self.head = nn.Sequential(nn.Conv2d(self.backbone.num_features, hidden, 1), nn.ReLU(),
                                  nn.Conv2d(hidden, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.head(self.backbone(x)), size=x.shape[-2:], mode="bilinear", align_corners=False)


def masks(n: int, side: int, seed: int = 0, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (1 channel, normalised) and their masks (float 0/1) at ``side`` pixels."""
    if (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        x = fashion_mnist(split, DataSpec(1, side, 10), limit=n).tensors[0]
        return x, (x * 0.3530 + 0.2860 > THRESHOLD).float()
    g = torch.Generator().manual_seed(seed + (split != "train"))
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side), indexing="ij")
    centre, radius = torch.rand(n, 2, 1, 1, generator=g) - 0.5, 0.2 + 0.4 * torch.rand(n, 1, 1, generator=g)
    y = (((xx - centre[:, 0]) ** 2 + (yy - centre[:, 1]) ** 2) < radius ** 2).float().unsqueeze(1)
    return y + 0.3 * torch.randn(y.shape, generator=g), y


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.binary_cross_entropy_with_logits(model(x), y)


def batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def train(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]], epochs: int = 1, lr: float = 2e-3
          ) -> float:
    """Adam on the segmentation loss; returns the last epoch's mean loss."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    mean = float("nan")
    for _ in range(epochs):
        total = 0.0
        for batch in data:
            loss = loss_fn(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
        mean = total / len(data)
    model.eval()
    return mean


@torch.no_grad()
def iou(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Intersection over union of the predicted masks (logit > 0) with the true ones."""
    model.eval()
    inter = union = 0.0
    for x, y in data:
        p = model(x) > 0
        inter += float((p & (y > 0)).sum())
        union += float((p | (y > 0)).sum())
    return inter / max(union, 1.0)


def run(backbone: str = "resnet18", side: int = 64, n_train: int = 2048, n_val: int = 512, epochs: int = 1,
        target: str = "2x", seed: int = 0, **options: object) -> tuple[SegModel, PruneResult]:
    """Train the model briefly, prune its backbone to ``target``; ``options`` go to ``mdp_trt.prune``."""
    torch.manual_seed(seed)
    model = SegModel(backbone).eval()
    data = batches(*masks(n_train, side, seed), 64)
    val = batches(*masks(n_val, side, seed, split="test"), 64)
    loss = train(model, data, epochs)
    print(f"trained: loss {loss:.3f}, IoU {iou(model, val):.3f} on {n_val} test images", file=sys.stderr)
    result = mdp_trt.prune(model, target, part="backbone", data=data, loss_fn=loss_fn, input_size=(1, side, side),
                           seed=seed, **options)  # type: ignore[arg-type]
    return model, result


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--side", type=int, default=64, help="input side in pixels")
    ap.add_argument("--target", default="2x")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--train-images", type=int, default=2048)
    ap.add_argument("--engine", default="onnxruntime")
    ap.add_argument("--out", type=Path, default=Path("runs/backbone_segmentation"))
    args = ap.parse_args(argv)
    model, result = run(args.backbone, args.side, args.train_images, epochs=args.epochs, target=args.target,
                        engine=args.engine, importance_batches=8,
                        log=lambda s: print(s, file=sys.stderr, flush=True))
    val = batches(*masks(512, args.side, split="test"), 64)
    r = result.report
    print(f"whole model: {r.dense_ms:.3f} -> {r.pruned_ms:.3f} ms measured, {r.speedup:.2f}x ({r.outcome}); "
          f"parameters {r.params_before / 1e6:.2f}M -> {r.params_after / 1e6:.2f}M")
    print(f"IoU {iou(model, val):.3f} dense -> {iou(result.model, val):.3f} pruned, before any fine-tuning")
    result.save(args.out, force=True)
    print(f"files: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
