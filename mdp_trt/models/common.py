"""Helpers every adapter shares: a timm model's name and input side, top-k selection, and
Taylor sums of ``w * dL/dw``."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from mdp_trt.errors import MdpError
from mdp_trt.models.base import SpaceConfig

DEFAULT_SIDE = 224  # input side when neither the config nor the model's pretrained_cfg gives one


def arch_name(model: nn.Module) -> str | None:
    """The timm architecture name in the model's pretrained_cfg (what rebuilds it), or None."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    name = cfg.get("architecture") if isinstance(cfg, dict) else None
    return str(name) if name else None


def input_side(model: nn.Module, config: SpaceConfig) -> int:
    """The square input side terms are built for: the config's, else the model's own."""
    if config.resolution is not None:
        if config.resolution < 1:
            raise MdpError(f"resolution must be a positive number of pixels, got {config.resolution}")
        return int(config.resolution)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return int(size[-2]) if size else DEFAULT_SIDE


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores, ascending; ties go to the lower index."""
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf)
    return np.sort(np.argsort(-s, kind="stable")[:k])


def weight_grad(p: nn.Parameter) -> torch.Tensor | None:
    """``w * dL/dw`` in double precision, or None where the parameter has no gradient."""
    return None if p.grad is None else p.detach().double() * p.grad.double()


def signed_taylor(model: nn.Module, names: Iterable[str | None]) -> float:
    """The signed sum of ``w * dL/dw`` over the named parameters of ``model`` (a None name,
    or a parameter without a gradient, adds nothing)."""
    total = 0.0
    for name in names:
        t = None if name is None else weight_grad(model.get_parameter(name))
        if t is not None:
            total += float(t.sum())
    return total
