"""Slide-level inference with a trained bundle: ``y = f*_MIL(f_T(F^FB))`` plus attention heatmaps.

No patch is pushed through the trainable extractor: the frozen features of every tissue patch are
read from the cache (or extracted once, with the frozen encoder named in ``model.pt``), translated
by f_T and classified by the EMA teacher head, all by :class:`~monai_fbta.networks.TranslatedMIL` (the one
predictor). Inference is a loop over slides, not an evaluator, so it calls the writers' ``write_one`` per
slide. Outputs, all inside ``output_dir``:

* ``predictions.csv``: slide id, one probability per class, predicted index and class name;
* ``heatmaps/<slide_id>_heatmap.png``: attention over the slide thumbnail;
* ``attention/<slide_id>_attention.csv`` and ``.geojson``: per-patch attention with level-0 coordinates, the
  GeoJSON importable into QuPath (:mod:`monai_fbta.handlers.attention`);
* ``cache/``: the per-slide feature stores (reused by the next run) and ``extraction_report.csv``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from monai_fbta.data.datalist import load_datalist
from monai_fbta.data.extraction import extract_features
from monai_fbta.data.store import read_array, read_coords, slide_id_of, store_path
from monai_fbta.pipeline.paths import inside, safe_name
from monai_fbta.pipeline.prepare import SLIDE_EXTENSIONS, frozen_encoder
from monai_fbta.handlers.checkpoint import build_inference_network
from monai_fbta.pipeline.report import write_predictions_csv

__all__ = ["InferenceError", "inference_rows", "run_inference", "predict_slide"]

logger = logging.getLogger("fbta.inference")


class InferenceError(RuntimeError):
    """Inference produced nothing (every slide failed), or a slide failed in strict mode."""


def inference_rows(inputs: str | os.PathLike | Sequence[str], class_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Rows to predict from a slide file, a folder of slides, a list of slide paths, or a labelled datalist.

    A datalist's labels are read against ``class_names`` (the model's): a label the model does not know is
    refused (:class:`~monai_fbta.data.datalist.DatalistError`), never mapped to another class.
    """
    if not isinstance(inputs, (list, tuple)) and Path(inputs).suffix.lower() in (".csv", ".json"):
        return load_datalist(inputs, classes=class_names)
    return _slide_rows(inputs)


def _slide_rows(inputs: str | os.PathLike | Sequence[str]) -> list[dict[str, Any]]:
    """``{"slide_id", "image"}`` for a slide file, a folder of slides or a list of slide paths."""
    if isinstance(inputs, (list, tuple)):
        paths = [Path(p) for p in inputs]
    elif Path(inputs).is_dir():
        paths = sorted(p for p in Path(inputs).iterdir() if p.suffix.lower() in SLIDE_EXTENSIONS)
        if not paths:
            raise FileNotFoundError(f"no slides ({', '.join(SLIDE_EXTENSIONS)}) in {inputs}")
    else:
        paths = [Path(inputs)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"slide file(s) not found: {missing}")
    rows = [{"slide_id": safe_name(slide_id_of(p)), "image": str(p.resolve())} for p in paths]
    ids = [r["slide_id"] for r in rows]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise ValueError(f"several input slides share the slide id(s) {dupes}: rename them or use a datalist")
    return rows


def _slide_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` of the slide at level 0."""
    from monai_fbta.data.slide import open_slide

    with open_slide(path) as slide:
        width, height = slide.level_dimensions[0]
    return int(width), int(height)


def predict_slide(
    network: torch.nn.Module, store: str, row: Mapping[str, Any], device: str | torch.device = "cpu",
    heatmaps: Any = None, attention_maps: Any = None,
) -> dict[str, Any]:
    """Predict one slide from its feature store: load coords and features, ``network`` (a
    :class:`~monai_fbta.networks.TranslatedMIL` with ``metadata``), then the writers when given (a
    :class:`~monai_fbta.handlers.heatmap.HeatmapWriter`, an :class:`~monai_fbta.handlers.attention.AttentionWriter`).

    Returns the slide's record (``slide_id``, ``probs``, ``pred``, ``pred_name``, ``num_patches``, written paths).
    """
    names = network.metadata["class_names"]
    sid = slide_id_of(row)
    coords, attrs = read_coords(store)
    features = torch.as_tensor(read_array(store, "features")).to(device)
    with torch.no_grad():
        probs, attention = network(features[None], return_attention=True)  # [1, C], [1, N]
    probs, attention = probs[0].cpu().tolist(), attention[0].cpu().numpy()
    pred = int(max(range(len(probs)), key=probs.__getitem__))
    record = {"slide_id": sid, "image": row["image"], "probs": probs, "pred": pred, "pred_name": names[pred],
              "label": row.get("label"), "num_patches": len(coords)}
    if heatmaps is not None:
        record["heatmap"] = heatmaps.write_one(
            safe_name(sid), row["image"], coords, attention, float(attrs["patch_size_level0"]),
            title=f"{sid}: {names[pred]} (p={probs[pred]:.2f})",
        )
    if attention_maps is not None:
        record["attention_csv"], record["attention_geojson"] = attention_maps.write_one(
            safe_name(sid), coords, attention, float(attrs["patch_size_level0"]), _slide_size(row["image"]))
    return record


def run_inference(
    model_path: str | os.PathLike,
    inputs: str | os.PathLike | Sequence[str],
    output_dir: str | os.PathLike,
    cache_dir: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    heatmaps: bool = True,
    attention_maps: bool = True,
    assume_mpp: float | None = None,
    batch_size: int = 64,
    num_workers: int = 0,
    skip_errors: bool = True,
    strict: bool = False,
    translator_dtype: torch.dtype | str | None = None,
) -> list[dict[str, Any]]:
    """Predict every input slide; returns one record per slide (``slide_id``, ``probs``, ``pred_name``...).

    ``assume_mpp`` (um/px) is the pixel size of slides whose metadata has none (a datalist's ``mpp`` column
    wins). ``heatmaps`` / ``attention_maps``: write the PNG heatmaps / the per-patch attention CSV and GeoJSON.
    ``predictions.csv`` holds the slides that worked; then :class:`InferenceError` is raised when no slide could
    be predicted, or, with ``strict``, when any slide failed (so a script's exit status tells).
    ``translator_dtype``: f_T's autocast dtype (:class:`~monai_fbta.networks.TranslatedMIL`; ``None``: float32).
    """
    network = build_inference_network(model_path, device, translator_dtype=translator_dtype)
    meta = network.metadata
    output_dir = os.fspath(output_dir)
    cache_dir = os.fspath(cache_dir) if cache_dir else inside(output_dir, "cache")
    rows = inference_rows(inputs, meta["class_names"])
    tiling = dict(meta["tiling"], **({} if assume_mpp is None else {"assume_mpp": float(assume_mpp)}))
    encoder = frozen_encoder(meta["encoder_name"], meta["encoder_weights"], os.path.dirname(os.fspath(model_path)))
    report = extract_features(rows, cache_dir, encoder, tiling_kwargs=tiling, batch_size=batch_size,
                              num_workers=num_workers, device=device, skip_errors=skip_errors)
    failed = {r.slide_id: r.error for r in report.failed}
    names = meta["class_names"]
    records, writer, tables = [], None, None
    if heatmaps:
        from monai_fbta.handlers.heatmap import HeatmapWriter

        writer = HeatmapWriter(inside(output_dir, "heatmaps"))
    if attention_maps:
        from monai_fbta.handlers.attention import AttentionWriter

        tables = AttentionWriter(inside(output_dir, "attention"))
    for row in rows:
        sid = slide_id_of(row)
        if sid in failed:
            logger.error("slide %s skipped: %s", sid, failed[sid])
            continue
        record = predict_slide(network, store_path(cache_dir, sid), row, device, writer, tables)
        records.append(record)
        logger.info("%s: %s (p=%.3f)", sid, record["pred_name"], record["probs"][record["pred"]])
    path = write_predictions_csv(inside(output_dir, "predictions.csv"), records, names)
    summary = f"{len(records)} slide(s) predicted -> {path}" + (f"; {len(failed)} failed (see {report.csv_path})" if failed else "")
    print(summary, flush=True)
    if failed and (strict or not records):
        first = next(iter(failed.items()))
        why = "no slide could be predicted" if not records else "strict mode: a slide failed"
        raise InferenceError(f"{why}: {summary}; first failure: {first[0]}: {first[1]}")
    return records

