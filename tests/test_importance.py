"""Taylor importance through :func:`mdp_trt.importance.taylor` on the transformer families,
whose adapters also score the blocks that cannot be removed (a Swin stage's first block)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import timm
import torch

from mdp_trt.importance import taylor
from mdp_trt.models import SpaceConfig, adapter_for

torch.set_num_threads(1)

MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "swin-narrow@56": ("swin_tiny_patch4_window7_224",
                       {"img_size": 56, "window_size": 4, "embed_dim": 32, "num_heads": (1, 2, 4, 8)}),
    "vit-narrow@32": ("vit_tiny_patch16_224", {"img_size": 32, "embed_dim": 48, "depth": 3, "num_heads": 3}),
}


@pytest.mark.parametrize("key", list(MODELS))
def test_taylor_scores_exactly_the_removable_blocks(key: str) -> None:
    name, kwargs = MODELS[key]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    adapter = adapter_for(model)
    space = adapter.space(model, SpaceConfig())
    locked = [b.name for b in space.blocks if not b.removable]
    if key.startswith("swin"):
        assert locked  # the case this test is for: blocks the adapter scores but nobody removes
    side = space.input_size[1]
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(2, 3, side, side, generator=g), torch.randint(0, 10, (2,), generator=g))
               for _ in range(2)]
    imp = taylor(model, space, batches, num_batches=2, adapter=adapter)
    removable = {b.name for b in space.blocks if b.removable}
    assert removable <= set(imp.blocks) and not set(locked) & set(imp.blocks)
    assert all(np.isfinite(v) and v >= 0 for v in imp.blocks.values())
    assert any(v > 0 for k, v in imp.blocks.items() if k in removable)
    assert set(imp.units) == {d.name for d in space.dims}
