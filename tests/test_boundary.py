"""Boundary costs of standalone subgraphs: measured, taken off the terms, and recovered."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
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

    class Gated(nn.Module):  # a depthwise conv with a squeeze-excitation gate, as in efficientnet
        def __init__(self) -> None:
            super().__init__()
            self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
            self.reduce, self.expand = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)

        def forward(self, x):
            y = torch.relu(self.dw(x))
            return y * torch.sigmoid(self.expand(torch.relu(self.reduce(y.mean((2, 3), keepdim=True)))))

    into, _ = engine.boundary_sides(export_onnx(Gated().eval(), (1, 16, 16, 16)))
    assert into == 1  # the graph's input; the pooled vector's conversion into the 1x1 conv is inside
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


def test_costs_are_kept_by_side_and_a_converted_side_stays(tmp_path: Path) -> None:
    """Where the whole model converts at a term's input too, only the output's cost comes off."""
    engine = BoundaryEngine()
    with LatencyTable.open(tmp_path / "t.sqlite", engine.identity()) as table:
        profile_space(space(), term_module, engine, table, progress=False, budget=FAST)  # type: ignore[arg-type]
        for sig in table.signatures():
            raw = table.points(sig)
            into = term_points(table, sig, keep=(True, False))
            out_of = term_points(table, sig, keep=(False, True))
            assert term_points(table, sig, keep=(True, True)) == raw
            for a, b in raw:
                assert table.kv_get(f"{COST}{sig}/{a},{b}") == {
                    "into": pytest.approx(PER_ELEMENT_MS * a * 64), "out_of": pytest.approx(PER_ELEMENT_MS * b * 64)}
                assert into[(a, b)] == pytest.approx(CORE_MS * a * b + PER_ELEMENT_MS * a * 64, rel=1e-9)
                assert out_of[(a, b)] == pytest.approx(CORE_MS * a * b + PER_ELEMENT_MS * b * 64, rel=1e-9)


def test_older_costs_of_both_sides_together_are_read_as_before(tmp_path: Path) -> None:
    engine = BoundaryEngine()
    with LatencyTable.open(tmp_path / "t.sqlite", engine.identity()) as table:
        from profilers.timing import summarize

        table.put("s", (8,), summarize([[1.0]]))
        table.put("s", (16,), summarize([[2.0]]))
        table.kv_set(f"{COST}s/8", 0.25)  # one figure for both sides
        table.kv_set(f"{COST}s/16", 1.95)  # more than the guard allows
        for keep in [(False, False), (True, False), (False, True)]:
            assert term_points(table, "s", keep) == {(8,): pytest.approx(0.75), (16,): pytest.approx(0.2)}


def test_module_paths_of_exported_nodes() -> None:
    from mdp_trt.engine_io import onnx_scopes

    assert onnx_scopes("/blocks/blocks.1/blocks.1.0/conv_pwl/Conv") == [
        "blocks", "blocks.1", "blocks.1.0", "blocks.1.0.conv_pwl"]
    assert onnx_scopes("/blocks/blocks.1/blocks.1.0/conv_pwl/Conv_output_0_nchwc")[-1] == "blocks.1.0.conv_pwl"
    assert onnx_scopes("/stages/stages.0/blocks/blocks.1/conv_dw/Conv")[-1] == "stages.0.blocks.1.conv_dw"
    assert onnx_scopes("/layer1/layer1.0/conv1/Conv")[-1] == "layer1.0.conv1"
    assert onnx_scopes("/conv_stem/Conv") == ["conv_stem"]
    assert onnx_scopes("/bn2/act/Mul/QuickGeluFusion/")[:2] == ["bn2", "bn2.act"]  # a fused node
    assert onnx_scopes("ReorderInput_token_26") == []


def test_boundary_context_maps_converted_nodes_to_terms() -> None:
    from mdp_trt.engine_io import boundary_context

    terms = [Term(n, "conv", ("a",)) for n in ("b.0.conv_dw", "b.0.se.conv_reduce", "b.0.se.conv_expand",
                                                 "b.0.conv_pwl", "head")]
    scopes = {"b.0.conv_dw": {"b.0.conv_dw", "b.0.bn2", "b.0.se"},  # the SE's mean
              "b.0.se.conv_expand": {"b.0.se.conv_expand", "b.0.se.gate", "b.0.se"},  # the SE's product
              "b.0.conv_pwl": {"b.0.conv_pwl", "b.0.bn3"}}
    into = {"/b/b.0/conv_pwl/Conv", "/b/b.0/bn3/BatchNormalization", "Reshape_7"}
    out_of = {"/b/b.0/bn2/act/Mul/QuickGeluFusion/", "/b/b.0/se/Mul", "/head/Gemm"}
    ctx = boundary_context(terms, scopes, into, out_of)
    # conv_pwl: fed by a conversion at its first layer (bn3 is inside it: not its edge);
    # conv_dw: converts out after its activation; the SE's Mul runs in a module two terms share.
    assert ctx == {"b.0.conv_pwl": (True, False), "b.0.conv_dw": (False, True), "head": (False, True)}
    assert boundary_context(terms, {}, {"/x/Conv"}, {"/y/Conv"}) == {}  # names of another model: as before


def test_surface_reads_a_terms_own_points_before_its_signatures() -> None:
    from mdp_trt.surface import LatencySurface

    sp = space()
    sig = sp.terms[0].signature
    shared = {(a, b): 1.0 for a in (8, 16, 24) for b in (8, 16, 24)}
    own = {w: 0.5 for w in shared}
    surf = LatencySurface.from_points(sp, {sig: shared, "t2": own})
    plan = sp.full_plan()
    assert surf.term_ms(sp.terms[0], plan) == 1.0 and surf.term_ms(sp.terms[1], plan) == 0.5


def test_onnxruntime_finds_the_conversions_of_a_whole_model(tmp_path: Path) -> None:
    """Squeeze-excitation runs in NCHW inside the whole model: the pointwise conv after it is fed
    by a conversion there too. Blocks without it, and a ResNet, stay blocked throughout."""
    import timm

    from mdp_trt.engine_io import CONTEXT, Lab
    from mdp_trt.models import SpaceConfig, adapter_for

    lab = Lab("onnxruntime", "fp32", 1, 64, 1, tmp_path / "t.sqlite", "m", progress=False, clock="cpu")
    lab.table.kv_set(f"{COST}conv/8", {"into": 0.1, "out_of": 0.1})  # costs were taken off
    model = timm.create_model("test_efficientnet").eval()
    sp = adapter_for(model).space(model, SpaceConfig(resolution=64))
    ctx = lab.boundary_context(sp, model)
    into = {name for name, (i, _) in ctx.items() if i}
    out_of = {name for name, (_, o) in ctx.items() if o}
    se = {"blocks.3.0.conv_pwl", "blocks.4.0.conv_pwl"}  # after the gate's product
    gated = {"blocks.3.0.conv_dw", "blocks.4.0.conv_dw"}  # the SE (in this term) pools in NCHW
    assert into == se and gated <= out_of, ctx
    convs = {t.name for t in sp.terms if t.name.endswith(("conv_pw", "conv_dw", "conv_exp", "conv_pwl"))}
    assert len(convs) == 10 and not (convs - gated) & out_of, ctx
    assert lab.table.kv_get(CONTEXT + sp.space_id) == {k: list(v) for k, v in ctx.items()}

    resnet = timm.create_model("resnet18").eval()
    rs = adapter_for(resnet).space(resnet, SpaceConfig(resolution=64))
    assert not any(i for i, _ in lab.boundary_context(rs, resnet).values())


class ContextEngine(BoundaryEngine):
    """:class:`BoundaryEngine`, whose whole model converts into the blocked layout before t2's conv."""

    def whole_model_conversions(self, model: bytes) -> tuple[set[str], set[str]]:
        return {"/t2/Conv"}, set()


def test_lab_keeps_the_side_the_whole_model_converts_and_the_surface_reads_it(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from mdp_trt.engine_io import CONTEXT, Lab
    from mdp_trt.surface import LatencySurface

    engine, sp = ContextEngine(), space()
    lab = Lab("onnxruntime", "fp32", 1, 8, 1, tmp_path / "ort.sqlite", "m", progress=False, clock="cpu")
    lab.engine, lab.table = engine, LatencyTable.open(tmp_path / "t.sqlite", engine.identity())  # type: ignore[assignment]
    profile_space(sp, term_module, engine, lab.table, progress=False, budget=FAST)  # type: ignore[arg-type]
    adapter = SimpleNamespace(term_module=lambda s, t, w: term_module(t, w))
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1))
    points = lab.points(adapter, sp, model)  # type: ignore[arg-type]
    assert lab.table.kv_get(CONTEXT + sp.space_id) == {"t2": [True, False]}
    surf = LatencySurface.from_points(sp, points)
    plan = sp.plan({"a": 8, "b": 16})
    assert surf.term_ms(sp.terms[0], plan) == pytest.approx(CORE_MS * 8 * 16)  # t1: both sides off
    # t2 (widths b, a) keeps the conversion into its input, which the whole model makes too.
    assert surf.term_ms(sp.terms[1], plan) == pytest.approx(CORE_MS * 16 * 8 + PER_ELEMENT_MS * 16 * 64)
    assert lab.points(adapter, sp) == {t.signature: term_points(lab.table, t.signature) for t in sp.terms}
