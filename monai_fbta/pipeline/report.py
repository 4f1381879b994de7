"""Held-out evaluation of ``model.pt`` and prediction writing (used by the bundle configs).

``model.pt`` and its metadata are :mod:`monai_fbta.handlers.checkpoint`'s; evaluation and inference rebuild the
network from it (:func:`~monai_fbta.handlers.checkpoint.load_inference_networks`), so they need no training config.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from monai_fbta._io import atomic_open, inside
from monai_fbta.environment import software_environment
from monai_fbta.handlers.checkpoint import RunMismatchError, check_identity, load_inference_model, load_inference_networks
from monai_fbta.handlers.predictions import write_predictions_csv

__all__ = [
    "check_model",
    "evaluate_checkpoint",
]

logger = logging.getLogger("fbta.report")


def check_model(
    model_path: str | os.PathLike, class_names: Sequence[str] | None = None, identity: Mapping[str, Any] | None = None
) -> bool:
    """Refuse (:class:`~monai_fbta.handlers.checkpoint.RunMismatchError`) to evaluate ``model.pt`` on data it does not fit.

    A model whose class names differ from ``class_names`` would read the datalist's labels as other classes;
    with ``identity`` (the current run's), a model of another run was selected on another split of other data.
    """
    meta = load_inference_model(model_path)["metadata"]
    if class_names is not None and list(class_names) != list(meta["class_names"]):
        raise RunMismatchError(
            f"{model_path} predicts the classes {meta['class_names']} but this datalist's classes are {list(class_names)}: "
            "evaluate it on a datalist with its classes (same names, same order), or train a model for these classes"
        )
    if identity is not None:
        check_identity(meta.get("run_identity"), identity, f"{model_path} was trained by another run",
                       "evaluate it with the datalist and settings it was trained with, or train in a new --ckpt_dir")
    return True


def evaluate_checkpoint(
    model_path: str | os.PathLike,
    rows: Sequence[Mapping[str, Any]],
    store_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    metrics_path: str | os.PathLike | None = None,
    split: str = "test",
    class_names: Sequence[str] | None = None,
    identity: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Metrics of ``model.pt`` on ``rows`` (translated and vanilla paths), logged, printed and saved as JSON.

    Also writes ``<split>_predictions.csv`` beside ``metrics_path``. ``class_names`` / ``identity``: see
    :func:`check_model`.
    """
    from monai_fbta.data.dataset import SlideDataset
    from monai_fbta.engines import FBTAEvaluator
    from monai_fbta.transforms.store import LoadStored

    if not rows:
        logger.warning("no %s slides: nothing to evaluate", split)
        return {}
    check_model(model_path, class_names, identity)
    head, translator, meta = load_inference_networks(model_path, device)
    dataset = SlideDataset(rows, LoadStored(store_dir, keys=("coords", "features")))  # the full bags, nothing else
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False)  # one slide per item: PrepareSlideBatch
    evaluator = FBTAEvaluator(device, loader, head, translator, prefix=split)
    evaluator.run()
    metrics = {k: float(v) for k, v in evaluator.state.metrics.items()}
    result = {
        "split": split,
        "num_slides": len(rows),
        "slide_ids": sorted(str(r["slide_id"]) for r in rows) if all("slide_id" in r for r in rows) else None,
        "model": os.fspath(model_path),
        "class_names": meta["class_names"],
        "metrics": metrics,
        "confusion_matrix": getattr(evaluator.state, "confusion_matrix", None),
        "confusion_matrix_vanilla": getattr(evaluator.state, "confusion_matrix_vanilla", None),
        "environment": software_environment(),
        "trained_with": meta.get("environment"),
    }
    lines = [f"{'' if split == 'train' else 'held-out '}{split} set ({len(rows)} slides), model {model_path}:"]
    lines += [f"  {k:<28s} {v:.4f}" for k, v in sorted(metrics.items())]
    print("\n".join(lines), flush=True)
    if metrics_path is not None:
        with atomic_open(metrics_path, "w") as f:
            json.dump(result, f, indent=1)
        records = [{"slide_id": p["slide_id"], "probs": p["pred"], "label": p["label"]} for p in evaluator.state.predictions]
        write_predictions_csv(os.path.join(os.path.dirname(os.fspath(metrics_path)), f"{split}_predictions.csv"),
                              records, meta["class_names"])
    return result


class CheckpointEvaluation:
    """The bundle's evaluation of ``model.pt`` on one split of a :class:`~monai_fbta.pipeline.prepare.Preprocessor`:
    :meth:`run` writes ``<output_dir>/<split>_metrics.json`` and ``<split>_predictions.csv`` (:func:`evaluate_checkpoint`).
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        prepare: Any,
        output_dir: str | os.PathLike,
        split: str = "test",
        device: str | torch.device = "cpu",
        class_names: Sequence[str] | None = None,
        identity: Mapping[str, Any] | None = None,
    ) -> None:
        self.model_path, self.prepare, self.output_dir, self.split = model_path, prepare, output_dir, split
        self.device, self.class_names, self.identity = device, class_names, identity

    def run(self) -> dict[str, Any]:
        """Evaluate (after ``prepare.run()``); returns the metrics report."""
        return evaluate_checkpoint(self.model_path, self.prepare.part(self.split), self.prepare.cache_dir, self.device,
                                   inside(os.fspath(self.output_dir), f"{self.split}_metrics.json"), split=self.split,
                                   class_names=self.class_names, identity=self.identity)
