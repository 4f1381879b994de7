"""Curriculum weight ``t/T`` of the consistency loss, stored on ``engine.state.curriculum``."""

from __future__ import annotations

from ignite.engine import Engine, Events

__all__ = ["CurriculumWeight"]


class CurriculumWeight:
    """Set ``engine.state.<attr>`` at the start of every epoch.

    ``weight(epoch) = max_weight * min(1, (epoch - 1) / max(1, T - 1))`` with ``epoch`` 1-based and
    ``T = ramp_epochs`` (default: the engine's ``max_epochs``): 0 in the first epoch, 1 in epoch ``T`` and after.
    A one-epoch run therefore has weight 0. The value is recomputed from the epoch, so resuming continues it.
    """

    def __init__(self, ramp_epochs: int | None = None, max_weight: float = 1.0, attr: str = "curriculum") -> None:
        if ramp_epochs is not None and ramp_epochs < 1:
            raise ValueError(f"CurriculumWeight: ramp_epochs must be >= 1, got {ramp_epochs}")
        self.ramp_epochs = ramp_epochs
        self.max_weight = float(max_weight)
        self.attr = attr

    def weight(self, epoch: int, max_epochs: int) -> float:
        """Weight during 1-based ``epoch`` of a run of ``max_epochs`` epochs."""
        total = self.ramp_epochs or max_epochs
        return self.max_weight * min(1.0, max(0, epoch - 1) / max(1, total - 1))

    def __call__(self, engine: Engine) -> None:
        setattr(engine.state, self.attr, self.weight(engine.state.epoch, engine.state.max_epochs))

    def attach(self, engine: Engine) -> None:
        if not hasattr(engine.state, self.attr):
            setattr(engine.state, self.attr, self.weight(1, engine.state.max_epochs or 1))
        if self.attr not in engine.state_dict_user_keys:
            engine.state_dict_user_keys.append(self.attr)
        engine.add_event_handler(Events.EPOCH_STARTED, self)
