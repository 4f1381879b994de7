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

from monai_fbta.networks.mil_base import (
    DEFAULT_BAG_CHUNK_SIZE, GatedAttentionPool, MILHead, checkpointed, run_per_bag, segment_bounds,
)
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
        return self.forward_segment(x, 0, None)[0]

    def forward_segment(
        self, x: torch.Tensor, num_context: int, state: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Continue the branch over a segment: ``x [B, num_context + r, d_inner]`` -> ``(y [B, r, d_inner], state)``.

        The first ``num_context`` rows (the ``d_conv - 1`` rows before the segment, or none at the
        start) only feed the causal conv; ``state [B, d_inner, d_state]`` is the scan state after them.
        """
        u = F.silu(self.conv(x.transpose(1, 2))[..., : x.shape[1]])[..., num_context:]  # [B, d_inner, r]
        dt, B, C = self.x_proj(u.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ self.dt_proj.weight.T).transpose(1, 2)  # [B, d_inner, r]
        y, state = selective_scan(
            u, delta, -torch.exp(self.A_log), B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(),
            self.D, delta_bias=self.dt_proj.bias, delta_softplus=True, chunk_size=self.chunk_size,
            initial_state=state, return_last_state=True,
        )
        return y.transpose(1, 2), state


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
        order, restore = self._reordering(x.shape[1], x.device)
        y = self.forward_branch(h) + self.reordered_branch(h[:, order])[:, restore]
        return self.out_proj(y * F.silu(z))

    def _reordering(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(order, restore)`` ``[L]`` each: the reordered branch's token order and its inverse."""
        order = stride_order(length, self.rate, device)
        restore = torch.empty_like(order)
        restore[order] = torch.arange(length, device=device)
        return order, restore

    def residual_chunked(self, x: torch.Tensor, norm: nn.Module, chunk_size: int) -> torch.Tensor:
        """``x + self(norm(x))`` for ``x [B, L, dim]``, segment by segment along each branch's order, exactly.

        ``out_proj`` has no bias, so ``out_proj((y_f + y_r) * silu(z))`` splits into one term per branch;
        each segment computes its term from the rows it covers (plus ``d_conv - 1`` rows of conv
        context) and hands the scan state to the next segment.
        """
        length = x.shape[1]
        context = self.forward_branch.conv.padding[0]  # d_conv - 1

        def segment(x, rows, num_context, state, branch):
            h, z = self.in_proj(norm(x[:, rows])).chunk(2, dim=-1)
            y, state = branch.forward_segment(h, num_context, state)
            return self.out_proj(y * F.silu(z[:, num_context:])), state

        def run(branch: _SSMBranch, order: torch.Tensor) -> torch.Tensor:
            terms, state = [], None
            for start, stop in segment_bounds(length, chunk_size):
                lo = max(0, start - context)
                term, state = checkpointed(segment, x, order[lo:stop], start - lo, state, branch)
                terms.append(term)
            return torch.cat(terms, dim=1)  # in the branch's order

        order, restore = self._reordering(length, x.device)
        natural = torch.arange(length, device=x.device)
        return x + run(self.forward_branch, natural) + run(self.reordered_branch, order)[:, restore]


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
        bag_chunk_size: bags longer than this are run segment by segment under checkpointing, exactly
            (:meth:`SRMamba.residual_chunked`; the PyTorch scan, since mamba-ssm's kernel takes no initial state).

    Bags in a padded batch are processed one at a time on their real instances (B is usually 1 in
    MIL), so padding cannot enter the scans or the reordering.
    """

    trace_refusal = "its sequence reordering and scan chunks are built from the bag size N in Python"

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
        bag_chunk_size: int | None = DEFAULT_BAG_CHUNK_SIZE,
    ) -> None:
        super().__init__(in_features, num_classes, hidden, dropout, bag_chunk_size)
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

    def _forward_bags_chunked(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.bag_chunk_size
        h = torch.cat(self._project_segments(x), dim=1)
        for norm, block in zip(self.norms, self.blocks):
            h = block.residual_chunked(h, norm, chunk)
        pooled, attention = self.pool.forward_chunked(h, self.norm, chunk)
        return self.classifier(pooled), attention

    def _forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return run_per_bag(x, mask, self._forward_bags)

    def _forward_chunked(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return run_per_bag(x, mask, self._forward_bags_chunked)
