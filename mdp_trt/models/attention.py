"""Multi-head self-attention whose query/key width per head may differ from its value width.

A pruned ViT block keeps ``heads`` heads, ``qk`` query/key channels and ``v`` value channels
per head. timm's ``Attention`` ties all three to one ``head_dim``, so surgery swaps it for
:class:`PrunedAttention`, which keeps timm's parameter names (``qkv``, ``proj``) and its call
signature, still runs ``F.scaled_dot_product_attention`` and keeps the softmax scale of the
dense model (``head_dim ** -0.5`` of the original head width), so that a plan that keeps
everything computes exactly what the dense model did.

The two latency terms of attention (:class:`AttnQKTerm`, :class:`AttnVTerm`) and the row
selection and slicing that every adapter's attention surgery shares live here too.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from mdp_trt.models.common import slice_linear, slice_vector


class HeadAttention(nn.Module):
    """What the pruned attentions share: ``num_heads`` heads of ``qk_dim`` query/key and
    ``v_dim`` value channels, the dense softmax scale, and attention over the split heads
    merged through ``proj``. Subclasses create ``attn_drop``, ``proj`` and ``proj_drop``."""

    attn_drop: nn.Dropout
    proj: nn.Linear
    proj_drop: nn.Dropout

    def __init__(self, num_heads: int, qk_dim: int, v_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.qk_dim, self.v_dim = num_heads, qk_dim, v_dim
        self.scale = float(scale)

    def split_heads(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, b: int, n: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(b, n, heads * width)`` projections as ``(b, heads, n, width)`` (``b`` and ``n``
        read once from the input, so that an exported graph reads its shape once)."""
        h, dq, dv = self.num_heads, self.qk_dim, self.v_dim
        return (
            q.reshape(b, n, h, dq).transpose(1, 2),
            k.reshape(b, n, h, dq).transpose(1, 2),
            v.reshape(b, n, h, dv).transpose(1, 2),
        )

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None,
        is_causal: bool,
        b: int,
        n: int,
    ) -> torch.Tensor:
        """Scaled dot-product attention of the split heads, merged to ``(b, n, heads * v_dim)``
        and projected."""
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.attn_drop.p if self.training else 0.0,
            is_causal=bool(is_causal),  # the ONNX tracer hands keyword flags over as tensors
            scale=self.scale,
        )
        out = out.transpose(1, 2).reshape(b, n, self.num_heads * self.v_dim)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, qk_dim={self.qk_dim}, v_dim={self.v_dim}, "
            f"scale={self.scale:.6g}"
        )


class PrunedAttention(HeadAttention):
    """Self-attention with ``num_heads`` heads of ``qk_dim`` query/key and ``v_dim`` value channels.

    ``qkv`` writes ``[q | k | v]``: ``num_heads * qk_dim`` query rows (head-major), as many key
    rows, then ``num_heads * v_dim`` value rows; ``proj`` reads ``num_heads * v_dim`` channels.
    ``q_norm`` / ``k_norm`` (timm's ``qk_norm``) normalise each head's ``qk_dim`` channels.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qk_dim: int,
        v_dim: int,
        scale: float,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        dim_out: int | None = None,
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
    ) -> None:
        super().__init__(num_heads, qk_dim, v_dim, scale)
        self.qkv = nn.Linear(dim, num_heads * (2 * qk_dim + v_dim), bias=qkv_bias)
        self.q_norm = q_norm if q_norm is not None else nn.Identity()
        self.k_norm = k_norm if k_norm is not None else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(num_heads * v_dim, dim_out or dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        b, n, _ = x.shape
        h, dq, dv = self.num_heads, self.qk_dim, self.v_dim
        q, k, v = self.qkv(x).split([h * dq, h * dq, h * dv], dim=-1)
        q, k, v = self.split_heads(q, k, v, b, n)
        q, k = self.q_norm(q), self.k_norm(k)
        return self.attend(q, k, v, attn_mask, is_causal, b, n)


def qkv_rows(
    heads: torch.Tensor, qk: torch.Tensor, v: torch.Tensor, num_heads: int, qk_dim: int, v_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of a ``[q | k | v]`` projection and columns of the output projection to keep.

    ``heads``, ``qk`` and ``v`` are the kept head indices and the kept channel indices within
    a head (the same channels in every kept head). Works for timm's ``Attention`` (where
    ``qk_dim == v_dim == head_dim``) and :class:`PrunedAttention` alike.
    """
    q_rows = head_rows(heads, qk, qk_dim)
    k_rows = q_rows + num_heads * qk_dim
    v_cols = head_rows(heads, v, v_dim)
    v_rows = v_cols + 2 * num_heads * qk_dim
    return torch.cat([q_rows, k_rows, v_rows]), v_cols


def head_rows(heads: torch.Tensor, idx: torch.Tensor, width: int) -> torch.Tensor:
    """Rows of a head-major projection (``width`` rows a head) holding channels ``idx`` of
    the heads ``heads``."""
    return (heads[:, None] * width + idx[None, :]).flatten()


def sliced_qkv_proj(
    qkv: nn.Linear, proj: nn.Linear, rows: torch.Tensor, cols: torch.Tensor, e: torch.Tensor
) -> tuple[nn.Linear, nn.Linear]:
    """Copies of ``qkv`` (rows ``rows``) and ``proj`` (columns ``cols``), both cut to the kept
    embedding channels ``e``; :func:`qkv_rows` gives the rows and columns."""
    qkv, proj = copy.deepcopy(qkv), copy.deepcopy(proj)
    slice_linear(qkv, rows, e)
    slice_linear(proj, e, cols)
    return qkv, proj


def sliced_qk_norms(attn: nn.Module, new: nn.Module, qk: torch.Tensor) -> None:
    """Give ``new`` copies of ``attn``'s per-head ``q_norm`` / ``k_norm`` keeping channels ``qk``."""
    for sub in ("q_norm", "k_norm"):
        norm = copy.deepcopy(attn.get_submodule(sub))
        slice_vector(norm, ("weight", "bias"), qk)
        setattr(new, sub, norm)


class AttnQKTerm(nn.Module):
    """Latency term ``attn_qk``: norm, query and key projections, scaled ``q @ k^T``, softmax.

    Input ``(batch, tokens, dim)``; output the attention probabilities
    ``(batch, heads, tokens, tokens)``. ``qk_norm`` is the norm each head's queries and keys
    go through (timm's ``qk_norm``), one module per projection.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qk_dim: int,
        norm: nn.Module,
        qkv_bias: bool = True,
        qk_norm: tuple[nn.Module, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.num_heads, self.qk_dim = num_heads, qk_dim
        self.scale = qk_dim**-0.5
        self.norm = norm
        self.qk = nn.Linear(dim, 2 * num_heads * qk_dim, bias=qkv_bias)
        self.q_norm, self.k_norm = qk_norm if qk_norm is not None else (nn.Identity(), nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k = (
            self.qk(self.norm(x))
            .reshape(b, n, 2, self.num_heads, self.qk_dim)
            .permute(2, 0, 3, 1, 4)
            .unbind(0)
        )
        q, k = self.q_norm(q), self.k_norm(k)
        return ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)


class AttnVTerm(nn.Module):
    """Latency term ``attn_v``: value projection, ``attn @ v``, output projection, residual add.

    The attention probabilities are a constant buffer of shape ``(1, heads, tokens, tokens)``,
    so the term has the single input ``(batch, tokens, dim)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        v_dim: int,
        tokens: int,
        qkv_bias: bool = True,
        proj_bias: bool = True,
        layer_scale: bool = False,
    ) -> None:
        super().__init__()
        self.num_heads, self.v_dim = num_heads, v_dim
        self.v = nn.Linear(dim, num_heads * v_dim, bias=qkv_bias)
        self.proj = nn.Linear(num_heads * v_dim, dim, bias=proj_bias)
        self.register_buffer("attn", torch.randn(1, num_heads, tokens, tokens).softmax(dim=-1))
        self.gamma = nn.Parameter(torch.rand(dim)) if layer_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        v = self.v(x).reshape(b, n, self.num_heads, self.v_dim).transpose(1, 2)
        y = self.proj((self.attn @ v).transpose(1, 2).reshape(b, n, self.num_heads * self.v_dim))
        if self.gamma is not None:
            y = y * self.gamma
        return x + y
