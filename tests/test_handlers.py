"""EMA teacher updates (exact formula, warm-up), curriculum schedule, loss logging."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import stepping_engine
from ignite.engine import Engine, Events

from monai_fbta.handlers import CurriculumWeight, ModelEMA, loss_terms, training_log_handlers

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


def test_stats_handler_logs_every_loss_term(capsys):
    engine = stepping_engine(nn.Linear(2, 2))
    for handler in training_log_handlers(name="fbta.test", progress=True):
        handler.attach(engine)
    engine.run(range(2), max_epochs=1)
    lines = [line for line in capsys.readouterr().out.splitlines() if "Iter:" in line]
    assert len(lines) == 2
    for term in ("loss", "cls", "cons", "dist"):
        assert all(f"{term}: " in line for line in lines)
    assert loss_terms({"loss": torch.tensor(2.0), "logits": None}) == {"loss": 2.0}


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


def test_training_record_on_disk_log_csv_curves(tmp_path, caplog):
    """Log file, per-epoch metrics CSV (every loss term, both validation paths), curves PNG, TensorBoard note."""
    import csv
    import logging

    from monai_fbta.handlers import EpochMetricsCSV, LogFile, OptionalTensorBoard, TrainingCurves, tensorboard_available

    engine = stepping_engine(nn.Linear(2, 2))
    evaluator = Engine(lambda e, b: None)

    @engine.on(Events.EPOCH_COMPLETED)
    def validate(trainer):  # stands in for ValidationHandler (attached before the CSV writer)
        evaluator.state.epoch = trainer.state.epoch
        evaluator.state.metrics = {"val_auc": 0.5 + 0.1 * trainer.state.epoch, "val_auc_vanilla": 0.5}

    (tmp_path / "train.log").write_text("an earlier run\n")
    log = LogFile(tmp_path / "train.log")
    for handler in (log, EpochMetricsCSV(tmp_path / "m.csv", evaluator), TrainingCurves(tmp_path / "m.csv", tmp_path / "c.png")):
        handler.attach(engine)
    with caplog.at_level(logging.WARNING, logger="fbta.tensorboard"):
        OptionalTensorBoard(tmp_path / "tb").attach(engine)
    logging.getLogger("fbta.record_test").warning("hello from the run")
    engine.run(range(3), max_epochs=2)
    rows = list(csv.DictReader(open(tmp_path / "m.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {k: float(rows[1][k]) for k in ("loss", "cls", "cons", "dist", "val_auc", "val_auc_vanilla")} == pytest.approx(
        {"loss": 1.0, "cls": 0.5, "cons": 0.25, "dist": 0.125, "val_auc": 0.7, "val_auc_vanilla": 0.5})
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    text = (tmp_path / "train.log").read_text()
    assert text.startswith("an earlier run\n") and "hello from the run" in text  # appended, never overwritten
    assert log.handler is None  # closed at the end of the run
    notes = [r.getMessage() for r in caplog.records if r.name == "fbta.tensorboard"]
    assert notes == ([] if tensorboard_available() else [notes[0]]) and all("pip install" in n for n in notes)

    engine.state.epoch = 1  # a run resumed after epoch 1 keeps row 1 and rewrites the rest
    resumed = EpochMetricsCSV(tmp_path / "m.csv")
    resumed.started(engine)
    assert [r["epoch"] for r in resumed.rows] == ["1"]
    (tmp_path / "other.csv").write_text("name,value\n")
    with pytest.raises(ValueError, match="other.csv exists and is not a metrics file"):
        EpochMetricsCSV(tmp_path / "other.csv").started(engine)


def test_progress_bar_is_off_when_stderr_is_not_a_terminal(monkeypatch):
    import io
    import sys

    from monai_fbta.handlers import LossProgressBar

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert LossProgressBar().tqdm_kwargs["disable"] is True
    assert LossProgressBar(disable=False).tqdm_kwargs["disable"] is False
