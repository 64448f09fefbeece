"""One contract for the transformer families beyond the plain ViT: ViTs with qk_norm, layer
scale, register tokens and average pooling; EVA-02 (rotary embeddings, SwiGLU) and the rotary
ViTs built on timm's Eva; BEiT (relative position bias, layer scale).

Random-initialised models with randomised norms, biases, tokens and layer scales, at small
sizes. Each model is held to: a space is found; the full plan is bit-exact; random plans run,
shrink, match the parameter count from the plan, export to ONNX Runtime within 1e-4, save and
load exactly, and can be pruned again; units whose weights are zero are the ones removed,
leaving the output unchanged; Taylor terms add up to the signed sums over the weights each dim
owns; every term module runs at its smallest and largest widths (and in ONNX Runtime) and together
they hold the model's parameters.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import contract
import numpy as np
import pytest
import timm
import torch
from contract import n_params, ort_run, run, state_equal
from helpers_resnet import rel_diff
from test_vit_adapter import randomize
from torch import nn

from mdp_trt import apply_plan, load_pruned, save_pruned, space_of
from mdp_trt.errors import UnsupportedModelError
from mdp_trt.models import SpaceConfig, adapter_for
from mdp_trt.space import PruningSpace

torch.set_num_threads(1)
pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")

# id -> (timm name, kwargs, family); the second group is heavy and runs with -m slow.
# (test_vit4's RmsNorm has no ONNX export at opset 17: tests/test_vit_adapter.py covers it.)
FAST: dict[str, tuple[str, dict[str, Any], str]] = {
    "vit_qknorm_ls_reg_avg": ("vit_small_patch16_224", dict(
        img_size=64, depth=4, qk_norm=True, init_values=1e-5, reg_tokens=4, global_pool="avg"), "vit"),
    "vit_noclass_reg": ("vit_tiny_patch16_224", dict(
        img_size=64, depth=3, class_token=False, no_embed_class=True, reg_tokens=2, global_pool="avg",
        init_values=0.1), "vit"),
    "test_vit": ("test_vit", {}, "vit"),
    "test_vit2": ("test_vit2", {}, "vit"),
    "eva02_tiny": ("eva02_tiny_patch14_224", dict(img_size=56), "eva"),
    "eva02_tiny_split_half": ("eva02_tiny_patch14_224", dict(
        img_size=56, depth=3, qkv_fused=False, scale_mlp=True, init_values=0.1, qk_norm=True,
        rope_rotate_half=True, num_reg_tokens=1), "eva"),
    "vit_rope_reg1_gap": ("vit_medium_patch16_rope_reg1_gap_256", dict(img_size=64, depth=3), "eva"),
    "beit_reduced": ("beit_base_patch16_224", dict(img_size=64, depth=3, embed_dim=192, num_heads=3), "beit"),
}
SLOW: dict[str, tuple[str, dict[str, Any], str]] = {
    "eva02_small": ("eva02_small_patch14_224", dict(img_size=56), "eva"),
    "eva02_base": ("eva02_base_patch14_224", dict(img_size=56), "eva"),
    "beit_base": ("beit_base_patch16_224", dict(img_size=64), "beit"),
}
ALL = {**FAST, **SLOW}
MODELS = [pytest.param(k, id=k) for k in FAST] + [pytest.param(k, id=k, marks=pytest.mark.slow) for k in SLOW]


def make(key: str, seed: int = 0) -> nn.Module:
    name, kwargs, _ = ALL[key]
    torch.manual_seed(seed)
    return randomize(timm.create_model(name, pretrained=False, **kwargs), seed).eval()


@functools.lru_cache(maxsize=2)
def built(key: str) -> tuple[nn.Module, PruningSpace, Any]:
    m = make(key)
    a = adapter_for(m)
    return m, a.space(m, SpaceConfig()), a


def side(m: nn.Module) -> int:
    return int(m.patch_embed.img_size[0])


def image(m: nn.Module, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, side(m), side(m), generator=torch.Generator().manual_seed(seed))


def rotary(m: nn.Module) -> bool:
    return getattr(m, "rope", None) is not None


# -- the contract ------------------------------------------------------------------------


@pytest.mark.parametrize("key", MODELS)
def test_space_found(key: str) -> None:
    m, sp, a = built(key)
    name, _, family = ALL[key]
    assert sp.family == family == a.family and sp.model == name
    assert sp.input_size == (3, side(m), side(m))
    depth = len(m.blocks)
    assert len(sp.dims) == 1 + 4 * depth and len(sp.terms) == 2 + 3 * depth
    assert all(b.removable for b in sp.blocks) and len(sp.blocks) == depth
    assert len({t.signature for t in sp.terms}) < len(sp.terms)  # repeated blocks share rows
    locked = dict(sp.locked)
    qk = sp.dim("blocks.0.qk")
    if rotary(m):  # whole rotation pairs, and inspect says so
        assert all(c % 2 == 0 for c in qk.choices) and "rotate in pairs" in locked["blocks.*.qk"]
        assert any(dict(t.consts).get("rope") for t in sp.terms)
    else:
        assert "blocks.*.qk" not in locked
    if family == "beit":
        assert dict(sp.terms[1].consts)["rel_pos"] == m.blocks[0].attn.relative_position_bias_table.shape[0]


@pytest.mark.parametrize("key", MODELS)
def test_full_plan_is_bit_exact(key: str) -> None:
    m, sp, a = built(key)
    contract.assert_full_plan_exact(a, m, sp, image(m))


@pytest.mark.parametrize("key", MODELS)
def test_random_plan_contract(key: str, tmp_path) -> None:
    m, sp, a = built(key)
    plan = sp.random_plan(1)
    plan.removed = (sp.blocks[1].name,)
    sp.validate(plan)
    pruned = apply_plan(m, plan, space=sp)
    x = image(m, seed=1)
    y = run(pruned, x)
    assert y.shape == (2, m.num_classes or plan.widths["embed"]) and torch.isfinite(y).all()
    assert n_params(pruned) == a.param_count(sp, plan) < n_params(m)
    assert len(pruned.blocks) == len(m.blocks) - 1
    assert pruned.num_features == pruned.forward_features(x).shape[-1] == plan.widths["embed"]
    contract.assert_exports_and_reloads(pruned, plan, x, y, tmp_path)
    sp2 = space_of(pruned)
    assert sp2.space_id != sp.space_id and len(sp2.blocks) == len(sp.blocks) - 1
    plan2 = sp2.random_plan(2)
    again = apply_plan(pruned, plan2, space=sp2)
    assert n_params(again) == a.param_count(sp2, plan2)
    assert run(again, x).shape == (2, m.num_classes or plan2.widths["embed"])
    save_pruned(tmp_path / "q.pt", again, [plan, plan2])
    back2 = load_pruned(tmp_path / "q.pt")
    assert state_equal(back2, again) and torch.equal(run(back2, x), run(again, x))


def _attn_rows(attn: nn.Module, role: str, rows: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tensor, indices along axis 0) that write query/key (``qk``) or value (``v``) channels
    ``rows`` (head-major) of a dense timm attention, fused or not."""
    h = attn.num_heads
    hd = attn.proj.in_features // h
    out = []
    if getattr(attn, "qkv", None) is not None:
        offsets = (0, h * hd) if role == "qk" else (2 * h * hd,)
        for off in offsets:
            out.append((attn.qkv.weight, rows + off))
            if attn.qkv.bias is not None:
                out.append((attn.qkv.bias, rows + off))
        bias = getattr(attn, "q_bias" if role == "qk" else "v_bias", None)
        if bias is not None:
            out.append((bias, rows))
    else:
        for r in ("q", "k") if role == "qk" else ("v",):
            lin = attn.get_submodule(f"{r}_proj")
            out += [(lin.weight, rows)] + ([(lin.bias, rows)] if lin.bias is not None else [])
    return out


@torch.no_grad()
def _silence(m: nn.Module, dim: str, units: list[int]) -> None:
    """Zero every weight that units of a block's ``qk``, ``v`` or ``mlp`` dim own."""
    blk = m.get_submodule(dim.rsplit(".", 1)[0])
    kind, u = dim.rsplit(".", 1)[1], torch.tensor(units)
    if kind in ("qk", "v"):
        attn = blk.attn
        hd = attn.proj.in_features // attn.num_heads
        rows = (torch.arange(attn.num_heads)[:, None] * hd + u[None, :]).flatten()
        for t, idx in _attn_rows(attn, kind, rows):
            t[idx] = 0.0
        if kind == "v":
            attn.proj.weight[:, rows] = 0.0
        return
    mlp = blk.mlp
    fc1s = [mlp.fc1_g, mlp.fc1_x] if hasattr(mlp, "fc1_g") else [mlp.fc1]
    hidden = mlp.fc2.in_features
    for fc in fc1s:
        idx = torch.cat([u, u + hidden]) if fc.out_features == 2 * hidden else u
        fc.weight[idx] = 0.0
        if fc.bias is not None:
            fc.bias[idx] = 0.0
    mlp.fc2.weight[:, u] = 0.0


def _zero_cases() -> list[Any]:
    cases = []
    for key, (_, kwargs, _) in FAST.items():
        kinds = ["v", "mlp"]
        if not kwargs.get("qk_norm"):  # a q/k norm mixes the channels of a head
            kinds.append("qk")
        if kwargs.get("scale_mlp"):  # a norm over the hidden width mixes its units
            kinds.remove("mlp")
        cases += [pytest.param(key, k, id=f"{key}-{k}") for k in kinds]
    return cases


@pytest.mark.parametrize(("key", "kind"), _zero_cases())
def test_zeroed_units_are_the_ones_removed(key: str, kind: str) -> None:
    m = make(key)
    a = adapter_for(m)
    sp = a.space(m, SpaceConfig())
    d = sp.dim(f"blocks.0.{kind}")
    k = d.size - d.choices[-2]
    if kind == "qk" and rotary(m):  # whole rotation pairs
        half = bool(m.rope.rotate_half)
        pairs = list(range(1, d.size // 2, d.size // k))[: k // 2]
        zero = sorted(pairs + [p + d.size // 2 for p in pairs] if half else [c for p in pairs for c in (2 * p, 2 * p + 1)])
    else:
        zero = list(range(1, d.size, d.size // k))[:k]
    assert len(zero) == k
    if kind == "qk":  # sharper attention, so that the wrong channels visibly change it
        attn = m.get_submodule("blocks.0.attn")
        rows = torch.arange(attn.proj.in_features)
        with torch.no_grad():
            for t, idx in _attn_rows(attn, "qk", rows):
                t[idx] *= 8.0
    _silence(m, d.name, zero)
    contract.assert_zeroed_removed(a, m, sp, d.name, zero, image(m))


@pytest.mark.parametrize("key", MODELS)
def test_taylor_terms(key: str) -> None:
    m, sp, a = built(key)
    m.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    out = m(image(m))
    target = torch.randint(0, out.shape[-1], (out.shape[0],))
    nn.functional.cross_entropy(out, target).backward()
    try:
        units, blocks = a.taylor_terms(m, sp)
        wg = {n: float((p.detach().double() * p.grad.double()).sum()) for n, p in m.named_parameters()
              if p.grad is not None}
    finally:
        m.zero_grad(set_to_none=True)
    assert set(units) == {d.name for d in sp.dims} and set(blocks) == {b.name for b in sp.blocks}
    assert all(units[d.name].shape == (d.size,) and np.isfinite(units[d.name]).all() for d in sp.dims)

    def total(prefix: str, skip: tuple[str, ...] = ()) -> float:
        return sum(v for n, v in wg.items() if n.startswith(prefix) and not any(s in n for s in skip))

    for i in range(len(m.blocks)):
        n = f"blocks.{i}"
        # every weight of the MLP but fc2's bias (an embedding channel's) belongs to one hidden unit
        assert units[f"{n}.mlp"].sum() == pytest.approx(total(f"{n}.mlp.", ("mlp.fc2.bias",)), rel=1e-9, abs=1e-12)
        # every attention weight but the output bias belongs to one head ...
        assert units[f"{n}.heads"].sum() == pytest.approx(
            total(f"{n}.attn.", ("attn.proj.bias", "_norm.")), rel=1e-9, abs=1e-12)
        # ... and, but the relative position table, to one query/key or value channel
        assert units[f"{n}.qk"].sum() + units[f"{n}.v"].sum() == pytest.approx(
            total(f"{n}.attn.", ("attn.proj.bias", "relative_position")), rel=1e-9, abs=1e-12)
        # a block: its two residual branches' output layers
        assert blocks[n] == pytest.approx(total(f"{n}.attn.proj.") + total(f"{n}.mlp.fc2."), rel=1e-9, abs=1e-12)
    if rotary(m):  # a rotation pair shares its score
        q = units["blocks.0.qk"]
        half = q.size // 2
        partner = np.r_[q[half:], q[:half]] if m.rope.rotate_half else q.reshape(-1, 2)[:, ::-1].reshape(-1)
        np.testing.assert_allclose(q, partner)


@pytest.mark.parametrize("key", MODELS)
def test_term_modules_run_and_hold_the_parameters(key: str) -> None:
    m, sp, a = built(key)
    with torch.device("meta"):
        assert contract.term_params(a, sp) == n_params(m)
    for t, pick, _, module, shape in contract.extreme_terms(a, sp):
        x = torch.randn(1, *shape)
        y = run(module, x)
        assert torch.isfinite(y).all(), t.name
        if pick == -1:  # the profilers time terms as ONNX graphs
            assert rel_diff(ort_run(module, x), y.numpy()) < 1e-4, t.name


# -- what is refused, and what inspect says ------------------------------------------------


@pytest.mark.parametrize(("name", "kwargs", "why"), [
    ("eva02_tiny_patch14_224", {"img_size": 56, "use_post_norm": True}, r"block blocks.0 is EvaBlockPostNorm"),
    ("eva02_tiny_patch14_224", {"img_size": 56, "scale_attn_inner": True}, r"blocks.0.attn normalizes its output"),
    ("eva02_tiny_patch14_224", {"img_size": 56, "global_pool": "map"}, r"attention pooling head"),
    ("eva02_tiny_patch14_224", {"img_size": 56, "attn_type": "rope"}, r"attention blocks.0.attn is AttentionRope"),
    ("beit_base_patch16_224", {"img_size": 64, "depth": 1, "use_shared_rel_pos_bias": True},
     r"a relative position bias shared by all blocks"),
    ("test_vit", {"scale_attn_norm": True}, r"blocks.0.attn normalizes its output"),
])
def test_unsupported_variants_name_the_layer(name: str, kwargs: dict, why: str) -> None:
    m = timm.create_model(name, pretrained=False, **kwargs)
    with pytest.raises(UnsupportedModelError, match=f"cannot be pruned: {why}.*Supported:"):
        adapter_for(m)


def test_inspect_names_the_rotary_constraint(capsys) -> None:
    from mdp_trt.inspect import main

    assert main(["--model", "eva02_tiny_patch14_224", "--resolution", "56", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["family"] == "eva" and summary["input_size"] == [3, 56, 56]
    qk = next(d for d in summary["dims"] if d["name"] == "blocks.0.qk")
    assert qk["choices"] == [8, 16, 24, 32, 40, 48, 56, 64]
    assert main(["--model", "eva02_tiny_patch14_224", "--resolution", "56"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "blocks.*.qk: rotary position embedding" in out and "keep whole pairs" in out
