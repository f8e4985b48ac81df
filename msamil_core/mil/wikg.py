"""WiKG: whole-slide image as a knowledge graph (Li et al., CVPR 2024), MIL-Lab
``wikg.base`` layout.

Each instance is a node with a head and a tail embedding; it links to the ``topk``
nodes whose tails best match its head (a dynamic directed graph), aggregates their
tails with knowledge-aware attention, and combines itself with the aggregate
(bi-interaction, GCN or GraphSAGE style). Attention pooling over the nodes and a
LayerNorm give the slide feature.

The neighbour search is done in row blocks, so the [N, N] similarity matrix never exists
at once and is not kept for backward (MIL-Lab materialises it, and a softmaxed copy
for logging).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._registry import register_model
from .base import MILModel, build_model, init_weights, masked_mean, masked_softmax, pool_instances, state_only
from .layers import mlp

__all__ = ["WIKG"]

_ACTIVATIONS = {"leaky_relu": nn.LeakyReLU, "relu": nn.ReLU, "tanh": nn.Tanh}
_ROW_BLOCK = 4096  # query rows per block of the neighbour search


class AttentionReadout(nn.Module):
    """Global attention pooling (PyG's ``GlobalAttention`` with a gate network):
    [B, N, D] -> pooled [B, D] and weights [B, N]."""

    def __init__(self, dim: int):
        super().__init__()
        self.gate_nn = nn.Sequential(nn.Linear(dim, dim // 2), nn.LeakyReLU(), nn.Linear(dim // 2, 1))

    def forward(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        weights = masked_softmax(self.gate_nn(x).squeeze(-1), mask)
        return (weights.unsqueeze(1) @ x)[:, 0], weights


class WIKG(MILModel):
    """WiKG. Slide feature: the normalised pooled node embedding [B, embed_dim].

    ``attention``: the readout's attention weights [B, M] (for ``pool='attn'``); for mean
    pooling uniform weights, for max pooling each node's share of the feature channels
    it holds the maximum of.
    """

    permutation_invariant = True

    def __init__(
        self,
        in_dim: int = 1024,
        num_classes: int = 2,
        embed_dim: int = 512,
        topk: int = 4,
        agg_type: str = "bi-interaction",
        pool: str = "attn",
        dropout: float = 0.25,
        act: str = "leaky_relu",
    ):
        super().__init__(in_dim, embed_dim, num_classes)
        if agg_type not in ("gcn", "sage", "bi-interaction"):
            raise ValueError(f"WIKG: agg_type must be 'gcn', 'sage' or 'bi-interaction', got {agg_type!r}")
        if pool not in ("attn", "mean", "max"):
            raise ValueError(f"WIKG: pool must be 'attn', 'mean' or 'max', got {pool!r}")
        d = embed_dim
        self.topk = topk
        self.agg_type = agg_type
        self.pool = pool
        self.scale = d**-0.5
        self.patch_embed = mlp(in_dim, [], d)
        # MIL-Lab builds these gate layers but never calls them; buffers keep its state dicts loading
        self.gate_U = state_only(nn.Linear(d, d // 2))
        self.gate_V = state_only(nn.Linear(d, d // 2))
        self.gate_W = state_only(nn.Linear(d // 2, d))
        self.W_head = nn.Linear(d, d)
        self.W_tail = nn.Linear(d, d)
        if agg_type == "gcn":
            self.linear = nn.Linear(d, d)
        elif agg_type == "sage":
            self.linear = nn.Linear(2 * d, d)
        else:
            self.linear1 = nn.Linear(d, d)
            self.linear2 = nn.Linear(d, d)
        self.activation = _ACTIVATIONS[act]()
        self.message_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if pool == "attn":
            self.readout = AttentionReadout(d)
        self.norm = nn.LayerNorm(d)
        self._build_head(num_classes)
        init_weights(self)

    def _neighbours(self, e_h: Tensor, e_t: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Top-k tail matches of every head: (logits [B, N, k], indices [B, N, k]).

        Padding nodes are never chosen while real ones remain; a bag with fewer real
        nodes than ``topk`` still gets k columns, and the extra (padding) ones carry the
        lowest logit so they get no weight downstream.
        """
        k = min(self.topk, e_t.shape[1])
        values, indices = [], []
        for start in range(0, e_h.shape[1], _ROW_BLOCK):
            logits = (e_h[:, start : start + _ROW_BLOCK] @ e_t.transpose(1, 2)) * self.scale
            if mask is not None:
                logits = logits.masked_fill(~mask.unsqueeze(1), torch.finfo(logits.dtype).min)
            v, i = logits.topk(k, dim=-1)
            values.append(v)
            indices.append(i)
        return torch.cat(values, 1), torch.cat(indices, 1)

    def _forward_features(self, h, mask, coords, scales, return_attention) -> tuple[Tensor, dict[str, Any]]:
        h = self.patch_embed(h)
        h = (h + masked_mean(h, mask).unsqueeze(1)) * 0.5
        e_h, e_t = self.W_head(h), self.W_tail(h)

        topk_logits, topk_index = self._neighbours(e_h, e_t, mask)
        B, N, k = topk_index.shape
        neighbours = e_t[torch.arange(B, device=h.device).view(B, 1, 1), topk_index]  # [B, N, k, D]
        neighbour_ok = None if mask is None else mask.gather(1, topk_index.flatten(1)).view(B, N, k)

        # knowledge-aware attention over each node's neighbours
        topk_prob = masked_softmax(topk_logits, neighbour_ok)
        gate = torch.tanh(e_h.unsqueeze(2) + topk_prob.unsqueeze(-1) * neighbours)
        ka_prob = masked_softmax((gate * neighbours).sum(-1), neighbour_ok)
        e_n = (ka_prob.unsqueeze(-1) * neighbours).sum(2)

        if self.agg_type == "gcn":
            embedding = self.activation(self.linear(e_h + e_n))
        elif self.agg_type == "sage":
            embedding = self.activation(self.linear(torch.cat([e_h, e_n], dim=-1)))
        else:
            embedding = self.activation(self.linear1(e_h + e_n)) + self.activation(self.linear2(e_h * e_n))
        embedding = self.message_dropout(embedding)

        if self.pool == "attn":
            pooled, weights = self.readout(embedding, mask)
        else:
            pooled, weights = pool_instances(embedding, mask, self.pool, return_attention)
        return self.norm(pooled), ({"attention": weights} if return_attention else {})


@register_model("wikg.base")
def wikg_base(**kwargs) -> WIKG:
    """WiKG, MIL-Lab ``wikg.base`` (width 512, 4 neighbours, bi-interaction, attention readout)."""
    return build_model(
        WIKG, dict(embed_dim=512, topk=4, agg_type="bi-interaction", pool="attn", dropout=0.25, act="leaky_relu"), kwargs
    )
