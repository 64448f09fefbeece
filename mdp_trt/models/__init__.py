"""Model adapters, one per timm family, found by structure rather than by name."""

from __future__ import annotations

from torch import nn

from mdp_trt.errors import UnsupportedModelError
from mdp_trt.models.base import Adapter, Importance, SpaceConfig

__all__ = ["Adapter", "Importance", "SpaceConfig", "adapter_for", "adapters", "FAMILIES"]

FAMILIES = "timm ResNet (BasicBlock / Bottleneck, incl. deep-stem variants such as resnet50d) and VisionTransformer / DeiT"


def adapters() -> list[Adapter]:
    from mdp_trt.models.resnet import ResNetAdapter
    from mdp_trt.models.vit import ViTAdapter

    return [ResNetAdapter(), ViTAdapter()]


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for ``model``, or one clear error naming what is supported and what blocked it."""
    for a in adapters():
        if a.matches(model):
            why = a.why_not(model)
            if why:
                raise UnsupportedModelError(
                    f"{type(model).__name__} looks like a {a.family} but cannot be pruned: {why}. "
                    f"Supported: {FAMILIES}."
                )
            return a
    raise UnsupportedModelError(
        f"unsupported model class {type(model).__module__}.{type(model).__name__}. "
        f"Supported: {FAMILIES}."
    )
