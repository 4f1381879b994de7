"""EMA teachers (f*_MIL of the MIL head, f*_TFE of the trainable extractor) on ignite's ``EMAHandler``.

Update after optimiser step ``s`` (1-based; ignite's convention, ``lambda`` is the weight of the student)::

    theta_ema <- (1 - lambda_s) * theta_ema + lambda_s * theta_student

``lambda_s`` is ``momentum``, or during warm-up ``momentum_warmup + (momentum - momentum_warmup) * (s - 1) /
(warmup_steps - 1)`` (ignite's ``EMAWarmUp``). ``s`` is read from ``engine.state.optimizer_step``, which the
trainer saves in its ``state_dict``, so a resumed run continues the warm-up where it stopped.
"""

from __future__ import annotations

import torch.nn as nn
from ignite.engine import Engine
from ignite.handlers import EMAHandler
from ignite.handlers.ema_handler import EMAWarmUp

from monai_fbta.handlers.events import OPTIMIZER_STEP_ATTR, FBTAEvents

__all__ = ["ModelEMA"]


class ModelEMA(EMAHandler):
    """EMA copy (``.ema_model``, in eval mode) of ``model`` updated after every optimiser step.

    Args:
        model: the student module.
        momentum: weight of the student in each update after warm-up (``0.001`` = decay 0.999; ``1``: the
            teacher is a copy of the student, i.e. no EMA).
        momentum_warmup: weight at the first optimiser step (``None``: no warm-up).
        warmup_steps: optimiser steps over which the weight goes linearly from ``momentum_warmup`` to ``momentum``.
        handle_buffers: ignite's option: ``"copy"`` (default), ``"update"`` or ``"ema_train"``.
        name: ``engine.state`` attribute holding the current momentum (unique per handler).
    """

    def __init__(
        self,
        model: nn.Module,
        momentum: float = 0.001,
        momentum_warmup: float | None = None,
        warmup_steps: int | None = None,
        handle_buffers: str = "copy",
        name: str = "ema_momentum",
    ) -> None:
        if (momentum_warmup is None) != (warmup_steps is None):
            raise ValueError("ModelEMA: give both momentum_warmup and warmup_steps, or neither")
        if momentum_warmup is not None and not 0 < momentum_warmup <= 1:
            raise ValueError(f"ModelEMA: momentum_warmup must be in (0, 1], got {momentum_warmup}")
        if not 0 < momentum <= 1:
            raise ValueError(f"ModelEMA: momentum must be in (0, 1], got {momentum}")
        # ignite refuses momentum 1; here it means "the teacher is a copy of the student after each step"
        super().__init__(model, momentum=min(momentum, 0.5), handle_buffers=handle_buffers)
        self.momentum = float(momentum)
        self._warmup = None if warmup_steps is None else EMAWarmUp(momentum_warmup, int(warmup_steps), momentum)
        self.name = name

    def momentum_at(self, step: int) -> float:
        """Momentum used for the update after optimiser step ``step`` (1-based)."""
        return self.momentum if self._warmup is None else float(self._warmup(step))

    def _update_ema_model(self, engine: Engine, name: str) -> None:
        """ignite's update; in ``"copy"`` mode the buffers are then copied by value, not aliased.

        ignite makes the EMA buffers share the student's tensors, so the teacher would see the student's
        BatchNorm statistics change mid-iteration, and a resumed run (whose loaded buffers are not aliased)
        would differ from an uninterrupted one.
        """
        super()._update_ema_model(engine, name)
        if self.handle_buffers == "copy":
            for buffer in self.ema_model.buffers():
                buffer.data = buffer.data.clone()

    def update(self, engine: Engine) -> None:
        """Move the EMA weights one step toward the student (called on ``OPTIMIZER_STEP_COMPLETED``)."""
        step = getattr(engine.state, OPTIMIZER_STEP_ATTR, engine.state.iteration)
        setattr(engine.state, self.name, self.momentum_at(step))
        self._update_ema_model(engine, self.name)

    def attach(self, engine: Engine, event=FBTAEvents.OPTIMIZER_STEP_COMPLETED) -> None:  # type: ignore[override]
        """Update on ``event`` (default: after each optimiser step of an :class:`FBTATrainer`)."""
        if not hasattr(engine.state, self.name):
            setattr(engine.state, self.name, self.momentum_at(1))
        engine.add_event_handler(event, self.update)
