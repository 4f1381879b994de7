"""FBTAInferenceEvaluator: predictions and attention of new (unlabelled) slides, for handlers to write.

One slide per iteration: its cached frozen bag ``features [1, N, D]`` goes through the one predictor,
:class:`~monai_fbta.networks.TranslatedMIL` with ``return_attention=True``. Nothing is written here; the handlers
(``val_handlers``) write what they need from ``engine.state.output``:
:class:`~monai_fbta.handlers.predictions.PredictionsCSV`, :class:`~monai_fbta.handlers.heatmap.HeatmapWriter`,
:class:`~monai_fbta.handlers.attention.AttentionWriter` (bundle inference, ``inference.json``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from monai_fbta.engines.evaluator import SlideEvaluator
from monai_fbta.networks.inference import TranslatedMIL

__all__ = ["FBTAInferenceEvaluator", "slide_size"]


def slide_size(meta: Mapping[str, Any], image: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of the slide at level 0: the store's tiling attrs ``slide_width``/``slide_height``
    (``meta``), else read from the slide file ``image`` (stores imported from CLAM/TRIDENT lack them)."""
    if "slide_width" in meta and "slide_height" in meta:
        return int(meta["slide_width"]), int(meta["slide_height"])
    from monai_fbta.data.slide import open_slide

    with open_slide(image) as slide:
        width, height = slide.level_dimensions[0]
    return int(width), int(height)


class FBTAInferenceEvaluator(SlideEvaluator):
    """Predict whole slides with ``network`` and expose, per slide, what inference handlers write.

    Args:
        device: device to run on.
        val_data_loader: one slide per item (``DataLoader(batch_size=None)``), as ``LoadStored(keys=["coords",
            "features"])`` gives it: ``slide_id``, ``image``, ``label`` (``-1``: none), ``features [N, D]``,
            ``coords [N, 2]``, ``coords_meta_dict`` (the store's tiling attrs, ``patch_size_level0`` among them).
        network: a :class:`~monai_fbta.networks.TranslatedMIL` taking ``[B, N, D]``
            (:func:`~monai_fbta.handlers.checkpoint.build_inference_network`; its ``metadata`` names the classes).
        class_names: the classes, in the network's output order (default: ``network.metadata["class_names"]``).
        kwargs: :class:`~monai_fbta.engines.evaluator.SlideEvaluator`'s other arguments (``prepare_batch``,
            ``val_handlers``, ``amp``...).

    ``engine.state.output`` of a slide::

        slide_id str, image str (slide path), label int | None
        probs [C] float32 tensor, pred int, pred_name str
        attention [N] float32 numpy, coords [N, 2] int64 numpy (level-0 x, y), num_patches int
        patch_size_level0 float, slide_size (width, height) at level 0

    ``engine.state.predictions``: per slide the same without ``attention`` and ``coords`` (``probs`` as a list).
    """

    def __init__(
        self,
        device: str | torch.device,
        val_data_loader: Iterable,
        network: TranslatedMIL,
        class_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> None:
        if getattr(network, "channels_first", False):
            raise ValueError("FBTAInferenceEvaluator takes bags [B, N, D]: build the network with channels_first=False")
        names = class_names if class_names is not None else getattr(network, "metadata", {}).get("class_names")
        if not names:
            raise ValueError("FBTAInferenceEvaluator: give class_names (or a network whose metadata names them)")
        self.class_names = list(names)
        super().__init__(device, val_data_loader, network, **kwargs)

    def predict(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``{"probs": [1, C], "attention": [1, N]}`` of ``features [1, N, D]``."""
        with torch.no_grad(), self.eval_mode():
            probs, attention = self.network(batch["features"], return_attention=True)
        return {"probs": probs, "attention": attention}

    def outputs(self, batch: Mapping[str, Any], out: Mapping[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The slide's output (see the class docstring) and its record in ``engine.state.predictions``."""
        probs = out["probs"][0].float().cpu()
        pred = int(probs.argmax())
        label = int(batch["label"].reshape(-1)[0]) if "label" in batch else -1
        meta = batch["coords_meta_dict"]
        record = {"slide_id": batch["slide_id"], "image": batch["image"], "label": None if label < 0 else label,
                  "probs": probs.tolist(), "pred": pred, "pred_name": self.class_names[pred],
                  "num_patches": int(batch["coords"].shape[0])}
        output = {**record, "probs": probs, "attention": out["attention"][0].float().cpu().numpy(),
                  "coords": np.asarray(batch["coords"].cpu(), dtype=np.int64),
                  "patch_size_level0": float(meta["patch_size_level0"]), "slide_size": slide_size(meta, batch["image"])}
        return output, record
