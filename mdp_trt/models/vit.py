"""timm VisionTransformer and DeiT: class, register and distillation tokens, any patch/image size.

Dims: ``embed`` (the embedding width, shared by the patch embedding, the prefix tokens, the
position embedding, every block, the norms and the head) and, per block ``blocks.i``,
``blocks.i.heads`` (attention heads), ``blocks.i.qk`` (query/key channels per head),
``blocks.i.v`` (value channels per head) and ``blocks.i.mlp`` (MLP hidden width). Every block
is removable; its four dims are private to it.

Surgery keeps the top-scoring units of every dim. For ``qk`` and ``v`` one set of channel
indices is kept, the same in every kept head: the scores of a channel are aggregated over
the heads, so one index set per block is what they rank. A pruned block's attention is a
:class:`~mdp_trt.models.attention.PrunedAttention` (its query/key and value widths may
differ), which keeps the dense softmax scale; everything else stays a timm module.

Latency terms: ``patch_embed`` (embed), per block ``attn_qk`` (embed, heads, qk),
``attn_v`` (embed, heads, v) and ``mlp`` (embed, mlp), and ``head`` (embed). Constants that
are the usual ViT defaults (LayerNorm, biases, GELU, no layer scale...) are left out of a
term's constants, so standard models have short signatures; anything else is named.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from timm.layers import Attention, LayerNorm, LayerScale, Mlp, PatchEmbed, QuickGELU, RmsNorm
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, VisionTransformer, global_pool_nlc
from torch import nn

from mdp_trt.errors import MdpError, UnsupportedModelError
from mdp_trt.models import common
from mdp_trt.models.attention import (
    AttnQKTerm,
    AttnVTerm,
    PrunedAttention,
    qkv_rows,
    sliced_qk_norms,
    sliced_qkv_proj,
)
from mdp_trt.models.base import Importance, SpaceConfig
from mdp_trt.models.common import Reducer, Unsupported, new_param, slice_linear, slice_vector
from mdp_trt.space import Block as SpaceBlock
from mdp_trt.space import Dim, Plan, PruningSpace, Term, aligned_choices, choices_for

FAMILY = "vit"
POOLS = ("token", "avg", "avgmax", "max", "")
# Parameter-free MLP activations that map 0 to 0 (a silent hidden unit stays silent): the
# module class, the extra constructor arguments that tell it apart, and its name in a term.
ACTIVATIONS: tuple[tuple[type[nn.Module], tuple[tuple[str, Any], ...], str], ...] = (
    (nn.GELU, (("approximate", "none"),), "gelu"),
    (nn.GELU, (("approximate", "tanh"),), "gelu_tanh"),
    (QuickGELU, (), "quick_gelu"),
    (nn.ReLU, (), "relu"),
    (nn.SiLU, (), "silu"),
)
TOKEN_PARAMS = ("cls_token", "reg_token", "dist_token", "pos_embed")
EMBED_NORMS = ("patch_embed.norm", "norm_pre", "norm", "fc_norm")
QK_NORM_PARAMS = tuple(f"attn.{m}_norm.{p}" for m in "qk" for p in ("weight", "bias"))
_M = TypeVar("_M", bound=nn.Module)


@dataclass(frozen=True)
class _Blk:
    """One transformer block as read from the model."""

    heads: int
    qk: int
    v: int
    mlp: int
    scale: float
    qkv_bias: bool
    proj_bias: bool
    mlp_bias: bool
    ls1: bool
    ls2: bool
    act: str
    qk_norm: str | None = None  # norm kind of the per-head query/key norms (timm's qk_norm)


@dataclass(frozen=True)
class _Vit:
    """What the adapter needs to know about a ViT, read once from the module tree."""

    name: str
    in_chans: int
    img: tuple[int, int]
    patch: tuple[int, int]
    grid: int
    embed: int
    prefix: int
    pos: str  # "all" (position embedding over prefix and patches), "patches", "none"
    patch_bias: bool
    embed_norm: bool
    pre_norm: bool
    norm: str  # "layernorm" | "rmsnorm"
    final: str  # "norm" (before pooling), "fc_norm" (after pooling), "none"
    pool: str
    num_classes: int
    distilled: bool
    blocks: tuple[_Blk, ...]

    @property
    def tokens(self) -> int:
        return self.grid + self.prefix


# -- reading a model ----------------------------------------------------------------------


def _sub(model: nn.Module, name: str, cls: type[_M]) -> _M:
    """Submodule ``name`` of ``model``, which must be a ``cls`` (checked when it was read)."""
    m = model.get_submodule(name)
    if not isinstance(m, cls):
        raise MdpError(f"internal: {name} is {type(m).__name__}, expected {cls.__name__}")
    return m


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    a, b = v
    return int(a), int(b)


def _scalar_or_pair(v: tuple[int, int]) -> int | tuple[int, int]:
    return v[0] if v[0] == v[1] else v


def _norm_kind(model: nn.Module, name: str, width: int) -> str | None:
    """'layernorm' / 'rmsnorm' for a supported norm over ``width`` channels, None for Identity."""
    m = model.get_submodule(name)
    if type(m) is nn.Identity:
        return None
    if type(m) in (nn.LayerNorm, LayerNorm):
        if m.weight is None or m.bias is None:
            raise Unsupported(f"LayerNorm {name} has no affine weight or bias")
        kind = "layernorm"
    elif type(m) is RmsNorm:
        if m.weight is None:
            raise Unsupported(f"RmsNorm {name} has no affine weight")
        kind = "rmsnorm"
    else:
        raise Unsupported(
            f"normalization {name} is {type(m).__name__}; handled: LayerNorm, RmsNorm"
        )
    shape = tuple(getattr(m, "normalized_shape", ()))
    if shape != (width,):
        raise Unsupported(f"{name} normalizes {shape}, expected ({width},)")
    return kind


def _linear(model: nn.Module, name: str, fan_in: int, fan_out: int | None = None) -> nn.Linear:
    m = model.get_submodule(name)
    if type(m) is not nn.Linear:
        raise Unsupported(f"{name} is {type(m).__name__}, expected a Linear")
    if m.in_features != fan_in or (fan_out is not None and m.out_features != fan_out):
        raise Unsupported(
            f"{name} maps {m.in_features}->{m.out_features}, expected "
            f"{fan_in}->{fan_out if fan_out is not None else 'any'}"
        )
    return m


def _act_name(m: nn.Module, where: str) -> str:
    for cls, attrs, name in ACTIVATIONS:
        if type(m) is cls and all(getattr(m, k, None) == v for k, v in attrs):
            return name
    handled = ", ".join(dict.fromkeys(cls.__name__ for cls, _, _ in ACTIVATIONS))
    raise Unsupported(f"MLP activation {where} is {m!r}; handled: {handled}")


def _activation(name: str) -> nn.Module:
    for cls, attrs, known in ACTIVATIONS:
        if name == known:
            return cls(**dict(attrs))
    raise MdpError(f"unknown MLP activation {name!r} in a latency term")


def _layer_scale(model: nn.Module, name: str, width: int) -> bool:
    m = model.get_submodule(name)
    if type(m) is nn.Identity:
        return False
    if type(m) is not LayerScale or tuple(m.gamma.shape) != (width,):
        raise Unsupported(
            f"{name} is {type(m).__name__}, expected timm LayerScale over {width} channels"
        )
    return True


def _block_norms(model: nn.Module, n: str, embed: int, norms: set[str]) -> None:
    """Add the kinds of block ``n``'s ``norm1`` and ``norm2`` to ``norms``; both must exist."""
    for norm in ("norm1", "norm2"):
        kind = _norm_kind(model, f"{n}.{norm}", embed)
        if kind is None:
            raise Unsupported(f"block {n} has no {norm}")
        norms.add(kind)


def _classes(model: nn.Module, name: str, embed: int) -> int:
    """Outputs of the classifier ``name`` (a Linear with a bias), 0 where it is an Identity."""
    if type(model.get_submodule(name)) is nn.Identity:
        return 0
    lin = _linear(model, name, embed)
    if lin.bias is None:
        raise Unsupported(f"classifier {name} has no bias")
    return lin.out_features


def _read_block(model: nn.Module, i: int, embed: int, norms: set[str]) -> _Blk:
    n = f"blocks.{i}"
    blk = model.get_submodule(n)
    if type(blk) is not Block:
        raise Unsupported(
            f"block {n} is {type(blk).__name__}; only the plain timm Block (pre-norm "
            f"attention then MLP) is handled, not fused or parallel variants"
        )
    _block_norms(model, n, embed, norms)
    attn = blk.attn
    if type(attn) is Attention:
        if type(getattr(attn, "norm", nn.Identity())) is not nn.Identity:
            raise Unsupported(f"{n}.attn normalizes its output before the projection (scale_norm)")
        if getattr(attn, "gate", None) is not None:
            raise Unsupported(f"{n}.attn has an output gate")
        heads, qk = int(attn.num_heads), int(attn.head_dim)
        v = qk
    elif type(attn) is PrunedAttention:
        heads, qk, v = attn.num_heads, attn.qk_dim, attn.v_dim
    else:
        raise Unsupported(
            f"attention {n}.attn is {type(attn).__name__}; handled: timm Attention "
            f"(no relative position, rotary, differential or fused variants)"
        )
    qk_norms = {_norm_kind(model, f"{n}.attn.{sub}", qk) for sub in ("q_norm", "k_norm")}
    if len(qk_norms) > 1:
        raise Unsupported(f"{n}.attn normalizes queries and keys differently ({qk_norms})")
    qkv = _linear(model, f"{n}.attn.qkv", embed, heads * (2 * qk + v))
    proj = _linear(model, f"{n}.attn.proj", heads * v, embed)
    mlp = blk.mlp
    if type(mlp) is not Mlp:
        raise Unsupported(
            f"MLP {n}.mlp is {type(mlp).__name__}; handled: timm Mlp (not GLU/SwiGLU)"
        )
    if type(mlp.norm) is not nn.Identity:
        raise Unsupported(f"MLP {n}.mlp normalizes its hidden units (scale_mlp_norm)")
    fc1 = _linear(model, f"{n}.mlp.fc1", embed)
    fc2 = _linear(model, f"{n}.mlp.fc2", fc1.out_features, embed)
    if (fc1.bias is None) != (fc2.bias is None):
        raise Unsupported(f"{n}.mlp has a bias on one of its two layers only")
    return _Blk(
        heads,
        qk,
        v,
        fc1.out_features,
        float(attn.scale),
        qkv.bias is not None,
        proj.bias is not None,
        fc1.bias is not None,
        _layer_scale(model, f"{n}.ls1", embed),
        _layer_scale(model, f"{n}.ls2", embed),
        _act_name(mlp.act, f"{n}.mlp.act"),
        qk_norms.pop(),
    )


def _read(model: nn.Module) -> _Vit:
    """Read ``model`` into a :class:`_Vit`; raises ``Unsupported`` with what blocked it."""
    if not isinstance(model, VisionTransformer):
        raise Unsupported(f"{type(model).__name__} is not a timm VisionTransformer")
    if type(model) not in (VisionTransformer, VisionTransformerDistilled):
        raise Unsupported(
            f"{type(model).__name__} subclasses VisionTransformer with its own behaviour"
        )
    name = common.arch_name(model)
    if name is None:
        raise Unsupported(
            "it has no timm pretrained_cfg naming its architecture "
            "(create it with timm.create_model so that it can be rebuilt)"
        )
    pe = model.patch_embed
    if type(pe) is not PatchEmbed or type(pe.proj) is not nn.Conv2d:
        raise Unsupported(
            f"patch embedding is {type(pe).__name__}; handled: timm PatchEmbed with a Conv2d"
        )
    if pe.img_size is None:
        raise Unsupported("the patch embedding has no fixed image size")
    if getattr(pe, "dynamic_img_pad", False):
        raise Unsupported("the patch embedding pads images (dynamic_img_pad)")
    conv = pe.proj
    patch = _pair(pe.patch_size)
    if isinstance(conv.padding, str):
        raise Unsupported(f"patch embedding conv uses padding {conv.padding!r}")
    if (
        tuple(conv.kernel_size) != patch
        or tuple(conv.stride) != patch
        or _pair(conv.padding) != (0, 0)
        or conv.groups != 1
        or tuple(conv.dilation) != (1, 1)
    ):
        raise Unsupported(f"patch embedding conv {conv} is not a plain {patch} patchify")
    embed = conv.out_channels
    img = _pair(pe.img_size)
    grid = (img[0] // patch[0]) * (img[1] // patch[1])
    norms: set[str] = set()
    embed_norm = _norm_kind(model, "patch_embed.norm", embed)
    pre_norm = _norm_kind(model, "norm_pre", embed)
    for kind in (embed_norm, pre_norm):
        if kind:
            norms.add(kind)

    counts = {}
    for tok in ("cls_token", "reg_token", "dist_token"):
        p = getattr(model, tok, None)
        if p is None:
            counts[tok] = 0
            continue
        if (
            not isinstance(p, nn.Parameter)
            or p.dim() != 3
            or p.shape[0] != 1
            or p.shape[2] != embed
        ):
            raise Unsupported(f"{tok} has shape {tuple(p.shape)}, expected (1, n, {embed})")
        counts[tok] = p.shape[1]
    prefix = int(model.num_prefix_tokens)
    if sum(counts.values()) != prefix:
        raise Unsupported(
            f"{prefix} prefix tokens declared, {sum(counts.values())} token parameters found"
        )
    pos_p = model.pos_embed
    if pos_p is None:
        pos = "none"
    else:
        pos = "patches" if model.no_embed_class else "all"
        want = grid if pos == "patches" else grid + prefix
        if tuple(pos_p.shape) != (1, want, embed):
            raise Unsupported(
                f"pos_embed has shape {tuple(pos_p.shape)}, expected (1, {want}, {embed})"
            )

    blocks = model.blocks
    if not isinstance(blocks, nn.Sequential):
        raise Unsupported(f"blocks is {type(blocks).__name__}, expected nn.Sequential")
    blks = tuple(_read_block(model, i, embed, norms) for i in range(len(blocks)))

    if getattr(model, "attn_pool", None) is not None:
        raise Unsupported(f"attention pooling head (global_pool={model.global_pool!r})")
    pool = str(model.global_pool)
    if pool not in POOLS:
        raise Unsupported(f"global pool {pool!r}; handled: {', '.join(repr(p) for p in POOLS)}")
    final_norm = _norm_kind(model, "norm", embed)
    fc_norm = _norm_kind(model, "fc_norm", embed)
    if final_norm and fc_norm:
        raise Unsupported("both a final norm and an fc_norm")
    final = "norm" if final_norm else "fc_norm" if fc_norm else "none"
    for kind in (final_norm, fc_norm):
        if kind:
            norms.add(kind)
    if len(norms) > 1:
        raise Unsupported(f"mixed normalization layers {sorted(norms)}")
    distilled = isinstance(model, VisionTransformerDistilled)
    num_classes = 0
    for head in ("head", "head_dist") if distilled else ("head",):
        num_classes = _classes(model, head, embed) or num_classes
    if distilled and type(model.head) is not type(model.head_dist):
        raise Unsupported("the class and distillation heads differ in kind")

    known = {"patch_embed.proj", *EMBED_NORMS, "head", "head_dist"}
    for i in range(len(blks)):
        known |= {
            f"blocks.{i}.{m}"
            for m in ("norm1", "norm2", "attn.qkv", "attn.proj", "ls1", "ls2", "mlp.fc1", "mlp.fc2",
                      "attn.q_norm", "attn.k_norm")
        }
    extra = [
        p
        for p, _ in model.named_parameters()
        if p not in TOKEN_PARAMS and p.rsplit(".", 1)[0] not in known
    ]
    if extra:
        raise Unsupported(f"parameters outside the layers this adapter prunes: {extra[:3]}")
    return _Vit(
        name,
        conv.in_channels,
        img,
        patch,
        grid,
        embed,
        prefix,
        pos,
        conv.bias is not None,
        embed_norm is not None,
        pre_norm is not None,
        norms.pop() if norms else "layernorm",
        final,
        pool,
        num_classes,
        distilled,
        blks,
    )


def _dim_names(info: _Vit) -> list[tuple[str, str, int]]:
    """(name, kind, size) of every dim, in space order."""
    out = [("embed", "embed", info.embed)]
    for i, b in enumerate(info.blocks):
        n = f"blocks.{i}"
        out += [
            (f"{n}.heads", "heads", b.heads),
            (f"{n}.qk", "qk", b.qk),
            (f"{n}.v", "v", b.v),
            (f"{n}.mlp", "mlp", b.mlp),
        ]
    return out


# -- units: which weights each unit of a dim owns -------------------------------------------


def _rows(n: int) -> Reducer:
    """Per-unit sums over axis 0 (output rows, biases, norm weights)."""
    return lambda t: t.reshape(n, -1).sum(1)


def _cols(n: int) -> Reducer:
    """Per-unit sums over the last axis (input columns, token embeddings)."""
    return lambda t: t.reshape(-1, n).sum(0)


def _heads_qkv(h: int, q: int) -> Reducer:
    def red(t: torch.Tensor) -> torch.Tensor:
        hq = h * q
        return sum(
            (part.reshape(h, -1).sum(1) for part in (t[:hq], t[hq : 2 * hq], t[2 * hq :])),
            torch.zeros(h, dtype=t.dtype, device=t.device),
        )

    return red


def _heads_proj(h: int) -> Reducer:
    return lambda t: t.reshape(t.shape[0], h, -1).sum((0, 2))


def _qk_qkv(h: int, q: int) -> Reducer:
    return lambda t: (
        t[: h * q].reshape(h, q, -1).sum((0, 2))
        + t[h * q : 2 * h * q].reshape(h, q, -1).sum((0, 2))
    )


def _v_qkv(h: int, q: int, v: int) -> Reducer:
    return lambda t: t[2 * h * q :].reshape(h, v, -1).sum((0, 2))


def _v_proj(h: int, v: int) -> Reducer:
    return lambda t: t.reshape(t.shape[0], h, v).sum((0, 1))


def _owners(model: nn.Module, info: _Vit) -> dict[str, list[tuple[str, Reducer]]]:
    """For every dim, the parameters its units own and how to sum a tensor of each into units.

    ``embed``: every parameter along its embedding axis (rows of what writes the residual
    stream, columns of what reads it, the last axis of tokens). ``heads``: a head's q, k, v
    rows and the output-projection columns reading it. ``qk``: channel j of q and k in every
    head. ``v``: value channel j in every head and the projection columns reading it.
    ``mlp``: fc1 rows (and bias) and fc2 columns.
    """
    e = info.embed
    reads = ("attn.qkv.weight", "mlp.fc1.weight", "head.weight", "head_dist.weight")
    skip = ("attn.qkv.bias", "mlp.fc1.bias", "head.bias", "head_dist.bias", *QK_NORM_PARAMS)
    own: dict[str, list[tuple[str, Reducer]]] = {"embed": []}
    for pname, _ in model.named_parameters():
        if pname.endswith(skip):
            continue
        by_col = pname in TOKEN_PARAMS or pname.endswith(reads)
        own["embed"].append((pname, _cols(e) if by_col else _rows(e)))
    params = dict(model.named_parameters())
    for i, b in enumerate(info.blocks):
        n = f"blocks.{i}"
        qkv = [f"{n}.attn.qkv.weight"] + ([f"{n}.attn.qkv.bias"] if b.qkv_bias else [])
        proj = f"{n}.attn.proj.weight"
        own[f"{n}.heads"] = [(p, _heads_qkv(b.heads, b.qk)) for p in qkv] + [
            (proj, _heads_proj(b.heads))
        ]
        own[f"{n}.qk"] = [(p, _qk_qkv(b.heads, b.qk)) for p in qkv] + [
            (f"{n}.{p}", _rows(b.qk)) for p in QK_NORM_PARAMS if f"{n}.{p}" in params
        ]
        own[f"{n}.v"] = [(p, _v_qkv(b.heads, b.qk, b.v)) for p in qkv] + [
            (proj, _v_proj(b.heads, b.v))
        ]
        fc1 = [f"{n}.mlp.fc1.weight"] + ([f"{n}.mlp.fc1.bias"] if b.mlp_bias else [])
        own[f"{n}.mlp"] = [(p, _rows(b.mlp)) for p in fc1] + [(f"{n}.mlp.fc2.weight", _cols(b.mlp))]
    missing = [p for items in own.values() for p, _ in items if p not in params]
    if missing:  # _read checked the layout; this guards the table above
        raise MdpError(f"internal: parameters {missing[:3]} not found")
    return own


def _unit_sums(
    model: nn.Module, info: _Vit, f: Callable[[nn.Parameter], torch.Tensor | None]
) -> dict[str, np.ndarray]:
    """Per dim, the per-unit sums of ``f(param)`` over the parameters its units own."""
    sizes = {name: size for name, _, size in _dim_names(info)}
    return common.unit_sums(model, sizes, _owners(model, info), f)


def _branch_outputs(info: _Vit, i: int) -> list[tuple[str, str | None, str | None]]:
    """(weight, bias, layer-scale gamma) of the two layers writing block i's residual branches."""
    n, b = f"blocks.{i}", info.blocks[i]
    return [
        (
            f"{n}.attn.proj.weight",
            f"{n}.attn.proj.bias" if b.proj_bias else None,
            f"{n}.ls1.gamma" if b.ls1 else None,
        ),
        (
            f"{n}.mlp.fc2.weight",
            f"{n}.mlp.fc2.bias" if b.mlp_bias else None,
            f"{n}.ls2.gamma" if b.ls2 else None,
        ),
    ]


# -- term modules ---------------------------------------------------------------------------


class _RmsNormTerm(nn.Module):
    """RMS norm written out in elementary ops: timm's ``RmsNorm`` calls ``aten::rms_norm``, which
    the TorchScript ONNX exporter cannot export at opset 17, and a term must export."""

    def __init__(self, width: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _norm(kind: str, width: int) -> nn.Module:
    return _RmsNormTerm(width) if kind == "rmsnorm" else nn.LayerNorm(width, eps=1e-6)


class _PatchTerm(nn.Module):
    """Patchify conv, prefix tokens, position embedding (and the optional embedding norms)."""

    def __init__(self, c: dict[str, Any], embed: int) -> None:
        super().__init__()
        ph, pw = _pair(c["patch"])
        h, w = _pair(c["img"])
        grid, tokens = (h // ph) * (w // pw), int(c["tokens"])
        norm = str(c.get("norm", "layernorm"))
        self.proj = nn.Conv2d(
            int(c["in_chans"]), embed, (ph, pw), stride=(ph, pw), bias=bool(c.get("bias", True))
        )
        self.embed_norm = _norm(norm, embed) if c.get("embed_norm") else nn.Identity()
        self.prefix = nn.Parameter(torch.randn(1, tokens - grid, embed)) if tokens > grid else None
        self.pos_mode = str(c.get("pos", "all"))
        n_pos = {"all": tokens, "patches": grid}.get(self.pos_mode, 0)
        self.pos = nn.Parameter(0.02 * torch.randn(1, n_pos, embed)) if n_pos else None
        self.norm_pre = _norm(norm, embed) if c.get("pre_norm") else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed_norm(self.proj(x).flatten(2).transpose(1, 2))
        if self.pos is not None and self.pos_mode == "patches":
            x = x + self.pos
        if self.prefix is not None:
            x = torch.cat([self.prefix.expand(x.shape[0], -1, -1), x], dim=1)
        if self.pos is not None and self.pos_mode == "all":
            x = x + self.pos
        return self.norm_pre(x)


class _MlpTerm(nn.Module):
    """norm2, fc1, activation, fc2, layer scale, residual add."""

    def __init__(self, c: dict[str, Any], embed: int, hidden: int) -> None:
        super().__init__()
        bias = bool(c.get("bias", True))
        self.norm = _norm(str(c.get("norm", "layernorm")), embed)
        self.fc1 = nn.Linear(embed, hidden, bias=bias)
        self.act = _activation(str(c.get("act", "gelu")))
        self.fc2 = nn.Linear(hidden, embed, bias=bias)
        self.gamma = nn.Parameter(torch.rand(embed)) if c.get("ls") else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc2(self.act(self.fc1(self.norm(x))))
        if self.gamma is not None:
            y = y * self.gamma
        return x + y


class _HeadTerm(nn.Module):
    """Final norm, pooling (or the class and distillation tokens), fc_norm, classifier(s)."""

    def __init__(self, c: dict[str, Any], embed: int) -> None:
        super().__init__()
        final, norm, n = (
            str(c.get("final", "norm")),
            str(c.get("norm", "layernorm")),
            int(c["num_classes"]),
        )
        self.norm = _norm(norm, embed) if final == "norm" else nn.Identity()
        self.fc_norm = _norm(norm, embed) if final == "fc_norm" else nn.Identity()
        self.pool, self.prefix = str(c["pool"]), int(c["prefix"])
        self.head: nn.Module = nn.Linear(embed, n) if n else nn.Identity()
        self.head_dist: nn.Module | None = None
        if c.get("dist"):
            self.head_dist = nn.Linear(embed, n) if n else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        if self.head_dist is not None:
            return (self.head(x[:, 0]) + self.head_dist(x[:, 1])) / 2
        x = global_pool_nlc(x, pool_type=self.pool, num_prefix_tokens=self.prefix)
        return self.head(self.fc_norm(x))


# -- surgery helpers ------------------------------------------------------------------------


@torch.no_grad()
def _pruned_attention(
    attn: nn.Module,
    b: _Blk,
    e: torch.Tensor,
    heads: torch.Tensor,
    qk: torch.Tensor,
    v: torch.Tensor,
) -> PrunedAttention:
    """A :class:`PrunedAttention` holding the kept rows and columns of ``attn``'s weights."""
    rows, cols = qkv_rows(heads, qk, v, b.heads, b.qk, b.v)
    drop = attn.get_submodule("attn_drop")
    out_drop = attn.get_submodule("proj_drop")
    new = PrunedAttention(
        len(e),
        len(heads),
        len(qk),
        len(v),
        b.scale,
        qkv_bias=b.qkv_bias,
        proj_bias=b.proj_bias,
        attn_drop=float(getattr(drop, "p", 0.0)),
        proj_drop=float(getattr(out_drop, "p", 0.0)),
    )
    sliced_qk_norms(attn, new, qk)
    new.qkv, new.proj = sliced_qkv_proj(
        _sub(attn, "qkv", nn.Linear), _sub(attn, "proj", nn.Linear), rows, cols, e
    )
    new.train(attn.training)
    return new


# -- the adapter ----------------------------------------------------------------------------


class ViTAdapter:
    """Adapter for ``timm`` ``VisionTransformer`` and ``VisionTransformerDistilled`` (DeiT)."""

    family = FAMILY

    # -- recognition --------------------------------------------------------------------

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, VisionTransformer)

    def why_not(self, model: nn.Module) -> str:
        return common.why_not(_read, model)

    def _require(self, model: nn.Module) -> _Vit:
        return common.require(_read, model)

    def arch(self, model: nn.Module) -> dict[str, Any]:
        """The timm name and the keyword arguments that rebuild the dense model.

        A pruned model answers with the architecture of the dense model it came from
        (recorded by :meth:`apply` as ``mdp_arch``), since plans are applied to that.
        """
        stored = getattr(model, "mdp_arch", None)
        if isinstance(stored, dict):
            return copy.deepcopy(stored)
        info = self._require(model)
        if hasattr(model, "mdp_indices") or any(
            type(m) is PrunedAttention for m in model.modules()
        ):
            raise UnsupportedModelError(
                "this ViT was pruned and does not record the dense architecture it came from "
                "(mdp_arch); rebuild it with mdp_trt.load_pruned"
            )
        if not isinstance(model, VisionTransformer):  # _read has checked it; this narrows the type
            raise UnsupportedModelError(f"{type(model).__name__} is not a timm VisionTransformer")
        kwargs: dict[str, Any] = {
            "num_classes": info.num_classes,
            "img_size": _scalar_or_pair(info.img),
            "in_chans": info.in_chans,
            "patch_size": _scalar_or_pair(info.patch),
            "global_pool": info.pool,
            "embed_dim": info.embed,
            "depth": len(info.blocks),
            "class_token": bool(model.has_class_token),
            "reg_tokens": int(model.num_reg_tokens),
            "no_embed_class": bool(model.no_embed_class),
            "dynamic_img_size": bool(model.dynamic_img_size),
            "pre_norm": info.pre_norm,
            "final_norm": info.final != "none",
            "fc_norm": info.final == "fc_norm",
        }
        if info.pos == "none":
            kwargs["pos_embed"] = "none"
        if info.embed_norm:
            kwargs["embed_norm_layer"] = info.norm
        if info.blocks:
            b = info.blocks[0]
            ratio = b.mlp / info.embed
            if int(info.embed * ratio) != b.mlp:
                ratio = (b.mlp + 0.5) / info.embed
            kwargs.update(
                num_heads=b.heads, mlp_ratio=ratio, qkv_bias=b.qkv_bias, proj_bias=b.proj_bias
            )
            if b.qk_norm:
                kwargs["qk_norm"] = True
            if b.ls1 or b.ls2:
                gamma = model.get_parameter("blocks.0.ls1.gamma" if b.ls1 else "blocks.0.ls2.gamma")
                kwargs["init_values"] = float(gamma.detach().flatten()[0]) or 1e-5
        return {"name": info.name, "kwargs": kwargs}

    # -- the space ----------------------------------------------------------------------

    def space(self, model: nn.Module, config: SpaceConfig) -> PruningSpace:
        info = self._require(model)
        common.check_config(
            config, info.name, info.img, "a ViT's input size is fixed when it is created: "
        )
        dims = []
        layers = _dim_layers(model, info)
        block_of = {
            f"blocks.{i}.{k}": f"blocks.{i}"
            for i in range(len(info.blocks))
            for k in ("heads", "qk", "v", "mlp")
        }
        for name, kind, size in _dim_names(info):
            if kind in ("embed", "mlp"):
                step, _ = aligned_choices(size, config.min_step, config.max_choices)
            else:
                step = min(size, config.head_step if kind == "heads" else config.per_head_step)
            dims.append(
                Dim(
                    name,
                    kind,
                    size,
                    step,
                    choices_for(size, step),
                    block_of.get(name),
                    layers[name],
                )
            )
        blocks = [
            SpaceBlock(
                f"blocks.{i}",
                True,
                "",
                tuple(f"blocks.{i}.{k}" for k in ("heads", "qk", "v", "mlp")),
            )
            for i in range(len(info.blocks))
        ]
        locked = [
            ("input channels", f"the image has {info.in_chans} channels"),
            (
                "tokens",
                f"fixed at {info.tokens}: a {info.img[0]}x{info.img[1]} image in "
                f"{info.patch[0]}x{info.patch[1]} patches ({info.grid}) plus {info.prefix} "
                f"class/register/distillation token(s); create the model with another "
                f"img_size or patch_size to change them",
            ),
        ]
        if info.num_classes:
            locked.append(("classifier outputs", f"the task has {info.num_classes} classes"))
        return PruningSpace(
            info.name,
            self.family,
            dims,
            blocks,
            _terms(info),
            (info.in_chans, info.img[0], info.img[1]),
            locked,
            dataclasses.asdict(config),
        )

    def term_module(
        self, space: PruningSpace, term: Term, widths: tuple[int, ...]
    ) -> tuple[nn.Module, tuple[int, ...]]:
        if len(widths) != len(term.dims):
            raise MdpError(f"term {term.name} takes {len(term.dims)} widths, got {widths}")
        with torch.random.fork_rng(devices=[]):  # seeded weights, the caller's RNG untouched
            torch.manual_seed(0)
            module, shape = self._term_module(term, tuple(int(w) for w in widths))
        return module.eval(), shape

    def _term_module(self, term: Term, w: tuple[int, ...]) -> tuple[nn.Module, tuple[int, ...]]:
        c = term.const
        tokens = int(c["tokens"])
        if term.kind == "patch_embed":
            h, wd = _pair(c["img"])
            return _PatchTerm(c, w[0]), (int(c["in_chans"]), h, wd)
        if term.kind == "attn_qk":
            e, heads, qk = w
            return (
                AttnQKTerm(
                    e,
                    heads,
                    qk,
                    _norm(str(c.get("norm", "layernorm")), e),
                    qkv_bias=bool(c.get("qkv_bias", True)),
                    qk_norm=(_norm(str(c["qk_norm"]), qk), _norm(str(c["qk_norm"]), qk))
                    if c.get("qk_norm")
                    else None,
                ),
                (tokens, e),
            )
        if term.kind == "attn_v":
            e, heads, v = w
            return (
                AttnVTerm(
                    e,
                    heads,
                    v,
                    tokens,
                    qkv_bias=bool(c.get("qkv_bias", True)),
                    proj_bias=bool(c.get("bias", True)),
                    layer_scale=bool(c.get("ls")),
                ),
                (tokens, e),
            )
        if term.kind == "mlp":
            return _MlpTerm(c, w[0], w[1]), (tokens, w[0])
        if term.kind == "head":
            return _HeadTerm(c, w[0]), (tokens, w[0])
        raise MdpError(f"term {term.name}: kind {term.kind!r} is not a ViT term")

    # -- importance ---------------------------------------------------------------------

    def magnitude(self, model: nn.Module, space: PruningSpace) -> Importance:
        """Per unit: the L2 norm of every weight the unit owns (see :func:`_owners`).

        A block scores, summed over embedding channels, the norm of each output row (and bias)
        of its attention projection and of its fc2, times the layer-scale gain where there is
        one: how much it writes into the residual stream.
        """
        info = self._fitting(model, space)
        sq = _unit_sums(model, info, lambda p: p.detach().double() ** 2)
        units = {k: np.sqrt(v) for k, v in sq.items()}
        blocks = {
            f"blocks.{i}": common.residual_norm(model, _branch_outputs(info, i))
            for i in range(len(info.blocks))
        }
        return Importance(units, blocks)

    def taylor_terms(
        self, model: nn.Module, space: PruningSpace
    ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Signed sums of ``w * dL/dw`` per unit over the weights it owns (see :func:`_owners`).

        A block scores the signed sum of ``w * dL/dw`` over the weights and biases of its
        attention projection and its fc2. Both are linear, so that sum equals the sum over
        tokens of ``out * dL/dout`` of the two residual branches: the first-order change of the
        loss when both branches are zeroed, which is what removing the block does.
        Parameters without a gradient contribute nothing.
        """
        info = self._fitting(model, space)
        units = _unit_sums(model, info, common.weight_grad)
        blocks = {
            f"blocks.{i}": common.signed_taylor(model, (n for w, b, _ in _branch_outputs(info, i) for n in (w, b)))
            for i in range(len(info.blocks))
        }
        return units, blocks

    # -- surgery ------------------------------------------------------------------------

    def _fitting(self, model: nn.Module, space: PruningSpace) -> _Vit:
        """The reading of ``model``, checked to be the model ``space`` was built from."""
        info = self._require(model)
        dims = [(n, s) for n, _, s in _dim_names(info)]
        common.check_fits(space, self.family, info.name, dims, (info.in_chans, *info.img))
        return info

    def apply(
        self, model: nn.Module, space: PruningSpace, plan: Plan, importance: Importance
    ) -> nn.Module:
        info = self._fitting(model, space)
        keep = common.kept_units(space, plan, importance)
        if not isinstance(model, VisionTransformer):  # _fitting has read it as one
            raise UnsupportedModelError(f"{type(model).__name__} is not a timm VisionTransformer")
        arch = self.arch(model)
        device = next(model.parameters()).device
        idx = {k: torch.as_tensor(v, dtype=torch.long, device=device) for k, v in keep.items()}
        e = idx["embed"]
        pruned = copy.deepcopy(model)
        with torch.no_grad():
            conv = pruned.patch_embed.proj
            conv.weight = new_param(conv.weight, conv.weight.index_select(0, e))
            if conv.bias is not None:
                conv.bias = new_param(conv.bias, conv.bias.index_select(0, e))
            conv.out_channels = len(e)
            for name in EMBED_NORMS:
                slice_vector(pruned.get_submodule(name), ("weight", "bias"), e)
            for name in TOKEN_PARAMS:
                p = getattr(pruned, name, None)
                if isinstance(p, nn.Parameter):
                    setattr(pruned, name, new_param(p, p.index_select(2, e)))
            for name in ("head", "head_dist"):
                head = getattr(pruned, name, None)
                if isinstance(head, nn.Linear):
                    slice_linear(head, None, e)
        removed = set(plan.removed)
        blocks = pruned.blocks
        for i, b in enumerate(info.blocks):
            n = f"blocks.{i}"
            if n in removed:
                continue
            blk = _sub(blocks, str(i), Block)
            for part in ("norm1", "norm2", "ls1", "ls2"):
                slice_vector(blk.get_submodule(part), ("weight", "bias", "gamma"), e)
            blk.attn = _pruned_attention(
                blk.get_submodule("attn"), b, e, idx[f"{n}.heads"], idx[f"{n}.qk"], idx[f"{n}.v"]
            )
            slice_linear(_sub(blk, "mlp.fc1", nn.Linear), idx[f"{n}.mlp"], e)
            slice_linear(_sub(blk, "mlp.fc2", nn.Linear), e, idx[f"{n}.mlp"])
        for i in reversed(range(len(info.blocks))):
            if f"blocks.{i}" in removed:
                del blocks[i]
        width = len(e)
        pruned.embed_dim = pruned.num_features = pruned.head_hidden_size = width
        reduction: Any = info.patch[0]
        if pruned.feature_info:
            reduction = pruned.feature_info[0].get("reduction", reduction)
        pruned.feature_info = [
            dict(module=f"blocks.{i}", num_chs=width, reduction=reduction)
            for i in range(len(blocks))
        ]
        common.mark_pruned(pruned, keep, arch)
        return pruned

    def param_count(self, space: PruningSpace, plan: Plan) -> int:
        """Parameters of the pruned model, summed over the kept latency terms' layers."""
        space.validate(plan)
        total = 0
        for t in space.kept_terms(plan):
            c = t.const
            w = space.term_widths(t, plan)
            k = 1 if c.get("norm") == "rmsnorm" else 2  # parameters per channel of a norm
            if t.kind == "patch_embed":
                e = w[0]
                ph, pw = _pair(c["patch"])
                h, wd = _pair(c["img"])
                grid, tokens = (h // ph) * (wd // pw), int(c["tokens"])
                n_pos = {"all": tokens, "patches": grid}.get(str(c.get("pos", "all")), 0)
                total += int(c["in_chans"]) * ph * pw * e + (e if c.get("bias", True) else 0)
                total += (tokens - grid) * e + n_pos * e
                total += k * e * (int(bool(c.get("embed_norm"))) + int(bool(c.get("pre_norm"))))
            elif t.kind == "attn_qk":
                e, heads, qk = w
                total += k * e + 2 * heads * qk * (e + int(bool(c.get("qkv_bias", True))))
                if c.get("qk_norm"):
                    total += 2 * qk * (1 if c["qk_norm"] == "rmsnorm" else 2)
            elif t.kind == "attn_v":
                e, heads, v = w
                total += heads * v * (e + int(bool(c.get("qkv_bias", True))))
                total += (
                    heads * v * e + (e if c.get("bias", True) else 0) + (e if c.get("ls") else 0)
                )
            elif t.kind == "mlp":
                e, hidden = w
                bias = int(bool(c.get("bias", True)))
                total += (
                    k * e + hidden * (e + bias) + e * (hidden + bias) + (e if c.get("ls") else 0)
                )
            elif t.kind == "head":
                e = w[0]
                n = int(c["num_classes"])
                total += k * e if c.get("final", "norm") != "none" else 0
                total += n * (e + 1) * (2 if c.get("dist") else 1)
        return total


def _dim_layers(model: nn.Module, info: _Vit) -> dict[str, tuple[str, ...]]:
    """Every module (or token parameter) that reads or writes each dim."""
    present = {n for n, m in model.named_modules() if type(m) is not nn.Identity}
    embed = ["patch_embed.proj", "patch_embed.norm"] + list(TOKEN_PARAMS) + ["norm_pre"]
    out: dict[str, tuple[str, ...]] = {}
    for i in range(len(info.blocks)):
        n = f"blocks.{i}"
        embed += [
            f"{n}.{m}"
            for m in ("norm1", "attn.qkv", "attn.proj", "ls1", "norm2", "mlp.fc1", "mlp.fc2", "ls2")
        ]
        out[f"{n}.heads"] = (f"{n}.attn.qkv", f"{n}.attn.proj")
        out[f"{n}.qk"] = (f"{n}.attn.qkv",) + tuple(
            f"{n}.attn.{m}" for m in ("q_norm", "k_norm") if f"{n}.attn.{m}" in present
        )
        out[f"{n}.v"] = (f"{n}.attn.qkv", f"{n}.attn.proj")
        out[f"{n}.mlp"] = (f"{n}.mlp.fc1", f"{n}.mlp.fc2")
    embed += ["norm", "fc_norm", "head", "head_dist"]
    out["embed"] = tuple(
        m
        for m in embed
        if (getattr(model, m, None) is not None if m in TOKEN_PARAMS else m in present)
    )
    return out


def _block_terms(n: str, qk_c: list[Any], v_c: list[Any], mlp_c: list[Any]) -> list[Term]:
    """Block ``n``'s three latency terms (``attn_qk``, ``attn_v``, ``mlp``) with their constants."""
    return [
        Term(f"{n}.attn_qk", "attn_qk", ("embed", f"{n}.heads", f"{n}.qk"), tuple(qk_c), n),
        Term(f"{n}.attn_v", "attn_v", ("embed", f"{n}.heads", f"{n}.v"), tuple(v_c), n),
        Term(f"{n}.mlp", "mlp", ("embed", f"{n}.mlp"), tuple(mlp_c), n),
    ]


def _terms(info: _Vit) -> list[Term]:
    """Latency terms; constants at their usual ViT default are left out (see the module doc)."""
    tokens = ("tokens", info.tokens)
    norm: list[tuple[str, Any]] = [("norm", info.norm)] if info.norm != "layernorm" else []
    patch: list[tuple[str, Any]] = [
        ("patch", _scalar_or_pair(info.patch)),
        ("img", _scalar_or_pair(info.img)),
        ("in_chans", info.in_chans),
        tokens,
    ]
    if info.pos != "all":
        patch.append(("pos", info.pos))
    if not info.patch_bias:
        patch.append(("bias", False))
    if info.embed_norm:
        patch.append(("embed_norm", True))
    if info.pre_norm:
        patch.append(("pre_norm", True))
    if info.embed_norm or info.pre_norm:
        patch += norm
    terms = [Term("patch_embed", "patch_embed", ("embed",), tuple(patch))]
    for i, b in enumerate(info.blocks):
        n = f"blocks.{i}"
        qkv_bias: list[tuple[str, Any]] = [] if b.qkv_bias else [("qkv_bias", False)]
        qk_c = [tokens, *qkv_bias, *norm] + ([("qk_norm", b.qk_norm)] if b.qk_norm else [])
        v_c = (
            [tokens, *qkv_bias]
            + ([] if b.proj_bias else [("bias", False)])
            + ([("ls", True)] if b.ls1 else [])
        )
        mlp_c = (
            [tokens, *norm]
            + ([] if b.mlp_bias else [("bias", False)])
            + ([("ls", True)] if b.ls2 else [])
        )
        if b.act != "gelu":
            mlp_c.append(("act", b.act))
        terms += _block_terms(n, qk_c, v_c, mlp_c)
    head: list[tuple[str, Any]] = [
        ("num_classes", info.num_classes),
        tokens,
        ("pool", info.pool),
        ("prefix", info.prefix),
    ]
    if info.final != "norm":
        head.append(("final", info.final))
    if info.final != "none":
        head += norm
    if info.distilled:
        head.append(("dist", True))
    terms.append(Term("head", "head", ("embed",), tuple(head)))
    return terms
