"""timm Swin Transformer v1 and v2: windowed attention, shifted windows, patch merging.

Dims: per stage ``layers.s.embed``, the stage's width: its blocks' residual stream and norms,
the patch embedding (stage 0) or the output of the patch merging that opens the stage, the
input of the merging that opens the next one (four concatenated copies of the width, so its
reduction's columns, and in v1 its norm, are sliced with the same indices in each copy), and
for the last stage the final norm and the classifier. Per block ``layers.s.blocks.j``:
``.heads``, ``.qk`` and ``.v`` (channels per head) and ``.mlp``. The relative position bias
goes with the heads: v1's table has a column per head; v2's continuous-bias MLP has an output
row per head, and its logit scale one entry per head.

Blocks: each has an identity shortcut, but the first block of every stage is locked so that no
stage is left empty (the space has no "at least one of these" constraint).

Surgery keeps the top-scoring units of every dim, one set of qk and v channels shared by the
kept heads (as for the ViT). A kept block's attention becomes :class:`PrunedWindowAttention`
(v1: the dense softmax scale) or :class:`PrunedWindowAttentionV2` (v2: cosine attention with
the per-head logit scale), which allow different query/key and value widths.

Latency terms: ``patch_embed`` (stage-0 width); per block ``attn_qk`` (embed, heads, qk: v1's
pre-norm, cyclic shift, window partition, query/key projections, scores with the position bias
and the shift mask, softmax), ``attn_v`` (embed, heads, v: value projection, probabilities
@ values, output projection, v2's post-norm, residual, window merge, reverse shift) and
``mlp`` (embed, mlp); ``layers.s.downsample`` (the widths of stages s-1 and s); ``head``
(last width). Term modules are copies of the model's own modules cut to their first
channels, so windows, shifts and masks are the model's.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import ClassifierHead, Mlp, PatchEmbed
from timm.layers import activations as tacts
from timm.models import swin_transformer as sw1
from timm.models import swin_transformer_v2 as sw2
from torch import nn

from mdp_trt.errors import MdpError, UnsupportedModelError
from mdp_trt.models import common, vit
from mdp_trt.models.attention import qkv_rows, sliced_qkv_proj
from mdp_trt.models.base import Importance, SpaceConfig
from mdp_trt.models.common import Reducer, Unsupported, new_param, slice_linear, slice_vector
from mdp_trt.models.common import arch_name as _arch_name
from mdp_trt.models.vit import (
    _classes,
    _cols,
    _heads_proj,
    _heads_qkv,
    _linear,
    _pair,
    _qk_qkv,
    _rows,
    _scalar_or_pair,
    _v_proj,
    _v_qkv,
)
from mdp_trt.space import Block, Dim, Plan, PruningSpace, Term, aligned_choices, choices_for

FAMILY = "swin"
POOLS = ("avg", "max", "avgmax")
Pair = tuple[int, int]


# -- pruned window attention ----------------------------------------------------------------


class _WindowAttention(nn.Module):
    """What the v1 and v2 pruned attentions share: ``qkv`` writes ``[q | k | v]`` (head-major,
    ``qk_dim`` query/key and ``v_dim`` value channels per head), ``proj`` reads the values."""

    relative_position_index: torch.Tensor

    def __init__(self, dim: int, num_heads: int, qk_dim: int, v_dim: int, window_size: Pair,
                 qkv_bias: bool, attn_drop: float, proj_drop: float) -> None:
        super().__init__()
        self.num_heads, self.qk_dim, self.v_dim = num_heads, qk_dim, v_dim
        self.window_size = window_size
        n = window_size[0] * window_size[1]
        self.qkv = nn.Linear(dim, num_heads * (2 * qk_dim + v_dim), bias=qkv_bias)
        self.register_buffer("relative_position_index", torch.zeros(n, n, dtype=torch.long),
                             persistent=False)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(num_heads * v_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.softmax = nn.Softmax(dim=-1)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return self.qkv(x)

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(b, heads, n, width)`` queries, keys and values; timm's own reshape when the
        widths are equal, so an unpruned block computes exactly what timm's does."""
        b, n, _ = qkv.shape
        h, dq, dv = self.num_heads, self.qk_dim, self.v_dim
        if dq == dv:
            q, k, v = qkv.reshape(b, n, 3, h, -1).permute(2, 0, 3, 1, 4).unbind(0)
            return q, k, v
        q, k, v = qkv.split([h * dq, h * dq, h * dv], dim=-1)
        return (q.reshape(b, n, h, dq).transpose(1, 2), k.reshape(b, n, h, dq).transpose(1, 2),
                v.reshape(b, n, h, dv).transpose(1, 2))

    def masked_softmax(self, attn: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if mask is not None:
            n, num_win = attn.shape[-1], mask.shape[0]
            attn = attn.view(-1, num_win, self.num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, n, n)
        return self.softmax(attn)

    def probs(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        return self.attn_drop(self.probs(q, k, mask)) @ v

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.split(self.project(x))
        out = self.attend(q, k, v, mask).transpose(1, 2).reshape(b, n, -1)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, qk_dim={self.qk_dim}, v_dim={self.v_dim}, "
                f"window_size={self.window_size}")


class PrunedWindowAttention(_WindowAttention):
    """Swin v1 window attention with its own query/key and value widths per head.

    Keeps timm's parameter names (``qkv``, ``proj``, ``relative_position_bias_table``, one
    column per head) and the dense model's softmax scale (``head_dim ** -0.5`` of the
    original head width), so a plan that keeps everything computes what the dense model did.
    """

    def __init__(self, dim: int, num_heads: int, qk_dim: int, v_dim: int, window_size: Pair,
                 scale: float, qkv_bias: bool = True, fused_attn: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__(dim, num_heads, qk_dim, v_dim, window_size, qkv_bias, attn_drop, proj_drop)
        self.scale = float(scale)
        self.fused_attn = fused_attn
        wh, ww = window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))

    def rel_bias(self) -> torch.Tensor:
        n = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

    def probs(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        attn = (q * self.scale) @ k.transpose(-2, -1)
        return self.masked_softmax(attn + self.rel_bias(), mask)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None) -> torch.Tensor:
        if not self.fused_attn:
            return super().attend(q, k, v, mask)
        b, h, n, _ = q.shape
        bias = self.rel_bias()
        if mask is not None:
            num_win = mask.shape[0]
            mask = mask.view(1, num_win, 1, n, n).expand(b // num_win, -1, h, -1, -1)
            bias = bias + mask.reshape(-1, h, n, n)
        # timm's default scale is the query width's; a pruned query keeps the dense one
        scale = None if self.scale == self.qk_dim**-0.5 else self.scale
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale,
                                              dropout_p=self.attn_drop.p if self.training else 0.0)


class PrunedWindowAttentionV2(_WindowAttention):
    """Swin v2 window attention (cosine similarity times a per-head logit scale, continuous
    position bias) with its own query/key and value widths per head.

    Keeps timm's names: ``qkv`` without a bias, ``q_bias`` / ``v_bias`` (and the zero
    ``k_bias`` buffer), ``logit_scale`` (heads, 1, 1), ``cpb_mlp`` (its last layer writes one
    row per head), ``proj``.
    """

    k_bias: torch.Tensor | None
    relative_coords_table: torch.Tensor

    def __init__(self, dim: int, num_heads: int, qk_dim: int, v_dim: int, window_size: Pair,
                 qkv_bias: bool = True, cpb_hidden: int = 512, qkv_bias_separate: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__(dim, num_heads, qk_dim, v_dim, window_size, False, attn_drop, proj_drop)
        wh, ww = window_size
        self.qkv_bias_separate = qkv_bias_separate
        self.logit_scale = nn.Parameter(torch.zeros(num_heads, 1, 1))
        self.cpb_mlp = nn.Sequential(nn.Linear(2, cpb_hidden), nn.ReLU(inplace=True),
                                     nn.Linear(cpb_hidden, num_heads, bias=False))
        self.q_bias = nn.Parameter(torch.zeros(num_heads * qk_dim)) if qkv_bias else None
        self.register_buffer("k_bias", torch.zeros(num_heads * qk_dim) if qkv_bias else None,
                             persistent=False)
        self.v_bias = nn.Parameter(torch.zeros(num_heads * v_dim)) if qkv_bias else None
        self.register_buffer("relative_coords_table", torch.zeros(1, 2 * wh - 1, 2 * ww - 1, 2),
                             persistent=False)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        if self.q_bias is None or self.k_bias is None or self.v_bias is None:
            return self.qkv(x)
        bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
        if self.qkv_bias_separate:
            qkv = self.qkv(x)
            qkv += bias
            return qkv
        return F.linear(x, weight=self.qkv.weight, bias=bias)

    def rel_bias(self) -> torch.Tensor:
        n = self.window_size[0] * self.window_size[1]
        table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        bias = table[self.relative_position_index.view(-1)].view(n, n, -1).permute(2, 0, 1).contiguous()
        return (16 * torch.sigmoid(bias)).unsqueeze(0)

    def probs(self, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(self.logit_scale, max=math.log(1.0 / 0.01)).exp()
        return self.masked_softmax(attn + self.rel_bias(), mask)


PRUNED = (PrunedWindowAttention, PrunedWindowAttentionV2)


# -- reading a model ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Blk:
    name: str  # layers.s.blocks.j
    heads: int
    qk: int
    v: int
    mlp: int
    window: Pair
    shift: Pair
    scale: float  # v1's softmax scale (0 for v2)
    qkv_bias: bool
    cpb: int  # v2's hidden width of the position-bias MLP (0 for v1)
    act: str


@dataclass(frozen=True)
class _Stage:
    width: int
    res: Pair  # the token grid of the stage's blocks
    blocks: tuple[_Blk, ...]  # the blocks present (removed ones are Identity in the model)


@dataclass(frozen=True)
class _Swin:
    name: str
    v2: bool
    in_chans: int
    img: Pair
    patch: Pair
    embed_norm: bool
    stages: tuple[_Stage, ...]
    pool: str
    num_classes: int


def _layernorm(model: nn.Module, name: str, width: int) -> None:
    m = model.get_submodule(name)
    if type(m) is not nn.LayerNorm or m.weight is None or m.bias is None:
        raise Unsupported(f"normalization {name} is {type(m).__name__}; handled: affine nn.LayerNorm")
    if tuple(m.normalized_shape) != (width,):
        raise Unsupported(f"{name} normalizes {tuple(m.normalized_shape)}, expected ({width},)")


def _read_attn(model: nn.Module, n: str, width: int, v2: bool) -> tuple[int, int, int, float, bool, int]:
    """Heads, qk and v per head, v1's softmax scale, whether q/k/v have biases and v2's
    position-bias MLP width."""
    a: Any = model.get_submodule(f"{n}.attn")
    timm_cls = sw2.WindowAttention if v2 else sw1.WindowAttention
    mine = PrunedWindowAttentionV2 if v2 else PrunedWindowAttention
    if type(a) is mine:
        heads, qk, v = a.num_heads, a.qk_dim, a.v_dim
    elif type(a) is timm_cls:
        heads = int(a.num_heads)
        qk = v = _linear(model, f"{n}.attn.qkv", width).out_features // (3 * heads)
    else:
        raise Unsupported(f"attention {n}.attn is {type(a).__name__}, expected timm's "
                          f"{timm_cls.__module__.rsplit('.', 1)[-1]}.WindowAttention")
    qkv = _linear(model, f"{n}.attn.qkv", width, heads * (2 * qk + v))
    if _linear(model, f"{n}.attn.proj", heads * v, width).bias is None:
        raise Unsupported(f"{n}.attn.proj has no bias")
    if v2:
        if qkv.bias is not None:
            raise Unsupported(f"{n}.attn.qkv has a bias of its own besides q_bias/v_bias")
        cpb = a.cpb_mlp
        if not (isinstance(cpb, nn.Sequential) and len(cpb) == 3 and type(cpb[1]) is nn.ReLU
                and type(cpb[0]) is nn.Linear and type(cpb[2]) is nn.Linear and cpb[0].in_features == 2
                and cpb[2].out_features == heads and cpb[2].bias is None):
            raise Unsupported(f"{n}.attn.cpb_mlp is not Linear(2, h), ReLU, Linear(h, {heads}, bias=False)")
        return heads, qk, v, 0.0, a.q_bias is not None, cpb[0].out_features
    return heads, qk, v, float(a.scale), qkv.bias is not None, 0


def _read_block(model: nn.Module, n: str, width: int, res: Pair, v2: bool) -> _Blk:
    blk: Any = model.get_submodule(n)
    cls = sw2.SwinTransformerV2Block if v2 else sw1.SwinTransformerBlock
    if type(blk) is not cls:
        raise Unsupported(f"block {n} is {type(blk).__name__}, expected {cls.__name__}")
    if blk.dynamic_mask:
        raise Unsupported(f"block {n} builds its shift mask on every forward (dynamic_mask)")
    if _pair(blk.input_resolution) != res:
        raise Unsupported(f"block {n} is built for a {_pair(blk.input_resolution)} grid, its stage has {res}")
    for norm in ("norm1", "norm2"):
        _layernorm(model, f"{n}.{norm}", width)
    heads, qk, v, scale, bias, cpb = _read_attn(model, n, width, v2)
    window = _pair(blk.window_size)
    if _pair(blk.attn.window_size) != window:
        raise Unsupported(f"{n}.attn has window {blk.attn.window_size}, its block {window}")
    mlp = blk.mlp
    if type(mlp) is not Mlp or type(mlp.norm) is not nn.Identity:
        raise Unsupported(f"MLP {n}.mlp is {type(mlp).__name__}; handled: timm Mlp without a hidden norm")
    fc1 = _linear(model, f"{n}.mlp.fc1", width)
    fc2 = _linear(model, f"{n}.mlp.fc2", fc1.out_features, width)
    if fc1.bias is None or fc2.bias is None:
        raise Unsupported(f"{n}.mlp has a layer without a bias")
    return _Blk(n, heads, qk, v, fc1.out_features, window, _pair(blk.shift_size), scale, bias, cpb,
                _act(mlp.act, f"{n}.mlp.act"))


def _act(m: nn.Module, where: str) -> str:
    """The MLP activation's name in a term signature (v2 builds timm's own GELU classes)."""
    timm_acts = {tacts.GELU: "gelu", tacts.GELUTanh: "gelu_tanh", tacts.QuickGELU: "quick_gelu"}
    if type(m) in timm_acts:
        return timm_acts[type(m)]
    return vit._act_name(m, where)


def _read(model: nn.Module) -> _Swin:
    """Read ``model`` into a :class:`_Swin`; raises ``Unsupported`` with what blocked it."""
    if type(model) not in (sw1.SwinTransformer, sw2.SwinTransformerV2):
        raise Unsupported(f"{type(model).__name__} is not timm's SwinTransformer or SwinTransformerV2")
    v2 = type(model) is sw2.SwinTransformerV2
    name = _arch_name(model)
    if name is None:
        raise Unsupported("it has no timm pretrained_cfg naming its architecture "
                          "(create it with timm.create_model so that it can be rebuilt)")
    if model.dynamic_img_size:
        raise Unsupported("it takes any image size (dynamic_img_size), so its shift masks are "
                          "built on every forward; create it with a fixed img_size")
    pe = model.patch_embed
    if type(pe) is not PatchEmbed or type(pe.proj) is not nn.Conv2d or pe.img_size is None:
        raise Unsupported(f"patch embedding is {type(pe).__name__}; handled: timm PatchEmbed "
                          f"with a Conv2d and a fixed image size")
    conv, patch = pe.proj, _pair(pe.patch_size)
    if (tuple(conv.kernel_size) != patch or tuple(conv.stride) != patch or isinstance(conv.padding, str)
            or _pair(conv.padding) != (0, 0) or conv.groups != 1 or conv.bias is None):
        raise Unsupported(f"patch embedding conv {conv} is not a plain {patch} patchify with a bias")
    width = conv.out_channels
    embed_norm = type(pe.norm) is not nn.Identity
    if embed_norm:
        _layernorm(model, "patch_embed.norm", width)
    stage_cls = sw2.SwinTransformerV2Stage if v2 else sw1.SwinTransformerStage
    merge_cls = sw2.PatchMerging if v2 else sw1.PatchMerging
    res = _pair(pe.grid_size)
    stages = []
    layers: Any = model.layers
    for s, st in enumerate(layers):
        n = f"layers.{s}"
        if type(st) is not stage_cls:
            raise Unsupported(f"stage {n} is {type(st).__name__}, expected {stage_cls.__name__}")
        if s == 0 and type(st.downsample) is not nn.Identity:
            raise Unsupported(f"{n} merges patches before the first stage")
        if s > 0:
            if type(st.downsample) is not merge_cls:
                raise Unsupported(f"{n}.downsample is {type(st.downsample).__name__}, expected PatchMerging")
            red = _linear(model, f"{n}.downsample.reduction", 4 * width)
            if red.bias is not None:
                raise Unsupported(f"{n}.downsample.reduction has a bias")
            _layernorm(model, f"{n}.downsample.norm", red.out_features if v2 else 4 * width)
            width, res = red.out_features, ((res[0] + 1) // 2, (res[1] + 1) // 2)
        blocks = tuple(_read_block(model, f"{n}.blocks.{j}", width, res, v2)
                       for j, b in enumerate(st.blocks) if type(b) is not nn.Identity)
        if not blocks:
            raise Unsupported(f"stage {n} has no blocks")
        stages.append(_Stage(width, res, blocks))
    if not stages:
        raise Unsupported("it has no stages")
    _layernorm(model, "norm", width)
    head = model.head
    if type(head) is not ClassifierHead:
        raise Unsupported(f"head is {type(head).__name__}, expected timm ClassifierHead")
    pool = str(head.global_pool.pool_type)
    if pool not in POOLS or type(head.flatten) is not nn.Identity:
        raise Unsupported(f"global pool {pool!r}; handled: {', '.join(POOLS)} (pooled, then the classifier)")
    num_classes = _classes(model, "head.fc", width)
    info = _Swin(name, v2, conv.in_channels, _pair(pe.img_size), patch, embed_norm, tuple(stages),
                 pool, num_classes)
    known = set(_param_names(info))
    extra = [p for p, _ in model.named_parameters() if p not in known]
    if extra:
        raise Unsupported(f"parameters outside the layers this adapter prunes: {extra[:3]}")
    return info


def _dim_names(info: _Swin) -> list[tuple[str, str, int, str | None]]:
    """(name, kind, size, owning block) of every dim, in space order."""
    out: list[tuple[str, str, int, str | None]] = []
    for s, st in enumerate(info.stages):
        out.append((f"layers.{s}.embed", "embed", st.width, None))
        for b in st.blocks:
            out += [(f"{b.name}.{k}", k, size, b.name)
                    for k, size in (("heads", b.heads), ("qk", b.qk), ("v", b.v), ("mlp", b.mlp))]
    return out


def _padded(res: Pair, window: Pair) -> Pair:
    return (math.ceil(res[0] / window[0]) * window[0], math.ceil(res[1] / window[1]) * window[1])


# -- units: which weights each unit of a dim owns -------------------------------------------


def _copies(w: int) -> Reducer:
    """Per-unit sums over the last axis read as four concatenated copies of a width (patch merging)."""
    return lambda t: t.reshape(-1, 4, w).sum((0, 1))


def _within(h: int, d: int) -> Reducer:
    """Per-channel sums of a head-major vector of ``h`` heads of ``d`` channels."""
    return lambda t: t.reshape(h, d).sum(0)


def _owners(info: _Swin) -> dict[str, list[tuple[str, Reducer]]]:
    """For every dim, the parameters its units own and how to sum a tensor of each into units.

    A stage width owns every parameter along its axis (rows of what writes it, columns of what
    reads it, both merging copies); heads own their q, k, v rows, projection columns and
    position-bias entries; qk and v channels the same channel in every head; mlp units fc1
    rows and fc2 columns.
    """
    own: dict[str, list[tuple[str, Reducer]]] = {name: [] for name, *_ in _dim_names(info)}
    e0 = info.stages[0].width
    own["layers.0.embed"] += [("patch_embed.proj.weight", _rows(e0)), ("patch_embed.proj.bias", _rows(e0))]
    if info.embed_norm:
        own["layers.0.embed"] += [(f"patch_embed.norm.{p}", _rows(e0)) for p in ("weight", "bias")]
    for s, st in enumerate(info.stages):
        e, w = f"layers.{s}.embed", st.width
        if s > 0:
            ds, prev = f"layers.{s}.downsample", info.stages[s - 1].width
            own[e].append((f"{ds}.reduction.weight", _rows(w)))
            own[f"layers.{s - 1}.embed"].append((f"{ds}.reduction.weight", _copies(prev)))
            for p in ("weight", "bias"):
                if info.v2:
                    own[e].append((f"{ds}.norm.{p}", _rows(w)))
                else:
                    own[f"layers.{s - 1}.embed"].append((f"{ds}.norm.{p}", _copies(prev)))
        for b in st.blocks:
            n, h, q, v = b.name, b.heads, b.qk, b.v
            own[e] += [(f"{n}.{p}", _rows(w)) for p in (
                "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.proj.weight",
                "attn.proj.bias", "mlp.fc2.weight", "mlp.fc2.bias")]
            own[e] += [(f"{n}.attn.qkv.weight", _cols(w)), (f"{n}.mlp.fc1.weight", _cols(w))]
            qkv = [f"{n}.attn.qkv.weight"] + ([f"{n}.attn.qkv.bias"] if b.qkv_bias and not info.v2 else [])
            proj = f"{n}.attn.proj.weight"
            own[f"{n}.heads"] += [(p, _heads_qkv(h, q)) for p in qkv] + [(proj, _heads_proj(h))]
            own[f"{n}.qk"] += [(p, _qk_qkv(h, q)) for p in qkv]
            own[f"{n}.v"] += [(p, _v_qkv(h, q, v)) for p in qkv] + [(proj, _v_proj(h, v))]
            if info.v2:
                own[f"{n}.heads"] += [(f"{n}.attn.logit_scale", _rows(h)),
                                      (f"{n}.attn.cpb_mlp.2.weight", _rows(h))]
                if b.qkv_bias:
                    own[f"{n}.heads"] += [(f"{n}.attn.q_bias", _rows(h)), (f"{n}.attn.v_bias", _rows(h))]
                    own[f"{n}.qk"].append((f"{n}.attn.q_bias", _within(h, q)))
                    own[f"{n}.v"].append((f"{n}.attn.v_bias", _within(h, v)))
            else:
                own[f"{n}.heads"].append((f"{n}.attn.relative_position_bias_table", _cols(h)))
            own[f"{n}.mlp"] += [(f"{n}.mlp.fc1.weight", _rows(b.mlp)), (f"{n}.mlp.fc1.bias", _rows(b.mlp)),
                                (f"{n}.mlp.fc2.weight", _cols(b.mlp))]
    last = f"layers.{len(info.stages) - 1}.embed"
    w = info.stages[-1].width
    own[last] += [("norm.weight", _rows(w)), ("norm.bias", _rows(w))]
    if info.num_classes:
        own[last].append(("head.fc.weight", _cols(w)))
    return own


def _param_names(info: _Swin) -> list[str]:
    """Every parameter a model read as ``info`` has: anything else is refused."""
    out = ["patch_embed.proj.weight", "patch_embed.proj.bias"]
    out += ["patch_embed.norm.weight", "patch_embed.norm.bias"] if info.embed_norm else []
    for s, st in enumerate(info.stages):
        if s > 0:
            out += [f"layers.{s}.downsample.{p}" for p in ("reduction.weight", "norm.weight", "norm.bias")]
        for b in st.blocks:
            own = ["norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "attn.qkv.weight",
                   "attn.proj.weight", "attn.proj.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
                   "mlp.fc2.bias"]
            if info.v2:
                own += ["attn.logit_scale", "attn.cpb_mlp.0.weight", "attn.cpb_mlp.0.bias", "attn.cpb_mlp.2.weight"]
                own += ["attn.q_bias", "attn.v_bias"] if b.qkv_bias else []
            else:
                own += ["attn.relative_position_bias_table"] + (["attn.qkv.bias"] if b.qkv_bias else [])
            out += [f"{b.name}.{p}" for p in own]
    out += ["norm.weight", "norm.bias"] + (["head.fc.weight", "head.fc.bias"] if info.num_classes else [])
    return out


def _unit_sums(model: nn.Module, info: _Swin, f: Callable[[nn.Parameter], torch.Tensor | None]
               ) -> dict[str, np.ndarray]:
    """Per dim, the per-unit sums of ``f(param)`` over the parameters its units own."""
    sizes = {name: size for name, _, size, _ in _dim_names(info)}
    return common.unit_sums(model, sizes, _owners(info), f)


def _branch_outputs(info: _Swin, b: _Blk) -> list[str]:
    """The parameters of the layers writing a block's two residual branches (v1: the attention
    projection and fc2; v2, post-norm: norm1 and norm2)."""
    parts = ("norm1", "norm2") if info.v2 else ("attn.proj", "mlp.fc2")
    return [f"{b.name}.{p}.{k}" for p in parts for k in ("weight", "bias")]


# -- surgery (also cuts term modules) -------------------------------------------------------


@torch.no_grad()
def _cut_attn(src: Any, b: _Blk, v2: bool, e: torch.Tensor, heads: torch.Tensor,
              qk: torch.Tensor, v: torch.Tensor) -> _WindowAttention:
    """A pruned attention holding the kept rows and columns of ``src``'s weights."""
    rows, cols = qkv_rows(heads, qk, v, b.heads, b.qk, b.v)
    drops = (float(src.attn_drop.p), float(src.proj_drop.p))
    new: _WindowAttention
    if v2:
        new = PrunedWindowAttentionV2(len(e), len(heads), len(qk), len(v), b.window, b.qkv_bias, b.cpb,
                                      bool(src.qkv_bias_separate), *drops)
        new.logit_scale = new_param(src.logit_scale, src.logit_scale.index_select(0, heads))
        new.cpb_mlp = copy.deepcopy(src.cpb_mlp)
        slice_linear(cast(nn.Linear, new.cpb_mlp[2]), heads)
        if b.qkv_bias:
            q_rows = rows[: len(heads) * len(qk)]
            new.q_bias = new_param(src.q_bias, src.q_bias.index_select(0, q_rows))
            new.k_bias = src.k_bias.index_select(0, q_rows)
            new.v_bias = new_param(src.v_bias, src.v_bias.index_select(0, cols))
        new.relative_coords_table = src.relative_coords_table.clone()
    else:
        new = PrunedWindowAttention(len(e), len(heads), len(qk), len(v), b.window, b.scale, b.qkv_bias,
                                    bool(getattr(src, "fused_attn", False)), *drops)
        table = src.relative_position_bias_table
        new.relative_position_bias_table = new_param(table, table.index_select(1, heads))
    new.relative_position_index = src.relative_position_index.clone()
    new.qkv, new.proj = sliced_qkv_proj(src.qkv, src.proj, rows, cols, e)
    return new.train(src.training)


@torch.no_grad()
def _cut_block(blk: Any, b: _Blk, v2: bool, e: torch.Tensor, heads: torch.Tensor,
               qk: torch.Tensor, v: torch.Tensor, mlp: torch.Tensor) -> None:
    for part in ("norm1", "norm2"):
        slice_vector(blk.get_submodule(part), ("weight", "bias"), e)
    blk.attn = _cut_attn(blk.get_submodule("attn"), b, v2, e, heads, qk, v)
    slice_linear(blk.get_submodule("mlp.fc1"), mlp, e)
    slice_linear(blk.get_submodule("mlp.fc2"), e, mlp)
    blk.dim = len(e)


@torch.no_grad()
def _cut_merge(ds: Any, v2: bool, prev: torch.Tensor, prev_size: int, e: torch.Tensor) -> None:
    """Patch merging from a stage of ``prev_size`` channels (``prev`` kept) to ``e``."""
    four = torch.cat([prev + c * prev_size for c in range(4)])
    slice_linear(ds.get_submodule("reduction"), e, four)
    slice_vector(ds.get_submodule("norm"), ("weight", "bias"), e if v2 else four)
    ds.dim, ds.out_dim = len(prev), len(e)


@torch.no_grad()
def _cut_patch_embed(pe: Any, e: torch.Tensor) -> None:
    conv = pe.get_submodule("proj")
    conv.weight = new_param(conv.weight, conv.weight.index_select(0, e))
    conv.bias = new_param(conv.bias, conv.bias.index_select(0, e))
    conv.out_channels = len(e)
    slice_vector(pe.get_submodule("norm"), ("weight", "bias"), e)


@torch.no_grad()
def _cut_head(norm: nn.Module, head: Any, e: torch.Tensor) -> None:
    slice_vector(norm, ("weight", "bias"), e)
    fc = head.get_submodule("fc")
    if isinstance(fc, nn.Linear):
        slice_linear(fc, None, e)
    head.in_features = head.num_features = len(e)


# -- term modules ---------------------------------------------------------------------------


def _partition(x: torch.Tensor, window: Pair, shift: Pair) -> torch.Tensor:
    """timm's cyclic shift, padding and window partition: ``(b * windows, tokens, c)``."""
    _, h, w, c = x.shape
    if any(shift):
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    x = F.pad(x, (0, 0, 0, (window[1] - w % window[1]) % window[1], 0, (window[0] - h % window[0]) % window[0]))
    return sw1.window_partition(x, window).view(-1, window[0] * window[1], c)


def _merge(x: torch.Tensor, window: Pair, shift: Pair, res: Pair) -> torch.Tensor:
    """The inverse of :func:`_partition`: ``(b, h, w, c)``."""
    hp, wp = _padded(res, window)
    x = sw1.window_reverse(x.view(-1, window[0], window[1], x.shape[-1]), window, hp, wp)
    x = x[:, : res[0], : res[1], :].contiguous()
    return torch.roll(x, shifts=shift, dims=(1, 2)) if any(shift) else x


class _QKTerm(nn.Module):
    """attn_qk: v1's norm1, shift, window partition, q/k projections, scores, softmax."""

    mask: torch.Tensor | None

    def __init__(self, blk: Any, attn: _WindowAttention, b: _Blk, v2: bool) -> None:
        super().__init__()
        h, dq = attn.num_heads, attn.qk_dim
        self.window, self.shift, self.v2 = b.window, b.shift, v2
        self.norm = nn.Identity() if v2 else blk.get_submodule("norm1")
        qkv = attn.qkv
        self.qk = nn.Linear(qkv.in_features, 2 * h * dq, bias=qkv.bias is not None)
        self.qk.weight = nn.Parameter(qkv.weight[: 2 * h * dq].clone())
        if qkv.bias is not None:
            self.qk.bias = nn.Parameter(qkv.bias[: 2 * h * dq].clone())
        del attn.qkv, attn.proj
        if isinstance(attn, PrunedWindowAttentionV2):
            attn.v_bias = None  # the attn_v term's
        self.attn = attn
        self.register_buffer("mask", blk.attn_mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _partition(self.norm(x), self.window, self.shift)
        bn, n, _ = x.shape
        a = self.attn
        if isinstance(a, PrunedWindowAttentionV2) and a.q_bias is not None and a.k_bias is not None:
            qk = F.linear(x, self.qk.weight, torch.cat((a.q_bias, a.k_bias)))
        else:
            qk = self.qk(x)
        q, k = qk.reshape(bn, n, 2, a.num_heads, a.qk_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return a.probs(q, k, self.mask)


class _VTerm(nn.Module):
    """attn_v: value projection, probabilities (a constant) @ values, output projection, v2's
    post-norm, residual add, window merge, reverse shift. Input: the windows ``(b, windows,
    tokens, c)``."""

    def __init__(self, blk: Any, attn: _WindowAttention, b: _Blk, res: Pair, v2: bool,
                 gen: torch.Generator) -> None:
        super().__init__()
        h, dq, dv = attn.num_heads, attn.qk_dim, attn.v_dim
        self.window, self.shift, self.res, self.heads, self.dv = b.window, b.shift, res, h, dv
        qkv = attn.qkv
        bias = attn.v_bias if isinstance(attn, PrunedWindowAttentionV2) else qkv.bias
        self.v = nn.Linear(qkv.in_features, h * dv, bias=bias is not None)
        self.v.weight = nn.Parameter(qkv.weight[2 * h * dq :].clone())
        if bias is not None:
            self.v.bias = nn.Parameter(bias[-h * dv :].clone())
        self.proj = attn.proj
        self.norm = blk.get_submodule("norm1") if v2 else nn.Identity()
        hp, wp = _padded(res, b.window)
        n, nw = b.window[0] * b.window[1], (hp // b.window[0]) * (wp // b.window[1])
        self.register_buffer("attn", torch.randn(1, nw, h, n, n, generator=gen).softmax(dim=-1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, nw, n, c = x.shape
        v = self.v(x).reshape(b, nw, n, self.heads, self.dv).permute(0, 1, 3, 2, 4)
        y = (self.attn @ v).transpose(2, 3).reshape(b * nw, n, self.heads * self.dv)
        y = self.norm(self.proj(y))
        return _merge(x.reshape(b * nw, n, c) + y, self.window, self.shift, self.res)


class _MlpTerm(nn.Module):
    """mlp: v1 norm2 then the MLP, v2 the MLP then norm2; residual add."""

    def __init__(self, blk: nn.Module, v2: bool) -> None:
        super().__init__()
        self.norm, self.mlp, self.v2 = blk.get_submodule("norm2"), blk.get_submodule("mlp"), v2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        t = x.reshape(b, -1, c)
        y = self.norm(self.mlp(t)) if self.v2 else self.mlp(self.norm(t))
        return (t + y).reshape(b, h, w, c)


# -- the adapter ----------------------------------------------------------------------------


@dataclass
class _Handle:
    """What term modules are cut from: the model the space was built from, as read."""

    model: nn.Module
    info: _Swin


class SwinAdapter:
    """Adapter for timm ``SwinTransformer`` (v1) and ``SwinTransformerV2``."""

    family = FAMILY

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, (sw1.SwinTransformer, sw2.SwinTransformerV2))

    def why_not(self, model: nn.Module) -> str:
        return common.why_not(_read, model)

    def _require(self, model: nn.Module) -> _Swin:
        return common.require(_read, model)

    def arch(self, model: nn.Module) -> dict[str, Any]:
        """The timm name and keyword arguments that rebuild the dense model (a pruned model
        answers with its dense model's, recorded by :meth:`apply` as ``mdp_arch``)."""
        stored = getattr(model, "mdp_arch", None)
        if isinstance(stored, dict):
            return copy.deepcopy(stored)
        info = self._require(model)
        if hasattr(model, "mdp_indices") or any(type(m) in PRUNED for m in model.modules()):
            raise UnsupportedModelError(
                "this Swin was pruned and does not record the dense architecture it came from "
                "(mdp_arch); rebuild it with mdp_trt.load_pruned")
        firsts = [st.blocks[0] for st in info.stages]
        ratios = []
        for st, b in zip(info.stages, firsts, strict=True):
            r = b.mlp / st.width
            ratios.append(r if int(st.width * r) == b.mlp else (b.mlp + 0.5) / st.width)
        layers: Any = model.layers
        kwargs: dict[str, Any] = {
            "img_size": _scalar_or_pair(info.img),
            "patch_size": _scalar_or_pair(info.patch),
            "in_chans": info.in_chans,
            "num_classes": info.num_classes,
            "global_pool": info.pool,
            "embed_dim": info.stages[0].width,
            "depths": tuple(len(st.blocks) for st in layers),
            "num_heads": tuple(b.heads for b in firsts),
            "window_size": tuple(b.window for b in firsts),
            "mlp_ratio": ratios[0] if len(set(ratios)) == 1 else tuple(ratios),
            "qkv_bias": firsts[0].qkv_bias,
            "always_partition": bool(layers[0].blocks[0].always_partition),
        }
        if info.v2:
            kwargs["pretrained_window_sizes"] = tuple(
                _pair(st.blocks[0].attn.pretrained_window_size)[0] for st in layers)
            if firsts[0].act != "gelu":
                kwargs["act_layer"] = firsts[0].act
        elif any(b.qk != st.width // b.heads for st, b in zip(info.stages, firsts, strict=True)):
            kwargs["head_dim"] = tuple(b.qk for b in firsts)
        return {"name": info.name, "kwargs": kwargs}

    # -- the space ----------------------------------------------------------------------

    def space(self, model: nn.Module, config: SpaceConfig) -> PruningSpace:
        info = self._require(model)
        common.check_config(config, info.name, info.img, "a Swin's input size is fixed when it is created: ")
        layers = _dim_layers(info)
        dims = []
        for name, kind, size, block in _dim_names(info):
            if kind in ("embed", "mlp"):
                step, _ = aligned_choices(size, config.min_step, config.max_choices)
            elif kind == "heads":  # later stages have up to 48 heads: max_choices bounds them too
                step = min(size, max(config.head_step, math.ceil(size / config.max_choices)))
            else:
                step = min(size, config.per_head_step)
            dims.append(Dim(name, kind, size, step, choices_for(size, step), block, layers[name]))
        blocks = [Block(b.name, j > 0, "" if j else f"the only block kept for sure in stage layers.{s}: "
                        f"the first block of a stage stays so that the stage is never empty",
                        tuple(f"{b.name}.{k}" for k in ("heads", "qk", "v", "mlp")))
                  for s, st in enumerate(info.stages) for j, b in enumerate(st.blocks)]
        locked = [
            ("input channels", f"the image has {info.in_chans} channels"),
            ("windows", f"a {info.img[0]}x{info.img[1]} image in {info.patch[0]}x{info.patch[1]} patches, "
                        f"stage grids {', '.join(f'{st.res[0]}x{st.res[1]}' for st in info.stages)}; create "
                        f"the model with another img_size or window_size to change them"),
            ("first block of each stage", "kept so that no stage is left empty"),
        ]
        if info.num_classes:
            locked.append(("classifier outputs", f"the task has {info.num_classes} classes"))
        return PruningSpace(info.name, self.family, dims, blocks, _terms(info),
                            (info.in_chans, info.img[0], info.img[1]), locked,
                            dataclasses.asdict(config), _Handle(model, info))

    def term_module(self, space: PruningSpace, term: Term, widths: tuple[int, ...]
                    ) -> tuple[nn.Module, tuple[int, ...]]:
        h = space.handle
        if not isinstance(h, _Handle):
            raise MdpError(f"space of {space.model} carries no model to cut term {term.name} from")
        if len(widths) != len(term.dims):
            raise MdpError(f"term {term.name} takes {len(term.dims)} widths, got {widths}")
        by = dict(zip(term.dims, (int(w) for w in widths), strict=True))
        sizes = {name: size for name, _, size, _ in _dim_names(h.info)}
        ref = next(h.model.parameters())

        def first(dim: str) -> torch.Tensor:
            return torch.arange(by.get(dim, sizes[dim]), device=ref.device)

        gen = torch.Generator().manual_seed(0)
        return self._term_module(h, term, first, gen)

    def _term_module(self, h: _Handle, term: Term, first: Callable[[str], torch.Tensor],
                     gen: torch.Generator) -> tuple[nn.Module, tuple[int, ...]]:
        info, model = h.info, h.model
        module: nn.Module
        if term.kind == "patch_embed":
            module = copy.deepcopy(model.get_submodule("patch_embed"))
            _cut_patch_embed(module, first("layers.0.embed"))
            return module.eval(), (info.in_chans, *info.img)
        if term.kind == "merge":
            s = int(term.name.split(".")[1])
            module = copy.deepcopy(model.get_submodule(term.name))
            _cut_merge(module, info.v2, first(term.dims[0]), info.stages[s - 1].width, first(term.dims[1]))
            res = info.stages[s - 1].res
            return module.eval(), (res[0], res[1], len(first(term.dims[0])))
        if term.kind == "head":
            norm, head = copy.deepcopy(model.get_submodule("norm")), copy.deepcopy(model.get_submodule("head"))
            _cut_head(norm, head, first(term.dims[0]))
            res = info.stages[-1].res
            return nn.Sequential(norm, head).eval(), (res[0], res[1], len(first(term.dims[0])))
        if term.block is None or term.kind not in ("attn_qk", "attn_v", "mlp"):
            raise MdpError(f"term {term.name}: kind {term.kind!r} is not a Swin term")
        s = int(term.block.split(".")[1])
        st = info.stages[s]
        b = next(b for b in st.blocks if b.name == term.block)
        e = first(f"layers.{s}.embed")
        src: Any = model.get_submodule(term.block)
        if term.kind == "mlp":
            part: Any = nn.Module()
            part.norm2, part.mlp = copy.deepcopy(src.norm2), copy.deepcopy(src.mlp)
            slice_vector(part.norm2, ("weight", "bias"), e)
            m = first(f"{b.name}.mlp")
            slice_linear(part.mlp.fc1, m, e)
            slice_linear(part.mlp.fc2, e, m)
            return _MlpTerm(part, info.v2).eval(), (st.res[0], st.res[1], len(e))
        part = nn.Module()
        part.norm1 = copy.deepcopy(src.norm1)
        slice_vector(part.norm1, ("weight", "bias"), e)
        part.attn_mask = src.attn_mask
        attn = _cut_attn(src.attn, b, info.v2, e, *(first(f"{b.name}.{k}") for k in ("heads", "qk", "v")))
        if term.kind == "attn_qk":
            return _QKTerm(part, attn, b, info.v2).eval(), (st.res[0], st.res[1], len(e))
        hp, wp = _padded(st.res, b.window)
        n = b.window[0] * b.window[1]
        module = _VTerm(part, attn, b, st.res, info.v2, gen)
        return module.eval(), ((hp // b.window[0]) * (wp // b.window[1]), n, len(e))

    # -- importance ---------------------------------------------------------------------

    def magnitude(self, model: nn.Module, space: PruningSpace) -> Importance:
        """Per unit: the L2 norm of every weight the unit owns (see :func:`_owners`). A block
        scores, summed over its stage's channels, the norm of what its two branch outputs write
        per channel: how much it adds to the residual stream."""
        info = self._fitting(model, space)
        units = {k: np.sqrt(v) for k, v in _unit_sums(model, info, lambda p: p.detach().double() ** 2).items()}
        blocks = {}
        for st in info.stages:
            for b in st.blocks:
                params = _branch_outputs(info, b)
                blocks[b.name] = common.residual_norm(
                    model, ((w, bias, None) for w, bias in zip(params[::2], params[1::2], strict=True)))
        return Importance(units, blocks)

    def taylor_terms(self, model: nn.Module, space: PruningSpace
                     ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Signed sums of ``w * dL/dw`` per unit over the weights it owns (see :func:`_owners`).

        A block scores the signed sum of ``w * dL/dw`` over the two layers writing its residual
        branches (v1: attention projection and fc2, linear; v2: the post-norms, affine): that
        is the sum over tokens of ``out * dL/dout``, the first-order change of the loss when
        both branches are zeroed, which is what removing the block does.
        """
        info = self._fitting(model, space)
        units = _unit_sums(model, info, common.weight_grad)
        blocks = {b.name: common.signed_taylor(model, _branch_outputs(info, b)) for st in info.stages for b in st.blocks}
        return units, blocks

    # -- surgery ------------------------------------------------------------------------

    def _fitting(self, model: nn.Module, space: PruningSpace) -> _Swin:
        """The reading of ``model``, checked to be the model ``space`` was built from."""
        info = self._require(model)
        dims = [(n, s) for n, _, s, _ in _dim_names(info)]
        common.check_fits(space, self.family, info.name, dims, (info.in_chans, *info.img))
        return info

    def apply(self, model: nn.Module, space: PruningSpace, plan: Plan, importance: Importance) -> nn.Module:
        info = self._fitting(model, space)
        keep = common.kept_units(space, plan, importance)
        arch = self.arch(model)
        device = next(model.parameters()).device
        idx = {k: torch.as_tensor(v, dtype=torch.long, device=device) for k, v in keep.items()}
        removed = set(plan.removed)
        pruned: Any = copy.deepcopy(model)
        _cut_patch_embed(pruned.patch_embed, idx["layers.0.embed"])
        for s, st in enumerate(info.stages):
            e = idx[f"layers.{s}.embed"]
            stage: Any = pruned.get_submodule(f"layers.{s}")
            if s > 0:
                _cut_merge(stage.downsample, info.v2, idx[f"layers.{s - 1}.embed"], info.stages[s - 1].width, e)
            for b in st.blocks:
                j = int(b.name.rsplit(".", 1)[1])
                if b.name in removed:
                    stage.blocks[j] = nn.Identity()
                    continue
                _cut_block(stage.blocks[j], b, info.v2, e, *(idx[f"{b.name}.{k}"] for k in ("heads", "qk", "v", "mlp")))
        last = idx[f"layers.{len(info.stages) - 1}.embed"]
        _cut_head(pruned.norm, pruned.head, last)
        pruned.embed_dim = len(idx["layers.0.embed"])
        pruned.num_features = pruned.head_hidden_size = len(last)
        for s, f in enumerate(pruned.feature_info):
            f["num_chs"] = len(idx[f"layers.{s}.embed"])
        common.mark_pruned(pruned, keep, arch)
        return pruned

    def param_count(self, space: PruningSpace, plan: Plan) -> int:
        """Parameters of the pruned model, summed over the kept latency terms' layers."""
        space.validate(plan)
        total = 0
        for t in space.kept_terms(plan):
            c, w = t.const, space.term_widths(t, plan)
            if t.kind == "patch_embed":
                ph, pw = _pair(c["patch"])
                total += (int(c["in_chans"]) * ph * pw + 1) * w[0] + (2 * w[0] if c.get("norm", True) else 0)
            elif t.kind == "merge":
                total += 4 * w[0] * w[1] + 2 * (w[1] if c.get("v2") else 4 * w[0])
            elif t.kind == "attn_qk":
                e, h, q = w
                bias = bool(c.get("qkv_bias", True))
                total += 2 * h * q * e
                if c.get("v2"):
                    hidden = int(c.get("cpb", 512))
                    total += h + 3 * hidden + hidden * h + (h * q if bias else 0)
                else:
                    wh, ww = _pair(c["window"])
                    total += 2 * e + (2 * wh - 1) * (2 * ww - 1) * h + (2 * h * q if bias else 0)
            elif t.kind == "attn_v":
                e, h, v = w
                total += h * v * (e + int(bool(c.get("qkv_bias", True)))) + h * v * e + e
                total += 2 * e if c.get("v2") else 0
            elif t.kind == "mlp":
                e, m = w
                total += m * (e + 1) + e * (m + 1) + 2 * e
            elif t.kind == "head":
                total += 2 * w[0] + int(c["num_classes"]) * (w[0] + 1)
        return total


def _dim_layers(info: _Swin) -> dict[str, tuple[str, ...]]:
    """Every module that reads or writes each dim."""
    out: dict[str, list[str]] = {name: [] for name, *_ in _dim_names(info)}
    out["layers.0.embed"] += ["patch_embed.proj"] + (["patch_embed.norm"] if info.embed_norm else [])
    for s, st in enumerate(info.stages):
        e = f"layers.{s}.embed"
        if s > 0:
            ds = f"layers.{s}.downsample"
            out[f"layers.{s - 1}.embed"] += [f"{ds}.reduction"] + ([] if info.v2 else [f"{ds}.norm"])
            out[e] += [f"{ds}.reduction"] + ([f"{ds}.norm"] if info.v2 else [])
        for b in st.blocks:
            n = b.name
            out[e] += [f"{n}.{m}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")]
            out[f"{n}.heads"] += [f"{n}.attn.qkv", f"{n}.attn.proj"] + (
                [f"{n}.attn.cpb_mlp.2"] if info.v2 else [f"{n}.attn"])
            out[f"{n}.qk"] += [f"{n}.attn.qkv"]
            out[f"{n}.v"] += [f"{n}.attn.qkv", f"{n}.attn.proj"]
            out[f"{n}.mlp"] += [f"{n}.mlp.fc1", f"{n}.mlp.fc2"]
    out[f"layers.{len(info.stages) - 1}.embed"] += ["norm"] + (["head.fc"] if info.num_classes else [])
    return {k: tuple(v) for k, v in out.items()}


def _terms(info: _Swin) -> list[Term]:
    """Latency terms; constants at their usual Swin value are left out of the signature."""
    v2: list[tuple[str, Any]] = [("v2", True)] if info.v2 else []
    patch: list[tuple[str, Any]] = [("patch", _scalar_or_pair(info.patch)), ("img", _scalar_or_pair(info.img)),
                                    ("in_chans", info.in_chans)]
    if not info.embed_norm:
        patch.append(("norm", False))
    terms = [Term("patch_embed", "patch_embed", ("layers.0.embed",), tuple(patch))]
    for s, st in enumerate(info.stages):
        e = f"layers.{s}.embed"
        grid = ("res", _scalar_or_pair(st.res))
        if s > 0:
            prev = info.stages[s - 1].res
            terms.append(Term(f"layers.{s}.downsample", "merge", (f"layers.{s - 1}.embed", e),
                              (("res", _scalar_or_pair(prev)), *v2)))
        for b in st.blocks:
            n = b.name
            win: list[tuple[str, Any]] = [grid, ("window", _scalar_or_pair(b.window))]
            if any(b.shift):
                win.append(("shift", _scalar_or_pair(b.shift)))
            bias: list[tuple[str, Any]] = [] if b.qkv_bias else [("qkv_bias", False)]
            cpb: list[tuple[str, Any]] = [("cpb", b.cpb)] if info.v2 and b.cpb != 512 else []
            mlp: list[tuple[str, Any]] = [grid, *v2] + ([] if b.act == "gelu" else [("act", b.act)])
            terms += [
                Term(f"{n}.attn_qk", "attn_qk", (e, f"{n}.heads", f"{n}.qk"), (*win, *bias, *v2, *cpb), n),
                Term(f"{n}.attn_v", "attn_v", (e, f"{n}.heads", f"{n}.v"), (*win, *bias, *v2), n),
                Term(f"{n}.mlp", "mlp", (e, f"{n}.mlp"), tuple(mlp), n),
            ]
    last = f"layers.{len(info.stages) - 1}.embed"
    terms.append(Term("head", "head", (last,), (("res", _scalar_or_pair(info.stages[-1].res)),
                                                ("pool", info.pool), ("num_classes", info.num_classes))))
    return terms
