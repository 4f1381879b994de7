"""The slide predictions CSV: ``write_predictions_csv`` and the :class:`PredictionsCSV` handler.

One row per slide: ``slide_id, prob_<class>..., pred, pred_name[, label]``, written atomically (a temp file, then
rename), so a reader never sees half a file.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from monai_fbta._io import atomic_open

__all__ = ["write_predictions_csv", "PredictionsCSV"]

logger = logging.getLogger("fbta.inference")


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


class PredictionsCSV:
    """Writes ``path`` (:func:`write_predictions_csv`) with every slide of an epoch, at ``EPOCH_COMPLETED``.

    ``attach(engine)``: at each ``ITERATION_COMPLETED`` the engine output's ``slide_id``, ``probs [C]`` and
    ``label`` (``None`` or ``< 0``: none) are kept and the prediction is logged; ``class_names`` default to the
    engine's ``class_names`` (:class:`~monai_fbta.engines.inference.FBTAInferenceEvaluator`'s, from ``model.pt``).
    """

    def __init__(self, path: str | os.PathLike, class_names: Sequence[str] | None = None) -> None:
        self.path = os.fspath(path)
        self.class_names = list(class_names) if class_names else None
        self.records: list[dict[str, Any]] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        if self.class_names is None:
            self.class_names = list(engine.class_names)
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _reset(self, engine) -> None:
        self.records = []

    def _collect(self, engine) -> None:
        out = engine.state.output
        probs = [float(p) for p in np.asarray(out["probs"], dtype=np.float64).ravel()]
        label = out.get("label")
        record = {"slide_id": out["slide_id"], "probs": probs, "label": None if label is None or int(label) < 0 else int(label)}
        self.records.append(record)
        pred = int(np.argmax(probs))
        logger.info("%s: %s (p=%.3f)", out["slide_id"], self.class_names[pred], probs[pred])

    def __call__(self, engine) -> None:
        write_predictions_csv(self.path, self.records, self.class_names)
        print(f"{len(self.records)} slide(s) predicted -> {self.path}", flush=True)
