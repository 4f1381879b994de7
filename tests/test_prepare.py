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
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fbta.prepare"):
        parts = split_rows(relabelled, tmp_path / "no_val.json", num_folds=2, val_fraction=0)
    assert not parts["val"] and "fold 0 has no validation slides (--val_fraction 0)" in caplog.text

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


def _ids(parts):
    return {name: sorted(r["slide_id"] for r in part) for name, part in parts.items()}


def test_a_failed_or_fixed_slide_never_moves_other_slides_between_parts(tmp_path, caplog):
    """The split used to be made from the slides that worked: a slide fixed after training re-split the data, and
    the finished run then reported its own training slides as the held-out test set (rc 0)."""
    path, rows = tmp_path / "splits.json", datalist_rows(15)
    whole = _ids(split_rows(rows, path, num_folds=3, val_fraction=0.5))
    failed = {whole["train"][0], whole["test"][0]}
    with caplog.at_level(logging.WARNING, logger="fbta.prepare"):
        some = _ids(split_rows(rows, path, num_folds=3, val_fraction=0.5, usable=[r["slide_id"] for r in rows
                                                                                 if r["slide_id"] not in failed]))
    assert some == {name: [s for s in ids if s not in failed] for name, ids in whole.items()}
    assert "2 slide(s) without features are left out of their part" in caplog.text
    assert _ids(split_rows(rows, path, num_folds=3, val_fraction=0.5)) == whole  # fixed: back in their own parts

    test_only = [r["slide_id"] for r in rows if r["slide_id"] not in whole["test"]]
    with pytest.raises(DatalistError, match=r"fold 0: no slide of its test part has features"):
        split_rows(rows, path, num_folds=3, val_fraction=0.5, usable=test_only)


def test_a_splits_file_a_run_was_trained_on_is_refused_not_remade(tmp_path, caplog):
    path, rows = tmp_path / "splits.json", datalist_rows(15)
    made = split_rows(rows, path, num_folds=3, val_fraction=0.5)
    fewer = rows[:12]  # e.g. a splits file of an older version, made from the slides that worked then
    (tmp_path / "last.pt").write_bytes(b"a trained run")
    with pytest.raises(DatalistError, match=r"made for another datalist, and .*last.pt was trained on its split"):
        split_rows(fewer, path, num_folds=3, val_fraction=0.5, trained=[tmp_path / "model.pt", tmp_path / "last.pt"])
    assert _ids(split_rows(rows, path, num_folds=3, val_fraction=0.5, trained=[tmp_path / "last.pt"])) == _ids(made)
    with caplog.at_level(logging.WARNING, logger="fbta.prepare"):  # --resume False: starting over, remade
        split_rows(fewer, path, num_folds=3, val_fraction=0.5, trained=[])
    assert "made for another datalist: making new splits" in caplog.text


def test_class_problems_name_empty_classes_and_labels_out_of_range():
    from monai_fbta.data.datalist import class_problems

    rows = datalist_rows(6, labels=(0, 1))
    assert class_problems(rows, 2, ["a", "b"]) == []
    problems = class_problems(rows, 3, ["a", "b", "c"])
    assert problems == ["class(es) 'c' have no slides in the datalist (of --num_classes 3): remove them from "
                        "--class_names and lower --num_classes, or add their slides"]
    shifted = datalist_rows(6, labels=(1, 2))  # 1-based integer labels
    assert class_problems(shifted, 2)[0] == "3 slide(s) have label 2, outside 0 .. 1 for --num_classes 2"
    assert "class(es) 0 have no slides" in class_problems(shifted, 2)[1]


def test_a_run_refuses_training_slides_whose_file_changed_since_it_learned_from_them(tmp_path):
    """A training slide replaced in place: the cache recomputed its features, but the finished run went on ("nothing
    left to train") and reported its test metrics with a model trained on the old pixels, rc 0."""
    from conftest import write_csv
    from slide_factory import tissue_rect_image, write_slide

    from monai_fbta.handlers.checkpoint import RunMismatchError
    from monai_fbta.pipeline.prepare import LEARNED_SLIDES_FILE, Preprocessor

    def slide(name: str, seed: int) -> str:
        image = tissue_rect_image(512, 512, (48, 48, 464, 464), seed)
        return write_slide(tmp_path / f"{name}.tif", image, levels=2, tile=64)

    rows = [{"slide_id": f"s{i}", "path": slide(f"s{i}", i), "label": "ab"[i % 2]} for i in range(6)]
    datalist = write_csv(tmp_path / "labels.csv", rows)
    models = tmp_path / "models"

    def prepare(resume: bool = True) -> Preprocessor:
        return Preprocessor(tmp_path, tmp_path / "cache", tiny_encoder(), models / "splits.json", datalist=datalist,
                            class_names=["a", "b"], tiling=TILING, num_folds=3, val_fraction=0.5, num_classes=2,
                            resume=resume).run()

    learned = {r["slide_id"] for name in ("train", "val") for r in prepare().part(name)}
    assert set(json.loads((models / LEARNED_SLIDES_FILE).read_text())) == learned
    (models / "last.pt").write_bytes(b"a run trained on these slides")
    prepare()  # unchanged slides: the run goes on
    victim = sorted(learned)[0]
    slide(victim, 99)  # rewritten in place
    for _ in range(2):  # and still refused once the cache holds the new features
        with pytest.raises(RunMismatchError, match=rf"last.pt was trained on other pixels: .* \({victim}; "):
            prepare()
    prepare(resume=False)  # starting over: the new slide is what the new run learns from
    assert json.loads((models / LEARNED_SLIDES_FILE).read_text())[victim]["head_tail_sha1"]
