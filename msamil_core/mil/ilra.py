"""ILRA-MIL: low-rank MIL (Xiang et al., ICLR 2023), MIL-Lab ``ilra.base`` layout.

Each gated attention block (GAB) projects the instances onto ``topk`` learned latent
vectors (latents attend to instances) and back (instances attend to the latents), a
low-rank stand-in for full self-attention at O(N k) cost. Non-local pooling (a learned
query attending to the instances) gives the slide feature. ILRA works on the raw features
(no instance embedding layer).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._registry import register_model
from .base import MILModel, build_model, init_weights

__all__ = ["ILRA"]


class MultiHeadAttention(nn.Module):
    """Set-transformer style attention block: queries [B, S_q, D_q] attend to keys [B, S_k, D_k]
    -> [B, S_q, D_v]: ``O = LN0(Q' + MHA(Q', K', V'))``, ``O = LN1(O + relu(fc_o(O)))``, optionally
    gated by ``SiLU(gate(Q))``."""

    def __init__(self, dim_Q: int, dim_K: int, dim_V: int, num_heads: int, ln: bool = False, gated: bool = False):
        super().__init__()
        self.multihead_attention = nn.MultiheadAttention(dim_V, num_heads, batch_first=True)
        self.fc_q = nn.Linear(dim_Q, dim_V)
        self.fc_k = nn.Linear(dim_K, dim_V)
        self.fc_v = nn.Linear(dim_K, dim_V)
        if ln:
            self.ln0 = nn.LayerNorm(dim_V)
            self.ln1 = nn.LayerNorm(dim_V)
        self.fc_o = nn.Linear(dim_V, dim_V)
        self.gate = nn.Sequential(nn.Linear(dim_Q, dim_V), nn.SiLU()) if gated else None

    def forward(
        self, Q: Tensor, K: Tensor, pad_mask: Tensor | None = None, need_weights: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """``pad_mask`` [B, S_k] bool, True = padding key. Returns the output and, with
        ``need_weights``, the head-averaged weights [B, S_q, S_k] (only asked for S_q = 1)."""
        q = self.fc_q(Q)
        a, weights = self.multihead_attention(
            q, self.fc_k(K), self.fc_v(K), key_padding_mask=pad_mask, need_weights=need_weights
        )
        O = q + a
        O = self.ln0(O) if hasattr(self, "ln0") else O
        O = O + F.relu(self.fc_o(O))
        O = self.ln1(O) if hasattr(self, "ln1") else O
        if self.gate is not None:
            O = O * self.gate(Q)
        return O, weights


class GAB(nn.Module):
    """Gated attention block: X [B, N, dim_in] -> [B, N, dim_out] through ``num_inds`` latents."""

    def __init__(self, dim_in: int, dim_out: int, num_heads: int, num_inds: int, ln: bool = False):
        super().__init__()
        self.latent = nn.Parameter(torch.empty(1, num_inds, dim_out))
        nn.init.xavier_uniform_(self.latent)
        self.project_forward = MultiHeadAttention(dim_out, dim_in, dim_out, num_heads, ln=ln, gated=True)
        self.project_backward = MultiHeadAttention(dim_in, dim_out, dim_out, num_heads, ln=ln, gated=True)

    def forward(self, X: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        H, _ = self.project_forward(self.latent.expand(X.shape[0], -1, -1), X, pad_mask)  # latents <- instances
        X_hat, _ = self.project_backward(X, H)  # instances <- latents (no padding among latents)
        return X_hat


class NLP(nn.Module):
    """Non-local pooling: a learned query attends to the instances: [B, N, dim] -> [B, 1, dim]."""

    def __init__(self, dim: int, num_heads: int, ln: bool = False):
        super().__init__()
        self.S = nn.Parameter(torch.empty(1, 1, dim))
        nn.init.xavier_uniform_(self.S)
        self.mha = MultiHeadAttention(dim, dim, dim, num_heads, ln=ln)

    def forward(self, X: Tensor, pad_mask: Tensor | None, need_weights: bool) -> tuple[Tensor, Tensor | None]:
        return self.mha(self.S.expand(X.shape[0], -1, -1), X, pad_mask, need_weights)


class ILRA(MILModel):
    """ILRA-MIL. Slide feature: the pooled query [B, embed_dim].

    ``attention``: the pooling query's attention over the instances (mean over heads) [B, M].
    """

    permutation_invariant = True

    def __init__(
        self,
        in_dim: int = 1024,
        num_classes: int = 2,
        embed_dim: int = 256,
        num_heads: int = 8,
        topk: int = 64,
        num_attention_layers: int = 2,
        ln: bool = True,
    ):
        super().__init__(in_dim, embed_dim, num_classes)
        self.gab_blocks = nn.ModuleList(
            GAB(in_dim if i == 0 else embed_dim, embed_dim, num_heads, topk, ln) for i in range(num_attention_layers)
        )
        self.pooling = NLP(embed_dim, num_heads, ln)
        self._build_head(num_classes)
        init_weights(self)

    def _forward_features(self, h, mask, coords, scales, return_attention) -> tuple[Tensor, dict[str, Any]]:
        pad_mask = None if mask is None else ~mask
        for block in self.gab_blocks:
            h = block(h, pad_mask)
        slide, weights = self.pooling(h, pad_mask, return_attention)
        return slide[:, 0], ({"attention": weights[:, 0]} if return_attention else {})


@register_model("ilra.base")
def ilra_base(**kwargs) -> ILRA:
    """ILRA-MIL, MIL-Lab ``ilra.base`` (width 256, 2 blocks, 8 heads, 64 latents)."""
    return build_model(ILRA, dict(embed_dim=256, num_attention_layers=2, num_heads=8, topk=64, ln=True), kwargs)
