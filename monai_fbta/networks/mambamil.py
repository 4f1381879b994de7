"""MambaMIL with SR-Mamba blocks (Yang et al., MICCAI 2024), written from the paper.

Layout: Linear(D -> hidden) + ReLU, ``num_layers`` residual blocks ``x + SRMamba(LayerNorm(x))``,
LayerNorm, gated attention pooling, linear classifier.

An SR-Mamba block projects the tokens to ``(x, z)`` of width ``expand * hidden`` and runs two
Mamba SSM branches (causal depthwise conv -> SiLU -> selective scan), one over the sequence in
slide order and one over the sequence *reordered* with stride ``rate`` (tokens 0, R, 2R, ...,
then 1, R+1, ..., so far-apart patches become neighbours). The reordered branch's output is put
back in slide order, the two are summed, gated by ``SiLU(z)`` and projected back.
The selective scan is :func:`monai_fbta.networks.selective_scan.selective_scan` (pure PyTorch on
CPU, mamba-ssm's CUDA kernel when installed).

Heatmap attention (``return_attention=True``): the gated attention pooling weights, ``[B, N]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from monai_fbta.networks.mil_base import GatedAttentionPool, MILHead, run_per_bag
from monai_fbta.networks.selective_scan import selective_scan

__all__ = ["MambaMIL", "SRMamba", "stride_order"]


def stride_order(length: int, rate: int, device: torch.device | None = None) -> torch.Tensor:
    """Permutation ``[length]`` visiting 0, rate, 2*rate, ..., then 1, rate+1, ... (no padding)."""
    return torch.cat([torch.arange(r, length, rate, device=device) for r in range(min(rate, length))])


class _SSMBranch(nn.Module):
    """Causal depthwise conv -> SiLU -> selective scan: ``[B, L, d_inner] -> [B, L, d_inner]``."""

    def __init__(self, d_inner: int, d_state: int, d_conv: int, dt_rank: int, chunk_size: int) -> None:
        super().__init__()
        self.d_state, self.dt_rank, self.chunk_size = d_state, dt_rank, chunk_size
        self.conv = nn.Conv1d(d_inner, d_inner, d_conv, padding=d_conv - 1, groups=d_inner)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner)
        # Mamba's initialisation: step sizes log-uniform in [1e-3, 1e-1], A = -(1..d_state).
        dt = torch.exp(torch.rand(d_inner) * (math.log(1e-1) - math.log(1e-3)) + math.log(1e-3))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        u = F.silu(self.conv(x.transpose(1, 2))[..., :length])  # [B, d_inner, L]
        dt, B, C = self.x_proj(u.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ self.dt_proj.weight.T).transpose(1, 2)  # [B, d_inner, L]
        y = selective_scan(
            u, delta, -torch.exp(self.A_log), B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(),
            self.D, delta_bias=self.dt_proj.bias, delta_softplus=True, chunk_size=self.chunk_size,
        )
        return y.transpose(1, 2)


class SRMamba(nn.Module):
    """Sequence-reordering Mamba mixer: ``[B, L, dim] -> [B, L, dim]`` (see the module docstring)."""

    def __init__(
        self, dim: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, rate: int = 10, chunk_size: int = 256
    ) -> None:
        super().__init__()
        d_inner, dt_rank = expand * dim, math.ceil(dim / 16)
        self.rate = rate
        self.in_proj = nn.Linear(dim, 2 * d_inner, bias=False)
        self.forward_branch = _SSMBranch(d_inner, d_state, d_conv, dt_rank, chunk_size)
        self.reordered_branch = _SSMBranch(d_inner, d_state, d_conv, dt_rank, chunk_size)
        self.out_proj = nn.Linear(d_inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, z = self.in_proj(x).chunk(2, dim=-1)
        order = stride_order(x.shape[1], self.rate, x.device)
        restore = torch.empty_like(order)
        restore[order] = torch.arange(order.numel(), device=x.device)
        y = self.forward_branch(h) + self.reordered_branch(h[:, order])[:, restore]
        return self.out_proj(y * F.silu(z))


class MambaMIL(MILHead):
    """MambaMIL head with SR-Mamba blocks; see the module docstring.

    Args:
        in_features: instance feature size D.
        num_classes: number of slide classes.
        hidden: projection / model width (default 512).
        dropout: dropout after the projection and in the attention pooling.
        num_layers: SR-Mamba blocks (default 2).
        d_state: SSM state size (default 16).
        d_conv: causal conv width (default 4).
        expand: inner width factor (default 2).
        rate: reordering stride R (default 10).
        attention_dim: width of the gated attention pooling (default 128).
        chunk_size: chunk length of the PyTorch selective scan.

    Bags in a padded batch are processed one at a time on their real instances (B is usually 1 in
    MIL), so padding cannot enter the scans or the reordering.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: int = 512,
        dropout: float = 0.25,
        num_layers: int = 2,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        rate: int = 10,
        attention_dim: int = 128,
        chunk_size: int = 256,
    ) -> None:
        super().__init__(in_features, num_classes, hidden, dropout)
        self.projection = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(num_layers))
        self.blocks = nn.ModuleList(
            SRMamba(hidden, d_state, d_conv, expand, rate, chunk_size) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(hidden)
        self.pool = GatedAttentionPool(hidden, attention_dim, dropout)
        self.classifier = nn.Linear(hidden, num_classes)

    def _forward_bags(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.projection(x)
        for norm, block in zip(self.norms, self.blocks):
            h = h + block(norm(h))
        pooled, attention = self.pool(self.norm(h))
        return self.classifier(pooled), attention

    def _forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return run_per_bag(x, mask, self._forward_bags)
