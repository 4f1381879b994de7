"""Slide-level inference with a trained bundle: ``y = f*_MIL(f_T(F^FB))`` plus attention maps, as an evaluator.

No patch is pushed through the trainable extractor: the frozen features of every tissue patch are read from the
cache (or extracted once, with the frozen encoder named in ``model.pt``), translated by f_T and classified by the EMA
teacher head, all by :class:`~monai_fbta.networks.TranslatedMIL` (the one predictor). ``inference.json`` declares
the pieces by ``_target_`` and runs ``validate_settings``, ``preprocess.run()``, ``evaluator.run()``,
``preprocess.finish()``:

* :class:`InferencePreprocessor` (``preprocess``): the rows to predict (:func:`inference_rows`), their features
  extracted into ``cache_dir`` (cached, resumable); failing slides are skipped and named;
* a ``monai.data.Dataset`` of the rows that worked with ``LoadStored(keys=["coords", "features"])``, a
  ``DataLoader(batch_size=None)``;
* :class:`~monai_fbta.engines.inference.FBTAInferenceEvaluator` with handlers that write, inside ``output_dir``:
  ``predictions.csv`` (:class:`~monai_fbta.handlers.predictions.PredictionsCSV`: slide id, one probability per
  class, predicted index and class name), ``heatmaps/<slide_id>_heatmap.png``
  (:class:`~monai_fbta.handlers.heatmap.HeatmapWriter`), ``attention/<slide_id>_attention.csv`` and ``.geojson``
  (:class:`~monai_fbta.handlers.attention.AttentionWriter`: per-patch attention with level-0 coordinates, the
  GeoJSON importable into QuPath); ``cache/`` holds the feature stores and ``extraction_report.csv``.

:func:`run_inference` builds the same pieces for Python callers; :func:`inference_evaluator` the dataset, loader and
evaluator alone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from monai_fbta._quiet import quiet_import
from monai_fbta.data.datalist import load_datalist
from monai_fbta.data.extraction import encoder_fingerprint, extract_features
from monai_fbta.data.store import slide_id_of
from monai_fbta.engines.inference import FBTAInferenceEvaluator
from monai_fbta.handlers.attention import AttentionWriter
from monai_fbta.handlers.checkpoint import build_inference_network
from monai_fbta.handlers.heatmap import HeatmapWriter
from monai_fbta.handlers.predictions import PredictionsCSV
from monai_fbta.pipeline.paths import inside, safe_name
from monai_fbta.pipeline.prepare import SLIDE_EXTENSIONS, model_frozen_encoder
from monai_fbta.transforms.store import LoadStored

quiet_import("monai")
from monai.data import Dataset  # noqa: E402
from monai.transforms import Compose  # noqa: E402

__all__ = ["InferenceError", "InferenceInputError", "InferencePreprocessor", "MissingInputError", "inference_rows",
           "inference_evaluator", "run_inference"]

logger = logging.getLogger("fbta.inference")


class InferenceError(RuntimeError):
    """Inference produced nothing (every slide failed), or a slide failed in strict mode."""


class InferenceInputError(ValueError):
    """The slides to predict cannot be taken as given: none in a folder, missing files, two with one slide id."""


class MissingInputError(InferenceInputError, FileNotFoundError):
    """An input slide file or folder does not exist, or a folder holds no slides."""


def inference_rows(inputs: str | os.PathLike | Sequence[str], class_names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Rows to predict from a slide file, a folder of slides, a list of slide paths, or a labelled datalist.

    A datalist's labels are read against ``class_names`` (the model's): a label the model does not know is
    refused (:class:`~monai_fbta.data.datalist.DatalistError`), never mapped to another class.
    """
    if not isinstance(inputs, (list, tuple)) and Path(inputs).suffix.lower() in (".csv", ".json"):
        return load_datalist(inputs, classes=class_names)
    return _slide_rows(inputs)


_NOT_IMAGES = (".csv", ".json", ".txt", ".md", ".log", ".yaml", ".yml")  # a folder's tables and notes: not worth a word


def _slide_rows(inputs: str | os.PathLike | Sequence[str]) -> list[dict[str, Any]]:
    """``{"slide_id", "image"}`` for a slide file, a folder of slides or a list of slide paths."""
    if isinstance(inputs, (list, tuple)):
        paths = [Path(p) for p in inputs]
    elif Path(inputs).is_dir():
        entries = sorted(Path(inputs).iterdir())
        paths = [p for p in entries if p.suffix.lower() in SLIDE_EXTENSIONS]
        if not paths:
            raise MissingInputError(f"no slides ({', '.join(SLIDE_EXTENSIONS)}) in {inputs}")
        others = [p.name + ("/" if p.is_dir() else "") for p in entries if p not in paths and not p.name.startswith(".")
                  and p.suffix.lower() not in _NOT_IMAGES]
        if others:
            logger.warning("%s: %d entr%s not read (not %s; subfolders are not searched): %s", inputs, len(others),
                           "y is" if len(others) == 1 else "ies are", "/".join(SLIDE_EXTENSIONS), ", ".join(others[:10]))
    else:
        paths = [Path(inputs)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise MissingInputError(f"slide file(s) not found: {missing}")
    rows = [{"slide_id": safe_name(slide_id_of(p)), "image": str(p.resolve())} for p in paths]
    ids = [r["slide_id"] for r in rows]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise InferenceInputError(f"several input slides share the slide id(s) {dupes}: predictions, heatmaps and "
                                  "cached features are named by it; rename them or list them in a datalist with "
                                  "distinct slide_id values")
    return rows


class InferencePreprocessor:
    """Bundle inference's preprocessing (``preprocess`` in ``inference.json``): the slides to predict and their
    cached frozen features.

    Building it does nothing; :attr:`rows` reads the inputs (cheap, no slide is read); :meth:`run` tiles and
    extracts every slide into ``cache_dir`` (:func:`~monai_fbta.data.extraction.extract_features`: cached,
    resumable) and skips the slides that fail, naming each; :attr:`data` is then the rows to predict; :meth:`finish`,
    after the evaluator, raises in ``strict`` mode when a slide failed.

    Args:
        inputs: a slide file, a folder of slides, a list of slide paths or a labelled datalist (:func:`inference_rows`).
        cache_dir: folder of the feature stores (and ``extraction_report.csv``).
        encoder: the frozen extractor of ``model.pt`` (:func:`~monai_fbta.pipeline.prepare.frozen_encoder`).
        tiling: the model's tiling settings (``model.pt`` metadata ``tiling``).
        class_names: the model's classes (a datalist's labels are read with them).
        assume_mpp: um/px of slides whose metadata has none (a datalist's ``mpp`` column wins).
        batch_size, num_workers, device: of the extraction.
        fail_fast: stop at the first failing slide (its error is raised) instead of skipping it.
        strict: :meth:`finish` raises :class:`InferenceError` when a slide failed (the others are predicted first).

    :meth:`run` raises :class:`InferenceError` when no slide could be extracted (nothing to predict).
    """

    def __init__(
        self,
        inputs: str | os.PathLike | Sequence[str],
        cache_dir: str | os.PathLike,
        encoder: torch.nn.Module,
        tiling: Mapping[str, Any],
        class_names: Sequence[str] | None = None,
        assume_mpp: float | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        device: str | torch.device | None = None,
        fail_fast: bool = False,
        strict: bool = False,
    ) -> None:
        self.inputs, self.cache_dir, self.encoder = inputs, os.fspath(cache_dir), encoder
        self.tiling = dict(tiling, **({} if assume_mpp is None else {"assume_mpp": float(assume_mpp)}))
        self.class_names = class_names
        self.extract_kwargs = {"batch_size": batch_size, "num_workers": num_workers, "device": device,
                               "skip_errors": not fail_fast}
        self.strict = strict
        self.failed: dict[str, str] = {}
        self.report_path: str | None = None
        self._data: list[dict[str, Any]] | None = None

    @cached_property
    def rows(self) -> list[dict[str, Any]]:
        """The rows to predict (:func:`inference_rows`)."""
        return inference_rows(self.inputs, self.class_names)

    def run(self) -> InferencePreprocessor:
        """Extract every slide's features into ``cache_dir`` (cached); skip and name the slides that failed."""
        report = extract_features(self.rows, self.cache_dir, self.encoder, tiling_kwargs=self.tiling, **self.extract_kwargs)
        self.failed = {r.slide_id: r.error for r in report.failed}
        self.report_path = report.csv_path
        for slide_id, error in self.failed.items():
            logger.error("slide %s skipped: %s", slide_id, error)
        self._data = [row for row in self.rows if slide_id_of(row) not in self.failed]
        if not self._data:
            raise self._error("no slide could be predicted", "0 slide(s) predicted (no predictions.csv written)")
        if self.failed:
            print(f"{len(self.failed)} slide(s) failed and are skipped (see {self.report_path})", flush=True)
        return self

    @property
    def data(self) -> list[dict[str, Any]]:
        """The rows whose features are ready (the dataset's); :meth:`run` must have run."""
        if self._data is None:
            raise RuntimeError("InferencePreprocessor.data: call run() first (inference.json's steps do: '$@preprocess.run()')")
        return self._data

    def finish(self) -> None:
        """After the evaluator: with ``strict``, raise :class:`InferenceError` when a slide failed."""
        if self.strict and self.failed:
            raise self._error("strict mode: a slide failed", f"{len(self.data)} slide(s) predicted")

    def _error(self, why: str, done: str) -> InferenceError:
        slide_id, error = next(iter(self.failed.items()))
        return InferenceError(f"{why}: {done}; {len(self.failed)} failed (see {self.report_path}); "
                              f"first failure: {slide_id}: {error}")


def inference_evaluator(
    network: torch.nn.Module, rows: Sequence[Mapping[str, Any]], cache_dir: str | os.PathLike,
    device: str | torch.device = "cpu", handlers: Sequence[Any] = (), features_of: Mapping[str, Any] | None = None,
) -> FBTAInferenceEvaluator:
    """What ``inference.json`` declares after preprocessing: ``Dataset(rows, Compose([LoadStored(cache_dir,
    keys=["coords", "features"], features_of=...)]))``, ``DataLoader(batch_size=None)`` and the evaluator of
    ``network`` (a :class:`~monai_fbta.networks.TranslatedMIL` taking ``[B, N, D]``) with ``handlers``;
    ``features_of``: the frozen extractor's :func:`~monai_fbta.data.extraction.encoder_fingerprint`."""
    dataset = Dataset(list(rows), Compose([LoadStored(cache_dir, keys=["coords", "features"], features_of=features_of)]))
    loader = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=0)
    return FBTAInferenceEvaluator(device, loader, network, val_handlers=handlers)


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
    """``inference.json`` in Python: predict every input slide; returns one record per predicted slide
    (``slide_id``, ``image``, ``label``, ``probs``, ``pred``, ``pred_name``, ``num_patches``).

    ``assume_mpp`` (um/px) is the pixel size of slides whose metadata has none (a datalist's ``mpp`` column
    wins). ``heatmaps`` / ``attention_maps``: write the PNG heatmaps / the per-patch attention CSV and GeoJSON.
    ``predictions.csv`` holds the slides that worked; :class:`InferenceError` is raised when no slide could be
    predicted, or, with ``strict``, when any slide failed (so a script's exit status tells). ``skip_errors=False``
    stops at the first failing slide. ``translator_dtype``: f_T's autocast dtype
    (:class:`~monai_fbta.networks.TranslatedMIL`; ``None``: float32).
    """
    network = build_inference_network(model_path, device, translator_dtype=translator_dtype)
    meta = network.metadata
    output_dir = os.fspath(output_dir)
    encoder = model_frozen_encoder(meta, os.path.dirname(os.fspath(model_path)))
    preprocess = InferencePreprocessor(
        inputs, cache_dir or inside(output_dir, "cache"), encoder, meta["tiling"], meta["class_names"], assume_mpp,
        batch_size, num_workers, device, fail_fast=not skip_errors, strict=strict,
    ).run()
    handlers = [PredictionsCSV(inside(output_dir, "predictions.csv"))]
    handlers += [HeatmapWriter(inside(output_dir, "heatmaps"))] if heatmaps else []
    handlers += [AttentionWriter(inside(output_dir, "attention"))] if attention_maps else []
    evaluator = inference_evaluator(network, preprocess.data, preprocess.cache_dir, device, handlers,
                                    features_of=encoder_fingerprint(encoder))
    evaluator.run()
    preprocess.finish()
    return evaluator.state.predictions
