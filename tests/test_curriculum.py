"""handlers/curriculum.py: CurriculumWeight, the schedule from 0 to 1 over the epochs."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events

from monai_fbta.handlers import CurriculumWeight

torch.set_num_threads(1)


def test_curriculum_goes_from_zero_to_one_over_epochs():
    engine = Engine(lambda e, b: None)
    CurriculumWeight().attach(engine)
    seen = []
    engine.add_event_handler(Events.EPOCH_STARTED, lambda e: seen.append(e.state.curriculum))
    engine.run([0], max_epochs=5)
    assert seen == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert "curriculum" in engine.state_dict()


def test_curriculum_ramp_and_scale():
    cw = CurriculumWeight(ramp_epochs=3, max_weight=0.5)
    assert [cw.weight(e, 10) for e in (1, 2, 3, 7)] == pytest.approx([0.0, 0.25, 0.5, 0.5])
    assert CurriculumWeight().weight(1, 1) == 0.0
    with pytest.raises(ValueError):
        CurriculumWeight(ramp_epochs=0)
