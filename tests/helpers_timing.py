"""Whole-model timing made deterministic for tests of the prune job: the latency terms are
profiled for real (into the test's table), whole models are "measured" by their size."""

from __future__ import annotations

import pytest
from torch import nn

from mdp_trt.engine_io import Lab
from profilers.timing import Comparison


class FakeClock:
    """A clock that only moves when a fake runner advances it (seconds)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fake_ms(m: nn.Module) -> float:
    """A deterministic whole-model latency: affine in the parameter count."""
    return 0.02 + 3e-7 * sum(p.numel() for p in m.parameters())


@pytest.fixture
def fake_timing(monkeypatch: pytest.MonkeyPatch) -> list[nn.Module]:
    """Every engine comparison timed by :func:`fake_ms`; returns the list of the modules measured."""
    seen: list[nn.Module] = []

    def compare(self: Lab, modules: list[nn.Module], input_shape: tuple[int, ...], times: int
                ) -> list[Comparison]:
        seen.extend(modules)
        ms = [fake_ms(m) for m in modules]
        return [Comparison(ms=ms, ratios=[ms[0] / m for m in ms], spread=[0.0] * len(ms), ratio_spread=0.0,
                           rounds=[ms] * 5, clock="thread-cpu", others_cores=0.0, load_avg=0.0, attempts=1,
                           reliable=True)] * times

    monkeypatch.setattr(Lab, "_compare", compare)
    return seen
