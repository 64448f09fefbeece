"""Attention of the BEiT lineage (timm ``Eva`` and ``Beit``) with pruned widths.

timm's ``EvaAttention`` and BEiT's ``Attention`` tie query/key and value widths to one head
width and reshape their output to the input width, so a pruned block holds
:class:`PrunedEvaAttention` instead. It keeps timm's parameter names (``qkv`` with ``q_bias``
and ``v_bias`` and no key bias, or ``q_proj`` / ``k_proj`` / ``v_proj``), the dense softmax
scale, the per-head relative position bias table (its columns sliced with the kept heads) and
the rotary embedding of the kept query/key channels: the model's shared rotary table is
indexed with ``rope_idx``, the kept channels' sine and cosine columns, so each kept rotation
pair keeps its frequency.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat
from torch import nn

from mdp_trt.models.attention import HeadAttention


class PrunedEvaAttention(HeadAttention):
    """Self-attention with ``num_heads`` heads of ``qk_dim`` query/key and ``v_dim`` value channels.

    ``fused``: one ``qkv`` projection writing ``[q | k | v]`` (head-major, ``v`` last) with the
    bias ``[q_bias | 0 | v_bias]``; otherwise ``q_proj`` (with bias), ``k_proj`` (without),
    ``v_proj`` (with). ``rel_pos``: a ``(distances, heads)`` table gathered by
    ``relative_position_index``. Rotary embeddings skip the ``num_prefix_tokens`` first tokens.
    """

    k_bias: torch.Tensor  # registered with q_bias / v_bias only
    rope_idx: torch.Tensor | None
    relative_position_index: torch.Tensor  # registered with relative_position_bias_table only

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qk_dim: int,
        v_dim: int,
        scale: float,
        fused: bool = True,
        qv_bias: bool = True,
        proj_bias: bool = True,
        num_prefix_tokens: int = 1,
        rotate_half: bool = False,
        rope_idx: torch.Tensor | None = None,
        rel_pos: tuple[int, torch.Tensor] | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__(num_heads, qk_dim, v_dim, scale)
        self.num_prefix_tokens = num_prefix_tokens
        self.rotate_half = rotate_half
        self.fused = fused
        hq, hv = num_heads * qk_dim, num_heads * v_dim
        self.qkv: nn.Linear | None = None
        self.q_proj = self.k_proj = self.v_proj = None
        self.q_bias: nn.Parameter | None = None
        self.v_bias: nn.Parameter | None = None
        if fused:
            self.qkv = nn.Linear(dim, 2 * hq + hv, bias=False)
            if qv_bias:
                self.q_bias = nn.Parameter(torch.zeros(hq))
                self.register_buffer("k_bias", torch.zeros(hq), persistent=False)
                self.v_bias = nn.Parameter(torch.zeros(hv))
        else:
            self.q_proj = nn.Linear(dim, hq, bias=qv_bias)
            self.k_proj = nn.Linear(dim, hq, bias=False)
            self.v_proj = nn.Linear(dim, hv, bias=qv_bias)
        self.q_norm: nn.Module = nn.Identity()
        self.k_norm: nn.Module = nn.Identity()
        # persistent: the kept channels come from the importance, which a reload does not have
        self.register_buffer("rope_idx", rope_idx)
        self.relative_position_bias_table: nn.Parameter | None = None
        if rel_pos is not None:
            distances, index = rel_pos
            self.relative_position_bias_table = nn.Parameter(torch.zeros(distances, num_heads))
            self.register_buffer("relative_position_index", index.clone(), persistent=False)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(hv, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        h, dq, dv = self.num_heads, self.qk_dim, self.v_dim
        if self.qkv is not None:
            if self.q_bias is None or self.v_bias is None:
                qkv = self.qkv(x)
            else:
                bias = torch.cat((self.q_bias, self.k_bias, self.v_bias))
                qkv = F.linear(x, weight=self.qkv.weight, bias=bias)
            q, k, v = qkv.split([h * dq, h * dq, h * dv], dim=-1)
        else:
            assert self.q_proj is not None and self.k_proj is not None and self.v_proj is not None
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.split_heads(q, k, v, b, n)

    def rel_pos_bias(self) -> torch.Tensor | None:
        """The ``(1, heads, tokens, tokens)`` relative position bias, as BEiT gathers it."""
        table = self.relative_position_bias_table
        if table is None:
            return None
        n = self.relative_position_index.shape[0]
        bias = table[self.relative_position_index.view(-1)].view(n, n, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(
        self,
        x: torch.Tensor,
        rope: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        is_causal: bool = False,
        shared_rel_pos_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self._qkv(x)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            if self.rope_idx is not None:
                rope = rope.index_select(-1, self.rope_idx)
            npt, half = self.num_prefix_tokens, self.rotate_half
            q = torch.cat(
                [q[:, :, :npt, :], apply_rot_embed_cat(q[:, :, npt:, :], rope, half=half)], dim=2
            ).type_as(v)
            k = torch.cat(
                [k[:, :, :npt, :], apply_rot_embed_cat(k[:, :, npt:, :], rope, half=half)], dim=2
            ).type_as(v)
        mask = self.rel_pos_bias()
        if shared_rel_pos_bias is not None:
            raise RuntimeError("a pruned BEiT block takes no shared relative position bias")
        if attn_mask is not None:
            mask = attn_mask if mask is None else mask + attn_mask
        return self.attend(q, k, v, mask, is_causal, b, n)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fused={self.fused}"
