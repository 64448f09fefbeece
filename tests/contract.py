"""Checks that every family's pruning-contract tests (graph, transformer, Swin) share."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from helpers_resnet import rel_diff
from torch import nn

from mdp_trt import load_pruned, save_pruned
from mdp_trt.models.base import Importance
from mdp_trt.space import Plan, PruningSpace, Term
from profilers.export import export_onnx


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def ort_run(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """``model`` exported to ONNX and run on ``x`` by ONNX Runtime on one CPU thread."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(export_onnx(model, tuple(x.shape)), opts, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"input": x.numpy()})[0])


def state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def assert_full_plan_exact(a: Any, m: nn.Module, sp: PruningSpace, x: torch.Tensor) -> nn.Module:
    """The full plan computes exactly what the model does and keeps every parameter."""
    full = a.apply(m, sp, sp.full_plan(), a.magnitude(m, sp))
    assert torch.equal(run(full, x), run(m, x))
    assert n_params(full) == n_params(m) == a.param_count(sp, sp.full_plan())
    return full


def assert_exports_and_reloads(pruned: nn.Module, plan: Plan, x: torch.Tensor, y: torch.Tensor,
                               tmp_path: Path) -> None:
    """ONNX Runtime agrees with ``y`` within 1e-4; a save and load gives the same model back."""
    assert rel_diff(ort_run(pruned, x), y.numpy()) < 1e-4
    save_pruned(tmp_path / "p.pt", pruned, plan)  # no arch=: the pruned model carries it
    back = load_pruned(tmp_path / "p.pt")
    assert state_equal(back, pruned) and torch.equal(run(back, x), y)


def assert_zeroed_removed(a: Any, m: nn.Module, sp: PruningSpace, dim: str, zero: list[int],
                          x: torch.Tensor) -> None:
    """With units ``zero`` of ``dim`` silenced in ``m``: magnitude scores exactly them 0, the
    plan one choice down removes them and leaves the output unchanged, and keeping the
    others instead changes it (so the check can fail)."""
    d = sp.dim(dim)
    imp = a.magnitude(m, sp)
    assert sorted(np.flatnonzero(imp.units[d.name] == 0).tolist()) == zero
    plan = sp.plan({d.name: d.choices[-2]})
    pruned = a.apply(m, sp, plan, imp)
    assert pruned.mdp_indices[d.name] == [i for i in range(d.size) if i not in zero]
    ref = run(m, x)
    assert rel_diff(run(pruned, x).numpy(), ref.numpy()) < 1e-5
    other = a.apply(m, sp, plan, Importance({k: -v for k, v in imp.units.items()}, {}))
    assert rel_diff(run(other, x).numpy(), ref.numpy()) > 1e-5


def term_params(a: Any, sp: PruningSpace) -> int:
    """Parameters of every term module at full width (together: the model's)."""
    full = sp.full_plan()
    return sum(n_params(a.term_module(sp, t, sp.term_widths(t, full))[0]) for t in sp.terms)


def extreme_terms(a: Any, sp: PruningSpace
                  ) -> Iterator[tuple[Term, int, tuple[int, ...], nn.Module, tuple[int, ...]]]:
    """``(term, pick, widths, module, input shape)`` for each distinct term signature at its
    smallest (pick 0) and largest (pick -1) widths."""
    seen: set[str] = set()
    for t in sp.terms:
        if t.signature in seen:
            continue
        seen.add(t.signature)
        for pick in (0, -1):
            widths = tuple(sp.dim(d).choices[pick] for d in t.dims)
            module, shape = a.term_module(sp, t, widths)
            yield t, pick, widths, module, shape
