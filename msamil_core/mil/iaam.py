"""IAAM, the multi-scale MIL aggregator of MsaMIL-Net (Wen, Wen & Fang; section 3.3), as
``msamil.base``.

Multi-scale Hierarchical Encoder (MHE):
    1. The bag's instances (patches at 20x, 10x and 5x) are put in ascending order of their
       level-0 top-left (x, y), so patches of different scales from the same region sit
       next to each other in the sequence.
    2. ``T' = T + FC([x, y, scale]) + E``: the projected features, a linear encoding of the
       position (normalised per bag to [0, 1]) and scale index, and the Transformer's
       sinusoidal encoding of the sequence position.
    3. Multi-head Low-rank Attention: queries and keys are projected to rank ``r`` << d,
       values keep the full width; then LayerNorm and an MLP, both with residuals.
Dynamic Multi-instance Query (DMQ):
    4. ``num_queries`` (10) learned queries cross-attend to the encoded instances, so the
       model picks the scales and places it needs instead of being outvoted by the many
       20x patches.
    5. A gated attention layer weighs the query outputs (``g_i = σ(W_g z_i + b_g)``, σ a
       softmax over the queries by default, or the sigmoid with ``gate="sigmoid"``) and sums
       them into the bag feature; a linear head classifies it.

Ablations (section 3.3; ``config/ablation.yaml``) are model options: ``position_encoding:
false`` (no FC([x, y, scale])), ``sinusoidal_encoding: false``, ``depth: 0`` (no MHE layer),
``num_queries: 1``, ``gate: sigmoid``, and ``rank`` equal to the width (full-rank attention).

An input projection maps any ``in_dim`` to the model width (512 in the paper). Attention
runs through ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels), so bags
of 20,000 instances fit: no [N, N] tensor is kept for backward, and with
``return_attention`` only the [queries, N] cross-attention is materialised.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._registry import register_model
from .base import MILModel, build_model, init_weights, masked_softmax
from .layers import mlp, patch_embed, sinusoidal_encoding

__all__ = ["MsaMIL", "instance_order", "position_features"]


def instance_order(coords: Tensor | None, scales: Tensor | None, mask: Tensor | None) -> Tensor | None:
    """The order IAAM reads a bag in: [B, M] indices (``None``: keep the given order).

    Real instances come first, sorted by x, then y, then scale (stable, so exact ties keep
    the caller's order); padding goes last. Without coordinates the real instances keep
    the caller's order.
    """
    if coords is None and mask is None:
        return None
    ref = coords if coords is not None else mask
    B, M = ref.shape[:2]
    order = torch.arange(M, device=ref.device).expand(B, M)
    keys: list[Tensor] = []  # least significant first; float64 keeps integer pixels exact
    if coords is not None:
        if scales is not None:
            keys.append(scales.double())
        keys += [coords[..., 1].double(), coords[..., 0].double()]
    if mask is not None:
        keys.append((~mask).double())
    for key in keys:
        order = order.gather(1, key.gather(1, order).argsort(dim=1, stable=True))
    return order


def position_features(coords: Tensor | None, scales: Tensor | None, mask: Tensor | None, like: Tensor) -> Tensor:
    """``[x, y, scale]`` per instance, [B, M, 3] in ``like``'s dtype.

    x and y are shifted to start at 0 and divided by the bag's larger side (so the aspect
    ratio is kept and they lie in [0, 1]), over the real instances only; scale is the
    index 0 / 1 / 2 (20x / 10x / 5x). Missing coordinates or scales give zeros.
    """
    B, M = like.shape[:2]
    out = torch.zeros(B, M, 3, device=like.device, dtype=torch.float64)
    if coords is not None:
        xy = coords.double()
        real = torch.ones(B, M, dtype=torch.bool, device=like.device) if mask is None else mask
        lo = xy.masked_fill(~real.unsqueeze(-1), float("inf")).amin(1, keepdim=True)
        hi = xy.masked_fill(~real.unsqueeze(-1), float("-inf")).amax(1, keepdim=True)
        extent = (hi - lo).amax(-1, keepdim=True).clamp_min(1e-12)  # one instance: extent 0 -> position 0
        out[..., :2] = ((xy - lo) / extent).masked_fill(~real.unsqueeze(-1), 0.0)
    if scales is not None:
        out[..., 2] = scales.double()
    return out.to(like.dtype)


class LowRankAttention(nn.Module):
    """Multi-head Low-rank Attention (MLA): ``softmax(Q_low K_low^T / sqrt(r_h)) V`` per head,
    with ``Q_low = x W_Q``, ``K_low = x W_K`` of width ``rank`` (``rank / num_heads`` per
    head) and ``V = x W_V`` of full width; the heads are merged by an output projection.

    Input [B, N, dim] and an optional key mask [B, N] (True = real) -> [B, N, dim].
    """

    def __init__(self, dim: int, num_heads: int = 8, rank: int = 128, attn_dropout: float = 0.0):
        super().__init__()
        if dim % num_heads or rank % num_heads:
            raise ValueError(f"IAAM: dim ({dim}) and rank ({rank}) must be multiples of num_heads ({num_heads})")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, rank)
        self.k = nn.Linear(dim, rank)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_dropout = attn_dropout

    def forward(self, x: Tensor, key_mask: Tensor | None) -> Tensor:
        B, N, dim = x.shape
        H = self.num_heads
        q = self.q(x).unflatten(-1, (H, -1)).transpose(1, 2)  # [B, H, N, r_h]
        k = self.k(x).unflatten(-1, (H, -1)).transpose(1, 2)
        v = self.v(x).unflatten(-1, (H, -1)).transpose(1, 2)  # [B, H, N, d_h]
        r_h, d_h = q.shape[-1], v.shape[-1]
        # The fused (flash / memory-efficient) kernels need one head width for q, k and v;
        # with r_h != d_h PyTorch falls back to the O(N^2)-memory math kernel (about 2 GB
        # more at N = 5,000). Zero columns change no dot product, so pad to a common width
        # and keep the 1/sqrt(r_h) scale.
        width = max(r_h, d_h)
        q, k, v = (F.pad(t, (0, width - t.shape[-1])) if t.shape[-1] < width else t for t in (q, k, v))
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=None if key_mask is None else key_mask[:, None, None, :],
            dropout_p=self.attn_dropout if self.training else 0.0,
            scale=r_h**-0.5,
        )
        return self.proj(out[..., :d_h].transpose(1, 2).reshape(B, N, dim))


class MHELayer(nn.Module):
    """One encoder layer: ``x + MLA(LN(x))``, then ``x + MLP(LN(x))``; [B, N, dim]."""

    def __init__(self, dim: int, num_heads: int, rank: int, mlp_ratio: float, dropout: float, attn_dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = LowRankAttention(dim, num_heads, rank, attn_dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = mlp(dim, [int(dim * mlp_ratio)], dim, dropout, act=nn.GELU, final_act=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, key_mask: Tensor | None) -> Tensor:
        x = x + self.drop(self.attn(self.norm1(x), key_mask))
        return x + self.drop(self.mlp(self.norm2(x)))


class DynamicQuery(nn.Module):
    """DMQ: learned queries Z [Q, dim] cross-attend to the instances, ``Z' = softmax(Z W_Q
    (X W_K)^T / sqrt(d)) X W_V``; gated attention ``g_i = sigmoid(W_g z'_i + b_g)`` then gives
    the bag feature ``sum_i g_i z'_i``.

    Input [B, N, dim] and an optional key mask -> bag feature [B, dim] and, with
    ``return_attention``, the instance weights [B, N]: each query's cross-attention
    (mean over heads) weighted by its share of the gates, which sums to 1 over the
    instances.
    """

    def __init__(self, dim: int, num_queries: int = 10, num_heads: int = 1, gate: str = "softmax"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"IAAM: dim ({dim}) must be a multiple of query_heads ({num_heads})")
        if gate not in ("softmax", "sigmoid"):
            raise ValueError(f"IAAM: gate must be softmax or sigmoid, got {gate!r}")
        self.num_heads = num_heads
        self.gate_fn = gate
        # Unit-variance queries (as DETR's query embeddings): with the usual 0.02 the query-key
        # logits start near 0.04, the cross-attention stays uniform through a short training
        # run and the bag feature is the plain mean (measured on the demo cohort).
        self.queries = nn.Parameter(torch.empty(1, num_queries, dim))
        nn.init.normal_(self.queries, std=1.0)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.gate = nn.Linear(dim, 1)

    def forward(self, x: Tensor, key_mask: Tensor | None, return_attention: bool) -> tuple[Tensor, Tensor | None]:
        B, N, dim = x.shape
        H = self.num_heads
        q = self.q(self.queries).expand(B, -1, -1).unflatten(-1, (H, -1)).transpose(1, 2)  # [B, H, Q, d_h]
        k = self.k(x).unflatten(-1, (H, -1)).transpose(1, 2)  # [B, H, N, d_h]
        v = self.v(x).unflatten(-1, (H, -1)).transpose(1, 2)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        weights = None
        if return_attention:  # [Q, N] per head only; never [N, N]
            weights = masked_softmax((q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5, mask)
            z = weights @ v
        else:
            z = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        z = z.transpose(1, 2).flatten(2)  # [B, Q, dim]
        # Softmax gates make the bag a convex combination of the query outputs. Independent
        # sigmoid gates (the literal eq. 7) let the first steps shrink every gate towards 0,
        # which lowers an initially large loss fastest and then leaves a constant bag feature.
        scores = self.gate(z)  # [B, Q, 1]
        g = scores.softmax(1) if self.gate_fn == "softmax" else torch.sigmoid(scores)
        bag = (g * z).sum(1)
        if weights is None:
            return bag, None
        share = g.squeeze(-1) / g.sum(1)  # [B, Q]
        return bag, torch.einsum("bq,bqn->bn", share, weights.mean(1))


class MsaMIL(MILModel):
    """IAAM (MsaMIL-Net's MIL aggregator). Slide feature: the gated query sum [B, embed_dim].

    Reads ``coords`` (level-0 x, y; [B, M, 2], int or float) and ``scales`` ([B, M], 0 = 20x,
    1 = 10x, 2 = 5x); either may be left out (treated as zeros; without coordinates the
    instances keep the given order). Given coordinates, the logits do not depend on the
    order in which instances are passed.

    ``attention``: the gate-weighted DMQ cross-attention over the instances [B, M], in the
    caller's instance order.
    """

    uses_positions = True

    def __init__(
        self,
        in_dim: int = 512,
        num_classes: int = 2,
        embed_dim: int = 512,
        depth: int = 1,
        num_heads: int = 8,
        rank: int = 128,
        mlp_ratio: float = 4.0,
        num_queries: int = 10,
        query_heads: int = 1,
        gate: str = "softmax",
        dropout: float = 0.25,
        block_dropout: float = 0.1,
        attn_dropout: float = 0.0,
        position_encoding: bool = True,
        sinusoidal_encoding: bool = True,
    ):
        super().__init__(in_dim, embed_dim, num_classes)
        self.patch_embed = patch_embed(in_dim, embed_dim, 1, dropout)
        # ablations (MsaMIL-Net sec. 3.3): FC([x, y, scale]) and the sinusoidal sequence encoding
        self.sinusoidal_encoding = sinusoidal_encoding
        self.pos_fc = nn.Linear(3, embed_dim) if position_encoding else None
        self.blocks = nn.ModuleList(
            MHELayer(embed_dim, num_heads, rank, mlp_ratio, block_dropout, attn_dropout) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.query = DynamicQuery(embed_dim, num_queries, query_heads, gate)
        self.head_drop = nn.Dropout(dropout)
        self._build_head(num_classes)
        init_weights(self)
        # Small position/scale weights: at Kaiming scale one step of the scale index adds a vector
        # as long as a patch embedding, which buries the 5x patches' content at the start.
        if self.pos_fc is not None:
            nn.init.normal_(self.pos_fc.weight, std=0.02)

    def _forward_features(self, h, mask, coords, scales, return_attention) -> tuple[Tensor, dict[str, Any]]:
        B, M, _ = h.shape
        order = instance_order(coords, scales, mask)
        if order is not None:
            h = h.gather(1, order.unsqueeze(-1).expand(-1, -1, h.shape[-1]))
            mask = None if mask is None else mask.gather(1, order)
            coords = None if coords is None else coords.gather(1, order.unsqueeze(-1).expand(-1, -1, 2))
            scales = None if scales is None else scales.gather(1, order)
        x = self.patch_embed(h)
        if self.pos_fc is not None:
            x = x + self.pos_fc(position_features(coords, scales, mask, x))
        if self.sinusoidal_encoding:
            x = x + sinusoidal_encoding(M, x.shape[-1], x.device, x.dtype)
        for block in self.blocks:
            x = block(x, mask)
        bag, weights = self.query(self.norm(x), mask, return_attention)
        intermeds: dict[str, Any] = {}
        if return_attention:
            if order is not None:  # back to the caller's order
                weights = torch.zeros_like(weights).scatter_(1, order, weights)
            intermeds["attention"] = weights
        return bag, intermeds

    def forward_head(self, slide_feats: Tensor) -> Tensor:
        return self.classifier(self.head_drop(slide_feats))


@register_model("msamil.base")
def msamil_base(**kwargs) -> MsaMIL:
    """IAAM as in the MsaMIL-Net paper: width 512, one low-rank attention layer (8 heads,
    rank 128), 10 dynamic queries."""
    return build_model(
        MsaMIL,
        dict(embed_dim=512, depth=1, num_heads=8, rank=128, mlp_ratio=4.0, num_queries=10, query_heads=1, dropout=0.25),
        kwargs,
    )
