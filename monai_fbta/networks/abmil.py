"""ABMIL: gated attention MIL (Ilse et al., ICML 2018)."""

from __future__ import annotations

import torch
from torch import nn

from monai_fbta.networks.mil_base import DEFAULT_BAG_CHUNK_SIZE, GatedAttentionPool, MILHead

__all__ = ["ABMIL"]


class ABMIL(MILHead):
    """Linear(D -> hidden) + ReLU + dropout, gated attention pooling, linear classifier.

    The attention softmax runs over the real instances only (padding gets weight 0), and the
    returned attention is that softmax: ``[B, N]``, summing to 1 per bag.

    Args:
        in_features: instance feature size D.
        num_classes: number of slide classes.
        hidden: projection width (default 512).
        dropout: dropout after the projection and inside the attention branches.
        attention_dim: width of the gated attention branches (default 256).
        bag_chunk_size: bags longer than this are pooled segment by segment, exactly, under
            checkpointing (memory O(bag_chunk_size * hidden) besides the input; see ``mil_base``).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: int = 512,
        dropout: float = 0.25,
        attention_dim: int = 256,
        bag_chunk_size: int | None = DEFAULT_BAG_CHUNK_SIZE,
    ) -> None:
        super().__init__(in_features, num_classes, hidden, dropout, bag_chunk_size)
        self.projection = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.pool = GatedAttentionPool(hidden, attention_dim, dropout)
        self.classifier = nn.Linear(hidden, num_classes)

    def _forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, attention = self.pool(self.projection(x), mask)  # [B, hidden], [B, N]
        return self.classifier(pooled), attention

    def _forward_chunked(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, attention = self.pool.forward_chunked(
            x, lambda rows: self.projection(self.standardise(rows)), self.bag_chunk_size, mask
        )
        return self.classifier(pooled), attention
