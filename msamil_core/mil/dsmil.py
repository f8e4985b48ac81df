"""DSMIL: dual-stream MIL (Li, Li & Eliceiri, CVPR 2021), MIL-Lab ``dsmil.base`` layout.

Stream 1 scores every instance per class (``i_classifier``) and keeps the max. Stream 2
takes each class's highest-scoring ("critical") instance, measures every instance's
similarity to it in a learned query space and pools the values with the softmax of those
similarities (``b_classifier``), giving one bag vector per class; a 1-D convolution over
the embedding width (``classifier``) turns them into bag logits. The two streams'
logits are averaged.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ._registry import register_model
from .base import MILModel, build_model, init_weights, masked_max, masked_softmax, state_only
from .layers import patch_embed

__all__ = ["DSMIL"]


class IClassifier(nn.Module):
    """Instance classifier: [B, M, E] -> instance logits [B, M, C]."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.inst_classifier = nn.Linear(in_dim, num_classes)

    def forward(self, h: Tensor) -> Tensor:
        return self.inst_classifier(h)


class BClassifier(nn.Module):
    """Bag stream: instance features [B, M, E] and instance logits [B, M, C] -> per-class
    bag vectors [B, C, E] and attention [B, M, C] (softmax over instances)."""

    def __init__(self, in_dim: int, attn_dim: int = 384, dropout: float = 0.0):
        super().__init__()
        self.q = nn.Linear(in_dim, attn_dim)
        self.v = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, in_dim))
        self.norm = nn.LayerNorm(in_dim)
        # MIL-Lab builds this layer but never calls it; kept (as buffers) so its state dicts load
        self.fcc = state_only(nn.Conv1d(3, 3, kernel_size=in_dim))

    def forward(self, h: Tensor, instance_logits: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
        _, critical = masked_max(instance_logits, mask)  # [B, C]: index of each class's top instance
        critical_feats = h.gather(1, critical.unsqueeze(-1).expand(-1, -1, h.shape[-1]))  # [B, C, E]
        q = self.q(h)  # [B, M, A]
        sim = q @ self.q(critical_feats).transpose(1, 2) / math.sqrt(q.shape[-1])  # [B, M, C]
        attn = masked_softmax(sim, None if mask is None else mask.unsqueeze(-1), dim=1)
        bag = self.norm(attn.transpose(1, 2) @ self.v(h))  # [B, C, E]
        return bag, attn


class DSMIL(MILModel):
    """DSMIL. Slide feature: per-class bag vectors [B, C, embed_dim].

    ``attention``: the bag stream's attention [B, M] of the predicted class; all classes'
    in ``class_attention`` [B, C, M].
    """

    permutation_invariant = True
    head_prefixes = ("classifier", "i_classifier")

    def __init__(
        self,
        in_dim: int = 1024,
        num_classes: int = 2,
        embed_dim: int = 512,
        num_fc_layers: int = 1,
        dropout: float = 0.25,
        attn_dim: int = 384,
        dropout_v: float = 0.0,
    ):
        super().__init__(in_dim, embed_dim, num_classes)
        self.patch_embed = patch_embed(in_dim, embed_dim, num_fc_layers, dropout)
        self.b_classifier = BClassifier(embed_dim, attn_dim, dropout_v)
        self._build_head(num_classes)
        init_weights(self)

    def _build_head(self, num_classes: int) -> None:
        self.i_classifier = IClassifier(self.embed_dim, num_classes)
        self.classifier = nn.Conv1d(num_classes, num_classes, kernel_size=self.embed_dim)

    def _forward_features(self, h, mask, coords, scales, return_attention) -> tuple[Tensor, dict[str, Any]]:
        h = self.patch_embed(h)
        instance_logits = self.i_classifier(h)
        bag, attn = self.b_classifier(h, instance_logits, mask)
        intermeds: dict[str, Any] = {"instance_logits": instance_logits}
        if return_attention:
            intermeds["class_attention"] = attn.transpose(1, 2)
        return bag, intermeds

    def forward_head(self, slide_feats: Tensor) -> Tensor:
        """Per-class bag vectors [B, C, E] -> bag-stream logits [B, C]."""
        return self.classifier(slide_feats).squeeze(-1)

    def _combine_logits(self, logits: Tensor, intermeds: dict[str, Any], mask: Tensor | None) -> Tensor:
        max_instance_logits, _ = masked_max(intermeds["instance_logits"], mask)
        logits = 0.5 * (logits + max_instance_logits)
        if "class_attention" in intermeds:
            pred = logits.argmax(-1)
            intermeds["attention"] = intermeds["class_attention"][torch.arange(len(pred), device=pred.device), pred]
        return logits


@register_model("dsmil.base")
def dsmil_base(**kwargs) -> DSMIL:
    """DSMIL, MIL-Lab ``dsmil.base`` (embed 512, query width 384)."""
    return build_model(DSMIL, dict(embed_dim=512, num_fc_layers=1, dropout=0.25, attn_dim=384, dropout_v=0.0), kwargs)
