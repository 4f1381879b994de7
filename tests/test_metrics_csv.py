"""handlers/metrics_csv.py: EpochMetricsCSV, in the on-disk training record it writes with LogFile (log_file.py),
TrainingCurves (curves.py) and OptionalTensorBoard (tensorboard.py): one run checks the four together."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from conftest import stepping_engine
from ignite.engine import Engine, Events

torch.set_num_threads(1)


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


def test_training_curves_add_the_extractor_scale_panel_when_the_csv_has_it(tmp_path):
    """plot_training_curves: a third panel (a wider PNG) for e2e_scale, only when the CSV has the column."""
    import struct

    from monai_fbta.handlers import plot_training_curves

    def png_width(columns: str, rows: list[str]) -> int:
        csv_path = tmp_path / f"{len(columns)}.csv"
        csv_path.write_text("\n".join([columns, *rows]) + "\n")
        data = plot_training_curves(csv_path, tmp_path / f"{len(columns)}.png").read_bytes()
        assert data[:4] == b"\x89PNG"
        return struct.unpack(">I", data[16:20])[0]  # IHDR width

    plain = png_width("epoch,loss,val_auc", ["1,1.0,0.5", "2,0.8,0.6"])
    with_scale = png_width("epoch,loss,e2e_scale,val_auc", ["1,1.0,1.0,0.5", "2,0.8,250.0,0.6"])
    assert (plain, with_scale) == (1100, 1500)
