"""Inference-model metadata, held-out evaluation and prediction writing (used by the bundle configs).

``model.pt`` (see :func:`monai_fbta.engines.save_inference_model`) carries everything needed to
rebuild the inference network: the EMA teacher head f*_MIL, the translator f_T and a metadata dict
written by :func:`model_metadata`. :func:`load_inference_networks` rebuilds both from it, so
evaluation and inference need no training config.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from monai_fbta._io import atomic_open

__all__ = [
    "resolve_class_names",
    "model_metadata",
    "load_inference_networks",
    "build_inference_network",
    "check_model",
    "evaluate_checkpoint",
    "write_predictions_csv",
]

logger = logging.getLogger("fbta.report")


def resolve_class_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    """``class_names`` as a list, or ``class_0 ... class_<n-1>`` when none were given; one name per class."""
    names = list(class_names) if class_names else [f"class_{i}" for i in range(int(num_classes))]
    if len(names) != int(num_classes):
        raise ValueError(f"{len(names)} class names {names} for num_classes={num_classes}")
    return names


def model_metadata(
    mil_name: str,
    feature_dim: int,
    num_classes: int,
    class_names: Sequence[str] | None,
    views: Sequence[str],
    encoder_name: str,
    encoder_weights: str | None,
    tiling: Mapping[str, Any],
    mil_hidden: int = 512,
    translator_heads: int = 10,
    identity: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Plain-Python description of the inference network (stored in ``model.pt``), with the run's ``identity``."""
    names = resolve_class_names(class_names, num_classes)
    return {
        "run_identity": None if identity is None else dict(identity),
        "mil_name": str(mil_name),
        "mil_hidden": int(mil_hidden),
        "feature_dim": int(feature_dim),
        "num_classes": int(num_classes),
        "class_names": names,
        "views": [str(v) for v in views],
        "translator_heads": int(translator_heads),
        "encoder_name": str(encoder_name),
        "encoder_weights": None if encoder_weights is None else str(encoder_weights),
        "tiling": {str(k): v for k, v in dict(tiling).items()},
    }


def _read_model(path: str | os.PathLike) -> dict[str, Any]:
    from monai_fbta.engines import load_inference_model

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no trained model at {path}: run the bundle's training first")
    return load_inference_model(path)


def load_inference_networks(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """``(mil_head, translator, metadata)`` rebuilt from ``model.pt`` (``weights_only`` load), in eval mode."""
    from monai_fbta.networks import FeatureTranslator, build_mil_head

    blob = _read_model(path)
    meta = blob["metadata"]
    head = build_mil_head(meta["mil_name"], in_features=meta["feature_dim"], num_classes=meta["num_classes"],
                          hidden=meta["mil_hidden"])
    head.load_state_dict(blob["mil_head"])
    translator = None
    if blob["translator"] is not None:
        translator = FeatureTranslator(meta["feature_dim"], num_heads=meta["translator_heads"])
        translator.load_state_dict(blob["translator"])
        translator = translator.to(device).eval()
    return head.to(device).eval(), translator, meta


def build_inference_network(
    model_path: str | os.PathLike, device: str | torch.device = "cpu", channels_first: bool = False,
    translator_dtype: torch.dtype | str | None = None,
):
    """:class:`~monai_fbta.networks.TranslatedMIL` with the weights of ``model.pt``, in eval mode on ``device``,
    its ``metadata`` set from the file (the bundle's ``network_def``, with ``channels_first=True``: input
    ``[B, D, N]`` as ``metadata.json`` describes it; bundle inference, with ``[B, N, D]``). ``translator_dtype``:
    see :class:`~monai_fbta.networks.TranslatedMIL` (``None``: float32)."""
    from monai_fbta.networks import TranslatedMIL

    head, translator, meta = load_inference_networks(model_path, device)
    network = TranslatedMIL(head, translator, channels_first=channels_first, translator_dtype=translator_dtype)
    network = network.to(device).eval()
    network.metadata = dict(meta)
    return network


def write_predictions_csv(path: str | os.PathLike, records: Sequence[Mapping[str, Any]], class_names: Sequence[str]) -> str:
    """``slide_id, prob_<class>..., pred, pred_name[, label]`` per slide, written atomically."""
    text = io.StringIO()
    has_label = any(r.get("label") is not None and int(r["label"]) >= 0 for r in records)
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["slide_id", *[f"prob_{c}" for c in class_names], "pred", "pred_name"] + (["label"] if has_label else []))
    for r in records:
        probs = [float(p) for p in r["probs"]]
        pred = int(np.argmax(probs))
        row = [r["slide_id"], *[f"{p:.6f}" for p in probs], pred, class_names[pred]]
        writer.writerow(row + ([r.get("label", "")] if has_label else []))
    with atomic_open(path, "w", newline="") as f:
        f.write(text.getvalue())
    return str(path)


def check_model(
    model_path: str | os.PathLike, class_names: Sequence[str] | None = None, identity: Mapping[str, Any] | None = None
) -> bool:
    """Refuse (:class:`~monai_fbta.engines.RunMismatchError`) to evaluate ``model.pt`` on data it does not fit.

    A model whose class names differ from ``class_names`` would read the datalist's labels as other classes;
    with ``identity`` (the current run's), a model of another run was selected on another split of other data.
    """
    from monai_fbta.engines.checkpoint import RunMismatchError, check_identity

    meta = _read_model(model_path)["metadata"]
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
    from monai_fbta.data.dataset import FBTADataset, collate_single
    from monai_fbta.engines import FBTAEvaluator

    if not rows:
        logger.warning("no %s slides: nothing to evaluate", split)
        return {}
    check_model(model_path, class_names, identity)
    head, translator, meta = load_inference_networks(model_path, device)
    dataset = FBTADataset(rows, store_dir, num_clusters=1, load_patches=False, cluster_on_init=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, shuffle=False, collate_fn=collate_single)
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
    }
    lines = [f"held-out {split} set ({len(rows)} slides), model {model_path}:"]
    lines += [f"  {k:<28s} {v:.4f}" for k, v in sorted(metrics.items())]
    print("\n".join(lines), flush=True)
    if metrics_path is not None:
        with atomic_open(metrics_path, "w") as f:
            json.dump(result, f, indent=1)
        records = [{"slide_id": p["slide_id"][0] if isinstance(p["slide_id"], list) else p["slide_id"],
                    "probs": p["pred"], "label": p["label"]} for p in evaluator.state.predictions]
        write_predictions_csv(os.path.join(os.path.dirname(os.fspath(metrics_path)), f"{split}_predictions.csv"),
                              records, meta["class_names"])
    return result
