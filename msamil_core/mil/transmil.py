"""TransMIL (Shao et al., NeurIPS 2021), MIL-Lab ``transmil.base`` layout.

Embedded instances are laid out on the smallest square grid that holds them (the grid is
filled up by repeating the first instances), a class token is prepended, and two Nyström
self-attention layers run with the PPEG convolutional position encoding between them;
the normalised class token is the slide feature.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ._registry import register_model
from .base import MILModel, build_model, init_weights, scatter_bags, split_bags
from .layers import PPEG, NystromAttention, patch_embed

__all__ = ["TransMIL"]


class TransLayer(nn.Module):
    """Pre-norm residual Nyström attention: ``x + attention(norm(x))``, [B, N, dim]."""

    def __init__(self, dim: int = 512, num_heads: int = 8):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = NystromAttention(
            dim=dim, dim_head=dim // num_heads, heads=num_heads, num_landmarks=dim // 2, pinv_iterations=6, dropout=0.1
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.attention(self.norm(x))


class TransMIL(MILModel):
    """TransMIL. Slide feature: the class token [B, embed_dim].

    The square layout and the Nyström landmarks depend on the bag's length, so with
    padding each bag's real instances run on their own (a padded batch gives the same
    logits as each bag alone).

    ``attention``: softmax over the instances of their scaled dot product with the class
    token after the first attention layer (MIL-Lab logs the unnormalised dot product).
    """

    def __init__(
        self,
        in_dim: int = 1024,
        num_classes: int = 2,
        embed_dim: int = 512,
        num_fc_layers: int = 1,
        dropout: float = 0.25,
        num_attention_layers: int = 2,
        num_heads: int = 4,
    ):
        super().__init__(in_dim, embed_dim, num_classes)
        self.patch_embed = patch_embed(in_dim, embed_dim, num_fc_layers, dropout)
        self.pos_layer = PPEG(dim=embed_dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim))
        self.blocks = nn.ModuleList(TransLayer(embed_dim, num_heads) for _ in range(num_attention_layers))
        self.norm = nn.LayerNorm(embed_dim)
        self._build_head(num_classes)
        init_weights(self)

    def _forward_features(self, h, mask, coords, scales, return_attention) -> tuple[Tensor, dict[str, Any]]:
        if mask is None:
            feats, attn = self._encode(h, return_attention)
        else:
            outs = [self._encode(bag, return_attention) for bag in split_bags(h, mask)]
            feats = torch.cat([f for f, _ in outs])
            attn = scatter_bags([a[0] for _, a in outs], mask, h.shape[1]) if return_attention else None
        return feats, ({"attention": attn} if return_attention else {})

    def _encode(self, h: Tensor, return_attention: bool) -> tuple[Tensor, Tensor | None]:
        """Bags of equal length without padding: [B, n, in_dim] -> class tokens [B, E] and,
        if asked, attention [B, n]."""
        n = h.shape[1]
        h = self.patch_embed(h)
        side = math.ceil(math.sqrt(n))
        h = torch.cat([h, h[:, : side * side - n]], dim=1)  # fill the square with the first instances
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)
        attn = None
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i == 0:
                if return_attention:
                    sim = (h[:, 1 : n + 1] @ h[:, 0].unsqueeze(-1)).squeeze(-1) / math.sqrt(h.shape[-1])
                    attn = sim.softmax(-1)
                h = self.pos_layer(h, side, side)
        return self.norm(h)[:, 0], attn


@register_model("transmil.base")
def transmil_base(**kwargs) -> TransMIL:
    """TransMIL, MIL-Lab ``transmil.base`` (embed 512, 2 Nyström layers of 4 heads)."""
    return build_model(
        TransMIL, dict(embed_dim=512, num_fc_layers=1, dropout=0.25, num_attention_layers=2, num_heads=4), kwargs
    )
