"""One rule per module type: how a layer reads and writes widths, and how it is sliced.

A rule traces a module into the :class:`~mdp_trt.models.graph.ChannelGraph` (which width
variables it reads and writes, which it ties together) and declares its *slots*: which axis
of which parameter or buffer a width indexes. Slicing, parameter counts, magnitude and
Taylor scores are all computed from the slots, so a module type is described once. Register
a rule for a custom layer with ``@register(MyLayer)`` instead of patching the graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from timm.layers import BatchNormAct2d, DropPath, LayerNorm2d, SelectAdaptivePool2d
from timm.layers import activations as tacts
from timm.layers.eca import CecaModule, EcaModule
from timm.layers.grn import GlobalResponseNorm
from timm.layers.norm_act import LayerNormAct2d
from timm.layers.squeeze_excite import SEModule
from timm.models._efficientnet_blocks import SqueezeExcite
from torch import nn

from mdp_trt.models.graph import ChannelGraph, ParamVal, Unsupported, Val

_R = TypeVar("_R", bound=type)


@dataclass(frozen=True)
class Slot:
    """Axis ``axis`` of tensor ``path`` (a parameter or buffer, dotted below the module) is
    indexed by the width of role ``role`` (``in``, ``out`` or ``inner``)."""

    path: str
    axis: int
    role: str


class Rule:
    """How one module type takes part in the channel graph (defaults: a parameter-free,
    elementwise module that passes its input's width through)."""

    kind = "op"
    anchor = False  # starts a latency term (a layer that mixes channels: conv, linear)
    cost = True  # False for aliases (Identity, Dropout) that never start a term
    norm = False  # a normalisation: its affine parameters carry the Taylor score of a channel
    mixes = False  # one channel's output depends on the others (removing a silent one changes it)

    def trace(self, g: ChannelGraph, name: str, module: nn.Module, args: Sequence[Any],
              out_shape: tuple[int, ...] | None) -> Any:
        return first_val(args, name)

    def slots(self, module: nn.Module, attr: str = "") -> list[Slot]:
        return []

    def describe(self, module: nn.Module) -> str:
        return type(module).__name__


_RULES: dict[type, Rule] = {}


def register(*types: type) -> Callable[[_R], _R]:
    """Class decorator: the decorated :class:`Rule` handles modules of ``types`` (and subclasses)."""

    def deco(cls: _R) -> _R:
        for t in types:
            _RULES[t] = cls()
        return cls

    return deco


def lookup(module: nn.Module) -> Rule | None:
    """The rule of the most specific registered type in ``module``'s class hierarchy."""
    for t in type(module).__mro__:
        if t in _RULES:
            return _RULES[t]
    return None


def first_val(args: Sequence[Any], where: str) -> Val:
    x = args[0] if args else None
    if not isinstance(x, Val):
        raise Unsupported(f"{where} takes a tensor whose channels cannot be followed")
    return x


def remap_axis(shape_in: Sequence[int], axis: int, shape_out: Sequence[int], where: str) -> int:
    """The axis of ``shape_out`` that carries axis ``axis`` of ``shape_in`` through a reshape."""
    before, size, after = math.prod(shape_in[:axis]), shape_in[axis], math.prod(shape_in[axis + 1:])
    for b in range(len(shape_out)):
        if math.prod(shape_out[:b]) == before and shape_out[b] == size \
                and math.prod(shape_out[b + 1:]) == after:
            return b
    raise Unsupported(f"{where} reshapes {tuple(shape_in)} to {tuple(shape_out)}, "
                      f"mixing the channel axis with others")


def _axis(x: Val, want: int, name: str) -> None:
    if x.axis != (want % x.ndim):
        raise Unsupported(f"{name} reads channels on axis {want}, they arrive on axis {x.axis}")


def _size(g: ChannelGraph, x: Val, n: int, name: str) -> None:
    if g.var(x.var).size != n:
        raise Unsupported(f"{name} expects {n} channels where {g.var(x.var).size} arrive")


def _present(module: nn.Module, slots: list[Slot]) -> list[Slot]:
    return [s for s in slots if get_tensor(module, s.path) is not None]


def get_tensor(module: nn.Module, path: str) -> torch.Tensor | None:
    owner, _, leaf = path.rpartition(".")
    m = module.get_submodule(owner) if owner else module
    t = getattr(m, leaf, None)
    return t if isinstance(t, torch.Tensor) else None


def set_tensor(module: nn.Module, path: str, value: torch.Tensor) -> None:
    owner, _, leaf = path.rpartition(".")
    m = module.get_submodule(owner) if owner else module
    old = getattr(m, leaf)
    if isinstance(old, nn.Parameter):
        setattr(m, leaf, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        setattr(m, leaf, value)


def resync(module: nn.Module) -> None:
    """Make layer attributes (channel counts, groups, normalized shapes) agree with the
    sliced tensors again, so the module still reads like the timm module it was."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.Conv1d):
            per_group = m.out_channels // m.groups
            out = m.weight.shape[0]
            m.groups = out // per_group if m.groups > 1 else 1
            m.out_channels, m.in_channels = out, m.weight.shape[1] * m.groups
        elif isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif isinstance(m, nn.BatchNorm2d):
            ref = m.weight if m.weight is not None else m.running_mean
            if ref is not None:
                m.num_features = ref.shape[0]
        elif isinstance(m, nn.LayerNorm) and m.weight is not None:
            m.normalized_shape = (m.weight.shape[0],)


# -- layers with weights -------------------------------------------------------------------


@register(nn.Conv2d)
class ConvRule(Rule):
    """Conv2d with or without bias. Depthwise (groups = channels): one width in and out.
    Grouped: in and out are one width pruned by whole groups (the group width stays, the
    group count shrinks), which keeps every group count valid."""

    kind = "conv"
    anchor = True

    def trace(self, g: ChannelGraph, name: str, module: nn.Module, args: Sequence[Any],
              out_shape: tuple[int, ...] | None) -> Any:
        assert isinstance(module, nn.Conv2d)
        x = first_val(args, name)
        _axis(x, 1, name)
        _size(g, x, module.in_channels, name)
        cin, cout, groups = module.in_channels, module.out_channels, module.groups
        if groups == 1:
            out = g.new_var(cout)
        elif cin == cout and cin % groups == 0:
            g.var(x.var).gran = math.lcm(g.var(x.var).gran, cin // groups)
            out = x.var
        else:
            raise Unsupported(f"grouped convolution {name} maps {cin} to {cout} channels in "
                              f"{groups} groups (a channel multiplier: in and out groups differ)")
        g.add_layer(name, self, {"in": x.var, "out": out}, name)
        return Val(out, 1, 4)

    def slots(self, module: nn.Module, attr: str = "") -> list[Slot]:
        assert isinstance(module, nn.Conv2d)
        s = [Slot("weight", 0, "out"), Slot("bias", 0, "out")]
        if module.groups == 1:
            s.append(Slot("weight", 1, "in"))
        return _present(module, s)

    def describe(self, module: nn.Module) -> str:
        assert isinstance(module, nn.Conv2d)
        g = module.groups
        groups = "1" if g == 1 else "dw" if g == module.in_channels else f"gw{module.in_channels // g}"
        extra = "" if type(module) is nn.Conv2d else f",{type(module).__name__}"
        return (f"conv(k{module.kernel_size},s{module.stride},p{module.padding},d{module.dilation},"
                f"g{groups},b{int(module.bias is not None)}{extra})")


@register(nn.Linear)
class LinearRule(Rule):
    kind = "linear"
    anchor = True

    def trace(self, g: ChannelGraph, name: str, module: nn.Module, args: Sequence[Any],
              out_shape: tuple[int, ...] | None) -> Any:
        assert isinstance(module, nn.Linear)
        x = first_val(args, name)
        _axis(x, -1, name)
        _size(g, x, module.in_features, name)
        out = g.new_var(module.out_features)
        g.add_layer(name, self, {"in": x.var, "out": out}, name)
        return Val(out, x.axis, x.ndim)

    def slots(self, module: nn.Module, attr: str = "") -> list[Slot]:
        return _present(module, [Slot("weight", 0, "out"), Slot("weight", 1, "in"), Slot("bias", 0, "out")])

    def describe(self, module: nn.Module) -> str:
        assert isinstance(module, nn.Linear)
        return f"linear(b{int(module.bias is not None)})"


# -- per-channel layers ----------------------------------------------------------------------


class _PerChannel(Rule):
    """A layer whose tensors are all per channel of the width it reads and writes."""

    axis = 1
    tensors: tuple[str, ...] = ("weight", "bias")

    def trace(self, g: ChannelGraph, name: str, module: nn.Module, args: Sequence[Any],
              out_shape: tuple[int, ...] | None) -> Any:
        x = first_val(args, name)
        _axis(x, self.channel_axis(module), name)
        n = self.channels(module)
        if n is not None:
            _size(g, x, n, name)
        g.add_layer(name, self, {"in": x.var, "out": x.var}, name)
        return x

    def channel_axis(self, module: nn.Module) -> int:
        return self.axis

    def channels(self, module: nn.Module) -> int | None:
        w = get_tensor(module, self.tensors[0]) if self.tensors else None
        return None if w is None else int(w.shape[0])

    def slots(self, module: nn.Module, attr: str = "") -> list[Slot]:
        return _present(module, [Slot(t, 0, "out") for t in self.tensors])


@register(nn.BatchNorm2d)
class BatchNormRule(_PerChannel):
    """BatchNorm2d and timm's BatchNormAct2d (its activation runs inside)."""

    kind = "bn"
    norm = True
    tensors = ("weight", "bias", "running_mean", "running_var")

    def channels(self, module: nn.Module) -> int | None:
        assert isinstance(module, nn.BatchNorm2d)
        return module.num_features

    def describe(self, module: nn.Module) -> str:
        if isinstance(module, BatchNormAct2d):
            return f"bnact({act_name(module.act)})"
        return "bn"


@register(nn.LayerNorm)
class LayerNormRule(_PerChannel):
    """LayerNorm over the last (channel) axis, e.g. in ConvNeXt blocks run channels-last."""

    kind = "ln"
    norm = True
    mixes = True
    axis = -1

    def trace(self, g: ChannelGraph, name: str, module: nn.Module, args: Sequence[Any],
              out_shape: tuple[int, ...] | None) -> Any:
        assert isinstance(module, nn.LayerNorm)
        if len(module.normalized_shape) != 1 or module.weight is None:
            raise Unsupported(f"{name} normalises over {module.normalized_shape}, not one channel axis")
        return super().trace(g, name, module, args, out_shape)

    def describe(self, module: nn.Module) -> str:
        return "ln"


@register(LayerNorm2d, LayerNormAct2d)
class LayerNorm2dRule(LayerNormRule):
    """timm's LayerNorm2d (and LayerNormAct2d): LayerNorm over the channels of an NCHW tensor."""

    axis = 1

    def describe(self, module: nn.Module) -> str:
        return "ln2d"


@register(GlobalResponseNorm)
class GRNRule(_PerChannel):
    """ConvNeXt v2's global response norm: per-channel weight and bias, normalised by the
    mean response over channels (so it mixes channels)."""

    kind = "grn"
    mixes = True

    def channel_axis(self, module: nn.Module) -> int:
        return int(getattr(module, "channel_dim", -1))


class ScaleRule(_PerChannel):
    """A bare per-channel parameter multiplied into a tensor (ConvNeXt's ``gamma``, LayerScale)."""

    kind = "scale"

    def slots(self, module: nn.Module, attr: str = "") -> list[Slot]:
        return [Slot(attr, 0, "out")]

    def describe(self, module: nn.Module) -> str:
        return "scale"


SCALE = ScaleRule()


@register(SqueezeExcite, SEModule)
class SERule(Rule):
    """Squeeze-excitation gates (EfficientNet/MobileNet ``SqueezeExcite``, ``SEModule``):
    they read and scale the width they gate; their reduction width is a dim of its own."""

    kind = "se"

    @staticmethod
    def parts(module: nn.Module) -> tuple[str, str, str]:
        if isinstance(module, SqueezeExcite):
            return "conv_reduce", "conv_expand", ""
        return "fc1", "fc2", "bn" if isinstance(getattr(module, "bn", None), nn.BatchNorm2d) else ""

    def trace(self, g: ChannelGraph, name: str, module: nn.Module, args: Sequence[Any],
              out_shape: tuple[int, ...] | None) -> Any:
        x = first_val(args, name)
        _axis(x, 1, name)
        red, exp, _ = self.parts(module)
        r, e = module.get_submodule(red), module.get_submodule(exp)
        if not (isinstance(r, nn.Conv2d) and isinstance(e, nn.Conv2d)) or r.groups != 1 or e.groups != 1:
            raise Unsupported(f"gate {name}: its reduce/expand layers are not plain 1x1 convs")
        _size(g, x, r.in_channels, name)
        inner = g.new_var(r.out_channels)
        g.add_layer(name, self, {"in": x.var, "out": x.var, "inner": inner}, name)
        return x

    def slots(self, module: nn.Module, attr: str = "") -> list[Slot]:
        red, exp, bn = self.parts(module)
        s = [Slot(f"{red}.weight", 0, "inner"), Slot(f"{red}.weight", 1, "in"), Slot(f"{red}.bias", 0, "inner"),
             Slot(f"{exp}.weight", 0, "out"), Slot(f"{exp}.weight", 1, "inner"), Slot(f"{exp}.bias", 0, "out")]
        if bn:
            s += [Slot(f"{bn}.{t}", 0, "inner") for t in ("weight", "bias", "running_mean", "running_var")]
        return _present(module, s)

    def describe(self, module: nn.Module) -> str:
        gate = getattr(module, "gate", None)
        act = getattr(module, "act1", None) or getattr(module, "act", None)
        pool = ",max" if getattr(module, "add_maxpool", False) else ""
        return f"se({act_name(act)},{act_name(gate)}{pool})"


@register(EcaModule, CecaModule)
class ECARule(Rule):
    """ECA gates: a 1-D conv across channels, whatever their number (no slots). Removing a
    channel changes its neighbours' gates, so it mixes channels."""

    kind = "eca"
    mixes = True

    def trace(self, g: ChannelGraph, name: str, module: nn.Module, args: Sequence[Any],
              out_shape: tuple[int, ...] | None) -> Any:
        x = first_val(args, name)
        _axis(x, 1, name)
        g.add_layer(name, self, {"in": x.var, "out": x.var}, name)
        return x

    def describe(self, module: nn.Module) -> str:
        conv = getattr(module, "conv", None)
        k = conv.kernel_size if isinstance(conv, nn.Conv1d) else "?"
        return f"eca(k{k},{act_name(getattr(module, 'gate', None))})"


# -- parameter-free layers -------------------------------------------------------------------

# One activation table: elementwise, parameter-free; the value says whether f(0) == 0.
ACTIVATIONS: dict[type, bool] = {
    nn.ReLU: True, nn.ReLU6: True, nn.SiLU: True, nn.GELU: True, nn.Hardswish: True,
    nn.Hardsigmoid: False, nn.Sigmoid: False, nn.Tanh: True, nn.LeakyReLU: True, nn.Mish: True,
    nn.Identity: True, tacts.Swish: True, tacts.HardSwish: True, tacts.HardSigmoid: False,
    tacts.Sigmoid: False, tacts.Tanh: True, tacts.GELU: True, tacts.Mish: True,
}


def act_name(module: Any) -> str:
    """Short name of an activation module or function (for term descriptions)."""
    if module is None:
        return "none"
    if isinstance(module, nn.Module):
        return type(module).__name__.lower()
    return getattr(module, "__name__", str(module)).lower()


@register(*ACTIVATIONS)
class ActivationRule(Rule):
    kind = "act"

    def describe(self, module: nn.Module) -> str:
        return act_name(module)


@register(nn.Identity, nn.Dropout, nn.Dropout2d, DropPath)
class AliasRule(Rule):
    """Modules that pass their input on unchanged at inference."""

    kind = "alias"
    cost = False


@register(nn.MaxPool2d, nn.AvgPool2d)
class PoolRule(Rule):
    kind = "pool"

    def describe(self, module: nn.Module) -> str:
        keys = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "dilation")
        return type(module).__name__ + "(" + ",".join(str(getattr(module, k, "")) for k in keys) + ")"


@register(nn.AdaptiveAvgPool2d, SelectAdaptivePool2d)
class GlobalPoolRule(Rule):
    """Global pooling, optionally flattened to (N, C)."""

    kind = "gpool"

    def trace(self, g: ChannelGraph, name: str, module: nn.Module, args: Sequence[Any],
              out_shape: tuple[int, ...] | None) -> Any:
        x = first_val(args, name)
        _axis(x, 1, name)
        if isinstance(module, SelectAdaptivePool2d) and module.feat_mult() != 1:
            raise Unsupported(f"global pool {name} ({module.pool_type}) concatenates poolings")
        return Val(x.var, 1, len(out_shape) if out_shape else x.ndim)

    def describe(self, module: nn.Module) -> str:
        return f"gpool({getattr(module, 'pool_type', 'avg')},{getattr(module, 'output_size', '')})"


@register(nn.Flatten)
class FlattenRule(Rule):
    """``nn.Flatten`` after a global pool: (N, C, 1, 1) -> (N, C) keeps the channel axis."""

    kind = "alias"
    cost = False

    def trace(self, g: ChannelGraph, name: str, module: nn.Module, args: Sequence[Any],
              out_shape: tuple[int, ...] | None) -> Any:
        x = first_val(args, name)
        if out_shape is None or x.axis >= len(out_shape) or out_shape[x.axis] != g.var(x.var).size:
            raise Unsupported(f"{name} flattens the channels together with other axes")
        return Val(x.var, x.axis, len(out_shape))


def scale_param(g: ChannelGraph, x: Val, p: ParamVal, shape: tuple[int, ...], owner: str, attr: str,
                node: str) -> Val:
    """``x * p`` with ``p`` a bare per-channel parameter: a scale layer on ``x``'s width."""
    axis = x.ndim - 1 if p.axis is None else p.axis + x.ndim - p.ndim  # broadcasting aligns the last axes
    if axis != x.axis:
        raise Unsupported(f"parameter {p.path} scales axis {axis}, the channels are on axis {x.axis}")
    if len(shape) != 1:
        raise Unsupported(f"parameter {p.path} of shape {shape} is not one value per channel")
    if g.var(x.var).size != shape[0]:
        raise Unsupported(f"parameter {p.path} has {shape[0]} values, the tensor {g.var(x.var).size} channels")
    g.add_layer(owner, SCALE, {"in": x.var, "out": x.var}, node, attr)
    return x


@register(nn.GroupNorm)
class GroupNormRule(Rule):
    """GroupNorm (and timm's GroupNormAct): not handled yet; named so the refusal says where."""

    def trace(self, g: ChannelGraph, name: str, module: nn.Module, args: Sequence[Any],
              out_shape: tuple[int, ...] | None) -> Any:
        raise Unsupported(f"layer {name} ({type(module).__name__}) normalises groups of channels, "
                          f"which no rule prunes yet")
