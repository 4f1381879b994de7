"""PredictionsCSV: predictions.csv written at EPOCH_COMPLETED from the engine output (write_predictions_csv's columns)."""

from __future__ import annotations

import csv

import torch
from ignite.engine import Engine

from monai_fbta.handlers import PredictionsCSV, write_predictions_csv


def _engine(outputs: list[dict], class_names: list[str] | None = None) -> Engine:
    engine = Engine(lambda e, i: outputs[i])
    if class_names is not None:
        engine.class_names = class_names
    return engine


def test_written_at_epoch_end_with_the_columns_of_write_predictions_csv(tmp_path):
    outputs = [{"slide_id": "a", "probs": torch.tensor([0.2, 0.8]), "label": None},
               {"slide_id": "b", "probs": torch.tensor([0.9, 0.1]), "label": None}]
    handler = PredictionsCSV(tmp_path / "out" / "predictions.csv")
    engine = _engine(outputs, class_names=["neg", "pos"])  # class names from the engine (the evaluator's)
    handler.attach(engine)
    engine.run([0, 1])
    text = (tmp_path / "out" / "predictions.csv").read_text()
    assert text.splitlines() == ["slide_id,prob_neg,prob_pos,pred,pred_name", "a,0.200000,0.800000,1,pos",
                                 "b,0.900000,0.100000,0,neg"]
    records = [{"slide_id": "a", "probs": [0.2, 0.8]}, {"slide_id": "b", "probs": [0.9, 0.1]}]
    assert text == open(write_predictions_csv(tmp_path / "direct.csv", records, ["neg", "pos"])).read()
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["predictions.csv"]  # atomic: no temp file left

    engine.run([1])  # a new run (epoch) writes only its own slides
    assert [r["slide_id"] for r in csv.DictReader(open(tmp_path / "out" / "predictions.csv"))] == ["b"]


def test_labels_when_known_and_given_class_names(tmp_path):
    outputs = [{"slide_id": "a", "probs": [0.6, 0.3, 0.1], "label": torch.tensor([2])},
               {"slide_id": "b", "probs": [0.1, 0.3, 0.6], "label": -1}]
    handler = PredictionsCSV(tmp_path / "p.csv", class_names=["x", "y", "z"])
    engine = _engine(outputs)
    handler.attach(engine)
    engine.run([0, 1])
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert [(r["pred_name"], r["label"]) for r in rows] == [("x", "2"), ("z", "")]
