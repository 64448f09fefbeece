"""timm ``Eva`` (EVA-02 and the rotary ViTs built on it) and ``Beit``: the BEiT lineage.

Dims as for the plain ViT: ``embed`` and, per block ``blocks.i``, ``heads``, ``qk`` (query/key
channels per head), ``v`` (value channels per head) and ``mlp`` (hidden width; for a SwiGLU
MLP one unit is a gate channel with its value channel). Every block is removable.

What differs from the plain ViT, and how surgery keeps it exact:

- query and value biases without a key bias (``q_bias`` / ``v_bias``), fused ``qkv`` or
  separate ``q_proj`` / ``k_proj`` / ``v_proj``: sliced like the weights they add to;
- layer scale ``gamma_1`` / ``gamma_2``: sliced with the embedding;
- BEiT's relative position bias, one ``(distances, heads)`` table per block: its columns go
  with the heads;
- rotary embeddings (EVA-02): each head's query/key channels rotate in pairs ((2j, 2j+1), or
  (j, j + head/2) in the half layout) by a frequency fixed per pair. A ``qk`` width therefore
  counts channels but keeps whole pairs: its choices are even, a pair is ranked by the sum of
  its two channels' scores, and the pruned attention gathers the kept pairs' sine and cosine
  columns from the model's rotary table, so every kept pair keeps its rotation. ``inspect``
  lists this under "Locked";
- SwiGLU MLPs, packed (``GluMlp``: ``fc1`` writes the gate half then the value half) or split
  (``SwiGLU``: ``fc1_g`` and ``fc1_x``, with an optional norm over the hidden width).

A pruned block's attention is a :class:`~mdp_trt.models.eva_attention.PrunedEvaAttention`
(dense softmax scale); everything else stays a timm module. Latency terms: ``patch_embed``,
per block ``attn_qk`` (its constants name the rotary embedding, the relative position bias and
the biases), ``attn_v`` and ``mlp`` (the SwiGLU kind), and ``head``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from timm.layers import GluMlp, Mlp, PatchEmbed, RotaryEmbeddingCat, SwiGLU, apply_rot_embed_cat
from timm.models.beit import Attention as BeitAttention
from timm.models.beit import Beit
from timm.models.beit import Block as BeitBlock
from timm.models.eva import Eva, EvaAttention, EvaBlock
from torch import nn

from mdp_trt.errors import MdpError, UnsupportedModelError
from mdp_trt.models import common
from mdp_trt.models.attention import AttnVTerm, head_rows, qkv_rows, sliced_qk_norms
from mdp_trt.models.base import Importance, SpaceConfig
from mdp_trt.models.common import Unsupported, new_param, slice_linear, slice_vector
from mdp_trt.models.common import arch_name as _arch_name
from mdp_trt.models.common import top_k as _top_k
from mdp_trt.models.eva_attention import PrunedEvaAttention
from mdp_trt.models.vit import (
    POOLS,
    _act_name,
    _activation,
    _block_norms,
    _block_terms,
    _classes,
    _HeadTerm,
    _linear,
    _norm,
    _norm_kind,
    _pair,
    _PatchTerm,
    _scalar_or_pair,
)
from mdp_trt.space import Block as SpaceBlock
from mdp_trt.space import Dim, Plan, PruningSpace, Term, aligned_choices, choices_for

TOKENS = ("cls_token", "reg_token", "pos_embed")
EMBED_NORMS = ("patch_embed.norm", "norm_pre", "norm", "fc_norm")
MLP_KINDS = {Mlp: "mlp", GluMlp: "glu", SwiGLU: "swiglu"}


@dataclass(frozen=True)
class _Blk:
    heads: int
    qk: int
    v: int
    mlp: int
    scale: float
    fused: bool
    qv_bias: bool
    proj_bias: bool
    mlp_kind: str  # "mlp" | "glu" | "swiglu"
    mlp_bias: bool
    mlp_norm: bool
    act: str
    ls1: bool
    ls2: bool
    rel_pos: int  # distances in the relative position bias table, 0 without one
    qk_norm: str | None
    rope_idx: tuple[int, ...] | None  # kept rotary columns of an already pruned block


@dataclass(frozen=True)
class _Info:
    kind: str  # "eva" | "beit"
    name: str
    in_chans: int
    img: tuple[int, int]
    patch: tuple[int, int]
    grid: int
    embed: int
    prefix: int
    pos: str  # "all" | "patches" | "none"
    patch_bias: bool
    pre_norm: bool
    norm: str
    final: str  # "norm" | "fc_norm" | "none"
    pool: str
    num_classes: int
    rope: int  # head width of the rotary table, 0 without rotary embeddings
    rope_half: bool
    blocks: tuple[_Blk, ...]

    @property
    def tokens(self) -> int:
        return self.grid + self.prefix


# -- reading a model ----------------------------------------------------------------------


def _attn_of(model: nn.Module, n: str, embed: int) -> tuple[int, int, int, float, bool, bool, bool]:
    """(heads, qk, v, scale, fused, qv_bias, proj_bias) of block ``n``'s attention."""
    attn: Any = model.get_submodule(f"{n}.attn")  # timm's classes: read by name, told apart by type
    if type(attn) is PrunedEvaAttention:
        heads, qk, v, fused = attn.num_heads, attn.qk_dim, attn.v_dim, attn.fused
    elif type(attn) in (EvaAttention, BeitAttention):
        if type(getattr(attn, "norm", nn.Identity())) is not nn.Identity:
            raise Unsupported(f"{n}.attn normalizes its output before the projection (scale_attn_inner)")
        if getattr(attn, "gate", None) is not None:
            raise Unsupported(f"{n}.attn has an output gate (gated_attn)")
        if getattr(attn, "qkv_bias_separate", False):
            raise Unsupported(f"{n}.attn adds its qkv bias separately (qkv_bias_separate)")
        heads = int(attn.num_heads)
        fused = getattr(attn, "qkv", None) is not None
        w = attn.qkv.weight if fused else attn.q_proj.weight
        qk = v = (w.shape[0] // 3 if fused else w.shape[0]) // heads
    else:
        raise Unsupported(
            f"attention {n}.attn is {type(attn).__name__}; handled: EvaAttention, BEiT Attention "
            f"(not AttentionRope or grouped-query attention)"
        )
    if fused:
        _linear(model, f"{n}.attn.qkv", embed, heads * (2 * qk + v))
        if attn.qkv.bias is not None:
            raise Unsupported(f"{n}.attn.qkv has a bias of its own")
        qv_bias = attn.q_bias is not None
    else:
        q = _linear(model, f"{n}.attn.q_proj", embed, heads * qk)
        k = _linear(model, f"{n}.attn.k_proj", embed, heads * qk)
        _linear(model, f"{n}.attn.v_proj", embed, heads * v)
        qv_bias = q.bias is not None
        if k.bias is not None or (attn.v_proj.bias is not None) != qv_bias:
            raise Unsupported(f"{n}.attn has a key bias, or a value bias without a query bias")
    proj = _linear(model, f"{n}.attn.proj", heads * v, embed)
    return heads, qk, v, float(attn.scale), fused, qv_bias, proj.bias is not None


def _read_block(model: nn.Module, info_kind: str, i: int, embed: int, norms: set[str]) -> _Blk:
    n = f"blocks.{i}"
    blk = model.get_submodule(n)
    want = EvaBlock if info_kind == "eva" else BeitBlock
    if type(blk) is not want:
        raise Unsupported(
            f"block {n} is {type(blk).__name__}; only the pre-norm {want.__name__} is handled "
            f"(not post-norm blocks)"
        )
    _block_norms(model, n, embed, norms)
    heads, qk, v, scale, fused, qv_bias, proj_bias = _attn_of(model, n, embed)
    attn = blk.attn
    qk_norms = {_norm_kind(model, f"{n}.attn.{s}", qk) if hasattr(attn, s) else None
                for s in ("q_norm", "k_norm")}
    if len(qk_norms) > 1:
        raise Unsupported(f"{n}.attn normalizes queries and keys differently")
    rel = 0
    table = getattr(attn, "relative_position_bias_table", None)
    if table is not None:
        if tuple(table.shape[1:]) != (heads,):
            raise Unsupported(f"{n}.attn relative position table has shape {tuple(table.shape)}")
        rel = int(table.shape[0])
    rope_idx = getattr(attn, "rope_idx", None)
    mlp = blk.mlp
    kind = MLP_KINDS.get(type(mlp))
    if kind is None:
        raise Unsupported(f"MLP {n}.mlp is {type(mlp).__name__}; handled: Mlp, GluMlp, SwiGLU")
    if kind == "glu" and (mlp.gate_last or type(mlp.act) is not nn.SiLU or mlp.chunk_dim != -1):
        raise Unsupported(f"{n}.mlp is a GluMlp other than SwiGLU (SiLU gate first, Linear)")
    fc1_name = f"{n}.mlp.fc1_g" if kind == "swiglu" else f"{n}.mlp.fc1"
    fc1 = _linear(model, fc1_name, embed)
    hidden = fc1.out_features // (2 if kind == "glu" else 1)
    if kind == "swiglu":
        _linear(model, f"{n}.mlp.fc1_x", embed, hidden)
        if (mlp.fc1_x.bias is None) != (fc1.bias is None):
            raise Unsupported(f"{n}.mlp has a bias on one fc1 half only")
    fc2 = _linear(model, f"{n}.mlp.fc2", hidden, embed)
    if (fc1.bias is None) != (fc2.bias is None):
        raise Unsupported(f"{n}.mlp has a bias on one of its layers only")
    mlp_norm = _norm_kind(model, f"{n}.mlp.norm", hidden)
    if mlp_norm:
        norms.add(mlp_norm)
    act = "silu" if kind != "mlp" else _act_name(mlp.act, f"{n}.mlp.act")
    if kind == "swiglu" and type(mlp.act) is not nn.SiLU:
        raise Unsupported(f"{n}.mlp gates with {type(mlp.act).__name__}, not SiLU")
    gammas = []
    for g in ("gamma_1", "gamma_2"):
        p = getattr(blk, g, None)
        if p is not None and tuple(p.shape) != (embed,):
            raise Unsupported(f"{n}.{g} has shape {tuple(p.shape)}")
        gammas.append(p is not None)
    return _Blk(
        heads, qk, v, mlp=hidden, scale=scale, fused=fused, qv_bias=qv_bias, proj_bias=proj_bias,
        mlp_kind=kind, mlp_bias=fc1.bias is not None, mlp_norm=mlp_norm is not None, act=act,
        ls1=gammas[0], ls2=gammas[1], rel_pos=rel, qk_norm=qk_norms.pop(),
        rope_idx=None if rope_idx is None else tuple(int(j) for j in rope_idx),
    )


def _read(model: nn.Module) -> _Info:
    """Read ``model`` into an :class:`_Info`; raises ``Unsupported`` with what blocked it."""
    if type(model) is Eva:
        kind = "eva"
    elif type(model) is Beit:
        kind = "beit"
    else:
        raise Unsupported(f"{type(model).__name__} is not a timm Eva or Beit")
    name = _arch_name(model)
    if name is None:
        raise Unsupported("it has no timm pretrained_cfg naming its architecture")
    pe = model.patch_embed
    if type(pe) is not PatchEmbed or type(pe.proj) is not nn.Conv2d or pe.img_size is None:
        raise Unsupported("patch embedding is not a timm PatchEmbed with a Conv2d and a fixed size")
    if getattr(model, "dynamic_img_size", False) or getattr(pe, "dynamic_img_pad", False):
        raise Unsupported("dynamic image size or padding")
    if getattr(model, "patch_drop", None) is not None:
        raise Unsupported("patch dropout")
    conv, patch = pe.proj, _pair(pe.patch_size)
    if (
        isinstance(conv.padding, str) or tuple(conv.kernel_size) != patch
        or tuple(conv.stride) != patch or _pair(conv.padding) != (0, 0) or conv.groups != 1
    ):
        raise Unsupported(f"patch embedding conv {conv} is not a plain {patch} patchify")
    embed, img = conv.out_channels, _pair(pe.img_size)
    grid = (img[0] // patch[0]) * (img[1] // patch[1])
    norms: set[str] = set()
    if _norm_kind(model, "patch_embed.norm", embed):
        raise Unsupported("a norm inside the patch embedding")
    pre_norm = _norm_kind(model, "norm_pre", embed) if hasattr(model, "norm_pre") else None
    if pre_norm:
        norms.add(pre_norm)
    prefix = int(model.num_prefix_tokens)
    count = sum(
        int(p.shape[1]) for t in ("cls_token", "reg_token") if (p := getattr(model, t, None)) is not None
    )
    if count != prefix:
        raise Unsupported(f"{prefix} prefix tokens declared, {count} token parameters found")
    if model.pos_embed is None:
        pos = "none"
    else:
        pos = "patches" if getattr(model, "no_embed_class", False) else "all"
        want = grid if pos == "patches" else grid + prefix
        if tuple(model.pos_embed.shape) != (1, want, embed):
            raise Unsupported(f"pos_embed has shape {tuple(model.pos_embed.shape)}")
    if getattr(model, "rel_pos_bias", None) is not None:
        raise Unsupported(
            "a relative position bias shared by all blocks (use_shared_rel_pos_bias): its heads "
            "are every block's heads"
        )
    rope, rope_half = 0, False
    r = getattr(model, "rope", None)
    if r is not None:
        if type(r) is not RotaryEmbeddingCat or getattr(model, "rope_mixed", False):
            raise Unsupported(f"rotary embedding {type(r).__name__}; handled: RotaryEmbeddingCat")
        if r.pos_embed is None or tuple(r.pos_embed.shape) != (grid, 2 * r.dim) or r.aug_active:
            raise Unsupported("the rotary embedding is not a fixed table over the patch grid")
        rope, rope_half = int(r.dim), bool(r.rotate_half)
    if not isinstance(model.blocks, nn.ModuleList):
        raise Unsupported("blocks is not an nn.ModuleList")
    blks = tuple(_read_block(model, kind, i, embed, norms) for i in range(len(model.blocks)))
    for i, b in enumerate(blks):
        if rope and b.rope_idx is None and b.qk != rope:
            raise Unsupported(f"blocks.{i} has {b.qk} query/key channels per head, the rotary table {rope}")
        if rope and b.qk % 2:
            raise Unsupported(f"blocks.{i} has an odd number of rotated query/key channels")
        if b.rel_pos and kind != "beit":
            raise Unsupported("relative position bias outside BEiT")
    if getattr(model, "attn_pool", None) is not None:
        raise Unsupported(f"attention pooling head (global_pool={model.global_pool!r})")
    pool = str(model.global_pool)
    if pool not in (POOLS if kind == "eva" else ("avg", "token")):
        raise Unsupported(f"global pool {pool!r}")
    final_norm, fc_norm = _norm_kind(model, "norm", embed), _norm_kind(model, "fc_norm", embed)
    if final_norm and fc_norm:
        raise Unsupported("both a final norm and an fc_norm")
    norms |= {k for k in (final_norm, fc_norm) if k}
    if len(norms) > 1:
        raise Unsupported(f"mixed normalization layers {sorted(norms)}")
    num_classes = _classes(model, "head", embed)
    known = {"patch_embed.proj", *EMBED_NORMS, "head"}
    for i in range(len(blks)):
        n = f"blocks.{i}"
        known |= {n} | {
            f"{n}.{m}"
            for m in ("norm1", "norm2", "attn", "attn.qkv", "attn.q_proj", "attn.k_proj", "attn.v_proj",
                      "attn.proj", "attn.q_norm", "attn.k_norm", "mlp.fc1", "mlp.fc1_g", "mlp.fc1_x",
                      "mlp.norm", "mlp.fc2")
        }
    extra = [p for p, _ in model.named_parameters() if p not in TOKENS and p.rsplit(".", 1)[0] not in known]
    if extra:
        raise Unsupported(f"parameters outside the layers this adapter prunes: {extra[:3]}")
    return _Info(
        kind, name, conv.in_channels, img, patch, grid, embed, prefix, pos, conv.bias is not None,
        pre_norm is not None, norms.pop() if norms else "layernorm",
        "norm" if final_norm else "fc_norm" if fc_norm else "none", pool, num_classes, rope, rope_half,
        blks,
    )


def _dim_names(info: _Info) -> list[tuple[str, str, int]]:
    out = [("embed", "embed", info.embed)]
    for i, b in enumerate(info.blocks):
        n = f"blocks.{i}"
        out += [(f"{n}.heads", "heads", b.heads), (f"{n}.qk", "qk", b.qk), (f"{n}.v", "v", b.v),
                (f"{n}.mlp", "mlp", b.mlp)]
    return out


def _partner(info: _Info, b: _Blk) -> np.ndarray | None:
    """For each query/key channel of a rotary block, the channel it rotates with (None: no rotary)."""
    if not info.rope:
        return None
    j = np.arange(b.qk)
    if info.rope_half:
        return (j + b.qk // 2) % b.qk
    return j ^ 1


# -- importance: which weights each unit owns ----------------------------------------------


def _attn_parts(t: dict[str, torch.Tensor], n: str, b: _Blk, e: int) -> dict[str, torch.Tensor]:
    """Views of block ``n``'s attention tensors (weights or what ``f`` made of them) by role:
    ``q``/``k`` ``(heads, qk, e)``, ``v`` ``(heads, v, e)``, biases ``(heads, width)``, ``proj``
    ``(e, heads, v)``, ``rel`` ``(distances, heads)``. Missing tensors (no gradient) are left out."""
    h, dq, dv = b.heads, b.qk, b.v
    out: dict[str, torch.Tensor] = {}
    a = f"{n}.attn"
    if b.fused:
        if (w := t.get(f"{a}.qkv.weight")) is not None:
            out["q"], out["k"], out["v"] = (
                w[: h * dq].reshape(h, dq, e), w[h * dq : 2 * h * dq].reshape(h, dq, e),
                w[2 * h * dq :].reshape(h, dv, e),
            )
        names = {"qb": f"{a}.q_bias", "vb": f"{a}.v_bias"}
    else:
        for r, width in (("q", dq), ("k", dq), ("v", dv)):
            if (w := t.get(f"{a}.{r}_proj.weight")) is not None:
                out[r] = w.reshape(h, width, e)
        names = {"qb": f"{a}.q_proj.bias", "vb": f"{a}.v_proj.bias"}
    for r, name in names.items():
        if (x := t.get(name)) is not None:
            out[r] = x.reshape(h, -1)
    if (w := t.get(f"{a}.proj.weight")) is not None:
        out["proj"] = w.reshape(e, h, dv)
    if (x := t.get(f"{a}.relative_position_bias_table")) is not None:
        out["rel"] = x
    return out


def _mlp_rows(t: dict[str, torch.Tensor], n: str, b: _Blk) -> list[torch.Tensor]:
    """Tensors whose first axis (folded to ``b.mlp`` units) is the hidden width."""
    m = f"{n}.mlp"
    names = [f"{m}.fc1_g.weight", f"{m}.fc1_g.bias", f"{m}.fc1_x.weight", f"{m}.fc1_x.bias"] if (
        b.mlp_kind == "swiglu") else [f"{m}.fc1.weight", f"{m}.fc1.bias"]
    names += [f"{m}.norm.weight", f"{m}.norm.bias"]
    out = []
    for name in names:
        if (x := t.get(name)) is not None:
            if b.mlp_kind == "glu" and ".fc1." in name:  # gate half then value half
                x = x.reshape(2, b.mlp, -1).sum(0)
            out.append(x.reshape(b.mlp, -1))
    return out


def _unit_sums(model: nn.Module, info: _Info, f: Callable[[nn.Parameter], torch.Tensor | None]
               ) -> dict[str, np.ndarray]:
    """Per dim, per unit, the sum of ``f`` over every weight the unit owns.

    ``embed``: every weight along its embedding axis. ``heads``: a head's q, k, v rows and
    biases, the projection columns reading it, its relative-position column. ``qk``: channel j
    of q and k (and q bias, q/k norms) in every head, shared evenly with its rotation partner.
    ``v``: value channel j, its bias and projection columns. ``mlp``: hidden unit j's fc1 rows
    (both SwiGLU halves), biases and norm, and fc2 column j.
    """
    e = info.embed
    with torch.no_grad():
        t = {k: v.double().cpu() for k, p in model.named_parameters() if (v := f(p)) is not None}
        zero = torch.zeros(e, dtype=torch.float64)
        emb = zero.clone()
        rows = ["patch_embed.proj.weight", "patch_embed.proj.bias"] + [
            f"{m}.{p}" for m in EMBED_NORMS for p in ("weight", "bias")
        ]
        cols = list(TOKENS) + ["head.weight"]
        out: dict[str, np.ndarray] = {}
        for i, b in enumerate(info.blocks):
            n = f"blocks.{i}"
            rows += [f"{n}.{m}.{p}" for m in ("norm1", "norm2") for p in ("weight", "bias")]
            rows += [f"{n}.gamma_1", f"{n}.gamma_2", f"{n}.attn.proj.bias", f"{n}.mlp.fc2.weight",
                     f"{n}.mlp.fc2.bias"]
            cols += [f"{n}.mlp.{m}.weight" for m in ("fc1", "fc1_g", "fc1_x")]
            a = _attn_parts(t, n, b, e)
            for r in ("q", "k", "v"):
                if r in a:
                    emb += a[r].sum((0, 1))
            if "proj" in a:
                emb += a["proj"].sum((1, 2))
            heads = torch.zeros(b.heads, dtype=torch.float64)
            qk = torch.zeros(b.qk, dtype=torch.float64)
            v = torch.zeros(b.v, dtype=torch.float64)
            for r in ("q", "k", "v"):
                if r in a:
                    heads += a[r].sum((1, 2))
                    (v if r == "v" else qk).add_(a[r].sum((0, 2)))
            for r in ("qb", "vb"):
                if r in a:
                    heads += a[r].sum(1)
                    (v if r == "vb" else qk).add_(a[r].sum(0))
            if "proj" in a:
                heads += a["proj"].sum((0, 2))
                v += a["proj"].sum((0, 1))
            if "rel" in a:
                heads += a["rel"].sum(0)
            for s in ("q_norm", "k_norm"):
                for p in ("weight", "bias"):
                    if (x := t.get(f"{n}.attn.{s}.{p}")) is not None:
                        qk += x
            partner = _partner(info, b)
            if partner is not None:
                qk = (qk + qk[torch.as_tensor(partner)]) / 2
            mlp = torch.zeros(b.mlp, dtype=torch.float64)
            for x in _mlp_rows(t, n, b):
                mlp += x.sum(1)
            if (x := t.get(f"{n}.mlp.fc2.weight")) is not None:
                mlp += x.sum(0)
            out.update({f"{n}.heads": heads.numpy(), f"{n}.qk": qk.numpy(), f"{n}.v": v.numpy(),
                        f"{n}.mlp": mlp.numpy()})
        for name in rows:
            if (x := t.get(name)) is not None:
                emb += x.reshape(e, -1).sum(1)
        for name in cols:
            if (x := t.get(name)) is not None:
                emb += x.reshape(-1, e).sum(0)
        out["embed"] = emb.numpy()
    return out


def _branch_outputs(info: _Info, i: int) -> list[tuple[str, str | None, str | None]]:
    """(weight, bias, gamma) of the two layers writing block i's residual branches."""
    n, b = f"blocks.{i}", info.blocks[i]
    return [
        (f"{n}.attn.proj.weight", f"{n}.attn.proj.bias" if b.proj_bias else None,
         f"{n}.gamma_1" if b.ls1 else None),
        (f"{n}.mlp.fc2.weight", f"{n}.mlp.fc2.bias" if b.mlp_bias else None,
         f"{n}.gamma_2" if b.ls2 else None),
    ]


# -- term modules ---------------------------------------------------------------------------


class _AttnQKTerm(nn.Module):
    """``attn_qk``: norm1, q and k projections (query bias only), q/k norms, rotary embedding of
    the patch tokens, scaled ``q @ k^T`` plus the relative position bias, softmax."""

    rope: torch.Tensor | None
    index: torch.Tensor  # registered with the table only

    def __init__(self, c: dict[str, Any], e: int, heads: int, qk: int) -> None:
        super().__init__()
        tokens, prefix = int(c["tokens"]), int(c.get("prefix", 1))
        self.heads, self.qk, self.prefix, self.scale = heads, qk, prefix, qk**-0.5
        self.norm = _norm(str(c.get("norm", "layernorm")), e)
        self.qk_proj = nn.Linear(e, 2 * heads * qk, bias=False)
        self.q_bias = nn.Parameter(torch.randn(heads * qk)) if c.get("qv_bias", True) else None
        kind = c.get("qk_norm")
        self.q_norm = _norm(str(kind), qk) if kind else nn.Identity()
        self.k_norm = _norm(str(kind), qk) if kind else nn.Identity()
        self.rope_half = c.get("rope") == "half"
        self.register_buffer("rope", torch.randn(tokens - prefix, 2 * qk) if c.get("rope") else None)
        self.table: nn.Parameter | None = None
        if c.get("rel_pos"):
            self.table = nn.Parameter(0.02 * torch.randn(int(c["rel_pos"]), heads))
            self.register_buffer("index", torch.randint(0, int(c["rel_pos"]), (tokens * tokens,)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        bias = None
        if self.q_bias is not None:
            bias = torch.cat((self.q_bias, torch.zeros_like(self.q_bias)))
        q, k = F.linear(self.norm(x), self.qk_proj.weight, bias).reshape(
            b, n, 2, self.heads, self.qk).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.rope is not None:
            p = self.prefix
            q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], self.rope, half=self.rope_half)], 2)
            k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], self.rope, half=self.rope_half)], 2)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        if self.table is not None:
            attn = attn + self.table[self.index].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        return attn.softmax(dim=-1)


class _MlpTerm(nn.Module):
    """``mlp``: norm2, fc1 (or the two SwiGLU halves), activation/gate, hidden norm, fc2, layer
    scale, residual add."""

    def __init__(self, c: dict[str, Any], e: int, hidden: int) -> None:
        super().__init__()
        bias, norm = bool(c.get("bias", True)), str(c.get("norm", "layernorm"))
        self.kind = str(c.get("mlp", "mlp"))
        self.norm = _norm(norm, e)
        if self.kind == "swiglu":
            self.fc1_g = nn.Linear(e, hidden, bias=bias)
            self.fc1_x = nn.Linear(e, hidden, bias=bias)
        else:
            self.fc1 = nn.Linear(e, hidden * (2 if self.kind == "glu" else 1), bias=bias)
        self.act = _activation(str(c.get("act", "gelu")))
        self.hidden_norm = _norm(norm, hidden) if c.get("mlp_norm") else nn.Identity()
        self.fc2 = nn.Linear(hidden, e, bias=bias)
        self.gamma = nn.Parameter(torch.rand(e)) if c.get("ls") else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        if self.kind == "swiglu":
            h = self.act(self.fc1_g(h)) * self.fc1_x(h)
        elif self.kind == "glu":
            g, v = self.fc1(h).chunk(2, dim=-1)
            h = self.act(g) * v
        else:
            h = self.act(self.fc1(h))
        y = self.fc2(self.hidden_norm(h))
        if self.gamma is not None:
            y = y * self.gamma
        return x + y


def _terms(info: _Info) -> list[Term]:
    """Latency terms; constants at their ViT default are left out, as in the ViT adapter."""
    tokens = ("tokens", info.tokens)
    norm: list[tuple[str, Any]] = [("norm", info.norm)] if info.norm != "layernorm" else []
    patch: list[tuple[str, Any]] = [
        ("patch", _scalar_or_pair(info.patch)), ("img", _scalar_or_pair(info.img)),
        ("in_chans", info.in_chans), tokens,
    ]
    if info.pos != "all":
        patch.append(("pos", info.pos))
    if not info.patch_bias:
        patch.append(("bias", False))
    if info.pre_norm:
        patch += [("pre_norm", True), *norm]
    terms = [Term("patch_embed", "patch_embed", ("embed",), tuple(patch))]
    for i, b in enumerate(info.blocks):
        n = f"blocks.{i}"
        bias: list[tuple[str, Any]] = [] if b.qv_bias else [("qkv_bias", False)]
        qk_c = [tokens, ("prefix", info.prefix), *norm, *([] if b.qv_bias else [("qv_bias", False)])]
        if info.rope:
            qk_c.append(("rope", "half" if info.rope_half else "interleaved"))
        if b.rel_pos:
            qk_c.append(("rel_pos", b.rel_pos))
        if b.qk_norm:
            qk_c.append(("qk_norm", b.qk_norm))
        v_c = [tokens, *bias] + ([] if b.proj_bias else [("bias", False)]) + ([("ls", True)] if b.ls1 else [])
        mlp_c = [tokens, *norm] + ([] if b.mlp_bias else [("bias", False)]) + ([("ls", True)] if b.ls2 else [])
        if b.mlp_kind != "mlp":
            mlp_c.append(("mlp", b.mlp_kind))
        if b.mlp_norm:
            mlp_c.append(("mlp_norm", True))
        if b.act != "gelu":
            mlp_c.append(("act", b.act))
        terms += _block_terms(n, qk_c, v_c, mlp_c)
    head: list[tuple[str, Any]] = [("num_classes", info.num_classes), tokens, ("pool", info.pool),
                                   ("prefix", info.prefix)]
    if info.final != "norm":
        head.append(("final", info.final))
    if info.final != "none":
        head += norm
    terms.append(Term("head", "head", ("embed",), tuple(head)))
    return terms


# -- surgery ----------------------------------------------------------------------------------


def _keep_qk(scores: np.ndarray, k: int, info: _Info) -> np.ndarray:
    """The ``k`` query/key channels to keep; with rotary embeddings, the ``k / 2`` best pairs
    (a pair scores the sum of its channels), in the layout the rotation expects."""
    if not info.rope:
        return _top_k(scores, k)
    s = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=-np.inf)
    size = len(s)
    if not info.rope_half:  # interleaved: pairs (2p, 2p+1)
        pairs = _top_k(s[0::2] + s[1::2], k // 2)
        return np.stack([2 * pairs, 2 * pairs + 1], 1).reshape(-1)
    pairs = _top_k(s[: size // 2] + s[size // 2 :], k // 2)  # half: pairs (p, p + size/2)
    return np.concatenate([pairs, pairs + size // 2])


@torch.no_grad()
def _pruned_attention(model: nn.Module, info: _Info, i: int, e: torch.Tensor, heads: torch.Tensor,
                      qk: torch.Tensor, v: torch.Tensor) -> PrunedEvaAttention:
    b = info.blocks[i]
    attn: Any = model.get_submodule(f"blocks.{i}.attn")  # timm's or a pruned one, as _attn_of read it
    q_rows, v_rows = head_rows(heads, qk, b.qk), head_rows(heads, v, b.v)
    rope_idx = None
    if info.rope and len(qk) < b.qk:
        old = torch.as_tensor(b.rope_idx) if b.rope_idx is not None else torch.arange(2 * b.qk)
        rope_idx = old.to(qk.device)[torch.cat([qk, qk + b.qk])]
    elif b.rope_idx is not None:
        rope_idx = torch.as_tensor(b.rope_idx, device=qk.device)
    rel = None
    if b.rel_pos:
        rel = (b.rel_pos, attn.relative_position_index)
    new = PrunedEvaAttention(
        len(e), len(heads), len(qk), len(v), b.scale, fused=b.fused, qv_bias=b.qv_bias,
        proj_bias=b.proj_bias, num_prefix_tokens=info.prefix, rotate_half=info.rope_half,
        rope_idx=rope_idx, rel_pos=rel, attn_drop=float(attn.attn_drop.p), proj_drop=float(attn.proj_drop.p),
    ).to(e.device)
    if b.fused:
        assert new.qkv is not None
        rows, _ = qkv_rows(heads, qk, v, b.heads, b.qk, b.v)
        new.qkv.weight = new_param(attn.qkv.weight, attn.qkv.weight[rows][:, e])
        if b.qv_bias:
            new.q_bias = new_param(attn.q_bias, attn.q_bias[q_rows])
            new.v_bias = new_param(attn.v_bias, attn.v_bias[v_rows])
    else:
        for r, idx in (("q", q_rows), ("k", q_rows), ("v", v_rows)):
            lin = copy.deepcopy(attn.get_submodule(f"{r}_proj"))
            slice_linear(lin, idx, e)
            setattr(new, f"{r}_proj", lin)
    if b.qk_norm:
        sliced_qk_norms(attn, new, qk)
    if b.rel_pos:
        table = attn.relative_position_bias_table
        new.relative_position_bias_table = new_param(table, table[:, heads])
    new.proj = copy.deepcopy(attn.proj)
    slice_linear(new.proj, e, v_rows)
    new.train(attn.training)
    return new


@torch.no_grad()
def _slice_mlp(mlp: Any, b: _Blk, e: torch.Tensor, hidden: torch.Tensor) -> None:
    """Slice timm's ``Mlp``, ``GluMlp`` or ``SwiGLU`` (``b.mlp_kind`` names which) in place."""
    if b.mlp_kind == "swiglu":
        slice_linear(mlp.fc1_g, hidden, e)
        slice_linear(mlp.fc1_x, hidden, e)
    elif b.mlp_kind == "glu":
        slice_linear(mlp.fc1, torch.cat([hidden, hidden + b.mlp]), e)
    else:
        slice_linear(mlp.fc1, hidden, e)
    slice_vector(mlp.norm, ("weight", "bias"), hidden)
    slice_linear(mlp.fc2, e, hidden)


# -- the adapter ----------------------------------------------------------------------------


class EvaAdapter:
    """Adapter for timm ``Eva`` (family ``eva``) and, as :class:`BeitAdapter`, ``Beit``."""

    family = "eva"
    cls: type[nn.Module] = Eva

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, self.cls)

    def why_not(self, model: nn.Module) -> str:
        return common.why_not(_read, model)

    def _require(self, model: nn.Module) -> _Info:
        return common.require(_read, model)

    def arch(self, model: nn.Module) -> dict[str, Any]:
        """The timm name and the keyword arguments that rebuild the dense model, checked by
        building it on the meta device and comparing every parameter's shape."""
        stored = getattr(model, "mdp_arch", None)
        if isinstance(stored, dict):
            return copy.deepcopy(stored)
        info = self._require(model)
        if any(type(m) is PrunedEvaAttention for m in model.modules()):
            raise UnsupportedModelError(
                "this model was pruned and does not record the dense architecture it came from "
                "(mdp_arch); rebuild it with mdp_trt.load_pruned"
            )
        kw: dict[str, Any] = {
            "num_classes": info.num_classes, "img_size": _scalar_or_pair(info.img),
            "in_chans": info.in_chans, "patch_size": _scalar_or_pair(info.patch),
            "global_pool": info.pool, "embed_dim": info.embed, "depth": len(info.blocks),
            "use_abs_pos_emb": info.pos != "none",
            "use_fc_norm": info.final == "fc_norm",
        }
        if info.blocks:
            b = info.blocks[0]
            ratio = b.mlp / info.embed
            if int(info.embed * ratio) != b.mlp:
                ratio = (b.mlp + 0.5) / info.embed
            gamma = model.get_parameter("blocks.0.gamma_1") if b.ls1 else None
            kw.update(
                num_heads=b.heads, mlp_ratio=ratio, qkv_bias=b.qv_bias, swiglu_mlp=b.mlp_kind != "mlp",
                scale_mlp=b.mlp_norm,
                init_values=None if gamma is None else float(gamma.detach().flatten()[0]) or 1e-5,
            )
        if info.kind == "eva":
            kw.update(
                class_token=getattr(model, "cls_token", None) is not None,
                num_reg_tokens=info.prefix - int(getattr(model, "cls_token", None) is not None),
                no_embed_class=info.pos == "patches", use_rot_pos_emb=bool(info.rope),
                use_pre_transformer_norm=info.pre_norm, use_post_transformer_norm=info.final == "norm",
            )
            r = getattr(model, "rope", None)
            if info.rope and isinstance(r, RotaryEmbeddingCat):  # the rotation's frequencies and grid
                kw.update(rope_rotate_half=info.rope_half, rope_temperature=float(r.temperature),
                          rope_grid_offset=float(r.grid_offset), rope_grid_indexing=str(r.grid_indexing),
                          ref_feat_shape=None if r.ref_feat_shape is None else tuple(r.ref_feat_shape))
            if info.blocks:
                b = info.blocks[0]
                kw.update(qkv_fused=b.fused, qk_norm=b.qk_norm is not None,
                          attn_only_layer_scale=b.ls1 and not b.ls2)
        elif info.blocks:
            kw["use_rel_pos_bias"] = bool(info.blocks[0].rel_pos)
        with torch.device("meta"):
            try:
                rebuilt = timm.create_model(info.name, pretrained=False, **kw)
            except (TypeError, AssertionError, ValueError) as exc:
                raise UnsupportedModelError(f"cannot record how to rebuild {info.name}: {exc}") from exc
        mine = {k: tuple(p.shape) for k, p in model.named_parameters()}
        theirs = {k: tuple(p.shape) for k, p in rebuilt.named_parameters()}
        if mine != theirs:
            diff = sorted(set(mine.items()) ^ set(theirs.items()))[:2]
            raise UnsupportedModelError(
                f"cannot record how to rebuild this {info.name} (its blocks differ from one another "
                f"or from its timm options): {diff}"
            )
        return {"name": info.name, "kwargs": kw}

    # -- the space ----------------------------------------------------------------------

    def space(self, model: nn.Module, config: SpaceConfig) -> PruningSpace:
        info = self._require(model)
        common.check_config(config, info.name, info.img)
        layers = _dim_layers(model, info)
        dims = []
        for name, kind, size in _dim_names(info):
            blk = None if kind == "embed" else name.rsplit(".", 1)[0]
            if kind in ("embed", "mlp"):
                step, _ = aligned_choices(size, config.min_step, config.max_choices)
            else:
                step = min(size, config.head_step if kind == "heads" else config.per_head_step)
                if kind == "qk" and info.rope:
                    step += step % 2  # whole rotation pairs
            dims.append(Dim(name, kind, size, step, choices_for(size, step), blk, layers[name]))
        blocks = [
            SpaceBlock(f"blocks.{i}", True, "", tuple(f"blocks.{i}.{k}" for k in ("heads", "qk", "v", "mlp")))
            for i in range(len(info.blocks))
        ]
        locked = [
            ("input channels", f"the image has {info.in_chans} channels"),
            ("tokens", f"fixed at {info.tokens}: a {info.img[0]}x{info.img[1]} image in "
                       f"{info.patch[0]}x{info.patch[1]} patches ({info.grid}) plus {info.prefix} "
                       f"class/register token(s); create the model with another img_size to change them"),
        ]
        if info.rope:
            layout = "(j, j + head/2)" if info.rope_half else "(2j, 2j+1)"
            locked.append((
                "blocks.*.qk",
                f"rotary position embedding: query/key channels rotate in pairs {layout} by a "
                f"frequency per pair, so qk widths are even and keep whole pairs with their "
                f"frequencies",
            ))
        if info.num_classes:
            locked.append(("classifier outputs", f"the task has {info.num_classes} classes"))
        return PruningSpace(info.name, self.family, dims, blocks, _terms(info),
                            (info.in_chans, info.img[0], info.img[1]), locked, dataclasses.asdict(config))

    def term_module(self, space: PruningSpace, term: Term, widths: tuple[int, ...]
                    ) -> tuple[nn.Module, tuple[int, ...]]:
        if len(widths) != len(term.dims):
            raise MdpError(f"term {term.name} takes {len(term.dims)} widths, got {widths}")
        w = tuple(int(x) for x in widths)
        c = term.const
        tokens = int(c["tokens"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            module: nn.Module
            if term.kind == "patch_embed":
                h, wd = _pair(c["img"])
                return _PatchTerm(c, w[0]).eval(), (int(c["in_chans"]), h, wd)
            if term.kind == "attn_qk":
                module = _AttnQKTerm(c, *w)
            elif term.kind == "attn_v":
                module = AttnVTerm(w[0], w[1], w[2], tokens, qkv_bias=bool(c.get("qkv_bias", True)),
                                   proj_bias=bool(c.get("bias", True)), layer_scale=bool(c.get("ls")))
            elif term.kind == "mlp":
                module = _MlpTerm(c, w[0], w[1])
            elif term.kind == "head":
                module = _HeadTerm(c, w[0])
            else:
                raise MdpError(f"term {term.name}: kind {term.kind!r} is not an {self.family} term")
        return module.eval(), (tokens, w[0])

    # -- importance ---------------------------------------------------------------------

    def _fitting(self, model: nn.Module, space: PruningSpace) -> _Info:
        info = self._require(model)
        dims = [(n, s) for n, _, s in _dim_names(info)]
        common.check_fits(space, self.family, info.name, dims, (info.in_chans, *info.img))
        return info

    def magnitude(self, model: nn.Module, space: PruningSpace) -> Importance:
        """Per unit: the L2 norm of the weights it owns. A block: summed over embedding channels,
        the norm of each output row of its attention projection and fc2, times |gamma|."""
        info = self._fitting(model, space)
        sq = _unit_sums(model, info, lambda p: p.detach().double() ** 2)
        blocks = {f"blocks.{i}": common.residual_norm(model, _branch_outputs(info, i)) for i in range(len(info.blocks))}
        return Importance({k: np.sqrt(v) for k, v in sq.items()}, blocks)

    def taylor_terms(self, model: nn.Module, space: PruningSpace
                     ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Signed sums of ``w * dL/dw`` per unit; a block: over its attention projection and fc2
        (linear, so the first-order change when both residual branches are zeroed)."""
        info = self._fitting(model, space)
        units = _unit_sums(model, info, common.weight_grad)
        blocks = {f"blocks.{i}": common.signed_taylor(model, (n for w, b, _ in _branch_outputs(info, i) for n in (w, b)))
                  for i in range(len(info.blocks))}
        return units, blocks

    # -- surgery ------------------------------------------------------------------------

    def apply(self, model: nn.Module, space: PruningSpace, plan: Plan, importance: Importance) -> nn.Module:
        info = self._fitting(model, space)
        keep = common.kept_units(space, plan, importance,
                          lambda d, scores, k: _keep_qk(scores, k, info) if d.kind == "qk" else _top_k(scores, k))
        arch = self.arch(model)
        device = next(model.parameters()).device
        idx = {k: torch.as_tensor(v, dtype=torch.long, device=device) for k, v in keep.items()}
        e = idx["embed"]
        pruned: Any = copy.deepcopy(model)  # an Eva or Beit, as _fitting read it
        with torch.no_grad():
            conv = pruned.patch_embed.proj
            _slice_conv_out(conv, e)
            for name in EMBED_NORMS:
                if hasattr(pruned, name.split(".")[0]):
                    slice_vector(pruned.get_submodule(name), ("weight", "bias"), e)
            for name in TOKENS:
                p = getattr(pruned, name, None)
                if isinstance(p, nn.Parameter):
                    setattr(pruned, name, new_param(p, p.index_select(2, e)))
            if isinstance(pruned.head, nn.Linear):
                slice_linear(pruned.head, None, e)
            removed = set(plan.removed)
            for i, b in enumerate(info.blocks):
                n = f"blocks.{i}"
                if n in removed:
                    continue
                blk = pruned.get_submodule(n)
                for part in ("norm1", "norm2"):
                    slice_vector(blk.get_submodule(part), ("weight", "bias"), e)
                slice_vector(blk, ("gamma_1", "gamma_2"), e)
                blk.attn = _pruned_attention(model, info, i, e, idx[f"{n}.heads"], idx[f"{n}.qk"], idx[f"{n}.v"])
                _slice_mlp(blk.mlp, b, e, idx[f"{n}.mlp"])
        blocks = pruned.blocks
        assert isinstance(blocks, nn.ModuleList)
        for i in reversed(range(len(info.blocks))):
            if f"blocks.{i}" in removed:
                del blocks[i]
        width = len(e)
        pruned.embed_dim = pruned.num_features = pruned.head_hidden_size = width
        pruned.feature_info = [dict(module=f"blocks.{i}", num_chs=width, reduction=info.patch[0])
                               for i in range(len(blocks))]
        common.mark_pruned(pruned, keep, arch)
        return pruned

    def param_count(self, space: PruningSpace, plan: Plan) -> int:
        """Parameters of the pruned model: those of the kept terms' modules, which hold exactly
        the model's layers (built on the meta device, so nothing is allocated)."""
        space.validate(plan)
        total = 0
        with torch.device("meta"):
            for t in space.kept_terms(plan):
                module, _ = self.term_module(space, t, space.term_widths(t, plan))
                total += sum(p.numel() for p in module.parameters())
        return total


class BeitAdapter(EvaAdapter):
    """Adapter for timm ``Beit`` (BEiT v1/v2 with per-block relative position bias)."""

    family = "beit"
    cls = Beit


@torch.no_grad()
def _slice_conv_out(conv: nn.Conv2d, e: torch.Tensor) -> None:
    conv.weight = new_param(conv.weight, conv.weight.index_select(0, e))
    if conv.bias is not None:
        conv.bias = new_param(conv.bias, conv.bias.index_select(0, e))
    conv.out_channels = len(e)


def _dim_layers(model: nn.Module, info: _Info) -> dict[str, tuple[str, ...]]:
    """Every module (or token parameter) that reads or writes each dim."""
    present = {n for n, m in model.named_modules() if type(m) is not nn.Identity}
    embed = ["patch_embed.proj", "cls_token", "reg_token", "pos_embed", "norm_pre"]
    out: dict[str, tuple[str, ...]] = {}
    for i in range(len(info.blocks)):
        n = f"blocks.{i}"
        a = [f"{n}.attn.{m}" for m in ("qkv", "q_proj", "k_proj", "v_proj") if f"{n}.attn.{m}" in present]
        mlp = [f"{n}.mlp.{m}" for m in ("fc1", "fc1_g", "fc1_x", "norm", "fc2") if f"{n}.mlp.{m}" in present]
        embed += [f"{n}.norm1", *a, f"{n}.attn.proj", f"{n}.norm2", *mlp]
        qk_norms = [f"{n}.attn.{m}" for m in ("q_norm", "k_norm") if f"{n}.attn.{m}" in present]
        out[f"{n}.heads"] = (f"{n}.attn",)
        out[f"{n}.qk"] = (*(a if len(a) == 1 else a[:2]), *qk_norms)
        out[f"{n}.v"] = (*a[-1:], f"{n}.attn.proj")
        out[f"{n}.mlp"] = tuple(mlp)
    embed += ["norm", "fc_norm", "head"]
    out["embed"] = tuple(
        m for m in embed if (getattr(model, m, None) is not None if m in TOKENS else m in present)
    )
    return out
