"""pipeline/report.py: evaluation refuses a model.pt of other class names or of another run."""

from __future__ import annotations

import pytest
import torch
from conftest import RUN_SETTINGS, datalist_rows, tiny_model
from slide_factory import TILING

from monai_fbta.handlers import run_identity
from monai_fbta.handlers.checkpoint import RunMismatchError
from monai_fbta.pipeline.report import check_model, evaluate_checkpoint

torch.set_num_threads(1)


def test_evaluation_refuses_a_model_with_other_class_names(tmp_path):
    model = tiny_model(tmp_path, TILING)  # classes ["a", "b"]
    assert check_model(model, ["a", "b"])
    with pytest.raises(RunMismatchError, match=r"predicts the classes \['a', 'b'\] but this datalist's classes are \['b', 'a'\]"):
        evaluate_checkpoint(model, [{"slide_id": "x", "image": "x.tif", "label": 0}], tmp_path / "none", class_names=["b", "a"])
    with pytest.raises(RunMismatchError, match="trained by another run: it holds no run identity"):
        check_model(model, ["a", "b"], identity=run_identity(datalist_rows(), ["a", "b"], 2, RUN_SETTINGS))
