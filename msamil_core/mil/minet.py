"""mi-Net: an instance classifier with max pooling over instance scores (Wang et al., "Revisiting
multiple instance neural networks", Pattern Recognition 2018), the positive control of the MIL
unit tests (``bench/mil_unit_tests.py``).

``minet.base`` obeys the standard MIL assumption by construction: one MLP gives every instance
a logit per positive class, and a bag's logit of a class is the largest of its instances'.
Class 0 is the negative class: its logit is fixed at 0, so a bag is negative only when no
instance shows evidence of another class (for two classes p(positive) = max_i sigmoid(s_i),
Wang et al.'s mi-Net). An extra instance can only raise a positive class's logit, so neither
the absence of an instance nor a "negative marker" can make a bag positive, which is what Raff
& Holt's single-concept test looks for. Class 0 is the first of the experiment's ``classes``
(or of its task's); ``negative_class=False`` max-pools a logit for every class instead, for
tasks without a negative class (subtyping), which is no longer standard MIL.

A standard MIL model cannot express a threshold concept ("A and B both present"), so the
threshold tests of the bench are outside what mi-Net can pass; its results there are in the
README.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._registry import register_model
from .base import MILModel, build_model, init_weights, masked_max, masked_softmax
from .layers import patch_embed

__all__ = ["MINet"]


class MINet(MILModel):
    """Instance MLP (``patch_embed``, dropout, linear ``classifier``) -> instance logits
    [B, M, C'] (C' = C - 1 with ``negative_class``, else C) -> max over the bag's real
    instances. Slide feature: those max-pooled logits [B, C']; :meth:`forward_head` puts the
    fixed logit 0 of class 0 in front.

    ``attention``: the softmax over the bag's instances of their logits for the predicted
    class, or, when class 0 is predicted, for the most likely other class: a smooth version
    of the max, peaked at the instance that sets the bag's logit. Every class's map is in
    ``class_attention`` [B, C, M]; class 0's is uniform (its logit reads no instance).
    """

    permutation_invariant = True

    def __init__(
        self,
        in_dim: int = 1024,
        num_classes: int = 2,
        embed_dim: int = 512,
        num_fc_layers: int = 2,
        dropout: float = 0.25,
        negative_class: bool = True,
    ):
        super().__init__(in_dim, embed_dim, num_classes)
        self.negative_class = negative_class
        self.patch_embed = patch_embed(in_dim, embed_dim, num_fc_layers, dropout)
        self.dropout = nn.Dropout(dropout)
        self._build_head(num_classes)
        init_weights(self)

    def _fixed_negative(self, num_classes: int) -> bool:
        """Whether class 0's logit is the constant 0 (a single class is scored as usual)."""
        return self.negative_class and num_classes > 1

    def _build_head(self, num_classes: int) -> None:
        self.classifier = nn.Linear(self.embed_dim, num_classes - self._fixed_negative(num_classes))

    def instance_logits(self, h: Tensor) -> Tensor:
        """Instance features [B, M, in_dim] -> instance logits [B, M, C']."""
        return self.classifier(self.dropout(self.patch_embed(h)))

    def _forward_features(self, h, mask, coords, scales, return_attention) -> tuple[Tensor, dict[str, Any]]:
        scores = self.instance_logits(h)
        pooled, _ = masked_max(scores, mask)
        return pooled, ({"instance_logits": scores} if return_attention else {})

    def forward_head(self, slide_feats: Tensor) -> Tensor:
        """Max-pooled instance logits [B, C'] -> logits [B, C]."""
        if self._fixed_negative(self.num_classes):
            return torch.cat([slide_feats.new_zeros(len(slide_feats), 1), slide_feats], -1)
        return slide_feats

    def _combine_logits(self, logits: Tensor, intermeds: dict[str, Any], mask: Tensor | None) -> Tensor:
        if "instance_logits" in intermeds:  # the attention maps, which need the bag's logits
            scores = intermeds.pop("instance_logits").transpose(1, 2)  # [B, C', M]
            maps = masked_softmax(scores, None if mask is None else mask.unsqueeze(1))
            pick = logits.argmax(-1)
            if self._fixed_negative(self.num_classes):
                pick = logits[:, 1:].argmax(-1) + 1
                uniform = maps.new_ones(maps[:, :1].shape) if mask is None else mask.unsqueeze(1).to(maps.dtype)
                maps = torch.cat([uniform / uniform.sum(-1, keepdim=True), maps], 1)
            intermeds["class_attention"] = maps
            intermeds["attention"] = maps[torch.arange(len(pick), device=pick.device), pick]
        return logits


@register_model("minet.base")
def minet_base(**kwargs) -> MINet:
    """mi-Net: logits of a two-layer instance MLP (512 wide) max-pooled over the bag, class 0
    the negative class (standard MIL)."""
    return build_model(MINet, dict(embed_dim=512, num_fc_layers=2, dropout=0.25, negative_class=True), kwargs)
