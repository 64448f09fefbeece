"""timm ResNets on the channel graph (the ``resnet`` family plugin): the space found, exact
surgery, importance, and bad input refused."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import timm
import torch
from helpers_resnet import (
    SIDE,
    image,
    make,
    onnx_run,
    rel_diff,
    run,
    silence,
    vit_adapter_present,
)
from torch import nn

from mdp_trt.errors import MdpError, PlanError, UnsupportedModelError
from mdp_trt.models.base import Importance, SpaceConfig
from mdp_trt.models.generic import Proto, graph_adapters
from mdp_trt.space import PruningSpace

torch.set_num_threads(1)

A = next(a for a in graph_adapters() if a.family == "resnet")
CFG = SpaceConfig(resolution=SIDE)
needs_api = pytest.mark.skipif(not vit_adapter_present(),
                               reason="mdp_trt.api needs mdp_trt.models.vit, not in this checkout yet")


def space_of(model: nn.Module, config: SpaceConfig = CFG) -> PruningSpace:
    return A.space(model, config)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- the space ---------------------------------------------------------------------------


def test_resnet18_stem_shares_layer1_residual_width() -> None:
    sp = space_of(make("resnet18"))
    names = [d.name for d in sp.dims]
    assert "stem" not in names  # layer1.0 has an identity shortcut: stem width == layer1 width
    res1 = sp.dim("layer1.res")
    assert {"conv1", "bn1", "layer1.0.conv2", "layer1.0.bn2", "layer1.1.conv2", "layer1.1.bn2",
            "layer1.0.conv1", "layer2.0.downsample.0"} <= set(res1.layers)
    assert res1.block is None and res1.size == 64
    assert len(sp.dims) == 1 + 4 * 2 + 3  # layer1.res + one inner width per block + 3 more stages
    assert [b.name for b in sp.blocks if b.removable] == ["layer1.0", "layer1.1", "layer2.1", "layer3.1",
                                                          "layer4.1"]
    locked = dict(sp.locked)
    assert "width 64->128" in locked["layer2.0"] and "feature map 16->8" in locked["layer2.0"]
    assert sp.block("layer3.1").dims == ("layer3.1.conv1",)
    assert sp.dim("layer3.1.conv1").block == "layer3.1"
    stem = next(t for t in sp.terms if t.name == "conv1")  # conv, BN, act and max-pool: one term
    assert stem.dims == ("layer1.res",) and stem.const["graph"].startswith("in(1, '3', 64, 64)|conv(k(7, 7)")
    assert "MaxPool2d(3,2,1" in stem.const["graph"]


def test_resnet50_space() -> None:
    sp = space_of(make("resnet50"), SpaceConfig())
    assert sp.input_size == (3, 224, 224) and sp.family == "resnet" and sp.model == "resnet50"
    assert len(sp.dims) == 1 + 4 + 16 * 2
    assert len(sp.blocks) == 16 and sum(b.removable for b in sp.blocks) == 12
    assert not sp.block("layer1.0").removable  # 64 -> 256: projection shortcut
    res3 = sp.dim("layer3.res")
    writers = {f"layer3.{i}.conv3" for i in range(6)} | {f"layer3.{i}.bn3" for i in range(6)}
    assert writers | {"layer3.0.downsample.0", "layer3.0.downsample.1"} <= set(res3.layers)
    readers = {f"layer3.{i}.conv1" for i in range(1, 6)} | {"layer4.0.conv1", "layer4.0.downsample.0"}
    assert readers <= set(res3.layers)
    assert res3.size == 1024 and res3.step % 8 == 0 and len(res3.choices) <= 16
    assert sp.dim("layer3.2.conv2").block == "layer3.2"
    assert sp.block("layer3.2").dims == ("layer3.2.conv1", "layer3.2.conv2")
    assert sp.dim("layer4.res").layers[-1] == "fc"
    convs = [t for t in sp.terms if t.kind == "conv"]
    assert len(convs) == 53 and len(sp.terms) == 55
    assert len({t.signature for t in sp.terms}) <= 25  # repeated blocks share their subgraphs
    t = next(t for t in sp.terms if t.name == "layer3.4.conv3")
    assert t.dims == ("layer3.4.conv2", "layer3.res") and t.block == "layer3.4"
    # conv + BN + the identity shortcut's add + ReLU: what engines fuse into one kernel
    assert t.const == {"graph": "in(1, 'd0', 14, 14)|conv(k(1, 1),s(1, 1),p(0, 0),d(1, 1),g1,b0)[in:d0,out:d1]"
                                "|bn[in:d1,out:d1]|add+ext(1, 'd1', 14, 14)|relu", "in_hw": 14}
    assert next(t for t in sp.terms if t.name == "layer3.5.conv3").signature == t.signature
    assert [t.name for t in sp.terms if t.block is None] == ["conv1", "global_pool", "fc"]
    pool, head = sp.terms[-2:]
    assert pool.dims == head.dims == ("layer4.res",) and pool.const["in_hw"] == 7
    assert head.const["graph"] == "in(1, 'd0')|linear(b1)[in:d0,out:1000]"
    assert sp.config == {"min_step": 8, "max_choices": 16, "head_step": 1, "per_head_step": 8,
                         "resolution": None}


def test_deep_stem_and_avg_down() -> None:
    sp = space_of(make("resnet50d"))
    assert [d.name for d in sp.dims[:3]] == ["conv1.0", "conv1.3", "stem"]
    t0, t1, t2 = (next(t for t in sp.terms if t.name == n) for n in ("conv1.0", "conv1.3", "conv1.6"))
    assert t0.dims == ("conv1.0",) and t0.const["graph"].startswith("in(1, '3', 64, 64)|conv(k(3, 3),s(2, 2)")
    assert t1.dims == ("conv1.0", "conv1.3") and t2.dims == ("conv1.3", "stem")
    assert sp.dim("stem").layers == ("conv1.6", "bn1", "layer1.0.conv1", "layer1.0.downsample.1")
    assert sp.dim("conv1.3").layers == ("conv1.3", "conv1.4", "conv1.6")
    pool = next(t for t in sp.terms if t.name == "layer2.0.downsample.0")  # the 2x2 average pool
    assert pool.dims == ("layer1.res",) and pool.block == "layer2.0" and pool.const["in_hw"] == 16
    assert pool.const["graph"].endswith("|AvgPool2d(2,2,0,True,False,)")
    ds = next(t for t in sp.terms if t.name == "layer2.0.downsample.1")
    assert ds.dims == ("layer1.res", "layer2.res") and ds.const["in_hw"] == 8
    # layer1's projection has stride 1: timm uses no pooling there
    assert not any(t.name == "layer1.0.downsample.0" for t in sp.terms)


def test_test_resnet_mixes_block_types() -> None:
    """timm's test_resnet: deep stem (16, 16, 32), Basic/Basic/Bottleneck/Basic, avg-pool shortcuts."""
    m = make("test_resnet")
    assert A.why_not(m) == ""
    sp = space_of(m)
    assert [d.name for d in sp.dims] == ["conv1.0", "conv1.3", "layer1.res", "layer1.0.conv1",
                                         "layer2.0.conv1", "layer2.res", "layer3.0.conv1",
                                         "layer3.0.conv2", "layer3.res", "layer4.0.conv1", "layer4.res"]
    assert [b.name for b in sp.blocks if b.removable] == ["layer1.0"]  # identity shortcut
    assert sp.input_size == (3, SIDE, SIDE)
    assert space_of(m, SpaceConfig()).input_size == (3, 160, 160)  # the model's pretrained_cfg


def test_term_modules_reproduce_the_model() -> None:
    """At full widths every term module computes what its nodes compute in the model: on the
    model's own input to the term, the same output (a term fed from outside too, a residual
    add, is checked on its shape), and its input side is the term's ``in_hw``."""
    m = make("resnet50d")
    sp = space_of(m, SpaceConfig(resolution=96))
    p = sp.handle
    assert isinstance(p, Proto)
    values: dict[str, torch.Tensor] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> object:
            out = super().run_node(n)
            values[n.name] = out
            return out

    with torch.no_grad():
        Recorder(p.t.gm).run(image(1, 96))
    full = sp.full_plan()
    exact = 0
    for t, cut in zip(sp.terms, p.cuts, strict=True):
        assert cut.name == t.name
        module, shape = A.term_module(sp, t, sp.term_widths(t, full))
        x = values[cut.primary]
        assert shape == tuple(x.shape[1:]), t.name
        assert (x.shape[-1] if x.dim() == 4 else 1) == t.const["in_hw"], t.name
        out = run(module, x)
        region = set(cut.nodes)
        wants = [values[n] for n in cut.nodes if any(u.name not in region for u in p.t.nodes[n].users)]
        for y, want in zip(out if isinstance(out, tuple) else (out,), wants, strict=True):
            assert y.shape == want.shape, t.name
            if "+ext" not in t.const["graph"]:
                assert torch.allclose(y, want, atol=1e-5), t.name
        exact += "+ext" not in t.const["graph"]
    assert exact > len(sp.terms) // 2


def test_term_modules_at_small_widths_and_onnx() -> None:
    sp = space_of(make("test_resnet"))
    by_sig = {t.signature: t for t in sp.terms}
    assert len(by_sig) >= 10
    for t in by_sig.values():
        widths = tuple(sp.dim(d).choices[0] for d in t.dims)
        module, shape = A.term_module(sp, t, widths)
        reads_image = t.const["graph"].startswith("in(1, '3'")
        assert shape[0] == (3 if reads_image else widths[0])
        x = torch.randn(1, *shape)
        y = run(module, x)
        if t.kind == "conv":
            assert y.shape[1] == widths[-1]
        again, _ = A.term_module(sp, t, widths)
        assert torch.equal(run(again, x), y)  # deterministic weights
    add = next(t for t in sp.terms if "add+ext" in t.const["graph"])
    module, shape = A.term_module(sp, add, (16, 24))
    x = torch.randn(1, *shape)
    assert rel_diff(onnx_run(module, x), run(module, x).numpy()) < 1e-4


# -- surgery -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet50d", "test_resnet"])
def test_full_plan_is_identical(name: str) -> None:
    m = make(name)
    sp = space_of(m)
    pruned = A.apply(m, sp, sp.full_plan(), A.magnitude(m, sp))
    x = image()
    assert (run(pruned, x) - run(m, x)).abs().max().item() < 1e-5
    assert n_params(pruned) == n_params(m) == A.param_count(sp, sp.full_plan())


FAST = {"test_resnet": 8, "resnet18": 6, "resnet50d": 6}
PLANS = [
    pytest.param(name, seed, marks=() if seed < FAST[name] else pytest.mark.slow, id=f"{name}-{seed}")
    for name in FAST for seed in range(20)
]


def _pruned(name: str, seed: int) -> tuple[nn.Module, PruningSpace, nn.Module]:
    m = make(name, seed=seed)
    sp = space_of(m)
    plan = sp.random_plan(seed)
    pruned = A.apply(m, sp, plan, A.magnitude(m, sp))
    pruned.mdp_arch = A.arch(m)
    return m, sp, pruned


@pytest.mark.parametrize(("name", "seed"), PLANS)
def test_random_plan(name: str, seed: int) -> None:
    m, sp, pruned = _pruned(name, seed)
    plan = sp.random_plan(seed)
    assert not sp.is_full(plan)
    assert n_params(pruned) == A.param_count(sp, plan) < n_params(m)
    x = image(seed=seed)
    y = run(pruned, x)
    assert y.shape == (2, 1000) and torch.isfinite(y).all()
    for b in plan.removed:
        assert isinstance(pruned.get_submodule(b), nn.Identity)
    assert pruned.num_features == plan.widths[sp.terms[-1].dims[0]]
    assert rel_diff(onnx_run(pruned, x), y.numpy()) < 1e-4
    assert sorted(pruned.mdp_indices) == sorted(plan.widths)
    assert all(len(v) == plan.widths[k] for k, v in pruned.mdp_indices.items())


@needs_api
@pytest.mark.parametrize(("name", "seed"), PLANS)
def test_save_load_round_trip(name: str, seed: int, tmp_path) -> None:
    from mdp_trt.api import load_pruned, save_pruned

    _, sp, pruned = _pruned(name, seed)
    save_pruned(tmp_path / "pruned.pt", pruned, sp.random_plan(seed))
    back = load_pruned(tmp_path / "pruned.pt")
    assert state_equal(back, pruned)
    x = image(seed=seed)
    assert torch.equal(run(back, x), run(pruned, x))


@needs_api
def test_public_api_path() -> None:
    import mdp_trt

    m = make("resnet50d")
    sp = mdp_trt.space_of(m, CFG)
    assert sp.space_id == space_of(m).space_id
    plan = sp.random_plan(7)
    via_api = mdp_trt.apply_plan(m, plan)
    direct = A.apply(m, sp, plan, A.magnitude(m, sp))
    assert state_equal(via_api, direct) and via_api.mdp_plan == plan.to_dict()
    assert mdp_trt.arch_of(m) == A.arch(m)
    # a grouped ResNet goes on to the channel graph; what neither handles is named
    assert mdp_trt.space_of(make("resnet26", cardinality=4, base_width=16), CFG).family == "resnet"
    with pytest.raises(UnsupportedModelError, match="cannot be pruned: layer bn1 .GroupNorm. normalises groups.*Supported:"):
        mdp_trt.space_of(make("resnet18", norm_layer="groupnorm"))


@needs_api
def test_apply_plan_result_saves_without_arch(tmp_path) -> None:
    """apply_plan's result carries the dense model's architecture: save_pruned needs no arch=."""
    import mdp_trt

    m = make("test_resnet", num_classes=10)
    plan = mdp_trt.space_of(m, CFG).random_plan(1)
    pruned = mdp_trt.apply_plan(m, plan)
    assert pruned.mdp_arch == A.arch(m)
    mdp_trt.save_pruned(tmp_path / "p.pt", pruned, plan)
    back = mdp_trt.load_pruned(tmp_path / "p.pt")
    assert state_equal(back, pruned) and torch.equal(run(back, image()), run(pruned, image()))


def test_input_model_untouched_and_still_timm_shaped() -> None:
    m = make("resnet18")
    before = copy.deepcopy(m.state_dict())
    sp = space_of(m)
    plan = sp.plan({"layer4.res": 256, "layer2.0.conv1": 64}, removed=["layer3.1"])
    pruned = A.apply(m, sp, plan, A.magnitude(m, sp))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert not any(isinstance(b, nn.Identity) for b in m.layer3)
    assert m.num_features == 512 and m.fc.in_features == 512
    x = image()
    feats = pruned.forward_features(x)
    assert feats.shape == (2, 256, 2, 2) and pruned.num_features == 256
    assert torch.allclose(pruned.forward_head(feats), run(pruned, x))
    assert pruned.feature_info[-1]["num_chs"] == 256
    pruned.reset_classifier(7)
    assert run(pruned, x).shape == (2, 7)


def test_iterative_plans_on_a_pruned_model() -> None:
    m = make("resnet50d")
    sp1 = space_of(m)
    p1 = A.apply(m, sp1, sp1.random_plan(3), A.magnitude(m, sp1))
    sp2 = space_of(p1)
    assert sp2.space_id != sp1.space_id and sp2.model == "resnet50d"
    removed = set(sp1.random_plan(3).removed)
    assert removed and not removed & {b.name for b in sp2.blocks}
    plan2 = sp2.random_plan(4)
    p2 = A.apply(p1, sp2, plan2, A.magnitude(p1, sp2))
    assert n_params(p2) == A.param_count(sp2, plan2)
    assert run(p2, image()).shape == (2, 1000)
    full = A.apply(p1, sp2, sp2.full_plan(), A.magnitude(p1, sp2))
    assert torch.equal(run(full, image()), run(p1, image()))


def test_arch_rebuilds_with_kwargs_and_max_pool_head() -> None:
    m = make("test_resnet", num_classes=10, in_chans=1, global_pool="max")
    arch = A.arch(m)
    assert arch == {"name": "test_resnet", "kwargs": {"num_classes": 10, "in_chans": 1, "global_pool": "max"}}
    rebuilt = timm.create_model(arch["name"], pretrained=False, **arch["kwargs"])
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == \
        {k: v.shape for k, v in m.state_dict().items()}
    sp = space_of(m)
    assert sp.input_size == (1, SIDE, SIDE)
    plan = sp.random_plan(0)
    pruned = A.apply(m, sp, plan, A.magnitude(m, sp))
    assert n_params(pruned) == A.param_count(sp, plan)
    assert run(pruned, image(chans=1)).shape == (2, 10)
    full = A.apply(m, sp, sp.full_plan(), A.magnitude(m, sp))
    assert torch.equal(run(full, image(chans=1)), run(m, image(chans=1)))


def test_headless_model() -> None:
    m = make("test_resnet", num_classes=0)
    sp = space_of(m)
    plan = sp.plan({"layer4.res": 48})
    pruned = A.apply(m, sp, plan, A.magnitude(m, sp))
    assert run(pruned, image()).shape == (2, 48)
    assert n_params(pruned) == A.param_count(sp, plan)


# -- importance and what surgery removes --------------------------------------------------


def test_zeroed_units_are_the_ones_removed() -> None:
    """Channels that output exactly 0 go first under magnitude importance; output unchanged."""
    m = make("test_resnet")
    zero = list(range(3, 35, 4))  # 8 units
    silence(m, "conv1.0", "conv1.1", list(range(1, 16, 2)))  # deep-stem inner width (16)
    silence(m, "layer2.0.conv1", "layer2.0.bn1", zero)  # BasicBlock inner width (48)
    silence(m, "layer3.0.conv2", "layer3.0.bn2", zero)  # Bottleneck inner width (48)
    zero16 = list(range(0, 192, 12))  # 16 units: layer3.res is cut in steps of 16
    for conv, bn in (("layer3.0.conv3", "layer3.0.bn3"), ("layer3.0.downsample.1", "layer3.0.downsample.2")):
        silence(m, conv, bn, zero16)  # every writer of the residual width layer3.res (192)
    sp = space_of(m)
    widths = {"conv1.0": 8, "layer2.0.conv1": 40, "layer3.0.conv2": 40, "layer3.res": 176}
    plan = sp.plan(widths)
    imp = A.magnitude(m, sp)
    for d, w in widths.items():
        assert np.count_nonzero(imp.units[d] == 0) == sp.dim(d).size - w, d
    pruned = A.apply(m, sp, plan, imp)
    for d, z in (("layer2.0.conv1", zero), ("layer3.0.conv2", zero), ("layer3.res", zero16)):
        assert pruned.mdp_indices[d] == [i for i in range(sp.dim(d).size) if i not in z]
    x = image()
    assert (run(pruned, x) - run(m, x)).abs().max().item() < 1e-5
    assert n_params(pruned) == A.param_count(sp, plan)
    # pruning live units instead does change the output: the check above can fail
    other = A.apply(m, sp, plan, Importance({k: -v for k, v in imp.units.items()}, {}))
    assert (run(other, x) - run(m, x)).abs().max().item() > 1e-3


def test_zeroed_residual_width_shared_with_the_stem() -> None:
    """resnet18: layer1.res is written by the stem conv and every layer1 block."""
    m = make("resnet18")
    zero = list(range(0, 64, 8))
    for conv, bn in (("conv1", "bn1"), ("layer1.0.conv2", "layer1.0.bn2"), ("layer1.1.conv2", "layer1.1.bn2")):
        silence(m, conv, bn, zero)
    sp = space_of(m)
    plan = sp.plan({"layer1.res": 56})
    pruned = A.apply(m, sp, plan, A.magnitude(m, sp))
    assert pruned.conv1.out_channels == 56 and pruned.layer2[0].downsample[0].in_channels == 56
    x = image()
    assert (run(pruned, x) - run(m, x)).abs().max().item() < 1e-5


def test_importance_ties_and_order() -> None:
    m = make("test_resnet")
    sp = space_of(m)
    imp = Importance({d.name: np.zeros(d.size) for d in sp.dims}, {})
    imp.units["layer4.res"][[90, 5, 50]] = [3.0, 2.0, 1.0]
    pruned = A.apply(m, sp, sp.plan({"layer4.res": 8}), imp)
    assert pruned.mdp_indices["layer4.res"] == [0, 1, 2, 3, 4, 5, 50, 90]


def test_magnitude_is_deterministic_and_complete() -> None:
    m = make("resnet18")
    sp = space_of(m)
    a, b = A.magnitude(m, sp), A.magnitude(m, sp)
    assert set(a.units) == {d.name for d in sp.dims}
    assert all(np.array_equal(a.units[k], b.units[k]) for k in a.units)
    assert set(a.blocks) == {b.name for b in sp.blocks if b.removable} and a.blocks == b.blocks
    assert all(len(a.units[d.name]) == d.size and (a.units[d.name] > 0).all() for d in sp.dims)


def test_taylor_terms() -> None:
    m = make("test_resnet")
    sp = space_of(m)
    torch.manual_seed(0)
    nn.functional.cross_entropy(m(image(4)), torch.randint(0, 1000, (4,))).backward()
    units, blocks = A.taylor_terms(m, sp)
    assert set(units) == {d.name for d in sp.dims}
    assert all(units[d.name].shape == (d.size,) for d in sp.dims)
    assert set(blocks) == {"layer1.0"}

    def term(bn: str) -> np.ndarray:
        b = m.get_submodule(bn)
        w, bias = b.weight.detach().double(), b.bias.detach().double()
        return (w * b.weight.grad.double() + bias * b.bias.grad.double()).numpy()

    np.testing.assert_allclose(units["layer3.res"], term("layer3.0.bn3") + term("layer3.0.downsample.2"))
    np.testing.assert_allclose(units["layer1.res"], term("bn1") + term("layer1.0.bn2"))
    np.testing.assert_allclose(units["conv1.3"], term("conv1.4"))
    assert blocks["layer1.0"] == pytest.approx(term("layer1.0.bn2").sum())
    assert np.abs(units["layer3.res"]).sum() > 0
    again, blocks2 = A.taylor_terms(m, sp)
    assert all(np.array_equal(units[k], again[k]) for k in units) and blocks == blocks2


# -- bad input ---------------------------------------------------------------------------


def test_bad_plans_are_refused() -> None:
    m = make("resnet18")
    before = copy.deepcopy(m.state_dict())
    sp = space_of(m)
    imp = A.magnitude(m, sp)
    good = sp.full_plan()

    def refused(plan, match: str, importance: Importance = imp) -> None:
        with pytest.raises(PlanError, match=match):
            A.apply(m, sp, plan, importance)

    refused(type(good)(good.model, good.space_id, {**good.widths, "layer9.res": 8}), "unknown dims")
    refused(type(good)(good.model, good.space_id, {**good.widths, "layer2.res": 12}), "not one of its choices")
    refused(type(good)(good.model, good.space_id, good.widths, ("layer2.0",)),
            "cannot be removed: it changes the width 64->128")
    other = space_of(make("resnet34"))
    refused(other.full_plan(), "plan is for model 'resnet34'")
    with pytest.raises(PlanError, match="not built from this model"):
        A.apply(make("resnet34"), sp, good, imp)
    refused(good, "has shape", Importance({**imp.units, "layer2.res": np.ones(3)}, {}))
    with pytest.raises(PlanError, match="removes unknown block"):
        sp.plan(removed=["layer7.0"])
    with pytest.raises(PlanError):
        A.param_count(sp, other.full_plan())
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


@pytest.mark.parametrize("kwargs", [
    pytest.param({"name": "resnet26", "cardinality": 4, "base_width": 16}, id="grouped"),
    pytest.param({"name": "test_resnet", "block_args": {"attn_layer": "se"}}, id="se"),
    pytest.param({"name": "test_resnet", "replace_stem_pool": True}, id="conv-stem-pool"),
    pytest.param({"name": "test_resnet", "output_stride": 16}, id="dilated"),
])
def test_variants_the_hand_written_adapter_refused(kwargs: dict, tmp_path) -> None:
    """Grouped, SE, conv-pooled stems and dilated ResNets prune exactly like the rest. Built
    with options their timm name does not carry, they are not what the name rebuilds: saving
    asks for ``arch=`` instead of writing a file that would load as another model."""
    from mdp_trt.api import save_pruned

    m = make(**kwargs)
    assert A.matches(m) and A.why_not(m) == ""
    sp = space_of(m)
    full = A.apply(m, sp, sp.full_plan(), A.magnitude(m, sp))
    assert torch.equal(run(full, image()), run(m, image()))
    plan = sp.random_plan(0)
    pruned = A.apply(m, sp, plan, A.magnitude(m, sp))
    assert n_params(pruned) == A.param_count(sp, plan) < n_params(m)
    assert rel_diff(onnx_run(pruned, image()), run(pruned, image()).numpy()) < 1e-4
    why = r"stride=\(1, 1\).*timm builds.*stride=\(2, 2\)" if "output_stride" in kwargs else ""
    with pytest.raises(UnsupportedModelError, match=f"would not rebuild this ResNet: .*{why}"):
        A.arch(m)
    assert not hasattr(pruned, "mdp_arch")
    with pytest.raises(MdpError, match="needs the architecture"):
        save_pruned(tmp_path / "p.pt", pruned, plan)


class _Gate(nn.Module):
    """A block wrapped in data-dependent control flow, which torch.fx cannot trace."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.inner(x)
        return x


def test_unsupported_models_say_what_blocked_them() -> None:
    import mdp_trt

    assert not A.matches(nn.Sequential(nn.Conv2d(3, 8, 3)))
    gated = make("resnet18")
    gated.layer2[1] = _Gate(gated.layer2[1])
    cases = {
        r"layer bn1 \(GroupNorm\) normalises groups of channels": make("resnet18", norm_layer="groupnorm"),
        r"global pool global_pool \(catavgmax\) concatenates poolings": make("test_resnet", global_pool="catavgmax"),
        r"torch.fx cannot trace module layer2.1 \(_Gate\): symbolically traced variables cannot be used "
        r"as inputs to control flow": gated,
    }
    for why, model in cases.items():
        assert A.matches(model)
        assert re.search(why, A.why_not(model)), (why, A.why_not(model))
        with pytest.raises(UnsupportedModelError, match=f"^cannot prune ResNet: {why}[^\n]*$"):
            A.space(model, CFG)
        with pytest.raises(UnsupportedModelError, match=f"^ResNet looks like a resnet but cannot be pruned: "
                                                        f"{why}[^\n]*. Supported: [^\n]*$"):
            mdp_trt.space_of(model)
    bare = timm.models.resnet.ResNet(timm.models.resnet.BasicBlock, (1, 1, 1, 1))
    assert "pretrained_cfg" in A.why_not(bare)


def test_resolution_override() -> None:
    with pytest.raises(MdpError, match="positive"):
        space_of(make("test_resnet"), SpaceConfig(resolution=0))
    sp = space_of(make("test_resnet"), SpaceConfig(resolution=8))
    assert next(t for t in sp.terms if t.name == "global_pool").const["in_hw"] == 1
