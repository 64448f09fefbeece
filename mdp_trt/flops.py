"""Parameter and FLOP counts of a module, as reported before and after pruning."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Floating-point operations of one forward pass (a multiply-add counts as two)."""
    was_training = model.training
    model.eval()
    # On the meta device: shapes only, no arithmetic (the count depends on nothing else).
    state = {k: torch.empty_like(v, device="meta") for k, v in
             [*model.named_parameters(), *model.named_buffers()]}
    try:
        with FlopCounterMode(display=False) as counter:
            torch.func.functional_call(model, state, (torch.zeros(input_shape, device="meta"),))
        return int(counter.get_total_flops())
    finally:
        model.train(was_training)
