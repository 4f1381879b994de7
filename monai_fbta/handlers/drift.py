"""A warning when the trainable extractor's features run away from the frozen extractor's scale."""

from __future__ import annotations

import logging

from ignite.engine import Engine, Events

__all__ = ["ExtractorDriftWarning"]

logger = logging.getLogger("fbta.train")


class ExtractorDriftWarning:
    """Warn once when an epoch's mean ``e2e_scale`` (the trainer output's mean square of f_TFE(patches) over that
    of F^FB[S]: :func:`~monai_fbta.engines.trainer.e2e_scale`) exceeds ``max_scale``; ``attach(trainer)``.

    With f_TFE's BatchNorm frozen, small weight changes can compound into features hundreds of times the frozen
    ones' scale; the MIL head then reads the e2e and translated views at chance while the run goes on without an
    error (docs/method.md, TransMIL section: the runs measured there that ran away ended at 580-950, those that
    learned at 0.3-1.6). The epoch means are kept in ``engine.state.e2e_scale`` ``{epoch: mean}``. Epochs
    without the e2e view (vanilla MIL) have no ``e2e_scale`` and are skipped.

    Args:
        max_scale: the ratio above which to warn.
    """

    def __init__(self, max_scale: float = 10.0) -> None:
        if not max_scale > 1:
            raise ValueError(f"ExtractorDriftWarning: max_scale must be above 1, got {max_scale}")
        self.max_scale = float(max_scale)
        self.warned = False
        self._sum, self._count = 0.0, 0

    def epoch_started(self, engine: Engine) -> None:
        self._sum, self._count = 0.0, 0

    def iteration_completed(self, engine: Engine) -> None:
        output = engine.state.output
        if isinstance(output, dict) and "e2e_scale" in output:
            self._sum += float(output["e2e_scale"])
            self._count += 1

    def epoch_completed(self, engine: Engine) -> None:
        if not self._count:
            return
        mean = self._sum / self._count
        if not hasattr(engine.state, "e2e_scale"):
            engine.state.e2e_scale = {}
        engine.state.e2e_scale[int(engine.state.epoch)] = mean
        if mean > self.max_scale and not self.warned:
            self.warned = True
            logger.warning(
                "epoch %d: the trainable extractor's features are %.0f times the frozen features' mean square "
                "(e2e_scale; above %g): f_TFE has run away from f_FFE and the e2e and translated views may stay at "
                "chance; docs/method.md (TransMIL section) has what brought it back",
                engine.state.epoch, mean, self.max_scale,
            )

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
