"""A residual block's share of its stage's width: the graph adapter's scores (checked on
resnet18 against folded conv+BN and BN Taylor terms computed here, and on every other family
for what they must add up to), and the solver's problem built from them (removing a block
loses its share of the units kept)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers_resnet import SIDE, image, make
from torch import nn

from mdp_trt.importance import taylor, with_floor
from mdp_trt.models import adapter_for
from mdp_trt.models.base import Importance, SpaceConfig
from mdp_trt.models.generic import graph_adapters
from mdp_trt.optimize import problem, solve_plan
from mdp_trt.space import PruningSpace
from mdp_trt.surface import LatencySurface

torch.set_num_threads(1)

A = next(a for a in graph_adapters() if a.family == "resnet")
CFG = SpaceConfig(resolution=SIDE)
# resnet18: the writers of each residual width that no removable block owns
LOCKED_WRITERS = {"layer1.res": [("conv1", "bn1")],
                  **{f"layer{i}.res": [(f"layer{i}.0.conv2", f"layer{i}.0.bn2"),
                                       (f"layer{i}.0.downsample.0", f"layer{i}.0.downsample.1")]
                     for i in (2, 3, 4)}}


def folded(model: nn.Module, conv: str, bn: str) -> np.ndarray:
    """|folded filter|_2 + |folded bias| per output channel, computed here from the modules."""
    c, b = model.get_submodule(conv), model.get_submodule(bn)
    with torch.no_grad():
        scale = b.weight / torch.sqrt(b.running_var + b.eps)
        shift = b.bias - b.running_mean * scale
        return (c.weight.flatten(1).norm(dim=1) * scale.abs() + shift.abs()).double().numpy()


def bn_term(model: nn.Module, bn: str) -> np.ndarray:
    b = model.get_submodule(bn)
    return (b.weight.detach().double() * b.weight.grad.double() + b.bias.detach().double() * b.bias.grad.double()).numpy()


def removable(space: PruningSpace) -> list[str]:
    return [b.name for b in space.blocks if b.removable]


def test_magnitude_shares_split_the_residual_scores() -> None:
    """Each removable block owns its last conv's scores on its stage's width; what no block
    owns is exactly the locked writers' scores; ``blocks`` is the share's total."""
    m = make("resnet18")
    sp = A.space(m, CFG)
    imp = A.magnitude(m, sp)
    assert set(imp.block_shares) == set(removable(sp)) == {"layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"}
    for b in removable(sp):
        ((dim, share),) = imp.block_shares[b].items()
        assert dim == b.split(".")[0] + ".res"
        np.testing.assert_allclose(share, folded(m, f"{b}.conv2", f"{b}.bn2"), rtol=1e-6)
        assert imp.blocks[b] == pytest.approx(share.sum())
    for dim, writers in LOCKED_WRITERS.items():
        owned = sum(per[dim] for per in imp.block_shares.values() if dim in per)
        np.testing.assert_allclose(imp.units[dim] - owned, sum(folded(m, c, b) for c, b in writers),
                                   rtol=1e-6, atol=1e-9)


def test_taylor_shares_split_each_batch_score_among_its_writers() -> None:
    """Per batch a unit's score |sum of terms| is split by the writers' |term|; the shares of
    the removable blocks never exceed the unit's score, and average over batches like it."""
    m = make("resnet18")
    m.eval()
    sp = A.space(m, CFG)
    torch.manual_seed(0)
    batches = [(image(2, seed=i), torch.randint(0, 1000, (2,))) for i in range(2)]
    expected: dict[str, dict[str, np.ndarray]] = {}
    units = {"layer1.res": np.zeros(64), "layer2.res": np.zeros(128)}
    for x, y in batches:
        m.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(m(x), y).backward()
        writers = {"layer1.res": ["bn1", "layer1.0.bn2", "layer1.1.bn2"],
                   "layer2.res": ["layer2.0.bn2", "layer2.0.downsample.1", "layer2.1.bn2"]}
        for dim, bns in writers.items():
            terms = {bn: bn_term(m, bn) for bn in bns}
            score = np.abs(sum(terms.values()))
            units[dim] += score / len(batches)
            spread = sum(np.abs(t) for t in terms.values())
            for bn in bns[1:]:
                block = bn.rsplit(".", 1)[0]
                if block in removable(sp):
                    share = expected.setdefault(block, {}).setdefault(dim, np.zeros(len(score)))
                    frac = np.divide(np.abs(terms[bn]), spread, out=np.zeros(len(score)), where=spread > 0)
                    share += score * frac / len(batches)
    m.zero_grad(set_to_none=True)
    imp = taylor(m, sp, batches, len(batches))
    for dim in units:
        np.testing.assert_allclose(imp.units[dim], units[dim], rtol=1e-6)
        owned = sum(per[dim] for per in imp.block_shares.values() if dim in per)
        assert (owned <= imp.units[dim] * (1 + 1e-9)).all() and owned.sum() > 0
    for block, per in expected.items():
        np.testing.assert_allclose(imp.block_shares[block][next(iter(per))], next(iter(per.values())), rtol=1e-6)
        assert imp.blocks[block] == pytest.approx(sum(v.sum() for v in imp.block_shares[block].values()))
    floored = with_floor(imp)
    assert floored.block_shares.keys() == imp.block_shares.keys()


def zero_surface(space: PruningSpace) -> LatencySurface:
    arrays = {t.name: np.zeros(tuple(len(space.dim(n).choices) for n in t.dims)) for t in space.terms}
    return LatencySurface(space, arrays, dict.fromkeys(arrays, 0))


def test_problem_loses_a_removed_blocks_share_of_the_units_kept() -> None:
    """The solver's importance of a plan, against the definition computed here: every dim's
    top-k units, less each removed block's share of its width's top-k; without shares the
    problem is the fixed-value one it always was."""
    m = make("resnet18")
    sp = A.space(m, CFG)
    imp = A.magnitude(m, sp)
    prob = problem(sp, zero_surface(sp), imp)
    assert {(v.block, v.dim) for v in prob.values} == {(b, b.split(".")[0] + ".res") for b in removable(sp)}
    plans = [sp.random_plan(seed) for seed in range(12)]
    assert any(p.removed for p in plans)
    for plan in plans:
        expected = 0.0
        for d in sp.dims:
            if d.block in plan.removed:
                continue
            top = np.argsort(-imp.units[d.name], kind="stable")[:plan.widths[d.name]]
            expected += imp.units[d.name][top].sum()
            expected -= sum(imp.block_shares[b][d.name][top].sum() for b in plan.removed
                            if d.name in imp.block_shares.get(b, {}))
        assert prob.objective(plan.widths, plan.removed) == pytest.approx(expected, rel=1e-9)
    plain = problem(sp, zero_surface(sp), Importance(imp.units, imp.blocks))
    assert not plain.values
    assert all(np.array_equal(d.value, imp.cumulative(d.name, d.choices)) for d in plain.dims)
    assert {b.name: b.value for b in plain.blocks if b.removable} == {b: imp.blocks[b] for b in removable(sp)}


def test_a_plan_cut_short_by_the_time_limit_is_kept_with_its_status() -> None:
    m = make("resnet18")
    sp = A.space(m, CFG)
    plan, sol = solve_plan(sp, zero_surface(sp), A.magnitude(m, sp), 1.0, time_limit_s=0.0)
    assert sol.status == "time_limit" and plan is not None
    assert plan.meta["solver_status"] == "time_limit" and plan.meta["gap"] is None
    sp.validate(plan)
    plan, sol = solve_plan(sp, zero_surface(sp), A.magnitude(m, sp), 1.0)
    assert sol.status == "optimal" and plan is not None and plan.meta["solver_status"] == "optimal"
    assert plan.widths == {d.name: d.size for d in sp.dims} and not plan.removed  # latency is free here


@pytest.mark.parametrize("name", ["test_convnext", "efficientnet_b0", "regnety_002", "resnext26ts", "seresnet18"])
def test_every_family_gives_shares_that_add_up(name: str) -> None:
    """On every family, a removable block's shares are per unit of widths it does not own,
    never more than the units' scores together, and total its ``blocks`` value; Taylor
    fractions of a width's score split it among its writers (at most 1 in all)."""
    m = make(name)
    a = adapter_for(m)
    sp = a.space(m, CFG)
    imp = a.magnitude(m, sp)
    shared = [b for b in removable(sp) if b in imp.block_shares]
    assert shared, "no removable block writes into a shared width"
    for b in shared:
        for d, share in imp.block_shares[b].items():
            assert sp.dim(d).block != b and share.shape == (sp.dim(d).size,) and (share >= 0).all()
        assert imp.blocks[b] == pytest.approx(sum(v.sum() for v in imp.block_shares[b].values()))
    for d in {d for per in imp.block_shares.values() for d in per}:
        owned = sum(per[d] for per in imp.block_shares.values() if d in per)
        assert (owned <= imp.units[d] * (1 + 1e-9) + 1e-12).all()
    torch.manual_seed(0)
    m.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(m(image(2)), torch.randint(0, 1000, (2,))).backward()
    units, blocks, fractions = a.taylor_shares(m, sp)
    m.zero_grad(set_to_none=True)
    assert set(fractions) == set(shared) and set(blocks) == set(removable(sp))
    for d in {d for per in fractions.values() for d in per}:
        total = sum(per[d] for per in fractions.values() if d in per)
        assert (total <= 1 + 1e-9).all() and total.max() > 0
    imp = taylor(m, sp, [(image(2), torch.randint(0, 1000, (2,)))], 1)
    prob = problem(sp, zero_surface(sp), imp)
    assert {v.block for v in prob.values} == set(shared)
