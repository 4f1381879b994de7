"""TensorBoard logging of the loss terms when ``tensorboard`` is installed (the optional ``tensorboard`` extra)."""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from typing import Any

from ignite.engine import Engine

from monai_fbta._quiet import quiet_import
from monai_fbta.handlers.stats import loss_terms

__all__ = ["OptionalTensorBoard", "tensorboard_available"]

logger = logging.getLogger("fbta.tensorboard")

OFF_NOTE = "TensorBoard logging is off: tensorboard is not installed (pip install 'monai-fbta[tensorboard]' to turn it on)"


def tensorboard_available() -> bool:
    """Whether ``tensorboard`` can be imported."""
    return importlib.util.find_spec("tensorboard") is not None


class OptionalTensorBoard:
    """MONAI's ``TensorBoardStatsHandler`` writing to ``log_dir`` when tensorboard is installed; ``attach(engine)``.

    Without tensorboard, attaching logs one warning line saying so and how to turn it on, and does nothing else.
    Extra keyword arguments go to ``TensorBoardStatsHandler``.
    """

    def __init__(
        self, log_dir: str | os.PathLike, output_transform: Callable[[Any], Any] = loss_terms, **kwargs: Any
    ) -> None:
        self.log_dir = os.fspath(log_dir)
        self.output_transform = output_transform
        self.kwargs = kwargs
        self.handler: Any = None

    def attach(self, engine: Engine) -> None:
        if not tensorboard_available():
            logger.warning(OFF_NOTE)
            return
        handlers_mod = quiet_import("monai.handlers")
        self.handler = handlers_mod.TensorBoardStatsHandler(
            log_dir=self.log_dir, output_transform=self.output_transform, **self.kwargs
        )
        self.handler.attach(engine)
