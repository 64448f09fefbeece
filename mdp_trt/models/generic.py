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
import timm
import torch
from timm.layers import DropPath, SelectAdaptivePool2d
from torch import nn

from mdp_trt.errors import MdpError, PlanError, UnsupportedModelError
from mdp_trt.models import rules
from mdp_trt.models.base import Importance, SpaceConfig
from mdp_trt.models.common import arch_name, input_side, top_k
from mdp_trt.models.graph import ChannelGraph, Layer, Unsupported, Val
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

    def dim_names(self, p: Proto) -> dict[int, str]:
        """Names the family gives some dims (root var -> name), where the graph's default
        (the layer that writes the width) would hide what the width is."""
        return {}


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

    def output_of(self, path: str) -> int | None:
        """Root width variable of what module ``path`` returns (its last node's), if it has one."""
        last = [n for n, paths in self.t.stack.items() if any(q == path or q.startswith(path + ".")
                                                              for q in paths)]
        v = self.t.vals.get(last[-1]) if last else None
        return self.root(v.var) if isinstance(v, Val) else None


def _build(model: nn.Module, plugin: Family, side: int) -> Proto:
    t = trace(model, side)
    p = Proto(model, t, plugin.blocks(model))
    for n, paths in t.stack.items():
        p.node_block[n] = next((b for b in p.blocks for q in paths if q == b or q.startswith(b + ".")), None)
    g = t.graph
    if t.output is not None and int(getattr(model, "num_classes", 0) or 0) > 0:
        g.fix(t.output.var, f"the task has {g.var(t.output.var).size} classes")
    classes = g.classes()
    p.dim_of = {r: n for r, n in plugin.dim_names(p).items() if r in classes}
    names = set(p.dim_of.values())
    for root, layers in classes.items():
        if root in p.dim_of:
            continue
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
    a, b = t.shapes.get(x, ()), t.shapes.get(out, ())
    if a != b:
        changes = [f"the width {a[1]}->{b[1]}"] if len(a) > 1 and len(b) > 1 and a[1] != b[1] else []
        changes += [f"the feature map {a[2]}->{b[2]}"] if len(a) == len(b) == 4 and a[2:] != b[2:] else []
        what = " and ".join(changes) or f"the shape {a[1:]}->{b[1:]}"
        return False, f"it changes {what}: no identity shortcut to keep"

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
        if arch_name(model) is None:
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
        why = "" if arch_name(model) else self.why_not(model)
        why = why or self.plugin.check(model)
        if why:
            raise UnsupportedModelError(f"cannot prune {type(model).__name__}: {why}")
        try:
            return _build(model, self.plugin, side)
        except Unsupported as exc:
            raise UnsupportedModelError(f"cannot prune {type(model).__name__}: {exc}") from exc

    def arch(self, model: nn.Module) -> dict[str, Any]:
        name = arch_name(model)
        if name is None:
            raise UnsupportedModelError(self.why_not(model))
        first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        kwargs: dict[str, Any] = {"num_classes": int(getattr(model, "num_classes", 0) or 0),
                                  "in_chans": first.in_channels}
        pool = next((m for m in model.modules() if isinstance(m, SelectAdaptivePool2d)), None)
        if pool is not None and pool.pool_type != "avg":  # "" too: a backbone returning its feature map
            kwargs["global_pool"] = pool.pool_type
        why = _rebuild_differs(model, name, kwargs)
        if why:
            raise UnsupportedModelError(f"timm.create_model({name!r}, **{kwargs}) would not rebuild this "
                                        f"{type(model).__name__}: {why}; pass arch= to save_pruned")
        return {"name": name, "kwargs": kwargs}

    # -- the space -----------------------------------------------------------------------

    def space(self, model: nn.Module, config: SpaceConfig) -> PruningSpace:
        side = input_side(model, config)
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
        space = PruningSpace(arch_name(model) or "", self.family, dims, blocks, terms,
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
        if mine != theirs or arch_name(model) != space.model:
            raise PlanError(f"the pruning space (of {space.model}, id {space.space_id}) was not built "
                            f"from this model ({arch_name(model)}, {len(mine)} dims)")
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

    def _scores(self, p: Proto, space: PruningSpace,
                unit: Callable[[nn.Module, Layer], dict[str, torch.Tensor]], norms_only: bool) -> _Scores:
        """Per unit of every dim, the sum over its layers of their part (``unit``: one vector
        per role, the units of that role's width); per removable block, its own layers' part of
        every width it shares, which goes with the block."""
        g = p.t.graph
        classes = g.classes()
        use_norm = {p.dim_of[r]: norms_only and any(la.rule.norm for la in ls) for r, ls in classes.items()}
        sc = _Scores({d.name: np.zeros(d.size) for d in space.dims}, {d.name: np.zeros(d.size) for d in space.dims})
        removable = {b.name for b in space.blocks if b.removable}
        with torch.no_grad():
            for layer in g.layers:
                for role, v in unit(p.t.gm.get_submodule(layer.name), layer).items():
                    d = p.dim(layer.vars[role])
                    if d is None or (use_norm[d] and not layer.rule.norm):
                        continue
                    part = v.double().cpu().numpy()
                    sc.units[d] += part
                    sc.spread[d] += np.abs(part)
                    b = p.layer_block(layer)
                    if b in removable and space.dim(d).block != b:
                        for store, x in ((sc.own, part), (sc.own_abs, np.abs(part))):
                            store.setdefault(b, {}).setdefault(d, np.zeros(len(part)))[:] += x
        for root, d in p.dim_of.items():
            gran = g.vars[root].gran
            if gran > 1:  # whole groups go: one score per group
                for arr in (sc.units[d], sc.spread[d], *(per[d] for per in (*sc.own.values(), *sc.own_abs.values())
                                                         if d in per)):
                    arr[:] = np.repeat(arr.reshape(-1, gran).mean(1), gran)
        return sc

    def magnitude(self, model: nn.Module, space: PruningSpace) -> Importance:
        """Per unit: the norm of everything a layer writes for it (filters, biases, norm
        parameters and means), summed over its layers; a conv followed by a BatchNorm counts
        once, folded (|folded filter|_2 + |folded bias|: the filter the engine runs). A unit
        whose writers are all zero scores exactly 0. A removable block owns its layers' part of
        each width it shares (``block_shares``: a residual block's last layer on its stage's
        width); ``blocks`` holds their totals."""
        p = self._fitting(model, space)
        folds = _bn_folds(p)
        folded = {conv.key for conv in folds.values()}

        def unit(mod: nn.Module, layer: Layer) -> dict[str, torch.Tensor]:
            if layer.key in folded:
                return {}
            if layer.key in folds:
                conv = p.t.gm.get_submodule(folds[layer.key].name)
                assert isinstance(conv, nn.Conv2d) and isinstance(mod, nn.BatchNorm2d)
                return {"out": _folded(conv, mod)}
            out: dict[str, torch.Tensor] = {}
            for s in layer.rule.slots(mod, layer.attr):
                t = rules.get_tensor(mod, s.path)
                if s.role == "in" or t is None or s.path.endswith("running_var"):
                    continue
                v = _per_unit(t.detach(), s.axis).pow(2).sum(1).sqrt()
                out[s.role] = out[s.role] + v if s.role in out else v
            return out

        sc = self._scores(p, space, unit, norms_only=False)
        return Importance(sc.units, sc.block_totals(space), sc.own)

    def taylor_terms(self, model: nn.Module, space: PruningSpace
                     ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Signed sum of w * dL/dw per unit: over the norms' affine parameters for a width that
        has norms, over every weight touching it otherwise (MLP and gate widths). A removable
        block scores its own layers' part of the widths it shares."""
        units, blocks, _ = self.taylor_shares(model, space)
        return units, blocks

    def taylor_shares(self, model: nn.Module, space: PruningSpace
                      ) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, dict[str, np.ndarray]]]:
        """:meth:`taylor_terms`, and per removable block the fraction of each unit's score on
        a width it shares that is its own: its layers' |part| over the sum of every layer's
        |part| on that width (0 where all are 0). The caller splits each batch's unit scores
        (absolute values of the sums) by these fractions and accumulates the block's share."""
        p = self._fitting(model, space)

        def unit(mod: nn.Module, layer: Layer) -> dict[str, torch.Tensor]:
            out: dict[str, torch.Tensor] = {}
            for s in layer.rule.slots(mod, layer.attr):
                t = rules.get_tensor(mod, s.path)
                if not isinstance(t, nn.Parameter) or t.grad is None:
                    continue
                v = _per_unit(t.detach().double() * t.grad.double(), s.axis).sum(1)
                out[s.role] = out[s.role] + v if s.role in out else v
            return out

        sc = self._scores(p, space, unit, norms_only=True)
        fractions = {b: {d: np.divide(own, sc.spread[d], out=np.zeros_like(own), where=sc.spread[d] > 0)
                         for d, own in per.items()} for b, per in sc.own_abs.items()}
        return sc.units, sc.block_totals(space), fractions

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
            groups = top_k(scores.reshape(-1, gran).sum(1), plan.widths[d.name] // gran)
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
        arch = getattr(model, "mdp_arch", None)
        if arch is None:
            try:
                arch = self.arch(model)
            except UnsupportedModelError:
                arch = None  # built with options timm's name does not carry: save_pruned needs arch=
        if arch is not None:
            pruned.mdp_arch = arch  # type: ignore[assignment]
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
            r = p.output_of(mod) if mod else None
            if r is not None and info.get("num_chs") == g.vars[r].size:
                info["num_chs"] = new(r)

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


@dataclass
class _Scores:
    """Per-unit scores of every dim, the sum of |each layer's part| (``spread``), and per
    removable block its layers' signed and absolute parts of the widths it shares."""

    units: dict[str, np.ndarray]
    spread: dict[str, np.ndarray]
    own: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    own_abs: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    def block_totals(self, space: PruningSpace) -> dict[str, float]:
        """Every removable block's value: the total of its parts (0 if it shares no width)."""
        return {b.name: float(sum(v.sum() for v in self.own.get(b.name, {}).values()))
                for b in space.blocks if b.removable}


def _bn_folds(p: Proto) -> dict[str, Layer]:
    """BatchNorm layer key -> the conv layer it folds into: the BN reads only that conv's
    output, the conv feeds nothing else, and the BN has its running statistics."""
    t = p.t
    convs = {la.node: la for la in t.graph.layers if not la.attr and la.rule.kind == "conv"}
    out: dict[str, Layer] = {}
    for la in t.graph.layers:
        mod = t.gm.get_submodule(la.name) if not la.attr else None
        if not isinstance(mod, nn.BatchNorm2d) or mod.running_mean is None or mod.running_var is None:
            continue
        src = t.nodes[la.node].all_input_nodes
        if len(src) == 1 and src[0].name in convs and len(src[0].users) == 1:
            out[la.key] = convs[src[0].name]
    return out


def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """|folded filter|_2 + |folded bias| per output channel of conv followed by BN."""
    assert bn.running_mean is not None and bn.running_var is not None
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale if conv.bias is None else (conv.bias - bn.running_mean) * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return conv.weight.detach().flatten(1).norm(dim=1) * scale.abs() + shift.abs()


_INFERENCE_ALIASES = (nn.Dropout, nn.Dropout2d, DropPath, nn.Identity)  # rates differ, outputs do not


@functools.lru_cache(maxsize=32)
def _layers_of(
    name: str, kwargs: tuple[tuple[str, Any], ...]
) -> tuple[tuple[str, type[nn.Module], str], ...]:
    """(path, type, extra_repr) of every module ``timm.create_model(name, **kwargs)`` builds."""
    try:
        with torch.device("meta"):
            fresh = timm.create_model(name, pretrained=False, **dict(kwargs))
    except Exception:  # some models compute at init: build on the CPU instead
        fresh = timm.create_model(name, pretrained=False, **dict(kwargs))
    return tuple((path, type(m), m.extra_repr()) for path, m in fresh.named_modules())


def _rebuild_differs(model: nn.Module, name: str, kwargs: dict[str, Any]) -> str:
    """'' when ``timm.create_model(name, **kwargs)`` builds ``model``'s layers, else the first
    layer that differs (a dilated ResNet, say, whose name does not carry ``output_stride``)."""
    theirs = {path: (cls, rep) for path, cls, rep in _layers_of(name, tuple(sorted(kwargs.items())))}
    for path, mod in model.named_modules():
        cls, rep = theirs.pop(path, (None, ""))
        if isinstance(mod, _INFERENCE_ALIASES) and cls is not None and issubclass(cls, _INFERENCE_ALIASES):
            continue
        if cls is not type(mod) or rep != mod.extra_repr():
            found = f"{cls.__name__}({rep})" if cls is not None else "nothing"
            return f"{path or 'the model'} is {type(mod).__name__}({mod.extra_repr()}), timm builds {found}"
    return f"timm builds {next(iter(theirs))} too" if theirs else ""
