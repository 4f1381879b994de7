"""The deployed FBTA network: translator then MIL head, as one module (for export and serving)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TranslatedMIL"]


class TranslatedMIL(nn.Module):
    """``probs = softmax(f*_MIL(f_T(F^FB)))`` on one whole bag of frozen features.

    Args:
        mil_head: the (EMA teacher) MIL head, ``[B, N, D] -> [B, C]``.
        translator: f_T, ``[..., D] -> [..., D]``; ``None`` for a vanilla MIL model.

    ``forward(features [B, N, D]) -> probabilities [B, C]``. State dict keys are ``mil_head.*`` and
    ``translator.*``, the layout of ``model.pt``'s ``network`` entry, so MONAI's ``ckpt_export``
    loads it with ``--key_in_ckpt network``.
    """

    def __init__(self, mil_head: nn.Module, translator: nn.Module | None = None) -> None:
        super().__init__()
        self.mil_head = mil_head
        self.translator = translator

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        bag = features if self.translator is None else self.translator(features)
        return torch.softmax(self.mil_head(bag), dim=-1)
