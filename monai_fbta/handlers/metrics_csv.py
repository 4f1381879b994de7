"""Per-epoch training metrics as CSV: mean of every loss term and the validation metrics of both paths."""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
from ignite.engine import Engine, Events

from monai_fbta._io import atomic_open
from monai_fbta.handlers.stats import loss_terms

__all__ = ["EpochMetricsCSV"]

logger = logging.getLogger("fbta.metrics")


class EpochMetricsCSV:
    """Write one CSV row per training epoch to ``path``; ``attach(trainer)`` after the ``ValidationHandler``.

    Columns: ``epoch``, the epoch mean of every loss term of the trainer's output (``loss``, ``cls``, ``cons``,
    ``dist``), the curriculum weight t/T, then the evaluator's metrics of that epoch (``val_auc``,
    ``val_auc_vanilla``, ... : the translated and the vanilla path). The file is rewritten atomically after
    every epoch, and a one-line summary is logged (``fbta.metrics``); a resumed run keeps the rows of the
    epochs it resumes after. Under ``torchrun`` rank 0 writes, with the loss means of its own slides.

    Args:
        path: the CSV file, e.g. ``eval/train_metrics.csv``.
        evaluator: the validation engine whose ``state.metrics`` are added (``None``: losses only).
        output_transform: trainer output -> ``{term: float}``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        evaluator: Engine | None = None,
        output_transform: Callable[[Any], Mapping[str, float]] = loss_terms,
    ) -> None:
        self.path = Path(path)
        self.evaluator = evaluator
        self.output_transform = output_transform
        self.rows: list[dict[str, Any]] = []
        self._sums: dict[str, float] = {}
        self._count = 0

    def _read_rows(self, up_to_epoch: int) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        with open(self.path, newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or reader.fieldnames[0] != "epoch":
                raise ValueError(f"{self.path} exists and is not a metrics file written by EpochMetricsCSV "
                                 "(no 'epoch' column first): move it away or choose another --output_dir")
            return [row for row in reader if int(row["epoch"]) <= up_to_epoch]

    def started(self, engine: Engine) -> None:
        """Keep the rows of the epochs already trained (a resumed run), drop later ones."""
        self.rows = self._read_rows(int(engine.state.epoch))

    def epoch_started(self, engine: Engine) -> None:
        self._sums, self._count = {}, 0

    def iteration_completed(self, engine: Engine) -> None:
        for key, value in self.output_transform(engine.state.output).items():
            self._sums[key] = self._sums.get(key, 0.0) + float(value)
        self._count += 1

    def epoch_completed(self, engine: Engine) -> None:
        row: dict[str, Any] = {"epoch": int(engine.state.epoch)}
        row.update({k: v / max(1, self._count) for k, v in self._sums.items()})
        if hasattr(engine.state, "curriculum"):
            row["curriculum"] = float(engine.state.curriculum)
        if self.evaluator is not None and self.evaluator.state.epoch == engine.state.epoch:
            row.update({k: float(v) for k, v in self.evaluator.state.metrics.items()})
        self.rows.append(row)
        if idist.get_rank() == 0:
            self.write()
            summary = " ".join(f"{k}={v:.4f}" for k, v in row.items() if isinstance(v, float))
            logger.info("epoch %d/%d: %s", row["epoch"], engine.state.max_epochs, summary)

    def write(self) -> Path:
        """Write every row (columns: the union, in order of appearance) atomically."""
        columns: list[str] = []
        for row in self.rows:
            columns += [k for k in row if k not in columns]
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
        with atomic_open(self.path, "w", newline="") as f:
            f.write(text.getvalue())
        return self.path

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
