"""Resume an interrupted training run from its last checkpoint (rerun the same command, lose one epoch at most).

:class:`TrainingCheckpoint` writes ``last.pt`` atomically after every epoch; :class:`ResumeTraining`,
attached to the same trainer, loads it on ``Events.STARTED`` when it exists, so the curriculum t/T,
EMA teachers, optimiser, RNG and epoch counter continue where the killed run stopped. A checkpoint of a
finished run makes the rerun skip training (the configured ``max_epochs`` is kept, so raising
``--num_epochs`` trains the extra epochs).

A run's identity (:func:`~monai_fbta.handlers.checkpoint.run_identity`: the datalist's content, the class names
and the settings that define the model) is saved in ``last.pt`` and ``model.pt``; a checkpoint of another run is
never resumed (:func:`check_resume`), so a bundle folder reused for new data cannot continue, or report, the old model.
One process trains in a checkpoint folder, and writes an output folder, at a time (:func:`hold_run_lock`): a second
launch there, with the same or other settings, stops at once instead of interleaving its checkpoints and reports with
the first run's. An output folder belongs to one run (:func:`check_output_dir`): a run with its own ``--ckpt_dir`` but
another run's ``--output_dir`` is refused, instead of replacing that run's report and resuming its metrics rows.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ignite.distributed as idist
from ignite.engine import Engine, Events

from monai_fbta._io import atomic_open, exclusive_lock
from monai_fbta.handlers.checkpoint import (
    RunMismatchError,
    check_identity,
    checkpoint_identity,
    load_checkpoint,
    load_inference_model,
    plain_value,
    training_objects,
)

__all__ = ["OUTPUT_IDENTITY_FILE", "ResumeTraining", "check_output_dir", "check_resume", "claim_output_dir",
           "hold_run_lock"]

logger = logging.getLogger("fbta.resume")

RESUME_REMEDY = ("use a new --ckpt_dir and a new --output_dir for this run, or --resume False to start over here "
                 "(replacing the old run's files)")
OUTPUT_IDENTITY_FILE = "run_identity.json"
RUN_LOCK = ".training.lock"

_held: dict[str, contextlib.ExitStack] = {}  # checkpoint and output folders this process trains in, locked until it exits


def hold_run_lock(ckpt_dir: str | os.PathLike, output_dir: str | os.PathLike | None = None) -> bool:
    """Lock ``ckpt_dir`` and ``output_dir`` (a ``.training.lock`` in each) for the rest of this process; run it
    before any long work.

    Two trainings in one checkpoint folder would interleave their checkpoints; two with their own checkpoint folders
    but one ``output_dir`` would interleave ``train_metrics.csv`` and the test report. Raises
    :class:`~monai_fbta._io.LockHeld`, naming the folder and the holder's host and pid, when another live process
    trains in either. The kernel frees the locks when the holder exits, killed or not. Returns ``True`` (a config
    expression).
    """
    for folder, what in ((ckpt_dir, "the training run in {}"), (output_dir, "the output folder {} of a training run")):
        if folder is None:
            continue
        key = os.path.realpath(folder)
        if key not in _held:
            stack = contextlib.ExitStack()
            stack.enter_context(exclusive_lock(Path(key) / RUN_LOCK, what.format(folder)))
            _held[key] = stack
    return True


def check_resume(path: str | os.PathLike, identity: Mapping[str, Any], enabled: bool = True) -> bool:
    """Refuse (:class:`RunMismatchError`) to resume ``path`` when it was saved by another run; run before any long work.

    Returns whether there is a checkpoint to resume.
    """
    if not enabled or not os.path.isfile(path):
        return False
    check_identity(checkpoint_identity(path), identity, f"{path} is the checkpoint of another run", RESUME_REMEDY)
    return True


def check_output_dir(output_dir: str | os.PathLike, identity: Mapping[str, Any], enabled: bool = True) -> bool:
    """Refuse (:class:`RunMismatchError`) to write into ``output_dir`` when its :data:`OUTPUT_IDENTITY_FILE` names
    another run; run before any long work. :func:`claim_output_dir` writes that file when the run starts training.

    Two runs with their own checkpoint folders but one output folder would replace each other's test report, and a
    resumed run would keep the other run's ``train_metrics.csv`` rows as its own. ``enabled=False`` (``--resume
    False``, start over) checks nothing. A folder without the file (no run, or outputs of an older version) is
    accepted. Returns ``True`` (a config expression).
    """
    marker = Path(output_dir) / OUTPUT_IDENTITY_FILE
    if not enabled or not marker.is_file():
        return True
    try:
        saved = json.loads(marker.read_text())
    except (OSError, ValueError):
        saved = None
    check_identity(saved, _as_json(identity), f"--output_dir {os.fspath(output_dir)} holds the outputs of another run",
                   RESUME_REMEDY)
    return True


def claim_output_dir(output_dir: str | os.PathLike, identity: Mapping[str, Any]) -> bool:
    """Record ``identity`` as the run whose outputs ``output_dir`` holds (:data:`OUTPUT_IDENTITY_FILE`, written
    atomically by rank 0), once the run is about to train: a run refused before that claims nothing."""
    if idist.get_rank() == 0:
        marker = Path(output_dir) / OUTPUT_IDENTITY_FILE
        marker.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(marker, "w") as f:
            json.dump(_as_json(identity), f, indent=1)
    return True


def _as_json(identity: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(plain_value(dict(identity))))


class ResumeTraining:
    """On ``Events.STARTED``: load ``path`` (written by :class:`TrainingCheckpoint`) into the trainer when present.

    Args:
        path: the training checkpoint, e.g. ``models/last.pt``.
        enabled: ``False`` starts from scratch (an existing checkpoint is then overwritten after epoch 1).
        objects: what to restore; default :func:`training_objects` of the trainer (same as the saver).
        evaluator / best_model: the validation engine and the ``model.pt`` its :class:`BestModelSaver` writes;
            when both are given, the evaluator's best metric is restored from ``model.pt``'s metadata, so a
            resumed run only replaces ``model.pt`` with a better model than the one saved before the kill.
        identity: this run's :func:`~monai_fbta.handlers.checkpoint.run_identity`; a checkpoint saved by another run is refused
            (:class:`RunMismatchError`, saying what differs), never resumed.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        enabled: bool = True,
        objects: dict[str, Any] | None = None,
        evaluator: Engine | None = None,
        best_model: str | os.PathLike | None = None,
        identity: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self.identity = identity
        self.enabled = bool(enabled)
        self.objects = objects
        self.evaluator = evaluator
        self.best_model = None if best_model is None else Path(best_model)
        self.resumed_epoch: int | None = None

    def _restore_best_metric(self) -> None:
        if self.evaluator is None or self.best_model is None or not self.best_model.is_file():
            return
        meta = load_inference_model(self.best_model)["metadata"]
        if self.identity is not None and meta.get("run_identity") != plain_value(self.identity):
            logger.warning("%s is not this run's model: its validation metric is not restored", self.best_model)
            return
        saved, ours = meta.get("key_metric"), getattr(self.evaluator.state, "key_metric_name", None)
        if saved is not None and ours is not None and saved != ours:
            raise RunMismatchError(
                f"{self.best_model} was selected by {saved} and this run selects by {ours}: a resumed run would compare "
                f"{ours} values with the saved best {saved} and keep the wrong model. Resume with the run's own "
                "--key_metric, or use a new --ckpt_dir (or --resume False to start over here)")
        if "best_metric" in meta and "epoch" in meta:
            self.evaluator.state.best_metric = float(meta["best_metric"])
            self.evaluator.state.best_metric_epoch = int(meta["epoch"])

    def __call__(self, engine: Engine) -> None:
        if not self.enabled or not self.path.is_file():
            return
        max_epochs = engine.state.max_epochs
        if self.identity is not None:
            check_resume(self.path, self.identity)
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
