"""One adapter for every convolutional family, on the channel graph.

A family plugin (:mod:`mdp_trt.models.families`) says only which model classes it takes and
where their residual blocks are; everything else comes from the graph: dims are the merged
width classes, a block is removable when its output is its input plus a branch (an identity
shortcut), terms are cut at the layers with weights and built by slicing copies of the real
modules, and surgery, parameter counts and importance read the rules' slots.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from timm.layers import SelectAdaptivePool2d
from torch import nn

from mdp_trt.errors import MdpError, PlanError, UnsupportedModelError
from mdp_trt.models import rules
from mdp_trt.models.base import Importance, SpaceConfig
from mdp_trt.models.graph import ChannelGraph, Layer, Unsupported, Val
from mdp_trt.models.resnet import _arch_name, _side, _top_k
from mdp_trt.models.trace import (
    ADDS,
    Cut,
    Traced,
    cut_terms,
    cut_vars,
    describe,
    slice_layer,
    slot_count,
    term_module,
    trace,
)
from mdp_trt.space import Block, Dim, Plan, PruningSpace, Term, aligned_choices, choices_for

WHY_SIDE = 64  # image side of the structural check (shapes do not matter there)


class Family:
    """What a family keeps of its own: the model classes it takes and where its blocks are."""

    name = ""
    classes: tuple[type, ...] = ()
    block_parents: tuple[str, ...] = ()  # glob paths of the containers whose children are blocks

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, self.classes)

    def check(self, model: nn.Module) -> str:
        """Why a model of these classes cannot be handled beyond what the graph finds ('' if fine)."""
        return ""

    def blocks(self, model: nn.Module) -> list[str]:
        """Qualified names of the residual blocks, in forward order (removed ones left out)."""
        return children_of(model, self.block_parents)


_FAMILIES: dict[str, Family] = {}
_F = TypeVar("_F", bound=type[Family])


def family(cls: _F) -> _F:
    """Class decorator registering a :class:`Family` plugin under its ``name``."""
    _FAMILIES[cls.name] = cls()
    return cls


def graph_adapters() -> list[GraphAdapter]:
    import mdp_trt.models.families  # noqa: F401  (registers the plugins)

    return [GraphAdapter(f) for f in _FAMILIES.values()]


def children_of(model: nn.Module, patterns: tuple[str, ...]) -> list[str]:
    """Names of the children of every module whose path matches one of ``patterns`` (globs
    matched per path component: ``stages.*`` matches ``stages.0``, not ``stages.0.1``)."""

    def hit(path: str, pattern: str) -> bool:
        a, b = path.split("."), pattern.split(".")
        return len(a) == len(b) and all(fnmatch.fnmatchcase(x, y) for x, y in zip(a, b, strict=True))

    out: list[str] = []
    for path, mod in model.named_modules():
        if path and any(hit(path, p) for p in patterns):
            out += [f"{path}.{n}" for n, c in mod.named_children() if not isinstance(c, nn.Identity)]
    return out


@dataclass
class Proto:
    """A model read into the graph: dims, blocks and terms, plus what builds term modules."""

    model: nn.Module
    t: Traced
    blocks: list[str]
    dim_of: dict[int, str] = field(default_factory=dict)  # root var -> dim name
    cuts: list[Cut] = field(default_factory=list)
    block_info: dict[str, tuple[bool, str]] = field(default_factory=dict)
    node_block: dict[str, str | None] = field(default_factory=dict)

    def root(self, v: int) -> int:
        return self.t.graph.find(v)

    def dim(self, v: int) -> str | None:
        return self.dim_of.get(self.root(v))

    def layer_block(self, layer: Layer) -> str | None:
        return self.node_block.get(layer.node)


def _build(model: nn.Module, plugin: Family, side: int) -> Proto:
    t = trace(model, side)
    p = Proto(model, t, plugin.blocks(model))
    for n, paths in t.stack.items():
        p.node_block[n] = next((b for b in p.blocks for q in paths if q == b or q.startswith(b + ".")), None)
    g = t.graph
    if t.output is not None and int(getattr(model, "num_classes", 0) or 0) > 0:
        g.fix(t.output.var, f"the task has {g.var(t.output.var).size} classes")
    names: set[str] = set()
    for root, layers in g.classes().items():
        writer = next((la for la in layers if g.find(la.vars.get("out", -1)) == root
                       and g.find(la.vars.get("in", -1)) != root), None)
        inner = next((la for la in layers if g.find(la.vars.get("inner", -1)) == root), None)
        name = f"{inner.name}.rd" if inner and not writer else (writer or layers[0]).key
        while name in names:
            name += "'"
        names.add(name)
        p.dim_of[root] = name
    for b in p.blocks:
        p.block_info[b] = _removable(p, b)
    p.cuts = cut_terms(t, lambda n: p.node_block.get(n))
    return p


def _removable(p: Proto, block: str) -> tuple[bool, str]:
    """Whether ``block`` is x + f(x) (an identity shortcut) with its input's shape, and if not why."""
    t = p.t
    nodes = [n for n, b in p.node_block.items() if b == block and n in t.nodes]
    inside = set(nodes)
    ins = list(dict.fromkeys(a.name for n in nodes for a in t.nodes[n].all_input_nodes
                             if a.name not in inside and isinstance(t.vals.get(a.name), Val)))
    if len(ins) != 1 or not nodes:
        return False, f"block {block} has {len(ins)} inputs"
    x, out = ins[0], nodes[-1]
    if t.shapes.get(out) != t.shapes.get(x):
        return False, f"it changes the shape {t.shapes[x][1:]} -> {t.shapes[out][1:]}: no identity shortcut to keep"

    def alias_of_input(n: str) -> bool:
        node = t.nodes[n]
        if n == x:
            return True
        rule = rules.lookup(t.gm.get_submodule(str(node.target))) if node.op == "call_module" else None
        return n in inside and rule is not None and not rule.cost and alias_of_input(node.all_input_nodes[0].name)

    adds = [n for n in nodes if t.nodes[n].op in ("call_function", "call_method") and t.nodes[n].target in ADDS]
    if any(alias_of_input(a.name) for n in adds for a in t.nodes[n].all_input_nodes):
        return True, ""
    if adds:
        return False, "its shortcut is a projection, not an identity"
    return False, "it has no residual connection"


class GraphAdapter:
    """The :class:`~mdp_trt.models.base.Adapter` of one family plugin, on the channel graph."""

    def __init__(self, plugin: Family) -> None:
        self.plugin = plugin
        self.family = plugin.name

    # -- recognition ---------------------------------------------------------------------

    def matches(self, model: nn.Module) -> bool:
        return self.plugin.matches(model)

    def why_not(self, model: nn.Module) -> str:
        if _arch_name(model) is None:
            return ("it has no timm pretrained_cfg naming its architecture "
                    "(create it with timm.create_model so that it can be rebuilt)")
        why = self.plugin.check(model)
        if why:
            return why
        try:
            _build(model, self.plugin, WHY_SIDE)
        except Unsupported as exc:
            return str(exc)
        except MdpError:
            pass  # too small an image for this model: structure is what is checked here
        return ""

    def _proto(self, model: nn.Module, side: int) -> Proto:
        why = "" if _arch_name(model) else self.why_not(model)
        why = why or self.plugin.check(model)
        if why:
            raise UnsupportedModelError(f"cannot prune {type(model).__name__}: {why}")
        try:
            return _build(model, self.plugin, side)
        except Unsupported as exc:
            raise UnsupportedModelError(f"cannot prune {type(model).__name__}: {exc}") from exc

    def arch(self, model: nn.Module) -> dict[str, Any]:
        name = _arch_name(model)
        if name is None:
            raise UnsupportedModelError(self.why_not(model))
        first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        kwargs: dict[str, Any] = {"num_classes": int(getattr(model, "num_classes", 0) or 0),
                                  "in_chans": first.in_channels}
        pool = next((m for m in model.modules() if isinstance(m, SelectAdaptivePool2d)), None)
        if pool is not None and pool.pool_type not in ("avg", ""):
            kwargs["global_pool"] = pool.pool_type
        return {"name": name, "kwargs": kwargs}

    # -- the space -----------------------------------------------------------------------

    def space(self, model: nn.Module, config: SpaceConfig) -> PruningSpace:
        side = _side(model, config)
        p = self._proto(model, side)
        g = p.t.graph
        classes = g.classes()
        dims: list[Dim] = []
        private: dict[str, list[str]] = {b: [] for b in p.blocks}
        for root, layers in classes.items():
            var, name = g.vars[root], p.dim_of[root]
            step, _ = aligned_choices(var.size, math.lcm(config.min_step, var.gran), config.max_choices)
            if var.gran > 1 and step % var.gran:
                step = var.size
            owners = {p.layer_block(la) for la in layers}
            owner = owners.pop() if len(owners) == 1 else None
            if owner is not None:
                private[owner].append(name)
            dims.append(Dim(name, "channels", var.size, step, choices_for(var.size, step), owner,
                            tuple(dict.fromkeys(la.key for la in layers))))
        blocks = [Block(b, *p.block_info[b], tuple(private[b])) for b in p.blocks]
        terms = []
        for cut in p.cuts:
            roots = [r for r in cut_vars(p.t, cut) if r in p.dim_of]
            if not roots:
                continue  # only fixed widths: no choice changes it
            if len(roots) > 3:
                raise UnsupportedModelError(f"cannot prune {type(model).__name__}: latency term {cut.name} "
                                            f"depends on {len(roots)} widths, at most 3 are handled")
            sym = {r: f"d{i}" for i, r in enumerate(roots)}
            desc = describe(p.t, cut, functools.partial(_symbol, g, sym))
            hw = p.t.shapes[cut.primary][2] if len(p.t.shapes[cut.primary]) == 4 else 1
            terms.append(Term(cut.name, cut.kind, tuple(p.dim_of[r] for r in roots),
                              (("graph", desc), ("in_hw", hw)), cut.block))
        locked = [(b.name, b.reason) for b in blocks if not b.removable]
        fixed = dict.fromkeys(g.vars[g.find(i)].fixed for i in range(len(g.vars)) if g.var(i).fixed)
        locked += [("fixed width", why) for why in fixed]
        space = PruningSpace(_arch_name(model) or "", self.family, dims, blocks, terms,
                             (p.t.in_chans, side, side), locked, dataclasses.asdict(config))
        space.handle = p
        return space

    def _fitting(self, model: nn.Module, space: PruningSpace) -> Proto:
        """The graph of ``model``, checked to be the one ``space`` was built from."""
        p = space.handle
        if isinstance(p, Proto) and p.model is model:
            return p
        p = self._proto(model, space.input_size[1])
        mine = sorted((n, p.t.graph.vars[r].size) for r, n in p.dim_of.items())
        theirs = sorted((d.name, d.size) for d in space.dims)
        if mine != theirs or _arch_name(model) != space.model:
            raise PlanError(f"the pruning space (of {space.model}, id {space.space_id}) was not built "
                            f"from this model ({_arch_name(model)}, {len(mine)} dims)")
        return p

    def term_module(self, space: PruningSpace, term: Term, widths: tuple[int, ...]
                    ) -> tuple[nn.Module, tuple[int, ...]]:
        p = space.handle
        if not isinstance(p, Proto):
            raise MdpError(f"space of {space.model} carries no model to cut term {term.name} from")
        if len(widths) != len(term.dims):
            raise MdpError(f"term {term.name} takes {len(term.dims)} widths, got {widths}")
        cut = next((c for c in p.cuts if c.name == term.name), None)
        if cut is None:
            raise MdpError(f"term {term.name} is not in the graph of {space.model}")
        by_dim = dict(zip(term.dims, (int(w) for w in widths), strict=True))
        g = p.t.graph

        def width(v: int) -> int:
            d = p.dim(v)
            return by_dim[d] if d in by_dim else g.var(v).size

        return term_module(p.t, cut, width)

    # -- importance ----------------------------------------------------------------------

    def _scores(self, model: nn.Module, space: PruningSpace,
                unit: Callable[[nn.Module, Layer, str, rules.Slot], torch.Tensor | None],
                norms_only: bool) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Per unit of every dim, the sum over its layers of ``unit`` per slot; per removable
        block, the sum of its own layers' contributions to widths it shares."""
        p = self._fitting(model, space)
        g = p.t.graph
        classes = g.classes()
        use_norm = {p.dim_of[r]: norms_only and any(la.rule.norm for la in ls) for r, ls in classes.items()}
        units = {d.name: np.zeros(d.size) for d in space.dims}
        blocks = {b.name: 0.0 for b in space.blocks if b.removable}
        with torch.no_grad():
            for layer in g.layers:
                mod = p.t.gm.get_submodule(layer.name)
                for s in layer.rule.slots(mod, layer.attr):
                    d = p.dim(layer.vars[s.role])
                    if d is None or (use_norm[d] and not layer.rule.norm):
                        continue
                    v = unit(mod, layer, s.role, s)
                    if v is None:
                        continue
                    units[d] += v.double().cpu().numpy()
                    b = p.layer_block(layer)
                    if b in blocks and space.dim(d).block != b:
                        blocks[b] += float(v.sum())
        for root, d in p.dim_of.items():
            gran = g.vars[root].gran
            if gran > 1:
                units[d] = np.repeat(units[d].reshape(-1, gran).mean(1), gran)
        return units, blocks

    def magnitude(self, model: nn.Module, space: PruningSpace) -> Importance:
        """Per unit: the norm of everything a layer writes for it (filters, biases, norm
        parameters and means), summed over its layers; a unit whose writers are all zero
        scores exactly 0. A block: the same over its layers on the widths it shares."""

        def unit(mod: nn.Module, layer: Layer, role: str, s: rules.Slot) -> torch.Tensor | None:
            t = rules.get_tensor(mod, s.path)
            if role == "in" or t is None or s.path.endswith("running_var"):
                return None
            return _per_unit(t.detach(), s.axis).pow(2).sum(1).sqrt()

        units, blocks = self._scores(model, space, unit, norms_only=False)
        return Importance(units, blocks)

    def taylor_terms(self, model: nn.Module, space: PruningSpace
                     ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Signed sum of w * dL/dw per unit: over the norms' affine parameters for a width that
        has norms, over every weight touching it otherwise (MLP and gate widths)."""

        def unit(mod: nn.Module, layer: Layer, role: str, s: rules.Slot) -> torch.Tensor | None:
            t = rules.get_tensor(mod, s.path)
            if not isinstance(t, nn.Parameter) or t.grad is None:
                return None
            return _per_unit(t.detach().double() * t.grad.double(), s.axis).sum(1)

        return self._scores(model, space, unit, norms_only=True)

    # -- surgery -------------------------------------------------------------------------

    def apply(self, model: nn.Module, space: PruningSpace, plan: Plan,
              importance: Importance) -> nn.Module:
        p = self._fitting(model, space)
        space.validate(plan)
        g = p.t.graph
        ref = next(model.parameters())
        missing = [d.name for d in space.dims if d.name not in importance.units]
        if missing:
            raise PlanError(f"importance lacks dims {missing[:5]}")
        keep: dict[str, np.ndarray] = {}
        for d in space.dims:
            scores = np.asarray(importance.units[d.name], dtype=np.float64)
            if scores.shape != (d.size,):
                raise PlanError(f"importance for {d.name} has shape {scores.shape}, the dim has {d.size} units")
            gran = next(g.vars[r].gran for r, n in p.dim_of.items() if n == d.name)
            groups = _top_k(scores.reshape(-1, gran).sum(1), plan.widths[d.name] // gran)
            keep[d.name] = (groups[:, None] * gran + np.arange(gran)).reshape(-1)
        idx = {k: torch.as_tensor(v, dtype=torch.long, device=ref.device) for k, v in keep.items()}
        removed = set(plan.removed)
        pruned = copy.deepcopy(model)
        for layer in g.layers:
            if p.layer_block(layer) in removed:
                continue
            cut: dict[str, torch.Tensor | None] = {}
            for role, v in layer.vars.items():
                dn = p.dim(v)
                cut[role] = None if dn is None or len(keep[dn]) == space.dim(dn).size else idx[dn]
            slice_layer(pruned.get_submodule(layer.name), layer, cut)
        for b in removed:
            parent, _, leaf = b.rpartition(".")
            setattr(pruned.get_submodule(parent), leaf, nn.Identity())
        self._fix_attributes(p, pruned, {d: len(v) for d, v in keep.items()})
        for prm in pruned.parameters():
            prm.grad = None
        pruned.mdp_indices = {k: [int(i) for i in v] for k, v in keep.items()}  # type: ignore[assignment]
        pruned.mdp_arch = getattr(model, "mdp_arch", None) or self.arch(model)  # type: ignore[assignment]
        return pruned

    def _fix_attributes(self, p: Proto, pruned: nn.Module, kept: dict[str, int]) -> None:
        """``num_features``, ``head_hidden_size`` and ``feature_info`` at the new widths."""
        t, g = p.t, p.t.graph

        def new(v: int) -> int:
            d = p.dim(v)
            return kept[d] if d is not None else g.var(v).size

        pool = next((n for n, node in t.nodes.items() if node.op == "call_module"
                     and isinstance(t.gm.get_submodule(str(node.target)), SelectAdaptivePool2d | nn.AdaptiveAvgPool2d)), None)
        if pool is not None:
            src = t.vals.get(t.nodes[pool].all_input_nodes[0].name)
            if isinstance(src, Val) and getattr(pruned, "num_features", None) == g.var(src.var).size:
                setattr(pruned, "num_features", new(src.var))  # noqa: B010 (a timm attribute)
        head = [la for la in g.layers if la.rule.anchor and t.output is not None
                and g.find(la.vars["out"]) == g.find(t.output.var)]
        if head and getattr(pruned, "head_hidden_size", None) == g.var(head[-1].vars["in"]).size:
            setattr(pruned, "head_hidden_size", new(head[-1].vars["in"]))  # noqa: B010
        for info in getattr(pruned, "feature_info", []) or []:
            mod = info.get("module") if isinstance(info, dict) else None
            last = [n for n, paths in t.stack.items() if mod and any(q == mod or q.startswith(mod + ".")
                                                                    for q in paths)]
            v = t.vals.get(last[-1]) if last else None
            if isinstance(v, Val) and info.get("num_chs") == g.var(v.var).size:
                info["num_chs"] = new(v.var)

    def param_count(self, space: PruningSpace, plan: Plan) -> int:
        """Every parameter of every kept layer, at the plan's widths (from the rules' slots)."""
        space.validate(plan)
        p = space.handle
        if not isinstance(p, Proto):
            raise MdpError(f"space of {space.model} carries no model to count parameters from")
        t, g = p.t, p.t.graph
        removed = set(plan.removed)

        def widths(layer: Layer) -> dict[str, int]:
            return {r: plan.widths[d] if (d := p.dim(v)) else g.var(v).size for r, v in layer.vars.items()}

        total = 0
        for n, node in t.nodes.items():
            if p.node_block.get(n) in removed:
                continue
            if node.op == "call_module":
                layers = [la for la in t.layers_of.get(n, []) if not la.attr]
                la = layers[0] if layers else None
                total += slot_count(t.gm.get_submodule(str(node.target)), la, widths(la) if la else {})
        for la in g.layers:
            if la.attr and p.layer_block(la) not in removed:
                total += slot_count(t.gm.get_submodule(la.name), la, widths(la))
        return total


def _per_unit(t: torch.Tensor, axis: int) -> torch.Tensor:
    """``t`` as (units along ``axis``, everything else)."""
    return t.movedim(axis, 0).reshape(t.shape[axis], -1)


def _symbol(g: ChannelGraph, sym: dict[int, str], v: int) -> str:
    """A term's name for width variable ``v``: its dim's place, or its size when fixed."""
    return sym.get(g.find(v), str(g.var(v).size))
