"""Training curves (loss terms and validation metrics per epoch) as a PNG at the end of training."""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import ignite.distributed as idist
from ignite.engine import Engine, Events

from monai_fbta._io import atomic_open
from monai_fbta.handlers.stats import LOSS_TERMS

__all__ = ["TrainingCurves", "plot_training_curves"]

logger = logging.getLogger("fbta.curves")


def plot_training_curves(csv_path: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Plot the CSV of :class:`~monai_fbta.handlers.EpochMetricsCSV` to ``path`` (PNG, written atomically).

    Left: the loss terms per epoch; middle: the validation metrics (``val_*`` columns; vanilla path dashed);
    right, when the CSV has it: the extractor's scale ``e2e_scale`` on a log axis (1 = the frozen features'; see
    :class:`~monai_fbta.handlers.ExtractorDriftWarning`). Uses matplotlib's Agg canvas directly (no display, no
    global backend change).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{csv_path} holds no epoch: nothing to plot")
    epochs = [int(r["epoch"]) for r in rows]

    def series(key: str) -> list[float]:
        return [float(r[key]) if r.get(key) not in (None, "") else float("nan") for r in rows]

    drift = "e2e_scale" in rows[0]
    fig = Figure(figsize=(15 if drift else 11, 4), layout="constrained")
    FigureCanvasAgg(fig)
    losses, metrics, *scale = fig.subplots(1, 3 if drift else 2, width_ratios=[3, 3, 2] if drift else None)
    for key in [k for k in LOSS_TERMS if k in rows[0]]:
        losses.plot(epochs, series(key), marker=".", label=key)
    for key in [k for k in rows[0] if k.startswith("cls_")]:  # each view's cross-entropy
        losses.plot(epochs, series(key), linestyle=":", label=key)
    losses.set(xlabel="epoch", ylabel="mean over the epoch", title="training losses (per view dotted)")
    val_keys = [k for k in rows[0] if k.startswith("val_")]
    for key in val_keys:
        metrics.plot(epochs, series(key), marker=".", label=key, linestyle="--" if key.endswith("_vanilla") else "-")
    metrics.set(xlabel="epoch", title="validation (translated path; vanilla dashed)")
    if drift:
        scale[0].plot(epochs, series("e2e_scale"), marker=".", label="e2e_scale")
        scale[0].axhline(1.0, color="grey", linewidth=0.8)
        scale[0].set(xlabel="epoch", yscale="log", title="f_TFE / f_FFE feature scale (1: frozen)")
    for ax in (losses, metrics, *scale):
        if ax.lines:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    return Path(path)


class TrainingCurves:
    """At the end of training, plot ``csv_path`` (written by :class:`EpochMetricsCSV`) to ``path``; ``attach(trainer)``.

    Attach after the ``EpochMetricsCSV`` it reads. Rank 0 only under ``torchrun``.
    """

    def __init__(self, csv_path: str | os.PathLike, path: str | os.PathLike) -> None:
        self.csv_path = Path(csv_path)
        self.path = Path(path)

    def __call__(self, engine: Engine) -> None:
        if idist.get_rank() != 0:
            return
        if not self.csv_path.is_file():
            logger.warning("no training curves: %s was not written (no epoch was trained in this run)", self.csv_path)
            return
        plot_training_curves(self.csv_path, self.path)
        logger.info("training curves written to %s", self.path)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)
