"""RRT-MIL as MIL-Lab builds it (``rrt.base``), with MIL-Lab's parameter names and shapes.

MIL-Lab's RRT encoder (after Tang et al., CVPR 2023) embeds the instances, runs
``n_layers`` pre-norm Nyström self-attention layers (its layer builder ignores the
``attn`` option, so the region attention of the RRT paper is never used), normalises, and
pools with an ungated attention network. It also builds a PPEG position encoder that
its forward pass never calls; those weights are kept as buffers so MIL-Lab state dicts
load with strict=True, and the output matches MIL-Lab's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._registry import register_model
from .base import MILModel, build_model, init_weights, scatter_bags, split_bags, state_only
from .layers import PPEG, NystromAttention

__all__ = ["RRTMIL"]

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class TransLayer1(nn.Module):
    """``x + attn(norm(x))`` with Nyström attention; [B, N, dim]."""

    def __init__(self, dim: int = 512, head: int = 8, drop_out: float = 0.0, trans_dim: int = 64, num_landmarks: int = 256):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim=dim, dim_head=trans_dim, heads=head, num_landmarks=num_landmarks, dropout=drop_out)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.attn(self.norm(x))


class DAttentionScorer(nn.Module):
    """RRT's attention pooling scores: Linear(L, 128) -> act -> [Dropout] -> Linear(128, 1),
    no biases by default; [B, N, L] -> raw scores [B, N, 1]."""

    def __init__(self, input_dim: int, act: str = "relu", bias: bool = False, dropout: bool = False):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(input_dim, 128, bias=bias), _ACTIVATIONS[act]()]
        if dropout:
            layers.append(nn.Dropout(0.25))
        layers.append(nn.Linear(128, 1, bias=bias))
        self.attention = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.attention(x)


class DAttention(nn.Module):
    """Holds the scorer under MIL-Lab's key path (``pool_fn.attention.attention.*``)."""

    def __init__(self, input_dim: int, act: str = "relu", bias: bool = False, dropout: bool = False):
        super().__init__()
        self.attention = DAttentionScorer(input_dim, act, bias, dropout)


class RRTEncoder(nn.Module):
    """Nyström layers, LayerNorm and attention pooling: [B, N, mlp_dim] -> [B, mlp_dim]."""

    def __init__(
        self,
        mlp_dim: int = 512,
        n_layers: int = 2,
        n_heads: int = 8,
        drop_out: float = 0.0,
        trans_dim: int = 64,
        num_landmarks: int = 256,
        peg_k: int = 7,
        da_act: str = "relu",
        da_bias: bool = False,
        da_dropout: bool = False,
    ):
        super().__init__()
        self.pool_fn = DAttention(mlp_dim, da_act, da_bias, da_dropout)
        self.norm = nn.LayerNorm(mlp_dim)
        self.layer1 = TransLayer1(mlp_dim, n_heads, drop_out, trans_dim, num_landmarks)
        self.layers = nn.Sequential(
            *(TransLayer1(mlp_dim, n_heads, drop_out, trans_dim, num_landmarks) for _ in range(n_layers - 1))
        )
        self.pos_embedding = state_only(PPEG(mlp_dim, k=peg_k))  # built, never called (see module docstring)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """One bag or equal-length bags without padding -> pooled [B, D], weights [B, N]."""
        x = self.norm(self.layers(self.layer1(x)))
        weights = self.pool_fn.attention(x).squeeze(-1).softmax(-1)
        return (weights.unsqueeze(1) @ x)[:, 0], weights


class RRTMIL(MILModel):
    """RRT-MIL (MIL-Lab). Slide feature: the pooled encoding [B, mlp_dim]. Bags with padding
    run one by one (Nyström landmarks depend on the length).

    ``attention``: the pooling weights [B, M].
    """

    def __init__(
        self,
        in_dim: int = 1024,
        num_classes: int = 2,
        embed_dim: int = 512,
        mlp_dim: int = 512,
        act: str = "relu",
        dropout: float = 0.25,
        n_layers: int = 2,
        n_heads: int = 8,
        drop_out: float = 0.0,
        trans_dim: int = 64,
        num_landmarks: int = 256,
        peg_k: int = 7,
        da_act: str = "relu",
        da_bias: bool = False,
        da_dropout: bool = False,
    ):
        super().__init__(in_dim, mlp_dim, num_classes)
        if embed_dim != mlp_dim:
            # the encoder's width is mlp_dim and it reads the embedding directly
            raise ValueError(f"RRTMIL: embed_dim ({embed_dim}) must equal mlp_dim ({mlp_dim})")
        self.patch_embed = nn.Sequential(nn.Linear(in_dim, embed_dim), _ACTIVATIONS[act]())
        self.dropout = nn.Dropout(dropout)
        self.encoder = RRTEncoder(
            mlp_dim, n_layers, n_heads, drop_out, trans_dim, num_landmarks, peg_k, da_act, da_bias, da_dropout
        )
        self._build_head(num_classes)
        init_weights(self)

    def _forward_features(self, h, mask, coords, scales, return_attention) -> tuple[Tensor, dict[str, Any]]:
        h = self.dropout(self.patch_embed(h))
        if mask is None:
            slide, weights = self.encoder(h)
        else:
            outs = [self.encoder(bag) for bag in split_bags(h, mask)]
            slide = torch.cat([s for s, _ in outs])
            weights = scatter_bags([w[0] for _, w in outs], mask, h.shape[1]) if return_attention else None
        return slide, ({"attention": weights} if return_attention else {})


@register_model("rrt.base")
def rrt_base(**kwargs) -> RRTMIL:
    """RRT-MIL, MIL-Lab ``rrt.base`` (width 512, 2 Nyström layers of 8 heads x 64)."""
    return build_model(
        RRTMIL,
        dict(
            embed_dim=512, mlp_dim=512, act="relu", dropout=0.25, n_layers=2, n_heads=8, trans_dim=64, num_landmarks=256,
            da_act="relu",
        ),  # fmt: skip
        kwargs,
    )
