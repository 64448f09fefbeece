"""Swin Transformer v1 and v2 held to the pruning contract, parametrised over timm models.

Random-initialised models with randomised norms, biases and logit scales (timm initialises
v2's post-norms to zero, which would silence every branch). Each model: a space is found,
aligned, with the first block of every stage locked; the full plan is bit-exact; random plans
run, shrink, match the parameter count from the plan, export to ONNX Runtime within 1e-4,
save and load exactly and can be pruned again; units that output zero are the ones removed,
leaving the output unchanged; Taylor terms are the signed sums over the weights units own;
term modules run at their smallest and largest widths, export, hold the model's parameters,
and the attention-score term computes the block's own windowed attention.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import contract
import numpy as np
import pytest
import timm
import torch
from contract import n_params, ort_run, run
from helpers_resnet import rel_diff
from timm.models import swin_transformer as sw1
from timm.models import swin_transformer_v2 as sw2
from torch import nn

from mdp_trt import apply_plan, load_pruned, save_pruned, space_of
from mdp_trt.errors import PlanError, UnsupportedModelError
from mdp_trt.models import SpaceConfig, adapter_for
from mdp_trt.models.swin import PrunedWindowAttention, PrunedWindowAttentionV2, SwinAdapter
from mdp_trt.space import PruningSpace

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
SMALL = {"img_size": 64, "window_size": 4}
# id -> (timm name, kwargs); the second group is heavy and runs with -m slow
FAST: dict[str, tuple[str, dict[str, Any]]] = {
    "swin_tiny@64": ("swin_tiny_patch4_window7_224", SMALL),
    # a narrow swin_tiny at 56 px: stage grids 14 and 7 are padded to whole windows
    "swin_tiny-narrow@56": ("swin_tiny_patch4_window7_224",
                            {"img_size": 56, "window_size": 4, "embed_dim": 32, "num_heads": (1, 2, 4, 8)}),
    "swinv2_tiny@64": ("swinv2_tiny_window8_256", SMALL),
}
SLOW: dict[str, tuple[str, dict[str, Any]]] = {
    "swin_tiny": ("swin_tiny_patch4_window7_224", {}),
    "swin_small@64": ("swin_small_patch4_window7_224", SMALL),
    "swin_base@64": ("swin_base_patch4_window7_224", SMALL),
    "swinv2_tiny": ("swinv2_tiny_window8_256", {}),
}
MODELS = [pytest.param(k, id=k) for k in FAST] + [pytest.param(k, id=k, marks=pytest.mark.slow) for k in SLOW]
SPEC = {**FAST, **SLOW}
A = SwinAdapter()


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1 and "norm" in name and name.endswith("weight"):
            p.copy_(0.5 + torch.rand(p.shape, generator=g))
        elif p.dim() == 1 or name.endswith("logit_scale"):
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


def make(key: str, seed: int = 0) -> nn.Module:
    name, kwargs = SPEC[key]
    torch.manual_seed(seed)
    return randomize(timm.create_model(name, pretrained=False, **kwargs), seed).eval()


@functools.lru_cache(maxsize=1)
def built(key: str) -> tuple[nn.Module, PruningSpace]:
    m = make(key)
    return m, A.space(m, SpaceConfig())


def image(model: nn.Module, batch: int = 2, seed: int = 0) -> torch.Tensor:
    h, w = model.patch_embed.img_size
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(seed))


def v2(model: nn.Module) -> bool:
    return isinstance(model, sw2.SwinTransformerV2)


# -- the contract ------------------------------------------------------------------------


@pytest.mark.parametrize("key", MODELS)
def test_space_found_and_aligned(key: str) -> None:
    m, sp = built(key)
    assert isinstance(adapter_for(m), SwinAdapter)
    assert sp.family == "swin" and sp.model == SPEC[key][0] and sp.input_size == (3, *m.patch_embed.img_size)
    stages = [d for d in sp.dims if d.kind == "embed"]
    assert [d.size for d in stages] == [m.layers[s].blocks[0].dim for s in range(len(m.layers))]
    for d in sp.dims:
        unit = 8 if d.kind in ("embed", "mlp", "qk", "v") else 1
        assert all(c % unit == 0 for c in d.choices[:-1]) and len(d.choices) <= 16, d
    for s, stage in enumerate(m.layers):
        names = [f"layers.{s}.blocks.{j}" for j in range(len(stage.blocks))]
        assert not sp.block(names[0]).removable and "never empty" in sp.block(names[0]).reason
        assert all(sp.block(n).removable for n in names[1:])
        assert all(sp.dim(f"{n}.heads").size == stage.blocks[0].attn.num_heads for n in names)
    assert all(len(t.dims) <= 3 for t in sp.terms)
    assert {t.kind for t in sp.terms} == {"patch_embed", "merge", "attn_qk", "attn_v", "mlp", "head"}
    assert len({t.signature for t in sp.terms}) < len(sp.terms)  # repeated blocks share rows
    shifted = [t for t in sp.terms if t.kind == "attn_qk" and "shift" in t.const]
    assert shifted and all(t.block and int(t.block.rsplit(".", 1)[1]) % 2 == 1 for t in shifted)
    merge = next(t for t in sp.terms if t.name == "layers.1.downsample")
    assert merge.dims == ("layers.0.embed", "layers.1.embed")


@pytest.mark.parametrize("key", MODELS)
def test_full_plan_is_bit_exact(key: str) -> None:
    m, sp = built(key)
    full = contract.assert_full_plan_exact(A, m, sp, image(m))
    assert all(type(b.attn) in (PrunedWindowAttention, PrunedWindowAttentionV2) for s in full.layers for b in s.blocks)


@pytest.mark.parametrize("key", MODELS)
def test_random_plan_contract(key: str, tmp_path) -> None:
    m, sp = built(key)
    plan = sp.random_plan(1)
    assert any(plan.widths[d.name] < d.size for d in sp.dims if d.kind == "embed")
    pruned = apply_plan(m, plan, space=sp)
    x = image(m, seed=1)
    y = run(pruned, x)
    assert y.shape == (2, m.num_classes) and torch.isfinite(y).all()
    assert n_params(pruned) == A.param_count(sp, plan) < n_params(m)
    for b in plan.removed:
        assert isinstance(pruned.get_submodule(b), nn.Identity)
    keep = {k: torch.tensor(v) for k, v in pruned.mdp_indices.items()}
    for s in range(1, len(m.layers)):  # a merging reads the kept channels in each of its four copies
        prev, e, width = keep[f"layers.{s - 1}.embed"], keep[f"layers.{s}.embed"], sp.dim(f"layers.{s - 1}.embed").size
        four = torch.cat([prev + c * width for c in range(4)])
        dense_red = m.get_submodule(f"layers.{s}.downsample.reduction").weight
        assert torch.equal(pruned.get_submodule(f"layers.{s}.downsample.reduction").weight, dense_red[e][:, four])
    feats = pruned.forward_features(x)
    assert pruned.num_features == feats.shape[-1] == plan.widths[f"layers.{len(m.layers) - 1}.embed"]
    contract.assert_exports_and_reloads(pruned, plan, x, y, tmp_path)
    sp2 = space_of(pruned)
    assert sp2.space_id != sp.space_id and not set(plan.removed) & {b.name for b in sp2.blocks}
    assert all(sp2.dim(d.name).size == plan.widths[d.name] for d in sp.dims if d.name in {e.name for e in sp2.dims})
    plan2 = sp2.random_plan(2)
    again = apply_plan(pruned, plan2, space=sp2)
    assert n_params(again) == A.param_count(sp2, plan2) and run(again, x).shape == y.shape
    save_pruned(tmp_path / "q.pt", again, [plan, plan2])
    assert torch.equal(run(load_pruned(tmp_path / "q.pt"), x), run(again, x))


@torch.no_grad()
def _silence(m: nn.Module, block: str, kind: str, units: list[int]) -> None:
    """Zero every weight that units of ``block``'s ``kind`` dim own, written out per layer."""
    blk = m.get_submodule(block)
    u = torch.tensor(units)
    if kind == "mlp":
        blk.mlp.fc1.weight[u] = 0
        blk.mlp.fc1.bias[u] = 0
        blk.mlp.fc2.weight[:, u] = 0
        return
    a = blk.attn
    h = a.num_heads
    d = a.qkv.out_features // (3 * h)
    for head in units:
        for part in range(3):
            rows = slice(part * h * d + head * d, part * h * d + (head + 1) * d)
            a.qkv.weight[rows] = 0
            if a.qkv.bias is not None:
                a.qkv.bias[rows] = 0
        a.proj.weight[:, head * d:(head + 1) * d] = 0
        if isinstance(a, sw2.WindowAttention):
            a.q_bias[head * d:(head + 1) * d] = 0
            a.v_bias[head * d:(head + 1) * d] = 0
            a.logit_scale[head] = 0
            a.cpb_mlp[2].weight[head] = 0
        else:
            a.relative_position_bias_table[:, head] = 0


@pytest.mark.parametrize("key", MODELS)
@pytest.mark.parametrize("kind", ["mlp", "heads"])
def test_zeroed_units_are_the_ones_removed(key: str, kind: str) -> None:
    m = make(key)
    sp = A.space(m, SpaceConfig())
    block = "layers.1.blocks.1"  # a shifted block
    d = sp.dim(f"{block}.{kind}")
    k = d.size - d.choices[-2]
    zero = list(range(1, d.size, d.size // k))[:k]
    _silence(m, block, kind, zero)
    contract.assert_zeroed_removed(A, m, sp, d.name, zero, image(m))


@pytest.mark.parametrize("key", MODELS)
def test_taylor_terms(key: str) -> None:
    m = make(key)
    sp = A.space(m, SpaceConfig())
    block = "layers.2.blocks.1"
    blk = m.get_submodule(block)
    outs: list[torch.Tensor] = []

    def keep(mod: nn.Module, i: Any, o: torch.Tensor) -> None:
        o.retain_grad()
        outs.append(o)

    # the two tensors a block adds to its residual stream
    for part in (blk.norm1, blk.norm2) if v2(m) else (blk.attn, blk.mlp):
        part.register_forward_hook(keep)
    torch.manual_seed(0)
    nn.functional.cross_entropy(m(image(m)), torch.randint(0, 1000, (2,))).backward()
    units, blocks = A.taylor_terms(m, sp)
    assert set(units) == {d.name for d in sp.dims} and set(blocks) == {b.name for b in sp.blocks}
    assert all(units[d.name].shape == (d.size,) and np.isfinite(units[d.name]).all() for d in sp.dims)

    def wg(p: torch.Tensor) -> torch.Tensor:
        assert p.grad is not None
        return p.detach().double() * p.grad.double()

    fc1, fc2 = blk.mlp.fc1, blk.mlp.fc2
    np.testing.assert_allclose(units[f"{block}.mlp"],
                               (wg(fc1.weight).sum(1) + wg(fc1.bias) + wg(fc2.weight).sum(0)).numpy())
    # stage widths own every parameter along their axis: all parameters but those indexed only
    # by heads, qk, v or mlp; a merging's reduction twice (its rows and its input copies)
    only_inner = ("qkv.bias", "q_bias", "v_bias", "logit_scale", "cpb_mlp.0.weight", "cpb_mlp.0.bias",
                  "cpb_mlp.2.weight", "relative_position_bias_table", "fc1.bias", "head.fc.bias")
    total = sum(float(wg(p).sum()) * (2 if n.endswith("reduction.weight") else 1)
                for n, p in m.named_parameters() if not n.endswith(only_inner))
    embed = sum(float(units[d.name].sum()) for d in sp.dims if d.kind == "embed")
    assert embed == pytest.approx(total, rel=1e-9)
    branch = sum(float((o.detach().double() * o.grad.double()).sum()) for o in outs)
    assert blocks[block] == pytest.approx(branch, rel=1e-4, abs=1e-9)
    m.zero_grad(set_to_none=True)


@pytest.mark.parametrize("key", MODELS)
def test_term_modules_run_and_hold_the_parameters(key: str) -> None:
    m, sp = built(key)
    assert contract.term_params(A, sp) == n_params(m)
    for t, pick, widths, module, shape in contract.extreme_terms(A, sp):
        assert any(w in shape for w in widths) or 3 in shape, (t.name, shape, widths)
        x = torch.randn(1, *shape)
        out = run(module, x)
        assert torch.isfinite(out).all(), t.name
        if pick == 0:
            assert rel_diff(ort_run(module, x), out.numpy()) < 1e-4, t.name


@pytest.mark.parametrize("key", list(FAST))
def test_score_term_is_the_blocks_windowed_attention(key: str) -> None:
    """attn_qk at full width on a block's input gives the probabilities the block computes
    (shift, padding, mask and position bias included), from a copy of its own modules."""
    m, sp = built(key)
    block = "layers.0.blocks.1"
    blk = m.get_submodule(block)
    assert any(blk.shift_size)
    seen: dict[str, torch.Tensor] = {}
    hooks = [blk.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0])),
             blk.attn.softmax.register_forward_hook(lambda mod, i, o: seen.__setitem__("p", o))]
    try:
        run(m, image(m))
    finally:
        for hk in hooks:
            hk.remove()
    t = next(t for t in sp.terms if t.name == f"{block}.attn_qk")
    module, shape = A.term_module(sp, t, sp.term_widths(t, sp.full_plan()))
    assert shape == tuple(seen["x"].shape[1:])
    torch.testing.assert_close(run(module, seen["x"]), seen["p"], rtol=1e-5, atol=1e-6)
    tv = next(t for t in sp.terms if t.name == f"{block}.attn_v")
    hp = math.ceil(shape[0] / blk.window_size[0]) * blk.window_size[0]
    assert A.term_module(sp, tv, sp.term_widths(tv, sp.full_plan()))[1] == (
        (hp // blk.window_size[0]) ** 2, blk.window_area, shape[2])


def test_pruned_attention_keeps_its_scale_and_bias() -> None:
    """Fewer query channels keep v1's dense softmax scale; fewer heads keep their own bias
    table columns (v1) and logit scales and bias-MLP rows (v2)."""
    for key in ("swin_tiny@64", "swinv2_tiny@64"):
        m, sp = built(key)
        n = "layers.1.blocks.1"
        plan = sp.plan({f"{n}.qk": 16, f"{n}.heads": 4})
        imp = A.magnitude(m, sp)
        kept = A.apply(m, sp, plan, imp).get_submodule(f"{n}.attn")
        dense = m.get_submodule(f"{n}.attn")
        heads = torch.as_tensor(np.sort(imp.ranking(f"{n}.heads")[:4]))
        assert (kept.num_heads, kept.qk_dim, kept.v_dim) == (4, 16, 32)
        if isinstance(kept, PrunedWindowAttention):
            assert kept.scale == dense.scale == 32**-0.5
            assert torch.equal(kept.relative_position_bias_table, dense.relative_position_bias_table[:, heads])
        else:
            assert isinstance(kept, PrunedWindowAttentionV2)
            assert torch.equal(kept.logit_scale, dense.logit_scale[heads])
            assert torch.equal(kept.cpb_mlp[2].weight, dense.cpb_mlp[2].weight[heads])


def test_arch_rebuilds_and_inspect_lists_the_dims(capsys) -> None:
    from mdp_trt.inspect import main

    m, sp = built("swin_tiny@64")
    arch = A.arch(m)
    again = timm.create_model(arch["name"], **arch["kwargs"])
    assert A.space(again, SpaceConfig()).space_id == sp.space_id
    assert main(["--model", "swinv2_tiny_window8_256", "--resolution", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["family"] == "swin"
    kinds = {d["kind"] for d in out["dims"]}
    assert kinds == {"embed", "heads", "qk", "v", "mlp"}
    merge = next(t for t in out["terms"] if t["name"] == "layers.3.downsample")
    assert merge["dims"] == ["layers.2.embed", "layers.3.embed"]


def test_bad_input_is_refused() -> None:
    m, sp = built("swin_tiny@64")
    with pytest.raises(PlanError, match="cannot be removed: the only block kept"):
        sp.plan(removed=["layers.3.blocks.0"])
    with pytest.raises(PlanError, match="not built from this model"):
        A.apply(make("swinv2_tiny@64"), sp, sp.full_plan(), A.magnitude(m, sp))
    with pytest.raises(Exception, match="resolution 96 was asked"):
        A.space(m, SpaceConfig(resolution=96))
    dyn = timm.create_model("swin_tiny_patch4_window7_224", img_size=64, window_size=4, dynamic_img_size=True)
    with pytest.raises(UnsupportedModelError, match="dynamic_img_size.*Supported:"):
        adapter_for(dyn)
    cat = timm.create_model("swin_tiny_patch4_window7_224", img_size=64, window_size=4, global_pool="catavgmax")
    with pytest.raises(UnsupportedModelError, match="global pool 'catavgmax'"):
        adapter_for(cat)
    plain = sw1.SwinTransformer(img_size=64, window_size=4, depths=(1, 1), num_heads=(2, 4), embed_dim=32)
    with pytest.raises(UnsupportedModelError, match="no timm pretrained_cfg"):
        adapter_for(plain)
