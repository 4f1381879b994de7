"""tqdm progress bar of the loss terms that stays quiet in a redirected log."""

from __future__ import annotations

import sys
from typing import Any

from ignite.engine import Engine
from ignite.handlers import ProgressBar

from monai_fbta.handlers.stats import loss_terms

__all__ = ["LossProgressBar"]


class LossProgressBar(ProgressBar):
    """tqdm progress bar showing the loss terms; ``attach(engine)`` like MONAI handlers.

    When stderr is not a terminal (output redirected to a file or a pipe) the bar is disabled, so a log
    file is not flooded with carriage-return updates; the ``StatsHandler`` epoch lines still report progress.
    ``tqdm_kwargs`` (e.g. ``disable=False``) override that.
    """

    def __init__(self, persist: bool = False, **tqdm_kwargs: Any) -> None:
        isatty = getattr(sys.stderr, "isatty", None)
        tqdm_kwargs.setdefault("disable", not (isatty is not None and isatty()))
        super().__init__(persist=persist, **tqdm_kwargs)

    def attach(self, engine: Engine, metric_names=None, output_transform=loss_terms, **kwargs) -> None:  # type: ignore[override]
        super().attach(engine, metric_names=metric_names, output_transform=output_transform, **kwargs)
