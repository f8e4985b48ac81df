"""DTFD-MIL: double-tier feature distillation (Zhang et al., CVPR 2022), MIL-Lab ``dftd.*``
layout (MIL-Lab spells the family ``dftd``).

Tier 1 splits a bag's instances into ``num_group`` random pseudo-bags; each is pooled by a
gated attention network (``attention``) and classified (``classifier``) with the bag's
label (the instance loss). From each pseudo-bag, features are distilled for tier 2: the
instances with the highest and lowest class-activation score (``MaxMinS``), the highest
only (``MaxS``), or the pooled pseudo-bag feature (``AFS``). Tier 2 (``attCls``) pools the
distilled features with a second gated attention network and classifies the bag.

Like MIL-Lab, attention pools with the raw gate scores (the DTFD paper normalises them
with a softmax; ``attention_softmax=True`` does that). ``total_instance // num_group``
instances per pseudo-bag are distilled at each end; when that is 0 (MIL-Lab's
``dftd.base``: 4 // 8) every instance of the pseudo-bag is passed on, as MIL-Lab does.
Then tier 2 sees every instance and the logits do not depend on the random split.

The split is random in training; in eval mode it is a fixed (seeded) permutation, so
predictions are reproducible.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._registry import register_model
from .base import MILModel, build_model, init_weights, scatter_bags, split_bags
from .layers import GatedAttentionScorer, mlp

__all__ = ["DTFD"]

_EVAL_SPLIT_SEED = 0


class Classifier1fc(nn.Module):
    """Dropout (if any) then one linear layer: [..., L] -> [..., C]."""

    def __init__(self, n_channels: int, n_classes: int, droprate: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(droprate)
        self.fc = nn.Linear(n_channels, n_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(x))


class ResidualBlock(nn.Module):
    """``x + relu(W2 relu(W1 x))`` without biases: [..., n] -> [..., n]."""

    def __init__(self, n: int = 512):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(n, n, bias=False), nn.ReLU(), nn.Linear(n, n, bias=False), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block(x)


class DimReduction(nn.Module):
    """Linear+ReLU from ``n_channels`` to ``m_dim``, then ``num_residuals`` residual blocks."""

    def __init__(self, n_channels: int, m_dim: int = 512, num_residuals: int = 0):
        super().__init__()
        self.fc1 = mlp(n_channels, [], m_dim)
        self.resBlocks = nn.Sequential(*(ResidualBlock(m_dim) for _ in range(num_residuals)))

    def forward(self, x: Tensor) -> Tensor:
        return self.resBlocks(self.fc1(x))


class AttentionWithClassifier(nn.Module):
    """Tier 2: gated attention pooling of [n, L] features, then a linear classifier."""

    def __init__(self, L: int = 512, D: int = 128, num_cls: int = 2):
        super().__init__()
        self.global_attn = GatedAttentionScorer(L, D)
        self.classifier = Classifier1fc(L, num_cls)

    def pool(self, x: Tensor, softmax: bool) -> Tensor:
        """[n, L] -> [1, L]."""
        weights = self.global_attn(x)
        if softmax:
            weights = weights.softmax(0)
        return (weights * x).sum(0, keepdim=True)


class DTFD(MILModel):
    """DTFD-MIL. Slide feature: tier 2's pooled feature [B, embed_dim].

    ``attention``: softmax over the bag of tier 1's attention scores [B, M] (one network
    scores every pseudo-bag, so its scores are comparable across the bag).
    """

    head_prefixes = ("classifier", "attCls.classifier")

    def __init__(
        self,
        in_dim: int = 1024,
        num_classes: int = 2,
        embed_dim: int = 512,
        attention_dim: int = 128,
        num_residuals: int = 0,
        dropout: float = 0.25,
        attention_drop: float = 0.25,
        distill: str = "MaxMinS",
        num_group: int = 8,
        total_instance: int = 8,
        bag_weight: float = 0.7,
        attention_softmax: bool = False,
    ):
        super().__init__(in_dim, embed_dim, num_classes)
        if distill not in ("MaxMinS", "MaxS", "AFS"):
            raise ValueError(f"DTFD: distill must be 'MaxMinS', 'MaxS' or 'AFS', got {distill!r}")
        self.distill = distill
        self.num_group = num_group
        self.per_group = total_instance // num_group
        self.bag_weight = bag_weight
        self.attention_softmax = attention_softmax
        self._dropout = dropout
        self._attention_dim = attention_dim
        self.patch_embed = DimReduction(in_dim, embed_dim, num_residuals)
        self.attention = GatedAttentionScorer(embed_dim, attention_dim, attention_drop)
        self._build_head(num_classes)
        init_weights(self)

    def _build_head(self, num_classes: int) -> None:
        self.classifier = Classifier1fc(self.embed_dim, num_classes, self._dropout)
        if hasattr(self, "attCls"):
            self.attCls.classifier = Classifier1fc(self.embed_dim, num_classes)
        else:
            self.attCls = AttentionWithClassifier(self.embed_dim, self._attention_dim, num_classes)

    def _split(self, n: int, device: torch.device) -> list[Tensor]:
        """Random pseudo-bags of near-equal size (no empty ones for bags smaller than
        ``num_group``); a fixed split in eval mode."""
        if self.training:
            perm = torch.randperm(n)
        else:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(_EVAL_SPLIT_SEED))
        return [g.to(device) for g in perm.tensor_split(min(self.num_group, n))]

    def _bag(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One bag, [n, in_dim] -> tier-2 feature [1, E], tier-1 logits [G, C], scores [n]."""
        h = self.patch_embed(h)
        scores = self.attention(h).squeeze(-1)
        cam_weight = self.classifier.fc.weight  # class activation maps use the weights only
        distilled, sub_logits = [], []
        for idx in self._split(h.shape[0], h.device):
            feats, weights = h[idx], scores[idx]
            if self.attention_softmax:
                weights = weights.softmax(0)
            weighted = feats * weights.unsqueeze(-1)
            pooled = weighted.sum(0, keepdim=True)
            sub_logits.append(self.classifier(pooled))
            if self.distill == "AFS":
                distilled.append(pooled)
                continue
            # rank the pseudo-bag's instances by their activation for the last class
            order = (weighted @ cam_weight.T).softmax(-1)[:, -1].argsort(descending=True)
            if self.per_group == 0:
                keep = order  # every instance (MIL-Lab's dftd.base)
            elif self.distill == "MaxS":
                keep = order[: self.per_group]
            else:
                keep = torch.cat([order[: self.per_group], order[-self.per_group :]])
            distilled.append(feats[keep])
        slide = self.attCls.pool(torch.cat(distilled), self.attention_softmax)
        return slide, torch.cat(sub_logits), scores

    def _forward_features(self, h, mask, coords, scales, return_attention) -> tuple[Tensor, dict[str, Any]]:
        outs = [self._bag(bag[0]) for bag in split_bags(h, mask)]
        intermeds: dict[str, Any] = {"sub_logits": [sub for _, sub, _ in outs]}
        if return_attention:
            intermeds["attention"] = scatter_bags([s.softmax(0) for _, _, s in outs], mask, h.shape[1])
        return torch.cat([slide for slide, _, _ in outs]), intermeds

    def forward_head(self, slide_feats: Tensor) -> Tensor:
        return self.attCls.classifier(slide_feats)

    def _instance_loss(self, intermeds: dict[str, Any], label: Tensor, mask: Tensor | None) -> Tensor:
        """Tier 1: every pseudo-bag carries its bag's label (cross-entropy, mean over bags)."""
        losses = [F.cross_entropy(sub, y.expand(sub.shape[0])) for sub, y in zip(intermeds["sub_logits"], label)]
        return torch.stack(losses).mean()


_DTFD_BASE = dict(
    embed_dim=512, attention_dim=128, num_residuals=4, dropout=0.25, attention_drop=0.25, num_group=8, total_instance=4
)


@register_model("dftd.base")
def dftd_base(**kwargs) -> DTFD:
    """DTFD-MIL, MIL-Lab ``dftd.base`` (MaxMinS distillation, 8 pseudo-bags, bag weight 0.7)."""
    return build_model(DTFD, {**_DTFD_BASE, "distill": "MaxMinS", "bag_weight": 0.7}, kwargs)


@register_model("dftd.base_afs")
def dftd_base_afs(**kwargs) -> DTFD:
    """DTFD-MIL, MIL-Lab ``dftd.base_afs`` (AFS distillation: pooled pseudo-bag features, bag weight 0.5)."""
    return build_model(DTFD, {**_DTFD_BASE, "distill": "AFS", "bag_weight": 0.5}, kwargs)
