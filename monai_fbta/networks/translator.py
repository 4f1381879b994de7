"""FeatureTranslator f_T: the mean of K parallel residual MLP heads (FBTA, step 5 of the method)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from monai_fbta.networks.mil_base import checkpointed

__all__ = ["FeatureTranslator", "translate_bag"]


class FeatureTranslator(nn.Module):
    """``head_k(x) = x + W2_k dropout(GELU(W1_k x + b1_k)) + b2_k``; output = mean over the K heads.

    The K heads are stacked weights. The mean (the usual call) is two plain matrix products with the heads
    side by side, ``[M, D] @ [D, K*hidden]`` then ``[M, K*hidden] @ [K*hidden, D] / K``: the same sum as the
    mean of the K heads, without the ``[K, M, D]`` per-head outputs. ``return_heads=True`` (L_dist) computes
    every head with one ``einsum`` per layer (no Python loop over heads).

    Initialisation: the first layer as ``nn.Linear``; the last layer as ``nn.Linear`` times
    ``init_scale`` (default 0.01), so f_T starts within about 1% of the identity (frozen features
    pass through almost unchanged) while every weight still gets a gradient from the first step.
    ``init_scale=0`` gives the identity at initialisation (up to rounding in the mean).

    Args:
        in_features: feature size D (input and output).
        num_heads: K (default 10).
        hidden: MLP width (default ``in_features``).
        dropout: dropout after the GELU.
        init_scale: scale of the last layer's initial weights and bias.

    ``forward(x [..., D], return_heads=False)`` -> ``mean [..., D]``, or ``(mean, heads [K, ..., D])``.
    """

    def __init__(
        self,
        in_features: int,
        num_heads: int = 10,
        hidden: int | None = None,
        dropout: float = 0.0,
        init_scale: float = 0.01,
    ) -> None:
        super().__init__()
        hidden = hidden or in_features
        if in_features < 1 or num_heads < 1 or hidden < 1:
            raise ValueError(f"FeatureTranslator: in_features, num_heads, hidden must be >= 1, got "
                             f"{in_features}, {num_heads}, {hidden}")
        self.in_features, self.num_heads, self.hidden = in_features, num_heads, hidden
        self.w1 = nn.Parameter(torch.empty(num_heads, in_features, hidden))
        self.b1 = nn.Parameter(torch.empty(num_heads, 1, hidden))
        self.w2 = nn.Parameter(torch.empty(num_heads, hidden, in_features))
        self.b2 = nn.Parameter(torch.empty(num_heads, 1, in_features))
        self.dropout = nn.Dropout(dropout)
        self.reset_parameters(init_scale)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> FeatureTranslator:
        """A translator of the shape ``state`` holds (K, D and hidden read from ``w1 [K, D, hidden]``), with its
        weights: a saved f_T loads whatever width it was built with."""
        num_heads, in_features, hidden = state["w1"].shape
        translator = cls(in_features, num_heads=num_heads, hidden=hidden)
        translator.load_state_dict(state)
        return translator

    def reset_parameters(self, init_scale: float = 0.01) -> None:
        """``nn.Linear``'s uniform init per head; the last layer multiplied by ``init_scale``."""
        for weight, bias, fan_in, scale in ((self.w1, self.b1, self.in_features, 1.0), (self.w2, self.b2, self.hidden, init_scale)):
            bound = scale / math.sqrt(fan_in)
            nn.init.uniform_(weight, -bound, bound)
            nn.init.uniform_(bias, -bound, bound)

    def forward(self, x: torch.Tensor, return_heads: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"FeatureTranslator: expected [..., {self.in_features}] features, got {list(x.shape)}")
        flat = x.reshape(-1, self.in_features)  # [M, D]
        if not return_heads:
            return self._mean(flat).reshape(x.shape)
        h = self.dropout(F.gelu(torch.einsum("md,kdh->kmh", flat, self.w1) + self.b1))  # [K, M, hidden]
        heads = flat + torch.einsum("kmh,khd->kmd", h, self.w2) + self.b2  # [K, M, D]
        heads = heads.reshape(self.num_heads, *x.shape)
        return heads.mean(0), heads

    def _mean(self, flat: torch.Tensor) -> torch.Tensor:
        """``mean_k head_k(flat)`` for ``flat [M, D]`` as two matrix products over the K heads side by side."""
        w1 = self.w1.permute(1, 0, 2).reshape(self.in_features, -1)  # [D, K*hidden], head-major columns
        h = self.dropout(F.gelu(torch.addmm(self.b1.reshape(-1), flat, w1)))  # [M, K*hidden]
        out = torch.addmm(self.b2.mean(0).reshape(-1), h, self.w2.reshape(-1, self.in_features), alpha=1.0 / self.num_heads)
        return flat + out


def translate_bag(translator: nn.Module, bag: torch.Tensor, chunk_size: int | None = 16384) -> torch.Tensor:
    """``f_T(bag)`` for ``bag [B, N, D]``, in chunks of instances (f_T acts per instance, so this is exact).

    With gradients on, each chunk runs under activation checkpointing, so training keeps the ``[N, D]``
    output and one chunk's ``[K, chunk, hidden]`` activations, not those of all N instances.
    Under ``torch.jit.trace`` the whole bag is translated at once (a traced branch would be fixed by the example).
    """
    if not chunk_size or torch.jit.is_tracing() or bag.shape[1] <= chunk_size:
        return translator(bag)
    return torch.cat([checkpointed(translator, c) for c in bag.split(chunk_size, dim=1)], dim=1)
