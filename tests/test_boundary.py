"""Boundary costs of standalone subgraphs: measured, taken off the terms, and recovered."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from torch import nn

from mdp_trt.space import Dim, PruningSpace, Term
from profilers.engines import get_engine
from profilers.engines.base import EngineIdentity, HostRunner
from profilers.profile import COST, SIDES, profile_space, term_points
from profilers.table import LatencyTable
from profilers.timing import Budget

FAST = Budget(warmup_ms=0.0, warmup_iters=1, repeats=2, iters=3, max_rounds=1)
PER_ELEMENT_MS = 2e-5  # one conversion of one element between layouts
CORE_MS = 1e-4  # compute per input channel x output channel


class FakeRunner(HostRunner):
    """A runner on a device clock that always reports ``ms``."""

    def __init__(self, ms: float, outputs: list[tuple[int, ...]] | None = None) -> None:
        super().__init__(lambda: None)
        self.ms = ms
        self.output_shapes = outputs or []

    def timed(self, iters: int) -> list[float]:
        return [self.ms] * iters


class BoundaryEngine:
    """Every subgraph timed alone pays a known conversion cost at its input and its output
    (``PER_ELEMENT_MS`` per element each way); inside a whole model it would not."""

    name, precision, batch_size, resolution, device = "fake", "fp32", 1, 8, "cpu"

    def __init__(self) -> None:
        self.sides_asked = 0

    def identity(self) -> EngineIdentity:
        return EngineIdentity("fake", "1", "cpu", "", "fp32", 1, 8, 1, "test")

    def prepare(self, module: nn.Module, input_shape: Sequence[int]) -> FakeRunner:
        conv = next(m for m in module.modules() if isinstance(m, nn.Conv2d))
        out = (input_shape[0], conv.out_channels, *input_shape[2:])
        core = CORE_MS * conv.in_channels * conv.out_channels
        return FakeRunner(core + PER_ELEMENT_MS * (math.prod(input_shape) + math.prod(out)), [out])

    def prepare_onnx(self, model: bytes, input_shape: Sequence[int] | None = None) -> FakeRunner:
        assert input_shape is not None and model == b"probe"
        return FakeRunner(2 * PER_ELEMENT_MS * math.prod(input_shape))  # both ways

    def boundary_sides(self, model: bytes) -> tuple[int, int]:
        self.sides_asked += 1
        return 1, 1

    def boundary_probe(self, shape: Sequence[int]) -> bytes:
        return b"probe"


def space() -> PruningSpace:
    dims = [Dim("a", "channels", 16, 8, (8, 16)), Dim("b", "channels", 24, 8, (8, 16, 24))]
    terms = [Term("t1", "conv", ("a", "b"), (("hw", 8),)), Term("t2", "conv", ("b", "a"), (("hw", 8),))]
    return PruningSpace("fake", "test", dims, [], terms, (3, 8, 8))


def term_module(term: Term, widths: tuple[int, ...]) -> tuple[nn.Module, tuple[int, ...]]:
    a, b = widths
    return nn.Sequential(nn.Conv2d(a, b, 3, padding=1), nn.ReLU()), (a, 8, 8)


def test_known_boundary_cost_is_recovered(tmp_path: Path) -> None:
    engine = BoundaryEngine()
    with LatencyTable.open(tmp_path / "t.sqlite", engine.identity()) as table:
        stats = profile_space(space(), term_module, engine, table, progress=False, budget=FAST)  # type: ignore[arg-type]
        assert stats.measured == 8 and engine.sides_asked == 1  # once per signature (both terms share one)
        assert stats.probes == 3  # tensors of 8, 16 and 24 channels at 8x8
        for sig in table.signatures():
            raw = table.points(sig)
            core = term_points(table, sig)
            for (a, b), ms in raw.items():
                assert ms > core[(a, b)]
                assert core[(a, b)] == pytest.approx(CORE_MS * a * b, rel=1e-9)
            assert table.kv_get(SIDES + sig) == {"into": 1, "out_of": 1}
        # A second run measures nothing and keeps the costs.
        again = profile_space(space(), term_module, engine, table, progress=False, budget=FAST)  # type: ignore[arg-type]
        assert again.measured == 0 and again.probes == 0
        assert len(table.kv_keys(COST)) == 8


def test_terms_measured_before_boundaries_keep_their_values(tmp_path: Path) -> None:
    engine = BoundaryEngine()
    with LatencyTable.open(tmp_path / "t.sqlite", engine.identity()) as table:
        sig = space().terms[0].signature
        from profilers.timing import summarize

        table.put(sig, (8, 8), summarize([[1.0]]))  # an older table's point
        profile_space(space(), term_module, engine, table, progress=False, budget=FAST)  # type: ignore[arg-type]
        assert table.kv_get(SIDES + sig) == {"into": 0, "out_of": 0}
        assert term_points(table, sig) == table.points(sig)  # nothing taken off: one rule per signature


def test_onnxruntime_finds_its_layout_conversions_and_probes_them() -> None:
    from profilers.export import export_onnx

    engine = get_engine("onnxruntime", resolution=16, device="cpu")
    conv = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU()).eval()
    assert engine.boundary_sides(export_onnx(conv, (1, 16, 16, 16))) == (1, 1)  # NCHW -> NCHWc -> NCHW

    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(16, 16, 3, padding=1)

        def forward(self, x):  # the add runs in NCHW after the conversion back
            return self.conv(x) + x

    assert engine.boundary_sides(export_onnx(Residual().eval(), (1, 16, 16, 16))) == (1, 1)
    mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)).eval()
    assert engine.boundary_sides(export_onnx(mlp, (1, 4, 16))) == (0, 0)
    assert engine.boundary_probe((1, 1000)) is None  # a pooled head: nothing to convert
    runner = engine.prepare_onnx(engine.boundary_probe((1, 16, 8, 8)), (1, 16, 8, 8))
    try:
        runner()
        assert runner.output_shapes == [(1, 16, 8, 8)]
    finally:
        runner.close()
    # The probe converts and converts back: the identity.
    import onnxruntime as ort

    sess = ort.InferenceSession(engine.boundary_probe((1, 16, 4, 4)), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 16, 4, 4)).astype(np.float32)
    assert np.array_equal(sess.run(None, {"input": x})[0], x)
