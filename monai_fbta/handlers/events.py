"""Custom Ignite events fired by :class:`monai_fbta.engines.FBTATrainer`."""

from __future__ import annotations

from ignite.engine import EventEnum

__all__ = ["FBTAEvents", "OPTIMIZER_STEP_ATTR"]

#: ``engine.state`` attribute counting optimiser steps (saved in the trainer's ``state_dict``).
OPTIMIZER_STEP_ATTR = "optimizer_step"


class FBTAEvents(EventEnum):
    """``OPTIMIZER_STEP_COMPLETED`` fires right after each optimiser step.

    With gradient accumulation over ``A`` slides this is every ``A`` iterations (and at the end of an
    epoch whose length is not a multiple of ``A``), which is when the EMA teachers must move.
    """

    OPTIMIZER_STEP_COMPLETED = "optimizer_step_completed"
