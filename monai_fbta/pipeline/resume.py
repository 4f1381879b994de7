"""Resume an interrupted training run from its last checkpoint (rerun the same command, lose one epoch at most).

:class:`TrainingCheckpoint` writes ``last.pt`` atomically after every epoch; :class:`ResumeTraining`,
attached to the same trainer, loads it on ``Events.STARTED`` when it exists, so the curriculum t/T,
EMA teachers, optimiser, RNG and epoch counter continue where the killed run stopped. A checkpoint of a
finished run makes the rerun skip training (the configured ``max_epochs`` is kept, so raising
``--num_epochs`` trains the extra epochs).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events

from monai_fbta.engines.checkpoint import load_checkpoint, load_inference_model, training_objects

__all__ = ["ResumeTraining"]

logger = logging.getLogger("fbta.resume")


class ResumeTraining:
    """On ``Events.STARTED``: load ``path`` (written by :class:`TrainingCheckpoint`) into the trainer when present.

    Args:
        path: the training checkpoint, e.g. ``models/last.pt``.
        enabled: ``False`` starts from scratch (an existing checkpoint is then overwritten after epoch 1).
        objects: what to restore; default :func:`training_objects` of the trainer (same as the saver).
        evaluator / best_model: the validation engine and the ``model.pt`` its :class:`BestModelSaver` writes;
            when both are given, the evaluator's best metric is restored from ``model.pt``'s metadata, so a
            resumed run only replaces ``model.pt`` with a better model than the one saved before the kill.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        enabled: bool = True,
        objects: dict[str, Any] | None = None,
        evaluator: Engine | None = None,
        best_model: str | os.PathLike | None = None,
    ) -> None:
        self.path = Path(path)
        self.enabled = bool(enabled)
        self.objects = objects
        self.evaluator = evaluator
        self.best_model = None if best_model is None else Path(best_model)
        self.resumed_epoch: int | None = None

    def _restore_best_metric(self) -> None:
        if self.evaluator is None or self.best_model is None or not self.best_model.is_file():
            return
        meta = load_inference_model(self.best_model)["metadata"]
        if "best_metric" in meta and "epoch" in meta:
            self.evaluator.state.best_metric = float(meta["best_metric"])
            self.evaluator.state.best_metric_epoch = int(meta["epoch"])

    def __call__(self, engine: Engine) -> None:
        if not self.enabled or not self.path.is_file():
            return
        max_epochs = engine.state.max_epochs
        load_checkpoint(self.path, self.objects or training_objects(engine))
        engine.state.max_epochs = max_epochs  # the command line wins over the saved value
        self.resumed_epoch = int(engine.state.epoch)
        self._restore_best_metric()
        if self.resumed_epoch >= max_epochs:
            msg = f"{self.path} is from a finished run ({self.resumed_epoch}/{max_epochs} epochs): nothing left to train"
        else:
            msg = f"resuming from epoch {self.resumed_epoch} of {max_epochs} ({self.path})"
        logger.warning(msg)
        print(msg, flush=True)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)
