"""pipeline/prepare.py: the frozen encoder kept in the ckpt_dir, splits that follow their datalist, strict preprocessing."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from conftest import datalist_rows, tiny_encoder
from slide_factory import TILING, tissue_slide

from monai_fbta.data.datalist import DatalistError, datalist_digest
from monai_fbta.pipeline.prepare import split_rows

torch.set_num_threads(1)


def test_frozen_encoder_weights_are_kept_in_the_ckpt_dir(tmp_path):
    from monai_fbta.networks.encoder import PatchEncoder
    from monai_fbta.pipeline.prepare import frozen_encoder

    given = tmp_path / "pretrained.pt"
    torch.save(PatchEncoder("tiny_cnn").backbone.state_dict(), given)
    enc = frozen_encoder("tiny_cnn", given, tmp_path / "run1")
    assert enc.weights_file == str(tmp_path / "run1" / "frozen_encoder_tiny_cnn.pt")
    assert frozen_encoder("tiny_cnn", given, tmp_path / "run1").weights_file == enc.weights_file  # same weights: reused
    other = tmp_path / "other.pt"
    torch.save(PatchEncoder("tiny_cnn").backbone.state_dict(), other)
    with pytest.raises(ValueError, match="other.pt differs from .*run1/frozen_encoder_tiny_cnn.pt"):
        frozen_encoder("tiny_cnn", other, tmp_path / "run1")


def test_splits_file_follows_its_datalist(tmp_path, caplog):
    path = tmp_path / "splits.json"
    rows = datalist_rows()
    split_rows(rows, path, num_folds=3, val_fraction=0.5)
    made = json.loads(path.read_text())
    assert made["datalist_sha256"] == datalist_digest(rows)
    split_rows(rows, path, num_folds=3, val_fraction=0.5)
    assert json.loads(path.read_text()) == made  # same data, same settings: reused

    relabelled = [dict(r, label=(i // 2) % 2) for i, r in enumerate(rows)]  # the same slide ids, other labels
    with caplog.at_level(logging.WARNING, logger="fbta.prepare"):
        split_rows(relabelled, path, num_folds=3, val_fraction=0.5)
    assert "made for another datalist: making new splits" in caplog.text
    assert json.loads(path.read_text())["datalist_sha256"] == datalist_digest(relabelled)
    split_rows(relabelled, path, num_folds=2, val_fraction=0.5)
    assert json.loads(path.read_text())["num_folds"] == 2

    hand_made = {"folds": [{"train": ["p1"], "val": [], "test": ["p2"]}]}
    path.write_text(json.dumps(hand_made))
    with pytest.raises(DatalistError, match="not written by monai-fbta, so it is not replaced"):
        split_rows(rows, path, num_folds=3, val_fraction=0.5)
    assert json.loads(path.read_text()) == hand_made


def test_training_preprocessing_in_strict_mode_fails_when_a_slide_failed(tmp_path):
    from monai_fbta.pipeline.prepare import preprocess

    rows = [{"slide_id": "good", "image": tissue_slide(tmp_path / "good.tif"), "label": 0},
            {"slide_id": "nompp", "image": tissue_slide(tmp_path / "nompp.tif", mpp=None), "label": 1}]
    assert [r["slide_id"] for r in preprocess(rows, tmp_path / "cache", tiny_encoder(), TILING)] == ["good"]
    with pytest.raises(RuntimeError, match=r"strict mode: 1 slide\(s\) failed in preprocessing .*extraction_report.csv"):
        preprocess(rows, tmp_path / "cache", tiny_encoder(), TILING, strict=True)
