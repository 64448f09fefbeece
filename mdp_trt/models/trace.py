"""Fill the channel graph from a model with torch.fx, cut it into latency terms, and slice.

The model is traced with timm's leaf modules and autowrapped functions plus every module
type that has a rule (:mod:`mdp_trt.models.rules`), and run once on a zero image to record
shapes. Width variables are then followed node by node: rules for modules, a small table
for functions and methods (elementwise ops, permutes, reshapes, reductions). A term is a
contiguous run of nodes that starts at a layer with weights; it is made runnable by copying
its nodes into a graph of their own over sliced copies of the real modules.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from timm.layers import activations as tacts
from timm.layers import get_notrace_functions, is_notrace_module
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from mdp_trt.errors import MdpError
from mdp_trt.models import rules
from mdp_trt.models.graph import ChannelGraph, Layer, ParamVal, Unsupported, Val

_BINARY = {operator.add, operator.iadd, torch.add, operator.mul, operator.imul, torch.mul,
           operator.sub, torch.sub, operator.truediv, torch.div, "add", "add_", "mul", "mul_",
           "sub", "div"}
_ELEMENTWISE = {F.relu, F.relu6, F.gelu, F.silu, F.hardswish, F.hardsigmoid, F.sigmoid, F.mish,
                F.leaky_relu, F.dropout, torch.sigmoid, torch.tanh, torch.relu, tacts.swish,
                tacts.sigmoid, tacts.hard_sigmoid, tacts.hard_swish, tacts.mish, tacts.tanh,
                "sigmoid", "sigmoid_", "relu", "relu_", "tanh", "gelu"}
_ALIASES = {"contiguous", "clone", "float", "to", "type_as", F.pad}
_PERMUTES = {"permute", torch.permute}
_RESHAPES = {"reshape", "view", "flatten", torch.reshape, torch.flatten}
_REDUCES = {"mean", "sum", "amax", torch.mean, torch.sum, torch.amax}
ADDS = {operator.add, operator.iadd, torch.add, "add", "add_"}  # what a residual add traces to
_FREE = _ALIASES | _PERMUTES | _RESHAPES  # no work of their own: never start a term
_SPLITS = {torch.split, torch.chunk, torch.cat, torch.stack, torch.concat, "split", "chunk"}


class _Tracer(fx.Tracer):
    """Keeps timm's no-trace modules and every module type with a rule as leaves, and
    remembers the innermost module whose forward could not be traced."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=tuple(f for f in get_notrace_functions() if callable(f)))
        self.failed_in: tuple[str, nn.Module] | None = None

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (rules.lookup(m) is not None or is_notrace_module(type(m))
                or super().is_leaf_module(m, module_qualified_name))

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = (self.path_of_module(m), m)
            raise


@dataclass
class Traced:
    """A traced model: its fx graph, the channel graph, and per node its value and shape."""

    gm: fx.GraphModule
    graph: ChannelGraph
    vals: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    nodes: dict[str, fx.Node]
    layers_of: dict[str, list[Layer]]  # node name -> layers it registered
    in_chans: int
    output: Val | None = None
    stack: dict[str, tuple[str, ...]] = field(default_factory=dict)  # node -> module paths around it

    def node_shape(self, name: str, width: Callable[[int], int]) -> tuple[int, ...]:
        """Shape of node ``name`` (batch 1) with its channel axis at ``width(var)``."""
        shape = list(self.shapes[name])
        v = self.vals.get(name)
        if isinstance(v, Val):
            shape[v.axis] = width(v.var)
        return tuple(shape)


def _target_name(target: Any) -> str:
    return target if isinstance(target, str) else getattr(target, "__name__", str(target))


def _paths(node: fx.Node) -> tuple[str, ...]:
    stack = node.meta.get("nn_module_stack") or {}
    out = [v[0] if isinstance(v, tuple) else str(k) for k, v in stack.items()]
    if node.op in ("call_module", "get_attr"):
        out.append(str(node.target))
    return tuple(out)


def trace(model: nn.Module, side: int) -> Traced:
    """Trace ``model`` at input side ``side``; raises :class:`Unsupported` naming what blocks it."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is None:
        raise Unsupported("the model has no Conv2d to read its input channels from")
    tracer = _Tracer()
    try:
        gm = fx.GraphModule(model, tracer.trace(model))
    except Exception as exc:  # fx raises many types for code it cannot trace
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        path, mod = tracer.failed_in or ("", model)
        where = f"module {path} ({type(mod).__name__})" if path else f"the forward of {type(mod).__name__}"
        raise Unsupported(f"torch.fx cannot trace {where}: {line[:200]}") from exc
    ref = next(model.parameters())
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(torch.zeros(1, first.in_channels, side, side, dtype=ref.dtype,
                                                device=ref.device))
    except RuntimeError as exc:
        raise MdpError(f"input side {side} does not run through {type(model).__name__}: "
                       f"{str(exc).splitlines()[0][:200]}") from exc
    finally:
        model.train(was)
    t = Traced(gm, ChannelGraph(), {}, {}, {}, {}, first.in_channels)
    _follow(t)
    return t


def _meta_shape(node: fx.Node) -> tuple[int, ...] | None:
    tm = node.meta.get("tensor_meta")
    shape = getattr(tm, "shape", None)
    return tuple(int(s) for s in shape) if shape is not None else None


def _follow(t: Traced) -> None:
    """Give every node its value (a width-carrying tensor, a bare parameter or None)."""
    g, seen_modules = t.graph, set()
    for node in t.gm.graph.nodes:
        t.nodes[node.name] = node
        t.stack[node.name] = _paths(node)
        shape = _meta_shape(node)
        if shape is not None:
            t.shapes[node.name] = shape
        args = [t.vals.get(a.name) if isinstance(a, fx.Node) else a for a in node.args]
        before = len(g.layers)
        if node.op == "placeholder":
            out: Any = Val(g.new_var(t.in_chans, f"the image has {t.in_chans} channels"), 1, 4)
        elif node.op == "get_attr":
            out = ParamVal(str(node.target), None, len(shape or ()))
        elif node.op == "call_module":
            name = str(node.target)
            mod = t.gm.get_submodule(name)
            rule = rules.lookup(mod)
            if rule is None:
                raise Unsupported(f"layer {name} ({type(mod).__name__}) has no pruning rule")
            if name in seen_modules and any(True for _ in mod.parameters()):
                raise Unsupported(f"layer {name} is called twice (shared weights)")
            seen_modules.add(name)
            out = rule.trace(g, name, mod, args, shape)
        elif node.op in ("call_function", "call_method"):
            out = _function(t, node, args, shape)
        elif node.op == "output":
            res = args[0]
            t.output = res if isinstance(res, Val) else None
            if t.output is None:
                raise Unsupported("the model's output is not one tensor whose channels can be followed")
            continue
        else:
            raise Unsupported(f"node {node.name}: unknown op {node.op}")
        t.vals[node.name] = out
        for layer in g.layers[before:]:
            layer.node = node.name
        t.layers_of[node.name] = g.layers[before:]
    _check_params(t)


def _function(t: Traced, node: fx.Node, args: list[Any], shape: tuple[int, ...] | None) -> Any:
    g, tgt, where = t.graph, node.target, f"{_target_name(node.target)} at {node.name}"
    if tgt in _SPLITS:
        raise Unsupported(f"operation {where} splits or concatenates channels (no rule for that yet)")
    if shape is None:  # sizes, getattr, tuples: nothing with channels
        if any(isinstance(a, ParamVal) for a in args):
            raise Unsupported(f"{where} uses a bare parameter in a way the graph cannot follow")
        return None
    tensors = [a for a in args if isinstance(a, Val | ParamVal)]
    x = next((a for a in tensors if isinstance(a, Val)), None)
    if tgt in _BINARY:
        params = [a for a in tensors if isinstance(a, ParamVal)]
        if x is None:
            if params and len(tensors) == 1:
                return params[0]
            raise Unsupported(f"{where} combines tensors whose channels cannot be followed")
        if params:
            p = params[0]
            owner, _, attr = p.path.rpartition(".")
            pshape = t.shapes[_param_source(t, node)]
            return rules.scale_param(g, x, p, pshape, owner, attr, node.name)
        for a in node.all_input_nodes:
            y = t.vals.get(a.name)
            if not isinstance(y, Val) or y is x:
                continue
            if y.ndim != x.ndim or y.axis != x.axis:
                raise Unsupported(f"{where} combines channels on different axes")
            if t.shapes[a.name][y.axis] == 1 and g.var(x.var).size != 1:
                continue  # broadcast over channels
            g.union(x.var, y.var, f"{where}")
        return Val(x.var, x.axis, len(shape))
    if x is None:
        if tensors and isinstance(tensors[0], ParamVal) and (tgt in _RESHAPES or tgt in _ALIASES):
            p = tensors[0]
            big = [i for i, s in enumerate(shape) if s != 1]
            return ParamVal(p.path, big[0] if len(big) == 1 else None, len(shape))
        if not tensors:
            return None
        raise Unsupported(f"{where} has no input whose channels can be followed")
    if tgt in _ELEMENTWISE or tgt in _ALIASES:
        return x
    src = next(a for a in node.args if isinstance(a, fx.Node) and isinstance(t.vals.get(a.name), Val))
    if tgt in _PERMUTES:
        order: Any = node.args[1:] if tgt == "permute" else node.args[1]
        if len(order) == 1 and isinstance(order[0], list | tuple):
            order = order[0]
        perm = [int(d) % x.ndim for d in order]
        return Val(x.var, perm.index(x.axis), x.ndim)
    if tgt in _RESHAPES:
        return Val(x.var, rules.remap_axis(t.shapes[src.name], x.axis, shape, where), len(shape))
    if tgt in _REDUCES:
        dim: Any = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        dims = [int(d) % x.ndim for d in ([dim] if isinstance(dim, int) else list(dim or []))]
        if not dims or x.axis in dims:
            raise Unsupported(f"{where} reduces over the channels")
        keep_arg: Any = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        keep = bool(keep_arg)
        axis = x.axis if keep else x.axis - sum(d < x.axis for d in dims)
        return Val(x.var, axis, len(shape))
    raise Unsupported(f"operation {where} has no pruning rule")


def _param_source(t: Traced, node: fx.Node) -> str:
    """The get_attr node at the root of the bare-parameter argument of ``node``."""
    for a in node.args:
        n = a
        while isinstance(n, fx.Node) and isinstance(t.vals.get(n.name), ParamVal):
            if n.op == "get_attr":
                return n.name
            n = next((b for b in n.args if isinstance(b, fx.Node)), None)
    raise Unsupported(f"{node.name}: cannot find the parameter it scales by")


def _check_params(t: Traced) -> None:
    """Every parameter sits in a leaf layer or is a per-channel scale the graph follows."""
    covered: set[str] = set()
    for node in t.gm.graph.nodes:
        if node.op == "call_module":
            covered |= {f"{node.target}.{n}" for n, _ in t.gm.get_submodule(str(node.target)).named_parameters()}
    covered |= {layer.key for layer in t.graph.layers if layer.attr}
    extra = [n for n, _ in t.gm.named_parameters() if n not in covered]
    if extra:
        raise Unsupported(f"parameters {extra[:3]} are used in a way the graph cannot follow")


# -- slicing ---------------------------------------------------------------------------------


@torch.no_grad()
def slice_layer(module: nn.Module, layer: Layer, keep: Mapping[str, torch.Tensor | None]) -> None:
    """Keep the channels ``keep[role]`` (None: all) on every slot of ``layer`` in ``module``."""
    for s in layer.rule.slots(module, layer.attr):
        idx = keep.get(s.role)
        t = rules.get_tensor(module, s.path)
        if idx is None or t is None:
            continue
        rules.set_tensor(module, s.path, t.index_select(s.axis, idx.to(t.device)).clone())
    if not layer.attr:
        rules.resync(module)


def slot_count(module: nn.Module, layer: Layer | None, width: Mapping[str, int]) -> int:
    """Parameters of ``module`` once ``layer``'s slots are cut to ``width[role]``."""
    shapes = {n: list(p.shape) for n, p in module.named_parameters()}
    if layer is not None:
        if layer.attr:
            shapes = {layer.attr: list(rules.get_tensor(module, layer.attr).shape)}  # type: ignore[union-attr]
        for s in layer.rule.slots(module, layer.attr):
            if s.path in shapes and s.role in width:
                shapes[s.path][s.axis] = width[s.role]
    total = 0
    for shape in shapes.values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


# -- latency terms ---------------------------------------------------------------------------


@dataclass
class Cut:
    """The nodes of one latency term, the node that feeds it, and the block it belongs to."""

    name: str
    kind: str
    nodes: list[str]
    primary: str
    block: str | None


def _inputs(node: fx.Node) -> list[fx.Node]:
    return list(node.all_input_nodes)


def cut_terms(t: Traced, block_of: Callable[[str], str | None]) -> list[Cut]:
    """Cut the graph into terms: a term starts at every layer with weights, and at any node
    with work of its own whose inputs come from another block's term."""
    cuts: list[Cut] = []
    term_of: dict[str, int] = {}
    for node in t.gm.graph.nodes:
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        val = t.vals.get(node.name)
        if isinstance(val, ParamVal):
            continue  # pulled into the term that uses it
        rule = rules.lookup(t.gm.get_submodule(str(node.target))) if node.op == "call_module" else None
        free = (rule is not None and not rule.cost) or (rule is None and (node.target in _FREE or val is None))
        prev = max((term_of[a.name] for a in _inputs(node) if a.name in term_of), default=None)
        block = block_of(node.name)
        start = (rule is not None and rule.anchor) or (
            not free and (prev is None or cuts[prev].block != block))
        if start:
            src = next((a for a in _inputs(node) if isinstance(t.vals.get(a.name), Val)), None)
            if src is None:
                raise Unsupported(f"node {node.name} starts a term without a tensor input")
            kind = rule.kind if rule else _target_name(node.target)
            if rule is not None and rule.kind == "conv":
                m = t.gm.get_submodule(str(node.target))
                kind = "conv" if m.groups == 1 else "dwconv" if m.groups == m.in_channels else "gconv"
            name = str(node.target) if node.op == "call_module" else node.name
            cuts.append(Cut(name, kind, [], src.name, block))
            prev = len(cuts) - 1
        if prev is None:
            continue
        cuts[prev].nodes.append(node.name)
        term_of[node.name] = prev
    return cuts


def _param_nodes(t: Traced, names: Iterable[str]) -> list[str]:
    """The bare-parameter nodes (get_attr and their reshapes) that ``names`` read."""
    out: list[str] = []

    def visit(n: fx.Node) -> None:
        if isinstance(t.vals.get(n.name), ParamVal) and n.name not in out:
            for a in _inputs(n):
                visit(a)
            out.append(n.name)

    for name in names:
        for a in _inputs(t.nodes[name]):
            visit(a)
    return out


def cut_vars(t: Traced, cut: Cut) -> list[int]:
    """Root width variables of a term in order: the input's, then as met."""
    g = t.graph
    out = [g.find(t.vals[cut.primary].var)]
    for n in cut.nodes:
        for layer in t.layers_of.get(n, []):
            out += [g.find(v) for v in layer.vars.values()]
        v = t.vals.get(n)
        if isinstance(v, Val):
            out.append(g.find(v.var))
    return list(dict.fromkeys(out))


def _outputs(t: Traced, region: set[str]) -> list[str]:
    return [n for n in region if any(u.name not in region for u in t.nodes[n].users)]


def describe(t: Traced, cut: Cut, symbol: Callable[[int], str]) -> str:
    """Everything a term's latency depends on besides its widths, as one string."""
    region = set(cut.nodes)
    parts = [f"in{t.node_shape(cut.primary, lambda v: symbol(v))}"]  # type: ignore[arg-type, return-value]
    for n in cut.nodes:
        node = t.nodes[n]
        if node.op == "call_module":
            mod = t.gm.get_submodule(str(node.target))
            rule = rules.lookup(mod)
            desc = rule.describe(mod) if rule else type(mod).__name__
        else:
            consts = [a for a in node.args if not isinstance(a, fx.Node)]
            desc = f"{_target_name(node.target)}{tuple(consts) if consts else ''}"
        ext = [a.name for a in _inputs(node) if a.name not in region and a.name != cut.primary
               and isinstance(t.vals.get(a.name), Val)]
        for a in ext:
            desc += f"+ext{t.node_shape(a, lambda v: symbol(v))}"  # type: ignore[arg-type, return-value]
        layers = t.layers_of.get(n, [])
        if layers:
            desc += "[" + ",".join(f"{r}:{symbol(v)}" for r, v in layers[0].vars.items()) + "]"
        parts.append(desc)
    return "|".join(parts)


def term_module(t: Traced, cut: Cut, width: Callable[[int], int], seed: int = 0
                ) -> tuple[nn.Module, tuple[int, ...]]:
    """A runnable module for ``cut`` with every width variable ``v`` cut to ``width(v)``.

    The real leaf modules are copied and sliced to their first channels; inputs from outside
    the term other than the one fed to it (a residual shortcut) are constant buffers.
    """
    g = t.graph
    params = _param_nodes(t, cut.nodes)
    region = set(cut.nodes) | set(params)
    order = [n.name for n in t.gm.graph.nodes if n.name in region]
    new = fx.Graph()
    env: dict[str, fx.Node] = {cut.primary: new.placeholder("x")}
    root: dict[str, Any] = {}
    ref = next(t.gm.parameters())
    gen = torch.Generator().manual_seed(seed)

    def keep(layer: Layer) -> dict[str, torch.Tensor | None]:
        out: dict[str, torch.Tensor | None] = {}
        for role, v in layer.vars.items():
            w, size = width(v), g.var(v).size
            out[role] = None if w == size else torch.arange(w, device=ref.device)
        return out

    def arg(a: fx.Node) -> fx.Node:
        if a.name not in env:
            if not isinstance(t.vals.get(a.name), Val):
                raise Unsupported(f"term {cut.name} reads {a.name} from outside, which is not a tensor")
            buf = f"_ext{len(root)}"
            shape = t.node_shape(a.name, width)
            root[buf] = torch.randn(shape, generator=gen, device="cpu").to(ref.device)
            env[a.name] = new.get_attr(buf)
        return env[a.name]

    scale = {layer.node: layer for layer in g.layers if layer.attr}
    for n in order:
        node = t.nodes[n]
        if node.op == "call_module":
            mod = copy.deepcopy(t.gm.get_submodule(str(node.target)))
            for layer in t.layers_of.get(n, []):
                slice_layer(mod, layer, keep(layer))
            root[str(node.target)] = mod
        elif node.op == "get_attr":
            owner, _, attr = str(node.target).rpartition(".")
            tensor = rules.get_tensor(t.gm.get_submodule(owner), attr)
            user = next((scale[u] for u in _users_through(t, node) if u in scale), None)
            if tensor is None or user is None:
                raise Unsupported(f"term {cut.name}: parameter {node.target} is not a channel scale")
            idx = keep(user)["out"]
            value = tensor.detach() if idx is None else tensor.detach().index_select(0, idx)
            root[str(node.target)] = nn.Parameter(value.clone())
        env[n] = new.node_copy(node, arg)
    outs = [env[n] for n in order if n in _outputs(t, set(cut.nodes))] or [env[order[-1]]]
    new.output(outs[0] if len(outs) == 1 else tuple(outs))
    module = fx.GraphModule(root, new).eval()
    return module, t.node_shape(cut.primary, width)[1:]


def _users_through(t: Traced, node: fx.Node) -> list[str]:
    """Names of the first non-parameter nodes that use ``node`` (through reshapes)."""
    out: list[str] = []
    for u in node.users:
        if isinstance(t.vals.get(u.name), ParamVal):
            out += _users_through(t, u)
        else:
            out.append(u.name)
    return out
