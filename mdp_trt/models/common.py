"""Helpers every adapter shares: a timm model's name and input side, and top-k selection."""

from __future__ import annotations

import numpy as np
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
