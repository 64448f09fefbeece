"""Importance of every unit of every dim, and of every block.

``taylor``: first-order Taylor, |sum of w * dL/dw| over what a unit owns (on normalisation
layers for convolution channels), accumulated over batches and averaged, as MDP does. Where
a block's layer writes into a shared width (a residual block's last layer), the block's share
of each unit's score is accumulated too (split among the writers by their |term|), so that
removing the block loses its share of the units kept.
``magnitude``: weight norms. ``random``: seeded noise, for ablations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from mdp_trt.errors import MdpError
from mdp_trt.models import Adapter, Importance, adapter_for
from mdp_trt.space import PruningSpace

METHODS = ("taylor", "magnitude", "random")

LossFn = Callable[[nn.Module, Any], torch.Tensor]
"""``loss_fn(model, batch)``: the scalar loss of one batch."""


def cross_entropy(model: nn.Module, batch: Any) -> torch.Tensor:
    """The default loss: classification of ``(images, labels)`` batches."""
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def taylor(model: nn.Module, space: PruningSpace, batches: Iterable[Any], num_batches: int,
           progress: bool = False, *, adapter: Adapter | None = None, root: nn.Module | None = None,
           loss_fn: LossFn | None = None) -> Importance:
    """Average over ``num_batches`` of the per-batch absolute Taylor terms.

    The loss is ``loss_fn(root, batch)`` (default: cross-entropy on ``(x, y)`` batches);
    ``root`` is the whole model when ``model`` is a part of it, so the gradients on the
    part's weights are those of the user's task. The model's weights and normalisation
    statistics are left as they were: gradients are taken in eval mode and cleared afterwards.
    """
    adapter = adapter or adapter_for(model)
    whole = model if root is None else root
    loss_of = loss_fn or cross_entropy
    with_shares = getattr(adapter, "taylor_shares", None)  # adapters whose blocks own part of a shared width
    was_training = whole.training
    whole.eval()
    units = {d.name: np.zeros(d.size) for d in space.dims}
    blocks = {b.name: 0.0 for b in space.blocks if b.removable}
    shares: dict[str, dict[str, np.ndarray]] = {}
    seen = 0
    it = iter(batches)
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        task = bar.add_task("importance (taylor)", total=num_batches)
    try:
        while seen < num_batches:
            try:
                batch = next(it)
            except StopIteration:
                break
            whole.zero_grad(set_to_none=True)
            loss = loss_of(whole, batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
                raise MdpError("loss_fn(model, batch) must return a scalar tensor that depends on the model")
            loss.backward()
            if with_shares is not None:
                u, b, fractions = with_shares(model, space)
            else:
                (u, b), fractions = adapter.taylor_terms(model, space), {}
            for k, v in u.items():
                units[k] += np.abs(v)
            for k, v in b.items():
                if k in blocks:  # adapters may score blocks that cannot be removed: no use here
                    blocks[k] += abs(float(v))
            for blk, per_dim in fractions.items():  # the block's part of this batch's unit scores
                for d, frac in per_dim.items():
                    own = shares.setdefault(blk, {}).setdefault(d, np.zeros(len(frac)))
                    own += frac * np.abs(u[d])
            seen += 1
            if bar is not None:
                bar.update(task, advance=1)
    finally:
        if bar is not None:
            bar.stop()
        whole.zero_grad(set_to_none=True)
        whole.train(was_training)
    if seen == 0:
        raise MdpError("no data to estimate importance from")
    block_shares = {b: {d: v / seen for d, v in per_dim.items()} for b, per_dim in shares.items()}
    blocks = {k: v / seen for k, v in blocks.items()}
    blocks.update({b: float(sum(v.sum() for v in per_dim.values())) for b, per_dim in block_shares.items()})
    return Importance({k: v / seen for k, v in units.items()}, blocks, block_shares)


def random_importance(space: PruningSpace, seed: int = 0) -> Importance:
    rng = np.random.default_rng(seed)
    return Importance(
        {d.name: rng.random(d.size) for d in space.dims},
        {b.name: float(rng.random()) for b in space.blocks if b.removable},
    )


def estimate(method: str, model: nn.Module, space: PruningSpace, batches: Iterable[Any] | None = None,
             num_batches: int = 0, seed: int = 0, progress: bool = False, *, adapter: Adapter | None = None,
             root: nn.Module | None = None, loss_fn: LossFn | None = None) -> Importance:
    """Importance by ``method`` (one of :data:`METHODS`); ``root`` and ``loss_fn`` as in :func:`taylor`."""
    if method == "taylor":
        if batches is None:
            raise MdpError("taylor importance needs data")
        imp = taylor(model, space, batches, num_batches, progress=progress, adapter=adapter, root=root,
                     loss_fn=loss_fn)
    elif method == "magnitude":
        imp = (adapter or adapter_for(model)).magnitude(model, space)
    elif method == "random":
        imp = random_importance(space, seed)
    else:
        raise MdpError(f"unknown importance {method!r}; accepted: {', '.join(METHODS)}")
    return with_floor(imp)


def with_floor(imp: Importance, rel: float = 1e-3) -> Importance:
    """Every unit worth at least ``rel`` times the mean positive score.

    Scores of exactly zero are common (timm zero-initialises the last norm of every residual
    block, so a fresh model's residual widths score 0); with a flat objective the solver may
    drop such units for nothing. The floor breaks those ties towards keeping units, and is
    far too small to outweigh any real score.
    """
    pos = np.concatenate([v[v > 0] for v in imp.units.values()] + [np.zeros(0)])
    floor = rel * (float(pos.mean()) if pos.size else 1.0)
    return Importance({k: np.maximum(v, 0.0) + floor for k, v in imp.units.items()}, dict(imp.blocks),
                      {b: dict(per_dim) for b, per_dim in imp.block_shares.items()})
