"""What one prune job cuts: a timm model, or a timm model held inside a user's model (a part).

A part (``part="backbone"``) is pruned by its own adapter (space, surgery), while everything
else is measured and exported as the whole model: the user's head runs in every latency
measurement, where the calibration's offset takes it in as a fixed part of every plan. The
part's output widths stay as they are, so the user's head still fits the pruned part.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterable

import torch
from torch import nn

from mdp_trt.errors import MdpError, UnsupportedModelError
from mdp_trt.models import Adapter, Importance, SpaceConfig, adapter_for
from mdp_trt.space import Dim, Plan, PruningSpace

FEATURE_WRAPPERS = ("FeatureListNet", "FeatureDictNet", "FeatureHooksNet", "FeatureGetterNet")


class Subject:
    """The whole model ``root`` and the module that is pruned (``root`` itself, or its
    submodule ``part``), with that module's adapter, looked up once."""

    def __init__(self, root: nn.Module, part: str | None = None, adapter: Adapter | None = None) -> None:
        self.root, self.part = root, part
        self.module = root if part is None else part_module(root, part)
        self.adapter = adapter or adapter_for(self.module)
        self.tag = "" if part is None else f"part:{_fingerprint(root, part)}/"
        """Prefix of this subject's whole-model records in a latency table ('' for a timm model)."""
        self._dense: dict[str, tuple[nn.Module, nn.Module]] = {}

    def space(self, config: SpaceConfig, kinds: Iterable[str] | None = None, remove_blocks: bool = True
              ) -> PruningSpace:
        """The space the solver chooses in; a part's output widths are kept."""
        space = self.full_space(config).restricted(kinds, remove_blocks)
        return space if self.part is None else keep_widths(space, self.output_dims(space))

    def full_space(self, config: SpaceConfig) -> PruningSpace:
        """The unrestricted space: the one importance is scored over."""
        return self.adapter.space(self.module, config)

    def cut_module(self, plan: Plan, importance: Importance | None = None, space: PruningSpace | None = None
                   ) -> nn.Module:
        """The pruned module alone, cut to ``plan`` (``module`` is not modified)."""
        from mdp_trt.api import apply_with

        return apply_with(self.adapter, self.module, plan, importance, space)

    def cut(self, plan: Plan, importance: Importance | None = None, space: PruningSpace | None = None
            ) -> nn.Module:
        """The whole model with its pruned module cut to ``plan`` (``root`` is not modified)."""
        pruned = self.cut_module(plan, importance, space)
        if self.part is None:
            return pruned
        return copy.deepcopy(self.root, {id(self.module): pruned})  # every other module copied as it is

    def dense(self, space: PruningSpace, whole: bool = True) -> nn.Module:
        """The whole model (``whole=False``: the pruned module alone) as the adapter rebuilds it
        at the full width of ``space``, in eval mode: the form every measurement runs (the same
        outputs as ``root``, a contract-suite check; some timm modules cannot be exported as
        they are). Built once per space and shared by the calibration, the dense measurement
        and a sweep's comparison, so callers must not modify it."""
        if space.space_id not in self._dense:
            module = self.cut_module(space.full_plan(), space=space).eval()
            model = module if self.part is None else copy.deepcopy(self.root, {id(self.module): module}).eval()
            self._dense[space.space_id] = (module, model)
        module, model = self._dense[space.space_id]
        return model if whole else module

    def after(self, root: nn.Module) -> Subject:
        """The same part of ``root`` (a model this subject's :meth:`cut` returned)."""
        return Subject(root, self.part, self.adapter)

    def output_dims(self, space: PruningSpace) -> list[str]:
        """The dims that set the part's output shape. Every dim is a candidate, a block's own
        ones too: in a stage of one block (timm's ``test_resnet``) the stage's output width is
        that block's. Found by cutting groups of dims to their smallest width at once and
        halving the groups that change the output (narrowing dims that do not set it cannot
        change it), so a deep backbone with one output width costs a few cuts, not one per dim."""
        probe = torch.zeros(1, *space.input_size)
        with torch.no_grad():
            dense = _shapes(self.module.eval()(probe))
            importance = self.adapter.magnitude(self.module, space)

            def changes(names: list[str]) -> bool:
                plan = space.plan({n: space.dim(n).choices[0] for n in names})
                return _shapes(self.adapter.apply(self.module, space, plan, importance).eval()(probe)) != dense

            def find(names: list[str]) -> list[str]:
                if not names or not changes(names):
                    return []
                if len(names) == 1:
                    return names
                half = len(names) // 2
                return find(names[:half]) + find(names[half:])

            return find([d.name for d in space.dims if len(d.choices) > 1])

    def name(self) -> str:
        arch = str(self.adapter.arch(self.module).get("name", type(self.module).__name__))
        return arch if self.part is None else f"{arch} ({type(self.root).__name__}.{self.part})"


def part_module(root: nn.Module, part: str) -> nn.Module:
    """``root``'s submodule ``part``, or one clear error naming what is there instead."""
    try:
        module = root.get_submodule(part)
    except AttributeError:
        children = ", ".join(n for n, _ in root.named_children()) or "none"
        raise MdpError(f"{type(root).__name__} has no submodule {part!r} (its children: {children})") from None
    if type(module).__name__ in FEATURE_WRAPPERS:
        raise UnsupportedModelError(
            f"{part} is a timm {type(module).__name__} (features_only=True), whose layers the adapters do "
            "not read; create the backbone with num_classes=0 (and global_pool='' for a feature map) and "
            "call it, or its forward_features, in your forward")
    return module


def keep_widths(space: PruningSpace, names: Iterable[str]) -> PruningSpace:
    """``space`` with the dims ``names`` held at their full width."""
    keep = set(names)
    dims = [Dim(d.name, d.kind, d.size, d.size, (d.size,), d.block, d.layers) if d.name in keep else d
            for d in space.dims]
    locked = list(space.locked) + [(n, "output width of the pruned part (the head reads it)") for n in sorted(keep)]
    return PruningSpace(space.model, space.family, dims, space.blocks, space.terms, space.input_size,
                        locked, dict(space.config), space.handle)


def _shapes(out: object) -> list[tuple[int, ...]]:
    if isinstance(out, torch.Tensor):
        return [tuple(out.shape)]
    if isinstance(out, dict):
        return [s for k in sorted(out) for s in _shapes(out[k])]
    if isinstance(out, list | tuple):
        return [s for o in out for s in _shapes(o)]
    return []


def _fingerprint(root: nn.Module, part: str) -> str:
    """What a whole-model measurement depends on besides the part: the rest of the model's
    class and parameter shapes."""
    rest = sorted((n, tuple(p.shape)) for n, p in root.named_parameters() if not n.startswith(f"{part}."))
    return hashlib.sha1(repr((type(root).__qualname__, part, rest)).encode()).hexdigest()[:12]
