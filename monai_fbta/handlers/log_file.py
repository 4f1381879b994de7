"""Copy of the training log in a file of the output folder."""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import ignite.distributed as idist
from ignite.engine import Engine, Events

__all__ = ["LogFile"]

LOG_FORMAT = "%(asctime)s - %(name)s - %(levelname)s - %(message)s"


class LogFile:
    """Append every log record (MONAI, ignite, monai-fbta) to ``path`` while the engine runs; ``attach(engine)``.

    Under torchrun only rank 0 writes (the other ranks' records stay on their consoles). The file handler is added
    to the root logger when attached (records reach it at their loggers' levels, as
    configured by the bundle's ``logging.conf``), and to the ``loggers`` that do not propagate to the root
    (MONAI's ``StatsHandler`` loggers) and removed when the run completes (a run that
    fails keeps it until the process exits, so the error's log lines are in the file too). The file is opened
    for appending: an existing log is never overwritten, each run starts with a dated header line.

    Args:
        path: the log file, e.g. ``eval/train.log``; its folder is created.
        level: lowest level written.
        fmt: ``logging.Formatter`` format (that of the bundle's ``logging.conf``).
        loggers: names of non-propagating loggers to copy too (the bundle's ``StatsHandler`` names).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        level: int | str = logging.INFO,
        fmt: str = LOG_FORMAT,
        loggers: Sequence[str] = ("fbta.train", "fbta.val"),
    ) -> None:
        self.path = Path(path)
        self.level = level
        self.fmt = fmt
        self.loggers = list(loggers)
        self.handler: logging.FileHandler | None = None

    def _targets(self) -> list[logging.Logger]:
        named = [logging.getLogger(n) for n in self.loggers]
        return [logging.getLogger()] + [lg for lg in named if not lg.propagate]

    def open(self) -> None:
        """Start writing (idempotent; under torchrun on rank 0 only, so each record is written once)."""
        if self.handler is not None or idist.get_rank() != 0:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(self.path, mode="a", encoding="utf-8")
        self.handler.setLevel(self.level)
        self.handler.setFormatter(logging.Formatter(self.fmt))
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"===== run started {datetime.datetime.now().isoformat(timespec='seconds')} =====\n")
        for target in self._targets():
            target.addHandler(self.handler)

    def close(self, engine: Engine | None = None) -> None:
        """Stop writing and close the file."""
        if self.handler is not None:
            for target in self._targets():
                target.removeHandler(self.handler)
            self.handler.close()
            self.handler = None

    def attach(self, engine: Engine) -> None:
        self.open()
        engine.add_event_handler(Events.COMPLETED, self.close)
