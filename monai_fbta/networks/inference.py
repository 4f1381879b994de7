"""The deployed FBTA network: translator then MIL head, as one module (for export and serving)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["TranslatedMIL", "METADATA_KEY"]

METADATA_KEY = "metadata"
"""Entry of ``model.pt`` holding the plain-Python description of the model (not a weight)."""


class TranslatedMIL(nn.Module):
    """``probs = softmax(f*_MIL(f_T(F^FB)))`` on one whole bag of frozen features.

    Args:
        mil_head: the (EMA teacher) MIL head, ``[B, N, D] -> [B, C]``.
        translator: f_T, ``[..., D] -> [..., D]``; ``None`` for a vanilla MIL model.
        channels_first: take ``[B, D, N]`` (MONAI's channel-first layout: D feature channels, N patches),
            as the bundle's ``network_def`` and ``metadata.json`` do; default ``[B, N, D]``.

    ``forward(features) -> probabilities [B, C]``. State dict keys are ``mil_head.*`` and ``translator.*``,
    the layout of ``model.pt``, so ``monai.bundle.load`` and ``ckpt_export`` load it as is.
    """

    def __init__(self, mil_head: nn.Module, translator: nn.Module | None = None, channels_first: bool = False) -> None:
        super().__init__()
        self.mil_head = mil_head
        self.translator = translator
        self.channels_first = bool(channels_first)
        self.metadata: dict[str, Any] = {}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """As ``nn.Module.load_state_dict``; the ``metadata`` entry of ``model.pt`` (classes, encoder, tiling...)
        is kept as ``self.metadata`` instead of being read as a weight (MONAI's ``ckpt_export`` loads strictly)."""
        state = dict(state_dict)
        if METADATA_KEY in state:
            self.metadata = dict(state.pop(METADATA_KEY))
        return super().load_state_dict(state, strict=strict, assign=assign)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.channels_first:
            features = features.transpose(1, 2)
        bag = features if self.translator is None else self.translator(features)
        return torch.softmax(self.mil_head(bag), dim=-1)
