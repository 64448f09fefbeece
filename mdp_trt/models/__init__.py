"""Model adapters, one per timm family, found by structure rather than by name."""

from __future__ import annotations

from torch import nn

from mdp_trt.errors import UnsupportedModelError
from mdp_trt.models.base import Adapter, Importance, SpaceConfig

__all__ = ["Adapter", "Importance", "SpaceConfig", "adapter_for", "adapters", "FAMILIES"]

FAMILIES = ("VisionTransformer / DeiT (incl. qk_norm, layer scale, register tokens), EVA-02 (Eva: "
            "rotary embeddings, SwiGLU), BEiT, Swin Transformer v1/v2, timm ResNet (BasicBlock / "
            "Bottleneck, incl. deep-stem variants such as resnet50d; ResNeXt, SE and ECA ResNets), ConvNeXt v1/v2, "
            "EfficientNet / MobileNetV2 / MobileNetV3, RegNetX/Y and ByobNet (e.g. resnext26ts)")


def adapters() -> list[Adapter]:
    """Every adapter, most specific first: a model goes to the first that takes it."""
    from mdp_trt.models.eva import BeitAdapter, EvaAdapter
    from mdp_trt.models.generic import graph_adapters
    from mdp_trt.models.swin import SwinAdapter
    from mdp_trt.models.vit import ViTAdapter

    return [ViTAdapter(), EvaAdapter(), BeitAdapter(), SwinAdapter(), *graph_adapters()]


def adapter_for(model: nn.Module) -> Adapter:
    """The adapter for ``model``, or one clear error naming what is supported and what blocked it.

    When every adapter that recognises the model refuses it, the last (most general) one's
    reason is given.
    """
    refused: list[tuple[Adapter, str]] = []
    for a in adapters():
        if a.matches(model):
            why = a.why_not(model)
            if not why:
                return a
            refused.append((a, why))
    if refused:
        a, why = refused[-1]
        raise UnsupportedModelError(
            f"{type(model).__name__} looks like a {a.family} but cannot be pruned: {why}. "
            f"Supported: {FAMILIES}."
        )
    raise UnsupportedModelError(
        f"unsupported model class {type(model).__module__}.{type(model).__name__}. "
        f"Supported: {FAMILIES}."
    )
