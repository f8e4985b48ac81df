"""ABMIL: attention-based deep MIL (Ilse, Tomczak & Welling, ICML 2018).

``abmil.base`` is MIL-Lab's gated ABMIL (the FEATHER architecture) with the same parameter
names and shapes; ``abmil.plain`` uses the ungated attention network of the same paper.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ._registry import register_model
from .base import MILModel, build_model, init_weights, masked_softmax
from .layers import attention_scorer, patch_embed

__all__ = ["ABMIL"]


class ABMIL(MILModel):
    """Instances are embedded (``patch_embed``), scored by a (gated) attention network
    (``global_attn``) and averaged with the softmax of the scores; a linear ``classifier``
    maps the bag feature [B, embed_dim] to logits.

    ``attention``: the softmax attention weights [B, M].
    """

    permutation_invariant = True

    def __init__(
        self,
        in_dim: int = 1024,
        num_classes: int = 2,
        embed_dim: int = 512,
        num_fc_layers: int = 1,
        dropout: float = 0.25,
        attn_dim: int = 384,
        gate: bool = True,
    ):
        super().__init__(in_dim, embed_dim, num_classes)
        self.patch_embed = patch_embed(in_dim, embed_dim, num_fc_layers, dropout)
        self.global_attn = attention_scorer(gate, embed_dim, attn_dim, dropout)
        self._build_head(num_classes)
        init_weights(self)

    def forward_attention(self, h: Tensor, attn_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Embedded instances [B, M, E] and raw attention scores [B, 1, M] (MIL-Lab's
        layout; padding gets the dtype's lowest value, as in MIL-Lab)."""
        h, mask, _, _ = self._prepare(h, attn_mask, None, None)
        h = self.patch_embed(h)
        scores = self.global_attn(h).transpose(1, 2)
        if mask is not None:
            scores = scores.masked_fill(~mask.unsqueeze(1), torch.finfo(scores.dtype).min)
        return h, scores

    def _forward_features(self, h, mask, coords, scales, return_attention) -> tuple[Tensor, dict[str, Any]]:
        h = self.patch_embed(h)
        weights = masked_softmax(self.global_attn(h).transpose(1, 2), None if mask is None else mask.unsqueeze(1))
        intermeds: dict[str, Any] = {}
        if return_attention:
            intermeds["attention"] = weights[:, 0]
        return (weights @ h)[:, 0], intermeds


@register_model("abmil.base")
def abmil_base(**kwargs) -> ABMIL:
    """Gated ABMIL, MIL-Lab ``abmil.base`` (embed 512, attention 384, dropout 0.25)."""
    return build_model(ABMIL, dict(embed_dim=512, attn_dim=384, num_fc_layers=1, dropout=0.25, gate=True), kwargs)


@register_model("abmil.plain")
def abmil_plain(**kwargs) -> ABMIL:
    """ABMIL with the ungated attention network (``tanh`` only), otherwise as ``abmil.base``."""
    return build_model(ABMIL, dict(embed_dim=512, attn_dim=384, num_fc_layers=1, dropout=0.25, gate=False), kwargs)
