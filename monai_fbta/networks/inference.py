"""The deployed FBTA network: translator then MIL head, as one module (for export and serving)."""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from monai_fbta.networks.mil_base import mil_logits
from monai_fbta.networks.encode import autocast
from monai_fbta.networks.translator import translate_bag

__all__ = ["TranslatedMIL", "METADATA_KEY", "LAYOUT_KEY", "state_layout", "autocast_dtype"]

METADATA_KEY = "metadata"
"""Entry of ``model.pt`` holding the plain-Python description of the model (not a weight)."""

LAYOUT_KEY = "layout"
"""Buffer of :class:`TranslatedMIL` (and entry of ``model.pt``): a checksum of the weights' names and shapes."""


def state_layout(state: Mapping[str, Any]) -> torch.Tensor:
    """``[1]`` int64 checksum of the tensor names and shapes of ``state`` (``layout`` and non-tensors left out).

    Two networks have the same layout exactly when every weight of one fits the other.
    """
    text = ";".join(f"{k}:{tuple(v.shape)}" for k, v in sorted(state.items())
                    if k != LAYOUT_KEY and isinstance(v, torch.Tensor))
    return torch.tensor([zlib.crc32(text.encode())], dtype=torch.int64)


def autocast_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``None``, ``torch.bfloat16`` / ``torch.float16`` or their names (``"bfloat16"``, ``"bf16"``, ``"float16"``,
    ``"fp16"``; ``"float32"``/``"fp32"`` mean ``None``) -> the autocast dtype, or ``None`` for plain float32."""
    names = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16, "float32": None, "fp32": None}
    if dtype is None or dtype == torch.float32:
        return None
    if isinstance(dtype, str) and dtype.lower() in names:
        return names[dtype.lower()]
    if dtype in (torch.bfloat16, torch.float16):
        return dtype
    raise ValueError(f"translator_dtype must be None, 'bfloat16' or 'float16', got {dtype!r}")


class TranslatedMIL(nn.Module):
    """``probs = softmax(f*_MIL(f_T(F^FB)))`` on whole bags of frozen features: the one predictor of the package.

    Training validation (:class:`~monai_fbta.engines.FBTAEvaluator`), held-out evaluation, bundle inference and
    ``network_def`` (export, serving) all call this module.

    Args:
        mil_head: the (EMA teacher) MIL head, ``[B, N, D] -> [B, C]``.
        translator: f_T, ``[..., D] -> [..., D]``; ``None`` for a vanilla MIL model.
        channels_first: take ``[B, D, N]`` (MONAI's channel-first layout: D feature channels, N patches),
            as the bundle's ``network_def`` and ``metadata.json`` do; default ``[B, N, D]``.
        chunk_size: instances per translator call (:func:`~monai_fbta.networks.translator.translate_bag`;
            exact, f_T acts per instance); ``None`` translates the whole bag at once.
        translator_dtype: ``None`` (default: float32, exact) or ``"bfloat16"`` / ``"float16"``: f_T runs under
            ``torch.autocast`` in that dtype (its output is cast back to float32 for the MIL head). bf16 is faster on CPUs with
            native bf16 and on GPUs; ``benchmarks/bench_inference.py`` measures the time and how far the predictions
            move (docs/benchmarks.md).

    ``forward(features, return_attention=False, translate=True)``: features are cast to float32; returns
    float32 probabilities ``[B, C]``, or ``(probabilities [B, C], attention [B, N])`` with ``return_attention``
    (the head must accept ``return_attention=True``). ``translate=False`` skips f_T: the vanilla path
    ``f*_MIL(F^FB)`` of the same head. No ``no_grad`` inside: callers choose.

    State dict keys are ``mil_head.*``, ``translator.*`` and
    ``layout`` (:func:`state_layout`), the layout of ``model.pt``, so ``monai.bundle.load`` and ``ckpt_export``
    load it as is. Loading weights of another architecture (other feature size, classes, head or translator)
    raises, even through MONAI's ``copy_model_state``, which would otherwise skip what does not fit.
    """

    def __init__(
        self,
        mil_head: nn.Module,
        translator: nn.Module | None = None,
        channels_first: bool = False,
        chunk_size: int | None = 16384,
        translator_dtype: torch.dtype | str | None = None,
    ) -> None:
        super().__init__()
        self.translator_dtype = autocast_dtype(translator_dtype)
        self.mil_head = mil_head
        self.translator = translator
        self.channels_first = bool(channels_first)
        self.chunk_size = chunk_size
        self.metadata: dict[str, Any] = {}
        self.register_buffer(LAYOUT_KEY, state_layout(self.state_dict()))

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """As ``nn.Module.load_state_dict``, refusing weights of another architecture (``ValueError``).

        The ``metadata`` entry of ``model.pt`` (classes, encoder, tiling...) is kept as ``self.metadata``
        instead of being read as a weight (MONAI's ``ckpt_export`` loads strictly).
        """
        state = dict(state_dict)
        if METADATA_KEY in state:
            self.metadata = dict(state.pop(METADATA_KEY))
        own = getattr(self, LAYOUT_KEY)
        given = state.get(LAYOUT_KEY, own)
        if not torch.equal(torch.as_tensor(given).to(own.device), own):
            raise ValueError(
                "these weights were saved from another network architecture than this TranslatedMIL (other feature "
                "size, number of classes, MIL head or translator), so they would only partly load: build the "
                "network from model.pt's own metadata (monai.bundle.load(..., workflow_type='inference') or "
                "monai_fbta.handlers.checkpoint.build_inference_network), or set the bundle settings it was trained with"
            )
        return super().load_state_dict(state, strict=strict, assign=assign)

    def forward(
        self, features: torch.Tensor, return_attention: bool = False, translate: bool = True
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.channels_first:
            features = features.transpose(1, 2)
        bag = features.float()
        if translate and self.translator is not None:
            with autocast(bag.device, self.translator_dtype):
                bag = translate_bag(self.translator, bag, self.chunk_size)
            bag = bag.float()
        if not return_attention:
            return torch.softmax(mil_logits(self.mil_head, bag).float(), dim=-1)
        logits, attention = self.mil_head(bag, return_attention=True)
        return torch.softmax(logits.float(), dim=-1), attention.float()
