"""Data for importance estimation, fine-tuning and evaluation.

``fashion-mnist`` reads the files of the Debian package ``dataset-fashion-mnist``;
a directory is read as an ImageFolder tree (``train/`` and ``val/`` inside, or classes
directly) through timm's transforms; ``synthetic`` is random data for smoke runs.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from mdp_trt.errors import MdpError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = 10


@dataclass(frozen=True)
class DataSpec:
    """What the model expects: channels, square resolution, classes."""

    in_chans: int
    resolution: int
    num_classes: int


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    ndim = magic & 0xFF
    shape = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(split: str, spec: DataSpec, root: Path = FASHION_MNIST_DIR,
                  limit: int | None = None) -> TensorDataset:
    """Fashion-MNIST ``train`` or ``test`` as normalised tensors at ``spec``'s size and channels."""
    prefix = {"train": "train", "test": "t10k", "val": "t10k"}[split]
    images = root / f"{prefix}-images-idx3-ubyte.gz"
    labels = root / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.is_file() or not labels.is_file():
        raise MdpError(
            f"Fashion-MNIST not found under {root} (install the Debian package dataset-fashion-mnist)"
        )
    x = torch.from_numpy(_read_idx(images)[:limit].copy()).float().div_(255.0).unsqueeze(1)
    y = torch.from_numpy(_read_idx(labels)[:limit].astype(np.int64))
    x = (x - 0.2860) / 0.3530
    if spec.resolution != 28:
        x = F.interpolate(x, size=(spec.resolution, spec.resolution), mode="bilinear", align_corners=False)
    if spec.in_chans != 1:
        x = x.expand(-1, spec.in_chans, -1, -1).contiguous()
    return TensorDataset(x, y)


def synthetic(n: int, spec: DataSpec, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, spec.in_chans, spec.resolution, spec.resolution, generator=g)
    y = torch.randint(0, spec.num_classes, (n,), generator=g)
    return TensorDataset(x, y)


def image_folder(root: Path, split: str, spec: DataSpec, train: bool) -> Dataset:
    """An ImageFolder split through timm's transforms (``root/train``, ``root/val`` or ``root``)."""
    from timm.data import create_dataset, create_transform

    sub = root / split if (root / split).is_dir() else root
    if not any(p.is_dir() for p in sub.iterdir()):
        raise MdpError(f"{sub} holds no class folders (expected an ImageFolder tree)")
    try:
        ds = create_dataset("", root=str(sub), split=split)
    except RuntimeError as exc:  # timm: "Found 0 images in subfolders of ..."
        raise MdpError(f"{sub} holds no images in its class folders ({str(exc).splitlines()[0]})") from exc
    if len(ds) == 0:
        raise MdpError(f"{sub} holds no images in its class folders")
    ds.transform = create_transform(spec.resolution, is_training=train)
    return ds


def loaders(data: str, spec: DataSpec, batch_size: int, train_limit: int | None = None,
            val_limit: int | None = None, workers: int = 0, seed: int = 0
            ) -> tuple[DataLoader, DataLoader]:
    """Train and validation loaders for ``data``: ``fashion-mnist``, ``synthetic`` or a directory."""
    if data == "synthetic":
        train: Dataset = synthetic(train_limit or 256, spec, seed)
        val: Dataset = synthetic(val_limit or 128, spec, seed + 1)
    elif data == "fashion-mnist":
        if spec.num_classes != FASHION_MNIST_CLASSES:
            raise MdpError(f"Fashion-MNIST has 10 classes; the model has {spec.num_classes}")
        train = fashion_mnist("train", spec, limit=train_limit)
        val = fashion_mnist("test", spec, limit=val_limit)
    else:
        root = Path(data)
        if not root.is_dir():
            raise MdpError(f"dataset path {root} does not exist (or use --data fashion-mnist|synthetic)")
        train = image_folder(root, "train", spec, train=True)
        val = image_folder(root, "val", spec, train=False)
        if train_limit:
            train = torch.utils.data.Subset(train, range(min(train_limit, len(train))))  # type: ignore[arg-type]
        if val_limit:
            val = torch.utils.data.Subset(val, range(min(val_limit, len(val))))  # type: ignore[arg-type]
    g = torch.Generator().manual_seed(seed)
    return (
        DataLoader(train, batch_size=batch_size, shuffle=True, generator=g, num_workers=workers, drop_last=False),
        DataLoader(val, batch_size=batch_size, shuffle=False, num_workers=workers),
    )


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, max_batches: int | None = None) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = total = 0
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        correct += int((model(x).argmax(1) == y).sum())
        total += int(y.numel())
    return 100.0 * correct / max(total, 1)
