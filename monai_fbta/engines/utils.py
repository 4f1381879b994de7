"""Engine helpers: :class:`PrepareSlideBatch`, the ``prepare_batch`` of :class:`~monai_fbta.engines.FBTATrainer` and
:class:`~monai_fbta.engines.FBTAEvaluator` (MONAI's ``PrepareBatch`` interface)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from monai_fbta._quiet import quiet_import

quiet_import("monai.engines")
from monai.engines import PrepareBatch  # noqa: E402

__all__ = ["PrepareSlideBatch"]


class PrepareSlideBatch(PrepareBatch):
    """One slide's sample -> the engine's inputs on ``device``.

    Takes the sample as the dataset yields it (``DataLoader(batch_size=None)``: no collation) or collated as a
    batch of one (``DataLoader(batch_size=1)``). Returns a dict with:

    * ``bag_keys`` (``features [N, D]``, ``pb_features [S, D]``) as MIL bags ``[1, N, D]``;
    * ``patch_keys`` (``pb_image``, ``pb_image_clean``) as one encoder batch ``[S, 3, H, W]``;
    * ``label_key`` as an int64 ``[1]``; ``id_key`` (``slide_id``) and other collated strings (``[str]``) as a ``str``;
    * other tensors moved as they are, other values unchanged.

    Bags differ in size, so a batch of several slides raises ``ValueError`` (accumulate gradients instead).
    """

    def __init__(
        self,
        bag_keys: Sequence[str] = ("features", "pb_features"),
        patch_keys: Sequence[str] = ("pb_image", "pb_image_clean"),
        label_key: str = "label",
        id_key: str = "slide_id",
    ) -> None:
        self.bag_keys, self.patch_keys = tuple(bag_keys), tuple(patch_keys)
        self.label_key, self.id_key = label_key, id_key

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """``kwargs`` go to ``Tensor.to()`` (MONAI's ``to_kwargs``)."""
        out: dict[str, Any] = {}
        for key, value in batchdata.items():
            if key == self.label_key and isinstance(value, int):
                value = torch.tensor([value])
            if not isinstance(value, torch.Tensor):
                listed = isinstance(value, (list, tuple))
                if key == self.id_key and listed and len(value) != 1:
                    raise ValueError(f"one slide per batch (bags differ in size), got {len(value)} slide ids")
                out[key] = value[0] if listed and len(value) == 1 and isinstance(value[0], str) else value
                continue
            value = value.to(device=device, non_blocking=non_blocking, **kwargs)
            if key in self.bag_keys:
                value = _one_slide(value, 3, key)
            elif key in self.patch_keys and value.ndim == 5:
                value = _one_slide(value, 5, key)[0]
            elif key == self.label_key:
                value = _one_slide(value.reshape(-1), 1, key).long()
            out[key] = value
        return out


def _one_slide(value: torch.Tensor, ndim: int, key: str) -> torch.Tensor:
    """``value`` with a leading batch dim of 1 (added when it has ``ndim - 1`` dims); a larger batch raises."""
    if value.ndim == ndim - 1 and ndim > 1:
        return value.unsqueeze(0)
    if value.shape[0] != 1:
        raise ValueError(f"one slide per batch (bags differ in size), got {value.shape[0]} in {key!r} {tuple(value.shape)}")
    return value
