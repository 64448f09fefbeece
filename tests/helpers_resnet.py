"""Helpers for the ResNet adapter tests: small models with realistic BN statistics, ONNX runs."""

from __future__ import annotations

import importlib.util
import io
import warnings
from typing import Any

import numpy as np
import onnxruntime as ort
import timm
import torch
from torch import nn

SIDE = 64


def vit_adapter_present() -> bool:
    """``mdp_trt.models.adapters()`` imports both adapters; the API needs the ViT one too."""
    return importlib.util.find_spec("mdp_trt.models.vit") is not None


@torch.no_grad()
def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial affine parameters and running statistics.

    timm zero-initialises the last BN of each residual branch; with random BN the branches
    contribute, so equality tests compare something.
    """
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.weight.copy_(0.5 + torch.rand(n, generator=g))
            m.bias.copy_(0.1 * torch.randn(n, generator=g))
            m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return model


def make(name: str, seed: int = 0, **kwargs: Any) -> nn.Module:
    """A timm model without pretrained weights, seeded, with random BN, in eval mode."""
    torch.manual_seed(seed)
    return randomize_bn(timm.create_model(name, pretrained=False, **kwargs), seed).eval()


def image(batch: int = 2, side: int = SIDE, chans: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, chans, side, side, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def onnx_run(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Export ``model`` with the TorchScript exporter (opset 17) and run it in ONNX Runtime CPU."""
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is legacy
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"input": x.numpy()})[0])


def rel_diff(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| relative to max |b|."""
    return float(np.abs(a - b).max() / max(float(np.abs(b).max()), 1e-12))


@torch.no_grad()
def silence(model: nn.Module, conv: str, bn: str, units: list[int]) -> None:
    """Make output channels ``units`` of a conv+BN exactly zero: zero filters, BN shift and mean."""
    model.get_submodule(conv).weight[units] = 0.0
    b = model.get_submodule(bn)
    b.bias[units] = 0.0
    b.running_mean[units] = 0.0
