"""CLAM: clustering-constrained attention MIL (Lu et al., Nature Biomedical Engineering 2021).

``clam_sb.*`` is the single-branch model with MIL-Lab's parameter names and shapes;
``clam_mb.*`` is the multi-branch model of the CLAM paper (one attention branch and one
bag classifier per class), named in the same style. Configs follow MIL-Lab's:
``base`` (smooth SVM instance loss), ``base_ce`` (cross-entropy), and ``*_subtyping``
(out-of-class instance supervision for mutually exclusive classes).

The instance-level clustering loss: for the bag's own class, the ``k_sample`` instances
with the highest attention are pushed to "positive" and the ``k_sample`` lowest to
"negative" by a per-class binary instance classifier; with ``subtyping`` the top
instances of every other class's branch are pushed to "negative" as well. The total loss
is ``bag_weight * bag loss + (1 - bag_weight) * instance loss``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._registry import register_model
from .base import MILModel, build_model, init_weights, masked_softmax, split_bags
from .layers import attention_scorer, patch_embed

__all__ = ["CLAM", "smooth_top1_svm_loss"]


def smooth_top1_svm_loss(logits: Tensor, target: Tensor, alpha: float = 1.0, tau: float = 1.0) -> Tensor:
    """Smooth top-1 multi-class SVM loss (Berrada, Zisserman & Kumar, ICLR 2018), the
    ``'svm'`` instance loss of CLAM (``SmoothTop1SVM`` of the smooth-topk package).

    ``tau * logsumexp((s_j + alpha * [j != y]) / tau) - s_y``, averaged over the batch.
    The smooth-topk package switches to the hard hinge where both agree numerically; the
    log-sum-exp form is already stable, so it is used throughout (and needs no GPU).

    Args:
        logits: [N, C] scores. target: long [N].
    """
    margin = alpha * (1.0 - F.one_hot(target, logits.shape[-1]).to(logits.dtype))
    smooth = tau * torch.logsumexp((logits + margin) / tau, dim=-1)
    return (smooth - logits.gather(-1, target.unsqueeze(-1)).squeeze(-1)).mean()


class CLAM(MILModel):
    """CLAM, single- (``multi_branch=False``) or multi-branch.

    Bag feature: attention pooling of the embedded instances, [B, embed_dim] (SB) or one per
    class, [B, C, embed_dim] (MB). ``attention``: the softmax attention weights [B, M]; for MB
    those of the predicted class, with every class's in ``class_attention`` [B, C, M].
    """

    permutation_invariant = True

    def __init__(
        self,
        in_dim: int = 1024,
        num_classes: int = 2,
        embed_dim: int = 512,
        n_fc_layers: int = 1,
        dropout: float = 0.25,
        gate: bool = True,
        attention_dim: int = 384,
        k_sample: int = 8,
        subtyping: bool = False,
        instance_loss_fn: str = "svm",
        bag_weight: float = 0.7,
        multi_branch: bool = False,
    ):
        super().__init__(in_dim, embed_dim, num_classes)
        if instance_loss_fn not in ("svm", "ce"):
            raise ValueError(f"CLAM: instance_loss_fn must be 'svm' or 'ce', got {instance_loss_fn!r}")
        self.k_sample = k_sample
        self.subtyping = subtyping
        self.bag_weight = bag_weight
        self.multi_branch = multi_branch
        self.instance_loss_fn = smooth_top1_svm_loss if instance_loss_fn == "svm" else F.cross_entropy
        self.patch_embed = patch_embed(in_dim, embed_dim, n_fc_layers, dropout)
        self.global_attn = attention_scorer(gate, embed_dim, attention_dim, dropout)  # MB: widened by _build_head
        self._build_head(num_classes)
        init_weights(self)

    @property
    def head_prefixes(self) -> tuple[str, ...]:  # type: ignore[override]
        if self.multi_branch:  # one attention branch per class
            return (f"global_attn.{self.global_attn.branch_layer}", "classifiers", "instance_classifiers")
        return ("classifier", "instance_classifiers")

    def _build_head(self, num_classes: int) -> None:
        if self.multi_branch:
            self.global_attn.set_branches(num_classes)
            # one single-logit bag classifier per class, as in the CLAM paper
            self.classifiers = nn.ModuleList(nn.Linear(self.embed_dim, 1) for _ in range(num_classes))
        else:
            self.classifier = nn.Linear(self.embed_dim, num_classes)
        self.instance_classifiers = nn.ModuleList(nn.Linear(self.embed_dim, 2) for _ in range(num_classes))

    def _forward_features(self, h, mask, coords, scales, return_attention) -> tuple[Tensor, dict[str, Any]]:
        h = self.patch_embed(h)
        scores = self.global_attn(h).transpose(1, 2)  # [B, K, M], K = 1 (SB) or C (MB)
        weights = masked_softmax(scores, None if mask is None else mask.unsqueeze(1))
        feats = weights @ h  # [B, K, E]
        intermeds: dict[str, Any] = {"instance_feats": h, "scores": scores}
        if return_attention:
            intermeds["weights"] = weights
        return (feats if self.multi_branch else feats[:, 0]), intermeds

    def forward_head(self, slide_feats: Tensor) -> Tensor:
        if self.multi_branch:
            return torch.cat([clf(slide_feats[:, c]) for c, clf in enumerate(self.classifiers)], dim=1)
        return self.classifier(slide_feats)

    def _combine_logits(self, logits: Tensor, intermeds: dict[str, Any], mask: Tensor | None) -> Tensor:
        weights = intermeds.pop("weights", None)
        if weights is not None:  # return_attention: pick the map of the predicted class
            if self.multi_branch:
                intermeds["class_attention"] = weights
                pred = logits.argmax(-1)
                intermeds["attention"] = weights[torch.arange(len(pred), device=pred.device), pred]
            else:
                intermeds["attention"] = weights[:, 0]
        return logits

    def _instance_loss(self, intermeds: dict[str, Any], label: Tensor, mask: Tensor | None) -> Tensor:
        """The clustering loss, averaged over the bags of the batch."""
        feats = split_bags(intermeds["instance_feats"], mask)
        scores = split_bags(intermeds["scores"].transpose(1, 2), mask)  # [1, n_b, K] each
        losses = [self._bag_instance_loss(f[0], s[0].T, int(y)) for f, s, y in zip(feats, scores, label)]
        return torch.stack(losses).mean()

    def _bag_instance_loss(self, h: Tensor, scores: Tensor, label: int) -> Tensor:
        """One bag: ``h`` [n, E] embedded instances, ``scores`` [K, n] raw attention."""
        k = min(self.k_sample, h.shape[0])  # small bags: CLAM's k_sample may exceed n
        total = h.new_zeros(())
        for c, clf in enumerate(self.instance_classifiers):
            a = scores[c if self.multi_branch else 0]
            if c == label:
                top = h[a.topk(k).indices]
                bottom = h[(-a).topk(k).indices]
                target = torch.cat([h.new_ones(k, dtype=torch.long), h.new_zeros(k, dtype=torch.long)])
                total = total + self.instance_loss_fn(clf(torch.cat([top, bottom])), target)
            elif self.subtyping:
                top = h[a.topk(k).indices]
                total = total + self.instance_loss_fn(clf(top), h.new_zeros(k, dtype=torch.long))
        # subtyping averages over every class's term, otherwise there is the label's only
        return total / len(self.instance_classifiers) if self.subtyping else total


_CLAM_BASE = dict(embed_dim=512, n_fc_layers=1, dropout=0.25, gate=True, attention_dim=384, k_sample=8, bag_weight=0.7)
_CLAM_CONFIGS = {
    "base": dict(subtyping=False, instance_loss_fn="svm"),
    "base_ce": dict(subtyping=False, instance_loss_fn="ce"),
    "base_subtyping": dict(subtyping=True, instance_loss_fn="svm"),
    "base_ce_subtyping": dict(subtyping=True, instance_loss_fn="ce"),
}


def _register_clam(family: str, multi_branch: bool) -> None:
    for config, options in _CLAM_CONFIGS.items():
        defaults = {**_CLAM_BASE, **options, "multi_branch": multi_branch}

        def entry(_defaults=defaults, **kwargs) -> CLAM:
            return build_model(CLAM, _defaults, kwargs)

        entry.__doc__ = f"CLAM-{family[-2:].upper()}, MIL-Lab clam config {config!r}."
        register_model(f"{family}.{config}")(entry)


_register_clam("clam_sb", multi_branch=False)
_register_clam("clam_mb", multi_branch=True)
