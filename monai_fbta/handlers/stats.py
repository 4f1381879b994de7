"""Logging of every loss term: MONAI ``StatsHandler``, optional TensorBoard, tqdm progress bar."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping

from ignite.handlers import ProgressBar
from ignite.engine import Engine

from monai_fbta._quiet import quiet_import

__all__ = ["LOSS_TERMS", "loss_terms", "LossProgressBar", "training_log_handlers"]

LOSS_TERMS = ("loss", "cls", "cons", "dist")


def loss_terms(output: Mapping) -> dict[str, float]:
    """The scalar loss terms of an :class:`FBTATrainer` iteration output."""
    return {k: float(output[k]) for k in LOSS_TERMS if k in output}


class LossProgressBar(ProgressBar):
    """tqdm progress bar showing the loss terms; ``attach(engine)`` like MONAI handlers."""

    def attach(self, engine: Engine, metric_names=None, output_transform=loss_terms, **kwargs) -> None:  # type: ignore[override]
        super().attach(engine, metric_names=metric_names, output_transform=output_transform, **kwargs)


def training_log_handlers(
    name: str = "fbta.train", log_dir: str | None = None, progress: bool = True, iteration_log: bool | int = True
) -> list:
    """Handlers logging every loss term each iteration (and epoch metrics).

    A ``TensorBoardStatsHandler`` is added when ``log_dir`` is given and tensorboard is importable.
    """
    handlers_mod = quiet_import("monai.handlers")
    handlers: list = [
        handlers_mod.StatsHandler(name=name, iteration_log=iteration_log, output_transform=loss_terms, tag_name="train")
    ]
    if log_dir is not None and importlib.util.find_spec("tensorboard") is not None:
        handlers.append(handlers_mod.TensorBoardStatsHandler(log_dir=log_dir, output_transform=loss_terms))
    if progress:
        handlers.append(LossProgressBar(persist=False))
    return handlers
