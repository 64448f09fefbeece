"""One contract for every family on the channel graph, parametrised over timm models.

Random-initialised models with randomised norms and layer scales (so every branch counts),
at 64 px. Each model is held to: a space is found, aligned; the full plan is bit-exact;
random plans run, shrink, match the parameter count from the plan, export to ONNX Runtime
within 1e-4, save and load exactly, and can be pruned again; units that output zero are the
ones removed, leaving the output unchanged; Taylor terms are the norms' signed sums; every
term module runs at its smallest and largest widths and together they hold the model's
parameters.
"""

from __future__ import annotations

import functools
import math

import contract
import numpy as np
import pytest
import timm
import torch
from contract import n_params, run
from helpers_resnet import image
from timm.layers.grn import GlobalResponseNorm
from torch import nn

from mdp_trt import apply_plan, space_of
from mdp_trt.errors import UnsupportedModelError
from mdp_trt.models import SpaceConfig, adapter_for
from mdp_trt.models.base import Importance
from mdp_trt.models.generic import GraphAdapter, Proto
from mdp_trt.models.rules import get_tensor, set_tensor
from mdp_trt.space import PruningSpace

torch.set_num_threads(1)
SIDE = 64
CFG = SpaceConfig(resolution=SIDE)

# name -> family; the second group is heavy and runs with -m slow
FAST = {
    "test_convnext": "convnext", "convnext_atto": "convnext", "convnextv2_atto": "convnext",
    "efficientnet_b0": "efficientnet", "tf_efficientnetv2_b0": "efficientnet",
    "mobilenetv3_large_100": "efficientnet", "mobilenetv3_small_100": "efficientnet",
    "regnetx_002": "regnet", "regnety_002": "regnet", "resnext26ts": "byobnet", "seresnet18": "resnet",
    "resnet18": "resnet", "resnet26": "resnet", "resnet50d": "resnet",
}
SLOW = {
    "convnext_tiny": "convnext", "convnext_small": "convnext", "convnext_base": "convnext",
    "convnextv2_nano": "convnext", "efficientnet_b1": "efficientnet", "efficientnet_b2": "efficientnet",
    "efficientnet_b3": "efficientnet", "mobilenetv2_100": "efficientnet", "mobilenetv4_conv_small": "efficientnet",
    "regnety_016": "regnet", "regnetx_016": "regnet", "resnext50_32x4d": "resnet", "resnet50": "resnet",
    "seresnet50": "resnet", "ecaresnet50d": "resnet", "seresnext50_32x4d": "resnet",
    "ecaresnet26t": "resnet", "regnetz_b16": "byobnet", "repvgg_a0": "byobnet",
}
MODELS = [pytest.param(n, id=n) for n in FAST] + [pytest.param(n, id=n, marks=pytest.mark.slow) for n in SLOW]
FAMILY = {**FAST, **SLOW}


@torch.no_grad()
def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial norms, GRN and layer scales (timm initialises some to 0 or 1e-6)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        norm = isinstance(m, nn.modules.batchnorm._NormBase | nn.LayerNorm | GlobalResponseNorm)
        for pname, p in m.named_parameters(recurse=False):
            if pname == "gamma" or (norm and pname == "weight"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif norm and pname == "bias":
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None and m.running_var is not None:
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    return model


def make(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return randomize(timm.create_model(name, pretrained=False), seed).eval()


@functools.lru_cache(maxsize=2)
def built(name: str) -> tuple[nn.Module, PruningSpace, GraphAdapter]:
    m = make(name)
    a = adapter_for(m)
    assert isinstance(a, GraphAdapter)
    return m, a.space(m, CFG), a


# -- the contract ------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_space_found_and_aligned(name: str) -> None:
    m, sp, a = built(name)
    assert sp.family == FAMILY[name] and sp.model == name and sp.input_size == (3, SIDE, SIDE)
    assert sp.dims and sp.terms and all(len(t.dims) <= 3 for t in sp.terms)
    p = sp.handle
    assert isinstance(p, Proto)
    for d in sp.dims:
        gran = next(p.t.graph.vars[r].gran for r, n in p.dim_of.items() if n == d.name)
        unit = math.lcm(8, gran)
        assert all(c % unit == 0 for c in d.choices[:-1]), d
        assert d.size % gran == 0 and len(d.choices) <= CFG.max_choices
    for b in sp.blocks:
        assert b.removable or b.reason
        assert all(sp.dim(d).block == b.name for d in b.dims)
    assert len({t.signature for t in sp.terms}) < len(sp.terms)  # repeated blocks share rows
    if FAMILY[name] in ("convnext", "regnet", "resnet") or name.startswith(("efficientnet", "mobilenet")):
        assert any(b.removable for b in sp.blocks)


@pytest.mark.parametrize("name", MODELS)
def test_full_plan_is_bit_exact(name: str) -> None:
    m, sp, a = built(name)
    contract.assert_full_plan_exact(a, m, sp, image(side=SIDE))


@pytest.mark.parametrize("name", MODELS)
def test_random_plan_contract(name: str, tmp_path) -> None:
    m, sp, a = built(name)
    plan = sp.random_plan(1)
    pruned = apply_plan(m, plan, space=sp)
    x = image(side=SIDE, seed=1)
    y = run(pruned, x)
    assert y.shape == (2, m.num_classes) and torch.isfinite(y).all()
    assert n_params(pruned) == a.param_count(sp, plan) < n_params(m)
    for b in plan.removed:
        assert isinstance(pruned.get_submodule(b), nn.Identity)
    dense = dict(m.named_modules())
    for n, conv in pruned.named_modules():
        if isinstance(conv, nn.Conv2d) and conv.groups > 1:  # whole groups go: group width stays
            ref = dense[n]
            assert isinstance(ref, nn.Conv2d)
            assert conv.in_channels // conv.groups == ref.in_channels // ref.groups
    assert pruned.num_features == pruned.forward_features(x).shape[1]
    contract.assert_exports_and_reloads(pruned, plan, x, y, tmp_path)
    sp2 = space_of(pruned, CFG)
    assert sp2.space_id != sp.space_id and not set(plan.removed) & {b.name for b in sp2.blocks}
    plan2 = sp2.random_plan(2)
    again = apply_plan(pruned, plan2, space=sp2)
    assert n_params(again) == a.param_count(sp2, plan2) and run(again, x).shape == y.shape


def _silence(model: nn.Module, sp: PruningSpace, dim: str, units: list[int]) -> None:
    """Zero everything the layers of ``dim`` write for ``units`` (filters, biases, norm
    parameters and means; not the variances), so those channels are exactly 0."""
    p = sp.handle
    assert isinstance(p, Proto)
    idx = torch.tensor(units)
    with torch.no_grad():
        for layer in p.t.graph.layers:
            mod = model.get_submodule(layer.name)
            for s in layer.rule.slots(mod, layer.attr):
                if p.dim(layer.vars[s.role]) != dim or s.role == "in" or s.path.endswith("running_var"):
                    continue
                t = get_tensor(mod, s.path)
                assert t is not None
                t = t.detach().clone()
                t.index_fill_(s.axis, idx, 0.0)
                set_tensor(mod, s.path, t)


@pytest.mark.parametrize("name", MODELS)
def test_zeroed_units_are_the_ones_removed(name: str) -> None:
    m = make(name)
    a = adapter_for(m)
    sp = a.space(m, CFG)
    p = sp.handle
    assert isinstance(p, Proto)
    classes = p.t.graph.classes()
    root = {n: r for r, n in p.dim_of.items()}
    ok = [d for d in sp.dims if len(d.choices) > 1 and p.t.graph.vars[root[d.name]].gran == 1
          and not any(la.rule.mixes for la in classes[root[d.name]])]
    if not ok:
        pytest.skip(f"every width of {name} passes a channel-mixing layer (LayerNorm, GRN, ECA)")
    # a block's own conv width first (gate reduction widths move the output least)
    d = next((d for d in ok if d.block and not d.name.endswith(".rd")), next((d for d in ok if d.block), ok[0]))
    k = d.size - d.choices[-2]
    zero = list(range(1, d.size, d.size // k))[:k]
    _silence(m, sp, d.name, zero)
    contract.assert_zeroed_removed(a, m, sp, d.name, zero, image(side=SIDE))


@pytest.mark.parametrize("name", MODELS)
def test_taylor_terms(name: str) -> None:
    m, sp, a = built(name)
    m.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    nn.functional.cross_entropy(m(image(2, SIDE)), torch.randint(0, m.num_classes, (2,))).backward()
    try:
        units, blocks = a.taylor_terms(m, sp)
    finally:
        grads = {n: p.grad for n, p in m.named_parameters()}
        m.zero_grad(set_to_none=True)
    assert set(units) == {d.name for d in sp.dims}
    assert all(units[d.name].shape == (d.size,) and np.isfinite(units[d.name]).all() for d in sp.dims)
    assert set(blocks) == {b.name for b in sp.blocks if b.removable}
    assert sum(np.abs(v).sum() for v in units.values()) > 0
    p = sp.handle
    assert isinstance(p, Proto)
    # a width with norms scores the signed sum of gamma*dgamma + beta*dbeta over all of them
    for d in sp.dims:
        gran = next(p.t.graph.vars[r].gran for r, n in p.dim_of.items() if n == d.name)
        norms = [la for la in p.t.graph.layers if la.rule.norm and p.dim(la.vars["out"]) == d.name]
        if gran == 1 and norms:
            want = np.zeros(d.size)
            for la in norms:
                for pn in ("weight", "bias"):
                    w = getattr(m.get_submodule(la.name), pn)
                    g = grads[f"{la.name}.{pn}"]
                    want += (w.detach().double() * g.double()).numpy()
            np.testing.assert_allclose(units[d.name], want, rtol=1e-9, atol=1e-12)
            break
    else:
        pytest.fail("no width with norms to check")


@pytest.mark.parametrize("name", MODELS)
def test_term_modules_run_and_hold_the_parameters(name: str) -> None:
    m, sp, a = built(name)
    with torch.device("meta"):  # as the latency surface counts term parameters
        assert contract.term_params(a, sp) == n_params(m)
    for t, _, widths, module, shape in contract.extreme_terms(a, sp):
        assert any(w in shape for w in widths) or 3 in shape, (t.name, shape, widths)
        out = run(module, torch.randn(1, *shape))
        outs = out if isinstance(out, tuple) else (out,)
        assert all(torch.isfinite(o).all() for o in outs), t.name


@pytest.mark.parametrize(("name", "kwargs", "why"), [
    ("test_efficientnet_gn", {}, r"layer bn1 \(GroupNormAct\) normalises groups of channels"),
    ("mixnet_s", {}, r"operation split at .* splits or concatenates channels"),
    ("efficientnet_b0", {"global_pool": "catavgmax"}, r"global pool global_pool \(catavgmax\) concatenates"),
])
def test_unsupported_variants_name_the_layer(name: str, kwargs: dict, why: str) -> None:
    m = timm.create_model(name, pretrained=False, **kwargs)
    with pytest.raises(UnsupportedModelError, match=f"cannot be pruned: {why}.*Supported:"):
        adapter_for(m)


def test_bad_plans_and_importance_are_refused() -> None:
    from mdp_trt.errors import PlanError

    m, sp, a = built("test_convnext")
    imp = a.magnitude(m, sp)
    other_model = make("convnext_atto")
    other = a.space(other_model, CFG)
    with pytest.raises(PlanError, match="plan is for model 'convnext_atto'"):
        a.apply(m, sp, other.full_plan(), imp)
    with pytest.raises(PlanError, match="not built from this model"):
        a.apply(other_model, sp, sp.full_plan(), imp)
    d = sp.dims[0].name
    with pytest.raises(PlanError, match="has shape"):
        a.apply(m, sp, sp.full_plan(), Importance({**imp.units, d: np.ones(3)}, {}))
    with pytest.raises(PlanError, match="lacks dims"):
        a.apply(m, sp, sp.full_plan(), Importance({}, {}))
    locked = next((b.name for b in sp.blocks if not b.removable), None)
    if locked is not None:
        with pytest.raises(PlanError, match="cannot be removed"):
            sp.plan(removed=[locked])


class _Branchy(nn.Module):
    """A conv whose output decides the path taken: data-dependent control flow."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.sum() > 0:
            return y
        return -y


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 1)
        self.body = _Branchy()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.stem(x))


def test_untraceable_forward_names_the_module() -> None:
    """What torch.fx cannot trace is named: the innermost module, or the model's own forward."""
    from mdp_trt.models.graph import Unsupported
    from mdp_trt.models.trace import trace

    flow = "symbolically traced variables cannot be used as inputs to control flow"
    with pytest.raises(Unsupported, match=rf"^torch.fx cannot trace module body \(_Branchy\): {flow}$"):
        trace(_Net(), 16)
    with pytest.raises(Unsupported, match=rf"^torch.fx cannot trace the forward of _Branchy: {flow}$"):
        trace(_Branchy(), 16)
