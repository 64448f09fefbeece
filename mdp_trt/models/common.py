"""Helpers every adapter shares: a timm model's name and input side, top-k selection, Taylor
sums of ``w * dL/dw``; the checks, importance sums and surgery the transformer adapters share."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import numpy as np
import torch
from torch import nn

from mdp_trt.errors import MdpError, PlanError, UnsupportedModelError
from mdp_trt.models.base import Importance, SpaceConfig
from mdp_trt.space import Dim, Plan, PruningSpace

DEFAULT_SIDE = 224  # input side when neither the config nor the model's pretrained_cfg gives one


def arch_name(model: nn.Module) -> str | None:
    """The timm architecture name in the model's pretrained_cfg (what rebuilds it), or None."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    name = cfg.get("architecture") if isinstance(cfg, dict) else None
    return str(name) if name else None


def input_side(model: nn.Module, config: SpaceConfig) -> int:
    """The square input side terms are built for: the config's, else the model's own."""
    if config.resolution is not None:
        if config.resolution < 1:
            raise MdpError(f"resolution must be a positive number of pixels, got {config.resolution}")
        return int(config.resolution)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return int(size[-2]) if size else DEFAULT_SIDE


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores, ascending; ties go to the lower index."""
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf)
    return np.sort(np.argsort(-s, kind="stable")[:k])


def weight_grad(p: nn.Parameter) -> torch.Tensor | None:
    """``w * dL/dw`` in double precision, or None where the parameter has no gradient."""
    return None if p.grad is None else p.detach().double() * p.grad.double()


def signed_taylor(model: nn.Module, names: Iterable[str | None]) -> float:
    """The signed sum of ``w * dL/dw`` over the named parameters of ``model`` (a None name,
    or a parameter without a gradient, adds nothing)."""
    total = 0.0
    for name in names:
        t = None if name is None else weight_grad(model.get_parameter(name))
        if t is not None:
            total += float(t.sum())
    return total


# -- what the transformer adapters (vit, eva, swin) share -----------------------------------

Reducer = Callable[[torch.Tensor], torch.Tensor]
Info = TypeVar("Info")


class Unsupported(Exception):
    """Something in the model that the adapter cannot handle (the message says what)."""


def why_not(read: Callable[[nn.Module], object], model: nn.Module) -> str:
    """What ``read`` found that blocks ``model`` ('' if nothing)."""
    try:
        read(model)
    except Unsupported as exc:
        return str(exc)
    return ""


def require(read: Callable[[nn.Module], Info], model: nn.Module) -> Info:
    """``read(model)``, or the public error naming what blocked it."""
    try:
        return read(model)
    except Unsupported as exc:
        raise UnsupportedModelError(f"cannot prune {type(model).__name__}: {exc}") from exc


def check_config(config: SpaceConfig, name: str, img: tuple[int, int], why: str = "") -> None:
    """The config's steps and choice count must be positive, and its resolution (if any) the
    model's image size ``img``, fixed when the model was created (``why`` opens that message)."""
    for f in ("min_step", "max_choices", "head_step", "per_head_step"):
        if getattr(config, f) < 1:
            raise MdpError(f"space config {f} must be >= 1, got {getattr(config, f)}")
    r = config.resolution
    if r is not None and (r, r) != img:
        raise MdpError(
            f"{why}this {name} takes {img[0]}x{img[1]} images, resolution {r} was asked; "
            f"create the model with img_size={r}"
        )


def check_fits(
    space: PruningSpace,
    family: str,
    name: str,
    dims: list[tuple[str, int]],
    input_size: tuple[int, ...],
) -> None:
    """Raise unless ``space`` was built from a model of this family, name, dims and input."""
    if (
        dims != [(d.name, d.size) for d in space.dims]
        or name != space.model
        or space.family != family
        or input_size != tuple(space.input_size)
    ):
        raise PlanError(
            f"the pruning space (of {space.model}, id {space.space_id}) was not built "
            f"from this model ({name}, {len(dims)} dims)"
        )


def kept_units(
    space: PruningSpace,
    plan: Plan,
    importance: Importance,
    select: Callable[[Dim, np.ndarray, int], np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Per dim, the indices of the units ``plan`` keeps: ``select(dim, scores, width)``, by
    default the top-scoring ones. Checks the plan and that importance covers every dim."""
    space.validate(plan)
    missing = [d.name for d in space.dims if d.name not in importance.units]
    if missing:
        raise PlanError(f"importance lacks dims {missing[:5]}")
    keep: dict[str, np.ndarray] = {}
    for d in space.dims:
        scores = np.asarray(importance.units[d.name])
        if scores.shape != (d.size,):
            raise PlanError(
                f"importance for {d.name} has shape {scores.shape}, the dim has {d.size} units"
            )
        k = plan.widths[d.name]
        keep[d.name] = top_k(scores, k) if select is None else select(d, scores, k)
    return keep


def mark_pruned(pruned: nn.Module, keep: dict[str, np.ndarray], arch: dict[str, Any]) -> None:
    """Drop the gradients copied from the dense model and record what was kept
    (``mdp_indices``) and the dense architecture (``mdp_arch``) that ``load_pruned`` rebuilds."""
    for p in pruned.parameters():
        p.grad = None
    target: Any = pruned  # plain attributes, which nn.Module's typing does not declare
    target.mdp_indices = {k: [int(i) for i in v] for k, v in keep.items()}
    target.mdp_arch = arch


def unit_sums(
    model: nn.Module,
    sizes: dict[str, int],
    owners: dict[str, list[tuple[str, Reducer]]],
    f: Callable[[nn.Parameter], torch.Tensor | None],
) -> dict[str, np.ndarray]:
    """Per dim (``sizes`` gives its units), the per-unit sums of ``f(param)`` over the
    parameters its units own; ``owners`` lists them, each with how it reduces to the units."""
    params = dict(model.named_parameters())
    out = {}
    with torch.no_grad():
        for dim, items in owners.items():
            acc = torch.zeros(sizes[dim], dtype=torch.float64)
            for pname, red in items:
                t = f(params[pname])
                if t is not None:
                    acc += red(t).cpu()
            out[dim] = acc.numpy()
    return out


@torch.no_grad()
def residual_norm(model: nn.Module, outputs: Iterable[tuple[str, str | None, str | None]]) -> float:
    """Summed over output channels, the L2 norm of each output row (weight and bias) of the
    layers ``(weight, bias, gain)`` writing a block's residual branches, times ``|gain|``
    where a layer scale follows: how much the block writes into the residual stream."""
    score = 0.0
    for w, b, g in outputs:
        pw = model.get_parameter(w).detach().double()
        rows = pw.reshape(pw.shape[0], -1).pow(2).sum(1)
        if b is not None:
            rows = rows + model.get_parameter(b).detach().double().pow(2)
        norm = rows.sqrt()
        if g is not None:
            norm = norm * model.get_parameter(g).detach().double().abs()
        score += float(norm.sum())
    return score


# -- surgery -------------------------------------------------------------------------------


def new_param(p: torch.Tensor, value: torch.Tensor) -> nn.Parameter:
    """A parameter holding a copy of ``value``, trainable as ``p`` was."""
    return nn.Parameter(value.clone(), requires_grad=p.requires_grad)


@torch.no_grad()
def slice_linear(
    lin: nn.Linear, out: torch.Tensor | None = None, inp: torch.Tensor | None = None
) -> None:
    """Keep output rows ``out`` (and bias entries) and input columns ``inp`` of ``lin``."""
    w = lin.weight
    if out is not None:
        w = w.index_select(0, out)
        if lin.bias is not None:
            lin.bias = new_param(lin.bias, lin.bias.index_select(0, out))
    if inp is not None:
        w = w.index_select(1, inp)
    lin.weight = new_param(lin.weight, w)
    lin.out_features, lin.in_features = w.shape


@torch.no_grad()
def slice_vector(module: nn.Module, names: tuple[str, ...], idx: torch.Tensor) -> None:
    """Keep entries ``idx`` of the 1-D parameters ``names`` of ``module`` (those that exist)."""
    for pname in names:
        p = getattr(module, pname, None)
        if isinstance(p, nn.Parameter):
            setattr(module, pname, new_param(p, p.index_select(0, idx)))
    if hasattr(module, "normalized_shape"):
        # a plain attribute that nn.Module does not declare, hence setattr
        setattr(module, "normalized_shape", (len(idx),))  # noqa: B010
