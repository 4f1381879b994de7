"""TrainingCheckpoint: the training state (``last.pt``, see :mod:`monai_fbta.handlers.checkpoint`) after every epoch,
or (``selected_by``) at each epoch that validation selects (``best.pt``)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
from ignite.engine import Engine, Events

from monai_fbta.handlers.checkpoint import SELECTED_KEY, save_checkpoint, training_objects

__all__ = ["TrainingCheckpoint"]


class TrainingCheckpoint:
    """Save the training state to ``path`` (e.g. ``run/last.pt``) every ``every`` epochs; ``attach(trainer)``.

    ``identity`` (the run's identity, see :func:`monai_fbta.pipeline.resume.run_identity`) is saved with it.
    ``selected_by`` (the validation evaluator, attached after the ``ValidationHandler``): save only at the epochs
    where its key metric reached a new best, i.e. the epoch whose model ``model.pt`` holds, with a
    ``selected_by`` entry ``{"metric", "value", "epoch"}`` (what the translated-head stage reads by default).
    """

    def __init__(
        self, path: str | os.PathLike, objects: Mapping[str, Any] | None = None, every: int = 1,
        identity: Mapping[str, Any] | None = None, selected_by: Engine | None = None,
    ) -> None:
        self.path = Path(path)
        self.objects = objects
        self.every = every
        self.identity = identity
        self.selected_by = selected_by

    def __call__(self, engine: Engine) -> None:
        extra = None
        if self.selected_by is not None:
            state = self.selected_by.state
            if getattr(state, "best_metric_epoch", None) != engine.state.epoch:
                return
            extra = {SELECTED_KEY: {"metric": str(state.key_metric_name), "value": float(state.best_metric),
                                    "epoch": int(engine.state.epoch)}}
        if idist.get_rank() == 0:  # one writer under torchrun; every rank holds the same weights
            save_checkpoint(self.path, self.objects or training_objects(engine), self.identity, extra)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.every), self)
