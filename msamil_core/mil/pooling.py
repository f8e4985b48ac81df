"""Mean- and max-pooling baselines (``meanmil.base``, ``maxmil.base``).

Instances are embedded (Linear + ReLU + dropout) and pooled over the bag by their mean or
channel-wise max; a linear classifier gives the logits. The usual lower bounds in MIL
benchmarks (MeanMIL / MaxMIL).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ._registry import register_model
from .base import MILModel, build_model, init_weights, pool_instances
from .layers import patch_embed

__all__ = ["PoolingMIL"]


class PoolingMIL(MILModel):
    """Embed, pool (``pool='mean'`` or ``'max'``), classify. Slide feature [B, embed_dim].

    ``attention``: for mean pooling 1/n on every real instance; for max pooling each
    instance's share of the embedding channels whose maximum it holds.
    """

    permutation_invariant = True

    def __init__(
        self,
        in_dim: int = 1024,
        num_classes: int = 2,
        embed_dim: int = 512,
        num_fc_layers: int = 1,
        dropout: float = 0.25,
        pool: str = "mean",
    ):
        super().__init__(in_dim, embed_dim, num_classes)
        if pool not in ("mean", "max"):
            raise ValueError(f"PoolingMIL: pool must be 'mean' or 'max', got {pool!r}")
        self.pool = pool
        self.patch_embed = patch_embed(in_dim, embed_dim, num_fc_layers, dropout)
        self.dropout = nn.Dropout(dropout)
        self._build_head(num_classes)
        init_weights(self)

    def _forward_features(self, h, mask, coords, scales, return_attention) -> tuple[Tensor, dict[str, Any]]:
        pooled, weights = pool_instances(self.dropout(self.patch_embed(h)), mask, self.pool, return_attention)
        return pooled, ({"attention": weights} if return_attention else {})


@register_model("meanmil.base")
def meanmil_base(**kwargs) -> PoolingMIL:
    """Mean pooling of 512-d instance embeddings."""
    return build_model(PoolingMIL, dict(embed_dim=512, num_fc_layers=1, dropout=0.25, pool="mean"), kwargs)


@register_model("maxmil.base")
def maxmil_base(**kwargs) -> PoolingMIL:
    """Channel-wise max pooling of 512-d instance embeddings."""
    return build_model(PoolingMIL, dict(embed_dim=512, num_fc_layers=1, dropout=0.25, pool="max"), kwargs)
