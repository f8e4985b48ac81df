"""A plain Transformer MIL (class token + pre-norm self-attention layers), MIL-Lab
``transformer.base`` layout. Without position encoding the model is permutation invariant.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._registry import register_model
from .base import MILModel, build_model, init_weights, masked_softmax
from .layers import mlp, patch_embed

__all__ = ["Transformer"]


class TransLayer(nn.Module):
    """``x + MHA(norm(x))`` then, if ``mlp_dim`` > 0, ``x + mlp(norm2(x))``; [B, N, dim].

    Attention runs through ``nn.MultiheadAttention`` without returning weights, which uses
    the fused kernel: no [N, N] tensor is kept for large bags.
    """

    def __init__(self, dim: int = 512, heads: int = 8, dropout: float = 0.1, mlp_dim: int | None = None):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.mlp = self.norm2 = None
        if mlp_dim is not None and mlp_dim > 0:
            self.mlp = mlp(dim, [mlp_dim], dim, dropout)
            self.norm2 = nn.LayerNorm(dim)

    def forward(self, x: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        """``pad_mask`` [B, N] bool, True = padding (PyTorch's key_padding_mask)."""
        y = self.norm(x)
        x = x + self.attention(y, y, y, key_padding_mask=pad_mask, need_weights=False)[0]
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x

    def cls_attention(self, x: Tensor, pad_mask: Tensor | None) -> Tensor:
        """The class token's attention weights over the other tokens, averaged over heads:
        [B, N - 1]. Only the class token's row is computed, never [N, N]."""
        attn = self.attention
        heads, dim = attn.num_heads, attn.embed_dim
        y = self.norm(x)
        w_q, w_k, _ = attn.in_proj_weight.chunk(3)
        b_q, b_k, _ = attn.in_proj_bias.chunk(3)
        q = F.linear(y[:, :1], w_q, b_q).unflatten(-1, (heads, dim // heads)).transpose(1, 2)  # [B, H, 1, d]
        k = F.linear(y, w_k, b_k).unflatten(-1, (heads, dim // heads)).transpose(1, 2)  # [B, H, N, d]
        scores = (q @ k.transpose(-1, -2)).squeeze(2) * (dim // heads) ** -0.5  # [B, H, N]
        keep = None if pad_mask is None else ~pad_mask.unsqueeze(1)
        return masked_softmax(scores, keep).mean(1)[:, 1:]


class Transformer(MILModel):
    """Transformer MIL. Slide feature: the normalised class token [B, embed_dim].

    ``attention``: the class token's attention over the instances in the first layer
    (mean over heads), renormalised over the instances.
    """

    permutation_invariant = True

    def __init__(
        self,
        in_dim: int = 1024,
        num_classes: int = 2,
        embed_dim: int = 512,
        num_fc_layers: int = 1,
        dropout: float = 0.25,
        num_attention_layers: int = 2,
        num_heads: int = 8,
        encoder_mlp_dim: int = -1,
    ):
        super().__init__(in_dim, embed_dim, num_classes)
        self.patch_embed = patch_embed(in_dim, embed_dim, num_fc_layers, dropout)
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim))
        self.blocks = nn.ModuleList(
            TransLayer(embed_dim, num_heads, dropout, encoder_mlp_dim) for _ in range(num_attention_layers)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self._build_head(num_classes)
        init_weights(self)

    def _forward_features(self, h, mask, coords, scales, return_attention) -> tuple[Tensor, dict[str, Any]]:
        B = h.shape[0]
        h = torch.cat([self.cls_token.expand(B, -1, -1), self.patch_embed(h)], dim=1)
        pad_mask = None if mask is None else torch.cat([mask.new_zeros(B, 1), ~mask], dim=1)
        intermeds: dict[str, Any] = {}
        for i, block in enumerate(self.blocks):
            if i == 0 and return_attention:
                attn = block.cls_attention(h, pad_mask)
                intermeds["attention"] = attn / attn.sum(-1, keepdim=True)
            h = block(h, pad_mask)
        return self.norm(h)[:, 0], intermeds


@register_model("transformer.base")
def transformer_base(**kwargs) -> Transformer:
    """Transformer MIL, MIL-Lab ``transformer.base`` (embed 512, 2 layers of 8 heads, MLP 2048)."""
    return build_model(
        Transformer,
        dict(embed_dim=512, num_fc_layers=1, dropout=0.25, num_attention_layers=2, num_heads=8, encoder_mlp_dim=2048),
        kwargs,
    )
