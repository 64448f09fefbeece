"""The reference workload a :class:`~profilers.timing.Sentinel` times on an engine.

A small fixed block (3x3 conv, depthwise 3x3, 1x1 conv at 32 channels, 28 x 28) with both
compute-bound and memory-bound kernels, so that what slows the models slows it too. It is
built with fixed weights and prepared on the engine being measured, at the engine's batch
size, so it sees the same clock, threads and device.
"""

from __future__ import annotations

from typing import Any

from profilers.timing import Sentinel

CHANNELS, SIDE = 32, 28


def reference_module() -> Any:
    """The sentinel's block, with weights from a fixed seed."""
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(0)
    block = nn.Sequential(
        nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1), nn.ReLU(),
        nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1, groups=CHANNELS), nn.ReLU(),
        nn.Conv2d(CHANNELS, CHANNELS, 1),
    )
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return block.eval()


def make_sentinel(engine: Any, *, calibrate_s: float = 1.0, tolerance: float = 0.08) -> Sentinel:
    """A sentinel on ``engine`` (prepared and calibrated: its floor read for ``calibrate_s``)."""
    batch = engine.identity().batch_size
    runner = engine.prepare(reference_module(), (batch, CHANNELS, SIDE, SIDE))
    s = Sentinel(runner, tolerance=tolerance)
    if calibrate_s > 0:
        s.calibrate(calibrate_s)
    return s
