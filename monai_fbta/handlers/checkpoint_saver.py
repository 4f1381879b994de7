"""TrainingCheckpoint: the training state (``last.pt``, see :mod:`monai_fbta.handlers.checkpoint`) after every epoch."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
from ignite.engine import Engine, Events

from monai_fbta.handlers.checkpoint import save_checkpoint, training_objects

__all__ = ["TrainingCheckpoint"]


class TrainingCheckpoint:
    """Save the training state to ``path`` (e.g. ``run/last.pt``) every ``every`` epochs; ``attach(trainer)``.

    ``identity`` (the run's identity, see :func:`monai_fbta.pipeline.resume.run_identity`) is saved with it.

    Attach it after the ``ValidationHandler`` and :class:`~monai_fbta.handlers.EpochMetricsCSV`, as the bundle does:
    the checkpoint then marks an epoch finished with its validation. Validation draws from torch's global RNG (its
    DataLoader's base seed), so only then is the saved RNG state the one the next epoch starts from, and a resumed
    run equals the uninterrupted one; a run killed during validation trains that epoch again instead of skipping
    its validation.
    """

    def __init__(
        self, path: str | os.PathLike, objects: Mapping[str, Any] | None = None, every: int = 1,
        identity: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self.objects = objects
        self.every = every
        self.identity = identity

    def __call__(self, engine: Engine) -> None:
        if idist.get_rank() == 0:  # one writer under torchrun; every rank holds the same weights
            save_checkpoint(self.path, self.objects or training_objects(engine), self.identity)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.every), self)
