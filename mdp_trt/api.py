"""Public entry points: prune a model to a latency target, describe its pruning space, apply a
plan, save and load results."""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import timm
import torch
from torch import nn

from mdp_trt.errors import MdpError, PlanError
from mdp_trt.models import Adapter, Importance, SpaceConfig, adapter_for
from mdp_trt.space import Plan, PruningSpace

if TYPE_CHECKING:
    from mdp_trt.importance import LossFn
    from mdp_trt.pipeline import PruneResult

PRUNED_FORMAT = 1


def create_model(name: str, pretrained: bool = False, checkpoint: str | Path | None = None,
                 resolution: int | None = None, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with one clear error for an unknown name or a checkpoint that does not fit.

    ``resolution`` is passed as ``img_size`` to models whose structure depends on it (ViTs);
    convolutional models take any resolution as they are. A resolution below one pixel, or
    below a patch of a patch-embedding model, is refused before anything is built on it.
    """
    if resolution is not None and resolution < 1:
        raise MdpError(f"resolution must be at least 1 pixel, got {resolution}")
    if name.split(".")[0] not in timm.list_models():
        close = timm.list_models(f"*{name.split('_')[0]}*")[:8]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise MdpError(f"unknown timm model {name!r}{hint}")
    extra: dict[str, Any] = {"img_size": resolution} if resolution else {}
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs, **extra)
    except TypeError as exc:
        if not resolution or "img_size" not in str(exc):
            raise
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    _check_patches(model, name, resolution)
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise MdpError(f"checkpoint {path} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for unreadable files
            raise _unreadable(f"checkpoint {path}", exc) from exc
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise MdpError(f"checkpoint {path} holds no state dict")
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            raise MdpError(f"checkpoint {path} does not fit {name}: {' '.join(first[:3])[:400]}") from exc
    return model


def _check_patches(model: nn.Module, name: str, resolution: int | None) -> None:
    """A patch-embedding model whose input is smaller than one patch has no tokens: refuse it."""
    embed = getattr(model, "patch_embed", None)
    grid = getattr(embed, "grid_size", None)
    if grid is not None and any(int(g) < 1 for g in grid):
        patch = getattr(embed, "patch_size", "?")
        side = tuple(patch)[-1] if isinstance(patch, (tuple, list)) else patch
        raise MdpError(f"{name} at resolution {resolution} has no patches: its patch size is {patch}; "
                       f"give a resolution of at least {side}")


def _unreadable(what: str, exc: Exception) -> MdpError:
    """One line for a file ``torch.load`` cannot read (torch's advice to load without
    ``weights_only`` is not passed on: that would run whatever code the file holds)."""
    if isinstance(exc, pickle.UnpicklingError):
        return MdpError(f"cannot read {what}: not a PyTorch file of tensors and plain containers "
                        "(a corrupt file, or one that holds other objects; save a state_dict)")
    lines = str(exc).strip().splitlines()
    return MdpError(f"cannot read {what}: {lines[0] if lines else type(exc).__name__}")


def space_of(model: nn.Module, config: SpaceConfig | None = None) -> PruningSpace:
    """The pruning space of a timm model (any family in ``mdp_trt.models.FAMILIES``)."""
    return adapter_for(model).space(model, config or SpaceConfig())


def apply_plan(model: nn.Module, plan: Plan, importance: Importance | None = None,
               space: PruningSpace | None = None) -> nn.Module:
    """A new, physically smaller module for ``plan``; ``model`` is not modified.

    With ``importance`` the highest-scoring units of every dim survive; without it, the
    units with the largest weight norm.
    """
    return apply_with(adapter_for(model), model, plan, importance, space)


def apply_with(adapter: Adapter, model: nn.Module, plan: Plan, importance: Importance | None = None,
               space: PruningSpace | None = None) -> nn.Module:
    """:func:`apply_plan` with the model's adapter already looked up."""
    if space is None:
        space = adapter.space(model, _config_of(plan))
    space.validate(plan)
    if importance is None:
        importance = adapter.magnitude(model, space)
    for name, scores in importance.units.items():
        if name in plan.widths and len(scores) != space.dim(name).size:
            raise PlanError(f"importance for {name} has {len(scores)} units, the dim has {space.dim(name).size}")
    pruned = adapter.apply(model, space, plan, importance)
    pruned.mdp_plan = plan.to_dict()  # type: ignore[assignment]
    # The dense model's architecture travels with every pruned one, so save_pruned needs no arch=.
    pruned.mdp_arch = getattr(model, "mdp_arch", None) or adapter.arch(model)  # type: ignore[assignment]
    return pruned


def _config_of(plan: Plan) -> SpaceConfig:
    cfg = plan.meta.get("space_config")
    return SpaceConfig(**cfg) if isinstance(cfg, dict) else SpaceConfig()


def save_pruned(path: str | Path, model: nn.Module, plan: Plan | Sequence[Plan],
                arch: dict[str, Any] | None = None) -> None:
    """Write ``{format, arch, plans, state_dict}`` atomically (temporary file, then rename).

    ``plan`` may be a lineage: plans applied one after another, each to the space of the
    model the previous one produced (iterative prune-then-fine-tune).
    """
    if arch is None:
        arch = getattr(model, "mdp_arch", None)
    if arch is None:
        raise MdpError("save_pruned needs the architecture (arch=...) of the dense model")
    plans = [plan] if isinstance(plan, Plan) else list(plan)
    payload = {
        "format": PRUNED_FORMAT,
        "arch": arch,
        "plans": [p.to_dict() for p in plans],
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    from profilers.export import write_atomic

    buf = io.BytesIO()
    torch.save(payload, buf)
    write_atomic(Path(path), buf.getvalue())


def load_pruned(path: str | Path) -> nn.Module:
    """Rebuild a pruned model from the timm architecture and its plan, then load its weights."""
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise MdpError(f"no pruned model at {path}") from exc
    except Exception as exc:
        raise _unreadable(f"pruned model {path}", exc) from exc
    if not isinstance(payload, dict) or payload.get("format") != PRUNED_FORMAT:
        raise MdpError(f"{path} is not a pruned model written by save_pruned")
    arch = payload["arch"]
    try:
        plans = [Plan.from_dict(p) for p in payload["plans"]]
        pruned = timm.create_model(arch["name"], pretrained=False, **arch.get("kwargs", {}))
    except (KeyError, TypeError) as exc:
        raise MdpError(f"{path} is not a pruned model written by save_pruned: {exc!r}") from exc
    pruned.mdp_arch = arch
    for plan in plans:
        pruned = apply_plan(pruned, plan)
        pruned.mdp_arch = arch
    try:
        pruned.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise MdpError(f"weights in {path} do not fit their plan: {exc}") from exc
    return pruned.eval()


def arch_of(model: nn.Module) -> dict[str, Any]:
    return adapter_for(model).arch(model)


def prune(model: nn.Module | str, target: str, *, engine: str = "onnxruntime",
          data: Iterable[Any] | str | None = None,
          loss_fn: LossFn | None = None, input_size: tuple[int, int, int] | None = None, part: str | None = None,
          out: str | Path | None = None, log: Callable[[str], None] | None = None,
          **options: Any) -> PruneResult:
    """Prune ``model`` (a timm model, its name, or a user's model holding one as ``part``) to
    ``target`` (``2x``, ``50%`` or ``3.2ms``) measured on ``engine``.

    ``data``: any iterable of batches (a DataLoader, a list of ``(x, y)``), from which
    importance is taken with ``loss_fn(model, batch)`` (default: cross-entropy on ``(x, y)``;
    for a part, the loss of the whole model). Without ``data``, the command's ``data`` option
    (``synthetic`` by default). ``input_size``: (channels, height, width) of the input, square.
    ``options``: any other option of the command (:class:`mdp_trt.config.PruneConfig`), e.g.
    ``lut=``, ``max_choices=``, ``tolerance=``. With ``out``, the command's files are written
    there (:meth:`PruneResult.save`). ``log``: progress lines (default: none).
    """
    from mdp_trt.config import PruneConfig
    from mdp_trt.part import Subject
    from mdp_trt.pipeline import Data, build_model, run

    if isinstance(data, str | Path):  # the command's dataset option: fashion-mnist, synthetic or a directory
        options["data"], data = str(data), None
    config = PruneConfig.from_options(**options, target=target, engine=engine)
    if input_size is not None:
        if len(input_size) != 3 or input_size[1] != input_size[2]:
            raise MdpError(f"input_size {tuple(input_size)}: give (channels, side, side) of a square input")
        config.resolution = int(input_size[1])
    torch.manual_seed(config.seed)  # as the command: a named model's initial weights, the data's order
    if isinstance(model, str):
        config.model = model
        if input_size is not None and config.in_chans is None:
            config.in_chans = int(input_size[0])
        model = build_model(config)
    elif not isinstance(model, nn.Module):
        raise MdpError(f"model must be an nn.Module or a timm model name, not {type(model).__name__}")
    subject = Subject(model, part)
    if input_size is not None:
        chans = subject.full_space(SpaceConfig(max_choices=2, resolution=config.resolution)).input_size[0]
        if chans != input_size[0]:
            raise MdpError(f"input_size has {input_size[0]} channels, the model takes {chans}")
    if data is None and part is not None and config.importance == "taylor":
        raise MdpError(f"part={part!r} needs data= (and loss_fn= for a task other than classification): "
                       "importance is taken from the whole model's loss")
    if data is None and loss_fn is not None:
        raise MdpError("loss_fn= needs data= to take the loss on")
    result = run(config, subject, Data(data, loss_fn) if data is not None else None, log=log or (lambda s: None))
    if out is not None:
        result.save(out, force=config.force)
    return result
