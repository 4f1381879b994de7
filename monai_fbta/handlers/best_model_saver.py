"""BestModelSaver: ``model.pt`` (see :mod:`monai_fbta.handlers.checkpoint`) at each new best validation metric."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
import torch.nn as nn
from ignite.engine import Engine, Events

from monai_fbta.handlers.checkpoint import save_inference_model

__all__ = ["BestModelSaver"]


class BestModelSaver:
    """On an evaluator: write ``model.pt`` whenever its key metric reached a new best; ``attach(evaluator)``."""

    def __init__(
        self,
        path: str | os.PathLike,
        mil_head: nn.Module,
        translator: nn.Module | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self.mil_head, self.translator, self.metadata = mil_head, translator, dict(metadata or {})

    def __call__(self, engine: Engine) -> None:
        if idist.get_rank() == 0 and engine.state.best_metric_epoch == engine.state.epoch:
            meta = {**self.metadata, "key_metric": engine.state.key_metric_name}
            meta.update(best_metric=float(engine.state.best_metric), epoch=int(engine.state.epoch))
            save_inference_model(self.path, self.mil_head, self.translator, meta)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)
