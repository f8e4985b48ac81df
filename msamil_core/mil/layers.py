"""Building blocks shared by several models of the zoo.

Module and parameter names follow MIL-Lab's layers (``patch_embed.0``, ``attention_a.0``,
``to_qkv``, ...) because MIL-Lab state dicts must load into our models unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["mlp", "patch_embed", "AttentionScorer", "GatedAttentionScorer", "attention_scorer", "NystromAttention", "PPEG"]


def mlp(
    in_dim: int,
    hidden_dims: list[int],
    out_dim: int,
    dropout: float = 0.0,
    act: type[nn.Module] = nn.ReLU,
    final_act: bool = True,
) -> nn.Sequential:
    """A stack of Linear layers: ``[Linear, act, Dropout]`` per hidden width, then
    ``Linear`` (and ``act`` when ``final_act``). The indices of the Linear layers in the
    Sequential (0, 3, 6, ...) are those of MIL-Lab's ``create_mlp``."""
    layers: list[nn.Module] = []
    for width in hidden_dims:
        layers += [nn.Linear(in_dim, width), act(), nn.Dropout(dropout)]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    if final_act:
        layers.append(act())
    return nn.Sequential(*layers)


def patch_embed(in_dim: int, embed_dim: int, num_fc_layers: int = 1, dropout: float = 0.0) -> nn.Sequential:
    """The instance embedding of most MIL-Lab models: ``num_fc_layers`` Linear+ReLU layers
    from ``in_dim`` to ``embed_dim`` (dropout between them, none after the last)."""
    return mlp(in_dim, [embed_dim] * (num_fc_layers - 1), embed_dim, dropout)


class AttentionScorer(nn.Module):
    """Ilse et al.'s attention network: ``w^T tanh(V h)``.

    Input [..., N, L]; output raw scores [..., N, K] (K attention branches).
    """

    def __init__(self, L: int, D: int, dropout: float = 0.0, num_branches: int = 1):
        super().__init__()
        self.module = nn.Sequential(nn.Linear(L, D), nn.Tanh(), nn.Dropout(dropout), nn.Linear(D, num_branches))

    branch_layer = "module.3"  # the layer whose width is the branch count

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x)

    def set_branches(self, num_branches: int) -> None:
        """Replace the output layer by a new one with ``num_branches`` outputs."""
        self.module[3] = nn.Linear(self.module[3].in_features, num_branches)


class GatedAttentionScorer(nn.Module):
    """Ilse et al.'s gated attention network: ``w^T (tanh(V h) * sigmoid(U h))``.

    Input [..., N, L]; output raw scores [..., N, K] (K attention branches).
    """

    def __init__(self, L: int, D: int, dropout: float = 0.0, num_branches: int = 1):
        super().__init__()
        self.attention_a = nn.Sequential(nn.Linear(L, D), nn.Tanh(), nn.Dropout(dropout))
        self.attention_b = nn.Sequential(nn.Linear(L, D), nn.Sigmoid(), nn.Dropout(dropout))
        self.attention_c = nn.Linear(D, num_branches)

    branch_layer = "attention_c"  # the layer whose width is the branch count

    def forward(self, x: Tensor) -> Tensor:
        return self.attention_c(self.attention_a(x) * self.attention_b(x))

    def set_branches(self, num_branches: int) -> None:
        """Replace the output layer by a new one with ``num_branches`` outputs."""
        self.attention_c = nn.Linear(self.attention_c.in_features, num_branches)


def attention_scorer(gate: bool, L: int, D: int, dropout: float = 0.0, num_branches: int = 1) -> nn.Module:
    """Gated or plain attention network (MIL-Lab's ``gate`` option)."""
    return (GatedAttentionScorer if gate else AttentionScorer)(L, D, dropout, num_branches)


def _iterative_pinv(x: Tensor, iters: int) -> Tensor:
    """Moore-Penrose pseudo-inverse of the square matrices ``x`` [B, H, m, m] by the
    Newton-Schulz-type iteration of the Nyströmformer paper (Xiong et al., 2021, eq. 16).

    The starting point is ``x^T / (max column sum * max row sum)``. The reference
    implementation takes those maxima over the whole tensor, which couples the bags of a
    batch; taking them per bag gives identical results for one bag and makes each bag's
    output independent of its batch-mates.
    """
    abs_x = x.abs()
    col = abs_x.sum(-1).flatten(1).amax(1)
    row = abs_x.sum(-2).flatten(1).amax(1)
    z = x.transpose(-1, -2) / (col * row).view(-1, 1, 1, 1)
    eye = torch.eye(x.shape[-1], device=x.device, dtype=x.dtype)
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * eye - xz @ (15 * eye - xz @ (7 * eye - xz)))
    return z


class NystromAttention(nn.Module):
    """Nyström self-attention (Xiong et al., 2021) as TransMIL and MIL-Lab's RRT use it.

    The sequence is zero-padded at the front to a multiple of ``num_landmarks``; landmarks
    are the means of consecutive segments of queries and keys; softmax(QK^T) is approximated
    by ``softmax(Q K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T)``, which costs O(N m) memory
    instead of O(N^2). A depth-wise convolution over the sequence adds a residual of the
    values. No mask: callers run each bag's real instances on their own (padding would
    change the landmarks).

    Input and output [B, N, dim].
    """

    def __init__(
        self,
        dim: int,
        dim_head: int = 64,
        heads: int = 8,
        num_landmarks: int = 256,
        pinv_iterations: int = 6,
        residual: bool = True,
        residual_conv_kernel: int = 33,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.heads = heads
        self.dim_head = dim_head
        self.num_landmarks = num_landmarks
        self.pinv_iterations = pinv_iterations
        self.scale = dim_head**-0.5
        inner = heads * dim_head
        self.to_qkv = nn.Linear(dim, inner * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout))
        self.res_conv = None
        if residual:
            k = residual_conv_kernel
            self.res_conv = nn.Conv2d(heads, heads, (k, 1), padding=(k // 2, 0), groups=heads, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, n, _ = x.shape
        m = self.num_landmarks
        pad = (-n) % m
        if pad:
            x = F.pad(x, (0, 0, pad, 0))
        N = n + pad
        q, k, v = (t.unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2) for t in self.to_qkv(x).chunk(3, -1))
        q = q * self.scale
        seg = N // m
        q_land = q.unflatten(2, (m, seg)).sum(3) / seg
        k_land = k.unflatten(2, (m, seg)).sum(3) / seg
        attn1 = (q @ k_land.transpose(-1, -2)).softmax(-1)  # [B, H, N, m]
        attn2 = (q_land @ k_land.transpose(-1, -2)).softmax(-1)  # [B, H, m, m]
        attn3 = (q_land @ k.transpose(-1, -2)).softmax(-1)  # [B, H, m, N]
        out = (attn1 @ _iterative_pinv(attn2, self.pinv_iterations)) @ (attn3 @ v)
        if self.res_conv is not None:
            out = out + self.res_conv(v)
        out = self.to_out(out.transpose(1, 2).flatten(2))
        return out[:, -n:]


class PPEG(nn.Module):
    """TransMIL's pyramid position encoding generator: depth-wise 7x7, 5x5 and 3x3
    convolutions over the instances laid out on a square grid, plus identity. The class
    token (position 0) passes through unchanged.

    Input [B, 1 + H*W, dim] -> same shape.
    """

    def __init__(self, dim: int = 512, k: int = 7):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, k, 1, k // 2, groups=dim)
        self.proj1 = nn.Conv2d(dim, dim, 5, 1, 5 // 2, groups=dim)
        self.proj2 = nn.Conv2d(dim, dim, 3, 1, 3 // 2, groups=dim)

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        B, _, C = x.shape
        cls_token, feat = x[:, :1], x[:, 1:]
        grid = feat.transpose(1, 2).reshape(B, C, H, W)
        grid = self.proj(grid) + grid + self.proj1(grid) + self.proj2(grid)
        return torch.cat((cls_token, grid.flatten(2).transpose(1, 2)), dim=1)


def sinusoidal_encoding(length: int, dim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The Transformer's fixed position encoding (Vaswani et al., 2017): [length, dim] with
    ``sin(p / 10000^(2i/dim))`` at even and ``cos`` at odd channels. Computed on the fly, so
    any sequence length works."""
    pos = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    enc = torch.zeros(length, dim, device=device, dtype=torch.float32)
    enc[:, 0::2] = torch.sin(pos * freq)
    enc[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return enc.to(dtype)
