"""No silent wrong result from the pipeline glue: run identity, splits, class names, early settings checks, exit status.

In-process checks; the same faults through real ``python -m monai.bundle`` commands are in ``test_bundle.py``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine
from conftest import RUN_SETTINGS, datalist_rows, tiny_encoder, tiny_model, write_csv
from slide_factory import TILING, tissue_slide

from monai_fbta.data.datalist import DatalistError, datalist_digest, load_datalist, make_splits
from monai_fbta.handlers import ResumeTraining, TrainingCheckpoint, check_resume, run_identity
from monai_fbta.handlers.checkpoint import RunMismatchError, save_checkpoint
from monai_fbta.networks import ABMIL
from monai_fbta.pipeline.infer import InferenceError, run_inference
from monai_fbta.pipeline.prepare import split_rows
from monai_fbta.pipeline.report import check_model, evaluate_checkpoint
from monai_fbta.pipeline.validate import RENAMED_OPTIONS, option_problems, settings_problems


# ----------------------------------------------------------------------------- item 1: run identity


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    """A folder where the demo trained, reused for other data: its last.pt is refused, saying what differs."""
    demo = run_identity(datalist_rows(), ["tumour", "normal"], 2, RUN_SETTINGS)
    assert run_identity(list(reversed(datalist_rows())), ("tumour", "normal"), 2, dict(RUN_SETTINGS)) == demo  # order, tuples
    head = ABMIL(8, 2, hidden=8)
    trainer = Engine(lambda e, b: None)
    trainer.state.max_epochs = 3
    TrainingCheckpoint(tmp_path / "last.pt", objects={"head": head}, identity=demo)(trainer)
    assert check_resume(tmp_path / "last.pt", demo) is True

    relabelled = [dict(r, label=1 - r["label"]) for r in datalist_rows()]
    new = run_identity(relabelled, ["a", "b"], 2, dict(RUN_SETTINGS, mil_name="transmil"))
    with pytest.raises(RunMismatchError) as err:
        check_resume(tmp_path / "last.pt", new)
    msg = str(err.value)
    for part in ("last.pt is the checkpoint of another run", "class_names differs (saved: ['tumour', 'normal']; now: ['a', 'b'])",
                 "the datalist differs (saved: 12 slides", "mil_name differs", "--ckpt_dir", "--resume False"):
        assert part in msg, msg
    assert check_resume(tmp_path / "last.pt", new, enabled=False) is False  # --resume False starts over

    before = {k: v.clone() for k, v in head.state_dict().items()}
    with pytest.raises(RunMismatchError, match="another run"):
        ResumeTraining(tmp_path / "last.pt", objects={"head": head}, identity=new)(trainer)
    assert all(torch.equal(before[k], v) for k, v in head.state_dict().items())  # nothing was loaded

    save_checkpoint(tmp_path / "old.pt", {"head": head})  # written before run identities existed
    with pytest.raises(RunMismatchError, match="holds no run identity"):
        check_resume(tmp_path / "old.pt", demo)


def test_datalist_digest_follows_content_not_file_times(tmp_path):
    slide = tissue_slide(tmp_path / "a.tif")
    path = write_csv(tmp_path / "labels.csv", [{"slide_id": "a", "path": slide, "label": 1}])
    first = datalist_digest(load_datalist(path))
    os.utime(path, (1, 1))
    assert datalist_digest(load_datalist(path)) == first
    write_csv(path, [{"slide_id": "a", "path": slide, "label": 0}])
    assert datalist_digest(load_datalist(path)) != first


def test_evaluation_refuses_a_model_with_other_class_names(tmp_path):
    model = tiny_model(tmp_path, TILING)  # classes ["a", "b"]
    assert check_model(model, ["a", "b"])
    with pytest.raises(RunMismatchError, match=r"predicts the classes \['a', 'b'\] but this datalist's classes are \['b', 'a'\]"):
        evaluate_checkpoint(model, [{"slide_id": "x", "image": "x.tif", "label": 0}], tmp_path / "none", class_names=["b", "a"])
    with pytest.raises(RunMismatchError, match="trained by another run: it holds no run identity"):
        check_model(model, ["a", "b"], identity=run_identity(datalist_rows(), ["a", "b"], 2, RUN_SETTINGS))


def test_inference_reads_datalist_labels_with_the_model_class_names(tmp_path):
    model = tiny_model(tmp_path, TILING)  # classes ["a", "b"]
    slide = tissue_slide(tmp_path / "s.tif")
    good = write_csv(tmp_path / "good.csv", [{"slide_id": "s", "path": slide, "label": "b"}])
    records = run_inference(model, good, tmp_path / "out", heatmaps=False, batch_size=8)
    assert [r["label"] for r in records] == [1]
    bad = write_csv(tmp_path / "bad.csv", [{"slide_id": "s", "path": slide, "label": "tumour"}])
    with pytest.raises(DatalistError, match=r"unknown label 'tumour' \(known classes \['a', 'b'\]\)"):
        run_inference(model, bad, tmp_path / "out2", heatmaps=False)


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


# ----------------------------------------------------------------------------- item 6: settings checked first


def test_settings_problems_name_the_option_and_what_is_wrong(tmp_path):
    assert settings_problems(mil_name="abmil", views=["frozen"], num_classes=2, class_names=["a", "b"],
                             encoder_name="tiny_cnn", fold=0, num_folds=5, val_fraction=0.2) == []
    problems = settings_problems(mil_name="abmill", views=["frozen", "e2e_view"], num_classes=3, class_names=["a", "b"],
                                 encoder_name="resnet5O", encoder_weights=str(tmp_path / "missing.pth"), fold=5, num_folds=5)
    expected = ["--mil_name 'abmill' is not one of", "(did you mean 'abmil'?)", "--views ['frozen', 'e2e_view']",
                "--class_names has 2 name(s) ['a', 'b'] but --num_classes is 3", "--encoder_name 'resnet5O'",
                "missing.pth: file not found", "--fold 5 is out of range: folds are numbered 0..4"]
    text = "\n".join(problems)
    assert all(e in text for e in expected), text

    slides = [_write_empty(tmp_path / f"s{i}.tif") for i in range(10)]
    labels = ["a"] * 8 + ["b"] * 2
    datalist = write_csv(tmp_path / "labels.csv", [{"slide_id": f"s{i}", "path": p, "label": lab}
                                                   for i, (p, lab) in enumerate(zip(slides, labels))])
    problems = settings_problems(num_classes=2, class_names=["a", "b"], datalist=datalist, num_folds=5, val_fraction=0.2)
    assert problems == ["class 'b' has 2 case(s) but 5 parts need at least 5 cases per class: lower --num_folds or add "
                        "slides of this class"]
    with pytest.raises(DatalistError, match="class 1 has 2 case"):  # not scikit-learn's n_splits message
        make_splits(load_datalist(datalist, classes=["a", "b"]), num_folds=5)
    assert "--datalist" in settings_problems(num_classes=2, class_names=["a", "b"], datalist=tmp_path / "nope.csv")[0]


def _write_empty(path) -> str:
    path.write_bytes(b"")
    return str(path)


def test_unknown_and_renamed_options_are_refused():
    known = ["assume_mpp", "num_epochs", "synthetic"]
    argv = ["run", "training", "--config_file", "x.json", "--mpp", "0.5", "--num_epoch", "2", "--synthetic#size", "9",
            "--num_epochs=3"]
    assert option_problems(argv, known) == ["option --mpp was renamed: use --assume_mpp",
                                            "unknown option --num_epoch for this command; did you mean --num_epochs?"]


def test_one_name_per_option_across_training_evaluation_and_inference():
    configs = Path(__file__).resolve().parents[1] / "bundles" / "fbta_stad" / "configs"
    train, evaluate, infer = (set(json.loads((configs / f"{n}.json").read_text())) for n in ("train", "evaluate", "inference"))
    assert not RENAMED_OPTIONS.keys() & (train | evaluate | infer)  # old names are refused, not read
    assert {"assume_mpp", "extract_batch_size", "num_workers", "fail_fast", "strict"} <= train & infer
    assert "model_path" in evaluate & infer


# ----------------------------------------------------------------------------- item 8: exit status


def test_inference_raises_when_nothing_or_in_strict_mode_something_failed(tmp_path):
    model = tiny_model(tmp_path, TILING)
    slides = tmp_path / "slides"
    slides.mkdir()
    tissue_slide(slides / "nompp.tif", mpp=None)
    with pytest.raises(InferenceError, match=r"no slide could be predicted: 0 slide\(s\) predicted .* 1 failed .*--assume_mpp"):
        run_inference(model, slides, tmp_path / "out", heatmaps=False, batch_size=8)
    assert len(run_inference(model, slides, tmp_path / "out", heatmaps=False, batch_size=8, assume_mpp=0.5)) == 1

    tissue_slide(slides / "good.tif")
    out = tmp_path / "out_strict"
    assert [r["slide_id"] for r in run_inference(model, [str(slides / "good.tif"), str(slides / "nompp.tif")], out,
                                                 heatmaps=False, batch_size=8)] == ["good"]
    with pytest.raises(InferenceError, match="strict mode: a slide failed"):
        run_inference(model, slides, out, heatmaps=False, batch_size=8, strict=True)
    with open(out / "predictions.csv") as f:
        assert [r["slide_id"] for r in csv.DictReader(f)] == ["good"]  # what worked is still written


def test_training_preprocessing_in_strict_mode_fails_when_a_slide_failed(tmp_path):
    from monai_fbta.pipeline.prepare import preprocess

    rows = [{"slide_id": "good", "image": tissue_slide(tmp_path / "good.tif"), "label": 0},
            {"slide_id": "nompp", "image": tissue_slide(tmp_path / "nompp.tif", mpp=None), "label": 1}]
    assert [r["slide_id"] for r in preprocess(rows, tmp_path / "cache", tiny_encoder(), TILING)] == ["good"]
    with pytest.raises(RuntimeError, match=r"strict mode: 1 slide\(s\) failed in preprocessing .*extraction_report.csv"):
        preprocess(rows, tmp_path / "cache", tiny_encoder(), TILING, strict=True)
