"""timm ResNets (BasicBlock and Bottleneck, plain and deep stems, avg-pool downsample).

The adapter reads the model into a small graph of conv+BN layers, each reading one width
variable and writing another. Widths that the residual adds force to be equal (a block
without a projection shortcut writes the width it reads) are merged by union-find, so a
stage's residual width is one dim, and so is a stem width that feeds an identity shortcut
(resnet18's stem and ``layer1``). Everything else (the space, surgery, importance, parameter
counts) is computed from that graph.

Dims are named after what writes them: ``layer3.res`` (a stage's residual width),
``layer3.2.conv1`` (a block's inner width), ``stem`` (the stem's output width when it is not
a residual width), ``conv1.0`` / ``conv1.3`` (inner widths of a deep stem).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
from timm.layers import SelectAdaptivePool2d, create_classifier
from timm.models.resnet import ResNet
from torch import nn

from mdp_trt.errors import MdpError, PlanError, UnsupportedModelError
from mdp_trt.models.base import Importance, SpaceConfig
from mdp_trt.space import Block, Dim, Plan, PruningSpace, Term, aligned_choices, choices_for

DEFAULT_SIDE = 224
STEM_OUT = "stem"
_M = TypeVar("_M", bound=nn.Module)
# Parameter-free elementwise activations that map 0 to 0 (a silent channel stays silent).
ACTIVATIONS: tuple[tuple[type[nn.Module], str], ...] = (
    (nn.ReLU, "relu"), (nn.ReLU6, "relu6"), (nn.SiLU, "silu"), (nn.GELU, "gelu"),
    (nn.Hardswish, "hardswish"),
)


def _activation_name(module: nn.Module) -> str | None:
    """The name of ``module`` in :data:`ACTIVATIONS`, or None."""
    return next((name for cls, name in ACTIVATIONS if type(module) is cls), None)


def _activation(name: str) -> nn.Module:
    """The activation module for a name in :data:`ACTIVATIONS` ('none': identity)."""
    if name == "none":
        return nn.Identity()
    for cls, known in ACTIVATIONS:
        if name == known:
            return cls()
    raise MdpError(f"unknown activation {name!r} in a latency term")


class _Unsupported(Exception):
    """Something in the model that this adapter cannot handle (message says what)."""


def _sub(model: nn.Module, name: str, cls: type[_M]) -> _M:
    """Submodule ``name`` of ``model``, which must be a ``cls``."""
    m = model.get_submodule(name)
    if not isinstance(m, cls):
        raise _Unsupported(f"{name} is {type(m).__name__}, expected {cls.__name__}")
    return m


@dataclass(frozen=True)
class _Conv:
    """One conv+BN(+act) layer: reads width variable ``cin`` (None: the image), writes ``cout``."""

    conv: str
    bn: str
    cin: str | None
    cout: str
    fixed_cin: int
    kernel: int
    stride: int
    padding: int
    in_hw: int
    out_hw: int
    act: str
    pool: str
    add: bool
    block: str | None


@dataclass
class _BlockInfo:
    name: str
    stage: str
    removable: bool
    reason: str
    inner: list[str]
    last: str  # the conv whose output is added to the shortcut


@dataclass
class _Graph:
    """The conv layers of a ResNet and the dims their width variables fall into."""

    convs: list[_Conv] = field(default_factory=list)
    sizes: dict[str, int] = field(default_factory=dict)
    parent: dict[str, str] = field(default_factory=dict)
    blocks: list[_BlockInfo] = field(default_factory=list)
    var_block: dict[str, str] = field(default_factory=dict)
    stages: dict[str, str] = field(default_factory=dict)  # stage -> its output width variable
    pool: dict[str, int] = field(default_factory=dict)  # stem max-pool: kernel, stride, padding, in_hw
    final: str = ""
    head_hw: int = 0
    num_classes: int = 0
    pool_type: str = "avg"
    feat_mult: int = 1
    side: int = 0
    dim_of: dict[str, str] = field(default_factory=dict)  # width variable -> dim name
    dim_order: list[str] = field(default_factory=list)
    dim_size: dict[str, int] = field(default_factory=dict)
    dim_block: dict[str, str] = field(default_factory=dict)  # private dims -> their block

    def new_var(self, name: str, size: int) -> str:
        self.sizes[name] = size
        self.parent[name] = name
        return name

    def find(self, v: str) -> str:
        while self.parent[v] != v:
            self.parent[v] = self.parent[self.parent[v]]
            v = self.parent[v]
        return v

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra

    def name_dims(self) -> None:
        """Name every union-find class: a stage's residual width, the stem, or its one variable."""
        members: dict[str, list[str]] = {}
        for v in self.sizes:  # insertion order = forward order
            members.setdefault(self.find(v), []).append(v)
        for vs in members.values():
            sizes = {self.sizes[v] for v in vs}
            if len(sizes) != 1:
                raise _Unsupported(f"widths {vs} are tied by residual adds but differ: {sorted(sizes)}")
            stages = [s for s, v in self.stages.items() if v in vs]
            if stages:
                name = f"{stages[0]}.res"
            elif STEM_OUT in vs:
                name = STEM_OUT
            else:
                name = vs[0]
            for v in vs:
                self.dim_of[v] = name
            self.dim_size[name] = sizes.pop()
            if len(vs) == 1 and vs[0] in self.var_block:
                self.dim_block[name] = self.var_block[vs[0]]
        seen: set[str] = set()
        for c in self.convs:
            d = self.dim_of[c.cout]
            if d not in seen:
                seen.add(d)
                self.dim_order.append(d)


def _conv_out(hw: int, kernel: int, stride: int, padding: int, ceil: bool = False) -> int:
    span = hw + 2 * padding - kernel
    if ceil:
        out = -(-span // stride) + 1
        if (out - 1) * stride >= hw + padding:
            out -= 1
        return out
    return span // stride + 1


def _int(v: Any) -> int:
    """An int from a conv/pool attribute that may be a tuple of equal ints."""
    if isinstance(v, tuple):
        if len(set(v)) != 1:
            raise _Unsupported(f"non-square kernel, stride or padding {v}")
        return int(v[0])
    return int(v)


def _check_bn(model: nn.Module, name: str, channels: int) -> None:
    bn = model.get_submodule(name)
    if not isinstance(bn, nn.BatchNorm2d) or type(bn) is not nn.BatchNorm2d:
        raise _Unsupported(f"normalization {name} is {type(bn).__name__}, only BatchNorm2d is handled")
    if not bn.affine or not bn.track_running_stats:
        raise _Unsupported(f"BatchNorm {name} has no affine parameters or no running statistics")
    if bn.num_features != channels:
        raise _Unsupported(f"BatchNorm {name} has {bn.num_features} channels, its conv writes {channels}")


def _add_conv(g: _Graph, model: nn.Module, conv_name: str, bn_name: str, cin: str | None,
              cout: str, in_hw: int, act: str, block: str | None, *, pool: str = "",
              add: bool = False) -> int:
    """Record one conv+BN layer reading ``cin`` and writing the new variable ``cout``; its output side."""
    conv = model.get_submodule(conv_name)
    if not isinstance(conv, nn.Conv2d) or type(conv) is not nn.Conv2d:
        raise _Unsupported(f"{conv_name} is {type(conv).__name__}, expected a Conv2d")
    if conv.groups != 1:
        raise _Unsupported(f"grouped convolution {conv_name} (groups={conv.groups}, ResNeXt-style)")
    if _int(conv.dilation) != 1:
        raise _Unsupported(f"dilated convolution {conv_name} (output_stride < 32)")
    if conv.bias is not None:
        raise _Unsupported(f"convolution {conv_name} has a bias")
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise _Unsupported(f"convolution {conv_name} uses padding {conv.padding!r}/{conv.padding_mode}")
    _check_bn(model, bn_name, conv.out_channels)
    k, s, p = _int(conv.kernel_size), _int(conv.stride), _int(conv.padding)
    if cin is not None and g.sizes[cin] != conv.in_channels:
        raise _Unsupported(f"{conv_name} reads {conv.in_channels} channels where {g.sizes[cin]} arrive")
    hw = _conv_out(in_hw, 2, 2, 0, ceil=True) if pool else in_hw
    out_hw = _conv_out(hw, k, s, p)
    if out_hw < 1:
        raise MdpError(f"input side {g.side} is too small: the feature map vanishes at {conv_name}")
    g.new_var(cout, conv.out_channels)
    g.convs.append(_Conv(conv_name, bn_name, cin, cout, conv.in_channels, k, s, p, in_hw, out_hw,
                         act, pool, add, block))
    return out_hw


def _act_of(model: nn.Module, name: str) -> str:
    act = model.get_submodule(name)
    found = _activation_name(act)
    if found is None:
        known = ", ".join(cls.__name__ for cls, _ in ACTIVATIONS)
        raise _Unsupported(f"activation {name} is {type(act).__name__}; handled: {known}")
    return found


def _stem(g: _Graph, model: ResNet, hw: int) -> tuple[str, int]:
    """The stem convs (one 7x7, or a deep stem of three 3x3) and the max-pool; (variable, side)."""
    c1 = model.get_submodule("conv1")
    if isinstance(c1, nn.Sequential):
        kids = list(c1.named_children())
        kinds = "".join("c" if isinstance(m, nn.Conv2d) else "b" if isinstance(m, nn.BatchNorm2d)
                        else "a" for _, m in kids)
        if len(kids) < 4 or kinds != "cba" * (len(kids) // 3) + "c":
            raise _Unsupported(f"deep stem conv1 is laid out as {[type(m).__name__ for _, m in kids]}, "
                               "expected (Conv2d, BatchNorm2d, activation) repeated, then Conv2d")
        cin: str | None = None
        for i in range(0, len(kids) - 1, 3):
            var = f"conv1.{kids[i][0]}"
            hw = _add_conv(g, model, var, f"conv1.{kids[i + 1][0]}", cin, var, hw,
                           _act_of(model, f"conv1.{kids[i + 2][0]}"), None)
            cin = var
        hw = _add_conv(g, model, f"conv1.{kids[-1][0]}", "bn1", cin, STEM_OUT, hw,
                       _act_of(model, "act1"), None)
    else:
        hw = _add_conv(g, model, "conv1", "bn1", None, STEM_OUT, hw, _act_of(model, "act1"), None)
    mp = model.get_submodule("maxpool")
    if isinstance(mp, nn.MaxPool2d) and type(mp) is nn.MaxPool2d:
        if _int(mp.dilation) != 1:
            raise _Unsupported("the stem max-pool is dilated")
        k, s, p = _int(mp.kernel_size), _int(mp.stride), _int(mp.padding)
        g.pool = {"kernel": k, "stride": s, "padding": p, "in_hw": hw, "ceil": int(mp.ceil_mode)}
        hw = _conv_out(hw, k, s, p, ceil=mp.ceil_mode)
    elif type(mp) is not nn.Identity:
        raise _Unsupported(f"stem pooling is {type(mp).__name__} (anti-aliased or conv stem pool)")
    return STEM_OUT, hw


def _block(g: _Graph, model: ResNet, name: str, stage: str, blk: nn.Module, r: str, hw: int
           ) -> tuple[str, int]:
    """Record one residual block reading variable ``r`` at side ``hw``; (output variable, side)."""
    bottleneck = hasattr(blk, "conv3")
    for attr in ("conv1", "bn1", "conv2", "bn2") + (("conv3", "bn3") if bottleneck else ()):
        if not hasattr(blk, attr):
            raise _Unsupported(f"block {name} ({type(blk).__name__}) has no {attr}")
    if getattr(blk, "se", None) is not None:
        raise _Unsupported(f"attention layer {name}.se ({type(blk.se).__name__}, SE/ECA-style)")
    if not isinstance(getattr(blk, "aa", nn.Identity()), nn.Identity):
        raise _Unsupported(f"anti-aliasing layer {name}.aa ({type(blk.aa).__name__})")
    out = f"{name}.out"
    c1 = f"{name}.conv1"
    h1 = _add_conv(g, model, c1, f"{name}.bn1", r, c1, hw, _act_of(model, f"{name}.act1"), name)
    if bottleneck:
        c2 = f"{name}.conv2"
        h2 = _add_conv(g, model, c2, f"{name}.bn2", c1, c2, h1, _act_of(model, f"{name}.act2"), name)
        last = f"{name}.conv3"
        h_out = _add_conv(g, model, last, f"{name}.bn3", c2, out, h2, _act_of(model, f"{name}.act3"),
                          name, add=True)
        inner = [c1, c2]
    else:
        last = f"{name}.conv2"
        h_out = _add_conv(g, model, last, f"{name}.bn2", c1, out, h1, _act_of(model, f"{name}.act2"),
                          name, add=True)
        inner = [c1]
    for v in inner:
        g.var_block[v] = name
    ds = getattr(blk, "downsample", None)
    if ds is None:
        if h_out != hw:
            raise _Unsupported(f"block {name} changes the feature map without a downsample path")
        g.union(out, r)
        removable, reason = True, ""
    else:
        kids = list(ds.named_children())
        if not isinstance(ds, nn.Sequential) or len(kids) not in (2, 3):
            raise _Unsupported(f"downsample {name}.downsample is not (pool,) conv, norm")
        pool = ""
        if len(kids) == 3:
            p = kids[0][1]
            if type(p) is nn.AvgPool2d and _int(p.kernel_size) == 2 and _int(p.stride) == 2 \
                    and _int(p.padding) == 0 and p.ceil_mode and not p.count_include_pad:
                pool = "avg2"
            elif type(p) is not nn.Identity:
                raise _Unsupported(f"downsample pooling {name}.downsample.{kids[0][0]} is {p!r}")
        cn, bn = kids[-2][0], kids[-1][0]
        h_ds = _add_conv(g, model, f"{name}.downsample.{cn}", f"{name}.downsample.{bn}", r, out + "@ds",
                         hw, "none", name, pool=pool)
        if h_ds != h_out:
            raise _Unsupported(f"block {name}: shortcut side {h_ds} differs from the main path's {h_out}")
        g.union(out, out + "@ds")
        removable = False
        changes = []
        if g.sizes[out] != g.sizes[r]:
            changes.append(f"width {g.sizes[r]}->{g.sizes[out]}")
        if h_out != hw:
            changes.append(f"feature map {hw}->{h_out}")
        what = " and ".join(changes) or "nothing, yet has a projection shortcut"
        reason = (f"first block of {stage} changes {what}: its shortcut is a projection, not an "
                  f"identity, so removing it would leave nothing to map its input to the next "
                  f"block's (replacement by the downsample path alone is not offered)")
    g.blocks.append(_BlockInfo(name, stage, removable, reason, inner, last))
    return out, h_out


def _graph(model: nn.Module, side: int) -> _Graph:
    """Read ``model`` into a :class:`_Graph` at input side ``side``; raises ``_Unsupported``."""
    if not isinstance(model, ResNet):
        raise _Unsupported(f"{type(model).__name__} is not a timm ResNet")
    g = _Graph(side=side)
    r, hw = _stem(g, model, side)
    i = 1
    while isinstance(getattr(model, f"layer{i}", None), nn.Sequential):
        stage = f"layer{i}"
        for idx, blk in getattr(model, stage).named_children():
            if isinstance(blk, nn.Identity):  # a block removed by an earlier plan
                continue
            r, hw = _block(g, model, f"{stage}.{idx}", stage, blk, r, hw)
        g.stages[stage] = r
        i += 1
    g.final, g.head_hw = r, hw
    gp, fc = model.get_submodule("global_pool"), model.get_submodule("fc")
    if not isinstance(gp, SelectAdaptivePool2d):
        raise _Unsupported(f"global pool is {type(gp).__name__}")
    g.pool_type, g.feat_mult = gp.pool_type, int(gp.feat_mult())
    if isinstance(fc, nn.Linear):
        if fc.bias is None or fc.in_features != g.sizes[r] * g.feat_mult:
            raise _Unsupported(f"classifier fc takes {fc.in_features} features, the network gives "
                               f"{g.sizes[r] * g.feat_mult}")
        g.num_classes = fc.out_features
    elif not isinstance(fc, nn.Identity):
        raise _Unsupported(f"classifier fc is {type(fc).__name__}")
    for name, mod in model.named_modules():
        if isinstance(mod, nn.BatchNorm2d | nn.Conv2d) and not name.startswith(("conv1", "bn1", "layer")):
            raise _Unsupported(f"unexpected layer {name} ({type(mod).__name__})")
    extra = [n for n, p in model.named_parameters() if not _is_known(g, n)]
    if extra:
        raise _Unsupported(f"parameters outside the conv/BN/fc layers: {extra[:3]}")
    g.name_dims()
    return g


def _is_known(g: _Graph, pname: str) -> bool:
    mod = pname.rsplit(".", 1)[0]
    return mod == "fc" or any(mod in (c.conv, c.bn) for c in g.convs)


def _side(model: nn.Module, config: SpaceConfig) -> int:
    if config.resolution is not None:
        if config.resolution < 1:
            raise MdpError(f"resolution must be a positive number of pixels, got {config.resolution}")
        return int(config.resolution)
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    return int(size[-2]) if size else DEFAULT_SIDE


def _arch_name(model: nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    name = cfg.get("architecture") if isinstance(cfg, dict) else None
    return str(name) if name else None


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` highest scores, ascending; ties go to the lower index."""
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf)
    order = np.argsort(-s, kind="stable")
    return np.sort(order[:k])


@torch.no_grad()
def _slice_conv(conv: nn.Conv2d, cin: torch.Tensor | None, cout: torch.Tensor) -> None:
    w = conv.weight.index_select(0, cout)
    if cin is not None:
        w = w.index_select(1, cin)
    conv.weight = nn.Parameter(w.clone(), requires_grad=conv.weight.requires_grad)
    conv.out_channels, conv.in_channels = w.shape[0], w.shape[1]


@torch.no_grad()
def _slice_bn(bn: nn.BatchNorm2d, idx: torch.Tensor) -> None:
    for pname in ("weight", "bias"):
        p = getattr(bn, pname)
        setattr(bn, pname, nn.Parameter(p.index_select(0, idx).clone(), requires_grad=p.requires_grad))
    for bname in ("running_mean", "running_var"):
        setattr(bn, bname, getattr(bn, bname).index_select(0, idx).clone())
    bn.num_features = len(idx)


def _stats(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Running mean and variance (checked to exist when the graph was read)."""
    if bn.running_mean is None or bn.running_var is None:
        raise MdpError("BatchNorm without running statistics")
    return bn.running_mean, bn.running_var


class _ConvTerm(nn.Module):
    """conv + BN (+ residual add) (+ activation), with an optional 2x2 average pool first.

    A term has one input, so the shortcut of a block-ending conv comes from a constant buffer
    of one sample's shape (broadcast over the batch). The add is part of the term because
    deployment engines fuse conv + BN + add + activation into one kernel.
    """

    def __init__(self, cin: int, cout: int, c: dict[str, Any]) -> None:
        super().__init__()
        k, s, p = int(c["kernel"]), int(c["stride"]), int(c["padding"])
        self.pool: nn.Module = (nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)
                                if c.get("pool") else nn.Identity())
        self.conv = nn.Conv2d(cin, cout, k, stride=s, padding=p, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = _activation(str(c["act"]))
        self.add = bool(c.get("add"))
        hw = int(c["in_hw"])
        if c.get("pool"):
            hw = _conv_out(hw, 2, 2, 0, ceil=True)
        out = _conv_out(hw, k, s, p)
        self.register_buffer("shortcut", torch.randn(1, cout, out, out) if self.add else torch.zeros(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(self.pool(x)))
        if self.add:
            y = y + self.shortcut
        return self.act(y)


class ResNetAdapter:
    """Adapter for ``timm.models.resnet.ResNet`` (see the module docstring)."""

    family = "resnet"

    # -- recognition ---------------------------------------------------------------------

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, ResNet)

    def why_not(self, model: nn.Module) -> str:
        if not isinstance(model, ResNet):
            return f"{type(model).__name__} is not a timm ResNet"
        if _arch_name(model) is None:
            return ("it has no timm pretrained_cfg naming its architecture "
                    "(create it with timm.create_model so that it can be rebuilt)")
        try:
            _graph(model, DEFAULT_SIDE)
        except _Unsupported as exc:
            return str(exc)
        return ""

    def _require(self, model: nn.Module, side: int) -> _Graph:
        why = self.why_not(model)
        if why:
            raise UnsupportedModelError(f"cannot prune {type(model).__name__}: {why}")
        return _graph(model, side)

    def arch(self, model: nn.Module) -> dict[str, Any]:
        name = _arch_name(model)
        if name is None or not isinstance(model, ResNet):
            raise UnsupportedModelError(self.why_not(model) or "not a timm ResNet")
        first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
        pool, fc = model.get_submodule("global_pool"), model.get_submodule("fc")
        return {"name": name, "kwargs": {
            "num_classes": fc.out_features if isinstance(fc, nn.Linear) else 0,
            "in_chans": first.in_channels,
            "global_pool": str(getattr(pool, "pool_type", "avg")),
        }}

    # -- the space -----------------------------------------------------------------------

    def space(self, model: nn.Module, config: SpaceConfig) -> PruningSpace:
        side = _side(model, config)
        g = self._require(model, side)
        layers: dict[str, list[str]] = {d: [] for d in g.dim_order}
        for c in g.convs:
            if c.cin is not None:
                layers[g.dim_of[c.cin]].append(c.conv)
            layers[g.dim_of[c.cout]] += [c.conv, c.bn]
        if g.num_classes:
            layers[g.dim_of[g.final]].append("fc")
        dims = []
        for d in g.dim_order:
            size = g.dim_size[d]
            step, _ = aligned_choices(size, config.min_step, config.max_choices)
            dims.append(Dim(d, "channels", size, step, choices_for(size, step),
                            block=g.dim_block.get(d), layers=tuple(dict.fromkeys(layers[d]))))
        blocks = [Block(b.name, b.removable, b.reason, tuple(g.dim_of[v] for v in b.inner))
                  for b in g.blocks]
        terms = []
        for c in g.convs:
            consts: list[tuple[str, Any]] = [
                ("kernel", c.kernel), ("stride", c.stride), ("padding", c.padding), ("in_hw", c.in_hw),
                ("act", c.act), ("pool", c.pool), ("add", c.add)]
            if c.cin is None:
                consts.append(("cin", c.fixed_cin))
                tdims: tuple[str, ...] = (g.dim_of[c.cout],)
            else:
                tdims = (g.dim_of[c.cin], g.dim_of[c.cout])
            terms.append(Term(c.conv, "conv", tdims, tuple(consts), c.block))
            if c.cout == STEM_OUT and g.pool:
                terms.append(Term("maxpool", "maxpool", (g.dim_of[STEM_OUT],),
                                  tuple(sorted(g.pool.items())), None))
        terms.append(Term("head", "head", (g.dim_of[g.final],),
                          (("in_hw", g.head_hw), ("num_classes", g.num_classes),
                           ("pool", g.pool_type)), None))
        first = g.convs[0]
        locked = [(b.name, b.reason) for b in g.blocks if not b.removable]
        locked.append(("input channels", f"the image has {first.fixed_cin} channels"))
        if g.num_classes:
            locked.append(("classifier outputs", f"the task has {g.num_classes} classes"))
        return PruningSpace(_arch_name(model) or "", self.family, dims, blocks, terms,
                            (first.fixed_cin, side, side), locked, dataclasses.asdict(config))

    def term_module(self, space: PruningSpace, term: Term, widths: tuple[int, ...]
                    ) -> tuple[nn.Module, tuple[int, ...]]:
        if len(widths) != len(term.dims):
            raise MdpError(f"term {term.name} takes {len(term.dims)} widths, got {widths}")
        with torch.random.fork_rng(devices=[]):  # seeded weights, the caller's RNG untouched
            torch.manual_seed(0)
            return self._term_module(term, widths)

    def _term_module(self, term: Term, widths: tuple[int, ...]) -> tuple[nn.Module, tuple[int, ...]]:
        c = term.const
        hw = int(c["in_hw"])
        if term.kind == "conv":
            cin, cout = (int(c["cin"]), widths[0]) if len(widths) == 1 else widths
            return _ConvTerm(cin, cout, c).eval(), (cin, hw, hw)
        if term.kind == "maxpool":
            mp = nn.MaxPool2d(int(c["kernel"]), int(c["stride"]), int(c["padding"]),
                              ceil_mode=bool(c["ceil"]))
            return mp.eval(), (widths[0], hw, hw)
        if term.kind == "head":
            pool, fc = create_classifier(widths[0], int(c["num_classes"]), pool_type=str(c["pool"]))
            return nn.Sequential(pool, fc).eval(), (widths[0], hw, hw)
        raise MdpError(f"term {term.name}: kind {term.kind!r} is not a ResNet term")

    # -- importance ----------------------------------------------------------------------

    def magnitude(self, model: nn.Module, space: PruningSpace) -> Importance:
        """Per unit: sum over the layers writing it of |folded filter|_2 + |folded bias|.

        BN is folded into the conv, so a unit whose conv filter and BN output are zero scores
        exactly 0. A removable block owns its last layer's unit scores: its share of the
        residual width it writes into (``block_shares``), lost on the units kept when the
        block goes; ``blocks`` holds their sum.
        """
        g = self._fitting(model, space)
        units = {d.name: np.zeros(d.size) for d in space.dims}
        per_conv: dict[str, np.ndarray] = {}
        with torch.no_grad():
            for c in g.convs:
                conv = _sub(model, c.conv, nn.Conv2d)
                bn = _sub(model, c.bn, nn.BatchNorm2d)
                mean, var = _stats(bn)
                scale = bn.weight / torch.sqrt(var + bn.eps)
                shift = bn.bias - mean * scale
                w = conv.weight.flatten(1).norm(dim=1) * scale.abs() + shift.abs()
                per_conv[c.conv] = w.double().cpu().numpy()
                units[g.dim_of[c.cout]] += per_conv[c.conv]
        blocks = {b.name: float(per_conv[b.last].sum()) for b in g.blocks if b.removable}
        shares = {b.name: {g.dim_of[self._last(g, b).cout]: per_conv[b.last]} for b in g.blocks if b.removable}
        return Importance(units, blocks, shares)

    def taylor_terms(self, model: nn.Module, space: PruningSpace
                     ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Signed gamma*dL/dgamma + beta*dL/dbeta per unit, summed over the BNs writing a width.

        A removable block scores the sum over units of its last BN's terms: the share of the
        residual width it writes, which goes when the block goes (its inner widths go too,
        and are counted by their own dims).
        """
        units, blocks, _ = self.taylor_shares(model, space)
        return units, blocks

    def taylor_shares(self, model: nn.Module, space: PruningSpace
                      ) -> tuple[dict[str, np.ndarray], dict[str, float], dict[str, dict[str, np.ndarray]]]:
        """:meth:`taylor_terms`, and per removable block the fraction of each unit's score on
        the residual width it writes that is its own: its last BN's |term| over the sum of
        |term| of every BN writing that width (0 where all are 0). A unit's score (the
        absolute value of the summed terms) times these fractions splits it among its
        writers; the caller accumulates that as the block's share."""
        g = self._fitting(model, space)
        units = {d.name: np.zeros(d.size) for d in space.dims}
        spread = {d.name: np.zeros(d.size) for d in space.dims}  # sum of |term| over the writers
        per_bn: dict[str, np.ndarray] = {}
        with torch.no_grad():
            for c in g.convs:
                bn = _sub(model, c.bn, nn.BatchNorm2d)
                t = torch.zeros_like(bn.weight, dtype=torch.float64)
                for p in (bn.weight, bn.bias):
                    if p.grad is not None:
                        t += p.detach().double() * p.grad.double()
                per_bn[c.conv] = t.cpu().numpy()
                units[g.dim_of[c.cout]] += per_bn[c.conv]
                spread[g.dim_of[c.cout]] += np.abs(per_bn[c.conv])
        blocks = {b.name: float(per_bn[b.last].sum()) for b in g.blocks if b.removable}
        fractions = {}
        for b in g.blocks:
            if b.removable:
                dim = g.dim_of[self._last(g, b).cout]
                total = spread[dim]
                own = np.abs(per_bn[b.last])
                fractions[b.name] = {dim: np.divide(own, total, out=np.zeros_like(own), where=total > 0)}
        return units, blocks, fractions

    @staticmethod
    def _last(g: _Graph, b: _BlockInfo) -> _Conv:
        """The conv of block ``b`` whose output is added to the shortcut."""
        return next(c for c in g.convs if c.conv == b.last)

    # -- surgery -------------------------------------------------------------------------

    def _fitting(self, model: nn.Module, space: PruningSpace) -> _Graph:
        """The graph of ``model``, checked to be the one ``space`` was built from."""
        g = self._require(model, space.input_size[1])
        mine = [(d, g.dim_size[d]) for d in g.dim_order]
        theirs = [(d.name, d.size) for d in space.dims]
        if mine != theirs or _arch_name(model) != space.model:
            raise PlanError(f"the pruning space (of {space.model}, id {space.space_id}) was not built "
                            f"from this model ({_arch_name(model)}, {len(mine)} dims)")
        return g

    def apply(self, model: nn.Module, space: PruningSpace, plan: Plan,
              importance: Importance) -> nn.Module:
        g = self._fitting(model, space)
        space.validate(plan)
        missing = [d.name for d in space.dims if d.name not in importance.units]
        if missing:
            raise PlanError(f"importance lacks dims {missing[:5]}")
        ref = next(model.parameters())
        keep: dict[str, np.ndarray] = {}
        for d in space.dims:
            scores = np.asarray(importance.units[d.name])
            if scores.shape != (d.size,):
                raise PlanError(f"importance for {d.name} has shape {scores.shape}, the dim has {d.size} units")
            keep[d.name] = _top_k(scores, plan.widths[d.name])
        idx = {k: torch.as_tensor(v, dtype=torch.long, device=ref.device) for k, v in keep.items()}
        if not isinstance(model, ResNet):  # _fitting has read it as one
            raise UnsupportedModelError(f"{type(model).__name__} is not a timm ResNet")
        pruned = copy.deepcopy(model)
        removed = set(plan.removed)
        for b in removed:
            stage, i = b.rsplit(".", 1)
            _sub(pruned, stage, nn.Sequential)[int(i)] = nn.Identity()
        for c in g.convs:
            if c.block in removed:
                continue
            cin = None if c.cin is None else idx[g.dim_of[c.cin]]
            out = idx[g.dim_of[c.cout]]
            _slice_conv(_sub(pruned, c.conv, nn.Conv2d), cin, out)
            _slice_bn(_sub(pruned, c.bn, nn.BatchNorm2d), out)
        final = idx[g.dim_of[g.final]]
        width = len(final)
        if g.num_classes:
            fc = _sub(pruned, "fc", nn.Linear)
            with torch.no_grad():
                w = fc.weight.view(fc.out_features, g.feat_mult, -1).index_select(2, final)
                fc.weight = nn.Parameter(w.reshape(fc.out_features, -1).clone(),
                                         requires_grad=fc.weight.requires_grad)
            fc.in_features = width * g.feat_mult
        pruned.num_features = width
        pruned.head_hidden_size = width * g.feat_mult
        widths = {STEM_OUT: len(idx[g.dim_of[STEM_OUT]])}
        widths.update({s: len(idx[g.dim_of[v]]) for s, v in g.stages.items()})
        for info in getattr(pruned, "feature_info", []):
            key = STEM_OUT if info.get("module") == "act1" else info.get("module")
            if key in widths:
                info["num_chs"] = widths[key]
        for p in pruned.parameters():
            p.grad = None
        pruned.mdp_indices = {k: [int(i) for i in v] for k, v in keep.items()}  # type: ignore[assignment]
        return pruned

    def param_count(self, space: PruningSpace, plan: Plan) -> int:
        """Conv weights and BN affine parameters of every kept layer, plus the classifier."""
        space.validate(plan)
        total = 0
        for t in space.kept_terms(plan):
            c = t.const
            w = space.term_widths(t, plan)
            if t.kind == "conv":
                cin, cout = (int(c["cin"]), w[0]) if len(w) == 1 else w
                total += cin * cout * int(c["kernel"]) ** 2 + 2 * cout
            elif t.kind == "head" and int(c["num_classes"]):
                n = int(c["num_classes"])
                mult = 2 if c["pool"] == "catavgmax" else 1
                total += w[0] * mult * n + n
        return total
