"""handlers/ema.py: ModelEMA teacher updates (exact formula, momentum 1, optimiser steps only, warm-up, buffers)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import stepping_engine
from ignite.engine import Events

from monai_fbta.handlers import ModelEMA

torch.set_num_threads(1)


def test_ema_one_step_exact_formula():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    ema = ModelEMA(model, momentum=0.25)
    before = [p.detach().clone() for p in ema.ema_model.parameters()]
    engine = stepping_engine(model)
    ema.attach(engine)
    engine.run([0], max_epochs=1)
    for old, new, student in zip(before, ema.ema_model.parameters(), model.parameters()):
        torch.testing.assert_close(new, 0.75 * old + 0.25 * student.detach())
        assert not torch.equal(new, old)


def test_ema_momentum_one_makes_the_teacher_a_copy_of_the_student():
    """``momentum=1`` (the accuracy study's "no EMA teacher" rows): after each step teacher == student."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    ema = ModelEMA(model, momentum=1.0)
    engine = stepping_engine(model)
    ema.attach(engine)
    engine.run(range(3), max_epochs=1)
    for teacher, student in zip(ema.ema_model.parameters(), model.parameters()):
        assert torch.equal(teacher, student.detach())
    with pytest.raises(ValueError, match="momentum must be in"):
        ModelEMA(model, momentum=1.5)


def test_ema_moves_only_on_optimizer_steps():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    ema = ModelEMA(model, momentum=0.5)
    engine = stepping_engine(model, steps_per_event=3)
    ema.attach(engine)
    snapshots = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: snapshots.append(ema.ema_model.weight.clone()))
    engine.run(range(6), max_epochs=1)
    changed = [not torch.equal(a, b) for a, b in zip(snapshots, snapshots[1:])]
    # iterations 3 and 6 step the optimiser: changes between snapshots 2->3 and 5->6 only
    assert changed == [False, True, False, False, True]
    assert engine.state.optimizer_step == 2


def test_ema_warmup_schedule_follows_step_count():
    model = nn.Linear(2, 2)
    ema = ModelEMA(model, momentum=0.01, momentum_warmup=0.5, warmup_steps=5, name="m_head")
    values = [ema.momentum_at(s) for s in range(1, 8)]
    assert values[0] == pytest.approx(0.5) and values[4] == pytest.approx(0.01) and values[6] == pytest.approx(0.01)
    assert all(a > b for a, b in zip(values[:5], values[1:5]))
    engine = stepping_engine(model)
    ema.attach(engine)
    seen = []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: seen.append(e.state.m_head))
    engine.run(range(3), max_epochs=1)
    assert seen == pytest.approx(values[:3])
    with pytest.raises(ValueError, match="both"):
        ModelEMA(model, momentum_warmup=0.5)


def test_two_ema_handlers_keep_separate_momenta():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    ema_a = ModelEMA(a, momentum=0.1, momentum_warmup=0.9, warmup_steps=3, name="ema_a")
    ema_b = ModelEMA(b, momentum=0.2, name="ema_b")
    engine = stepping_engine(a)
    ema_a.attach(engine)
    ema_b.attach(engine)
    engine.run([0], max_epochs=1)
    assert engine.state.ema_a == pytest.approx(0.9) and engine.state.ema_b == pytest.approx(0.2)


def test_ema_copies_buffers_by_value():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema = ModelEMA(model, momentum=0.5)
    engine = stepping_engine(model)
    ema.attach(engine)
    engine.run([0], max_epochs=1)
    student, teacher = model[1].running_mean, ema.ema_model[1].running_mean
    model.train()(torch.randn(4, 3) + 5)  # the student's statistics move after the optimiser step...
    assert not torch.equal(student, teacher)  # ...the teacher keeps those of the last step
    assert teacher.data_ptr() != student.data_ptr()
