"""Datalist loading/validation and stratified, patient-level, reproducible splits."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter

import pytest
from conftest import write_csv
from slide_factory import tissue_slide

from monai_fbta.data.datalist import (
    DatalistError,
    check_splits,
    datalist_digest,
    load_datalist,
    load_splits,
    make_splits,
    save_splits,
    select_fold,
)

CLASSES = ["normal", "tumour"]


def _touch(folder, names):
    for name in names:
        (folder / name).write_bytes(b"x")


def test_csv_loads_with_class_names_and_relative_paths(tmp_path):
    _touch(tmp_path, ["a.tif", "b.tif"])
    (tmp_path / "list.csv").write_text("slide_id,path,label,case_id\nA,a.tif,tumour,P1\nB,b.tif,normal,\n")
    rows = load_datalist(tmp_path / "list.csv", classes=CLASSES)
    assert rows == [
        {"slide_id": "A", "image": str((tmp_path / "a.tif").resolve()), "label": 1, "case_id": "P1"},
        {"slide_id": "B", "image": str((tmp_path / "b.tif").resolve()), "label": 0, "case_id": "B"},
    ]


def test_monai_json_datalist(tmp_path):
    _touch(tmp_path, ["s1.svs", "s2.svs"])
    content = {"training": [{"image": "s1.svs", "label": 1}, {"image": "s2.svs", "label": 0, "case_id": "P9"}]}
    (tmp_path / "dl.json").write_text(json.dumps(content))
    rows = load_datalist(tmp_path / "dl.json")
    assert [(r["slide_id"], r["label"], r["case_id"]) for r in rows] == [("s1", 1, "s1"), ("s2", 0, "P9")]


def test_every_problem_reported_at_once(tmp_path):
    _touch(tmp_path, ["a.tif", "b.tif", "c.tif", "d.tif"])
    (tmp_path / "bad.csv").write_text(
        "slide_id,path,label,case_id\n"
        "A,a.tif,tumour,P1\n"
        "B,missing.tif,normal,P2\n"  # missing file
        "C,c.tif,cancer,P3\n"  # unknown label
        "A,b.tif,tumour,P4\n"  # duplicate slide id
        "D,d.tif,normal,P1\n"  # P1 has both labels
    )
    with pytest.raises(DatalistError) as info:
        load_datalist(tmp_path / "bad.csv", classes=CLASSES)
    problems = info.value.problems
    assert len(problems) == 4, problems
    text = str(info.value)
    assert "bad.csv" in text
    assert "line 3 (slide B): file not found" in text and "missing.tif" in text
    assert "line 4 (slide C): unknown label 'cancer'" in text
    assert "line 5: duplicate slide_id 'A' (first at line 2)" in text
    assert "case 'P1': slides with inconsistent labels ['normal', 'tumour']" in text


def test_empty_and_malformed_lists(tmp_path):
    (tmp_path / "empty.csv").write_text("slide_id,path,label\n")
    with pytest.raises(DatalistError, match="empty"):
        load_datalist(tmp_path / "empty.csv")
    (tmp_path / "cols.csv").write_text("id,file\n1,a\n")
    with pytest.raises(DatalistError, match="missing column"):
        load_datalist(tmp_path / "cols.csv")
    with pytest.raises(DatalistError, match="does not exist"):
        load_datalist(tmp_path / "nope.csv")


def _cohort(num_cases=30, slides_per_case=2):
    """Imbalanced cohort: 1/3 of the cases are class 1; each case has several slides."""
    rows = []
    for c in range(num_cases):
        for s in range(slides_per_case):
            rows.append({"slide_id": f"c{c}_s{s}", "image": "", "label": int(c % 3 == 0), "case_id": f"c{c}"})
    return rows


def _check_fold(rows, fold):
    case_of = {r["slide_id"]: r["case_id"] for r in rows}
    parts = {name: set(fold[name]) for name in ("train", "val", "test")}
    assert set().union(*parts.values()) == {r["slide_id"] for r in rows}
    assert sum(len(p) for p in parts.values()) == len(rows)
    cases = {name: {case_of[s] for s in p} for name, p in parts.items()}
    assert not cases["train"] & cases["val"] and not cases["train"] & cases["test"] and not cases["val"] & cases["test"]


def test_kfold_splits_are_patient_level_stratified_and_reproducible(tmp_path):
    rows = _cohort()
    splits = make_splits(rows, num_folds=5, seed=3, val_fraction=0.2)
    label_of = {r["slide_id"]: r["label"] for r in rows}
    tests = []
    for fold in splits["folds"]:
        _check_fold(rows, fold)
        counts = Counter(label_of[s] for s in fold["test"])
        assert counts == {0: 8, 1: 4}  # 6 cases per fold: 4 of class 0, 2 of class 1, 2 slides each
        assert fold["val"]
        tests += fold["test"]
    assert sorted(tests) == sorted(label_of)  # test parts partition the cohort
    assert make_splits(rows, num_folds=5, seed=3, val_fraction=0.2) == splits
    assert make_splits(rows, num_folds=5, seed=4, val_fraction=0.2) != splits
    path = save_splits(splits, tmp_path / "sub" / "splits.json")
    assert load_splits(path) == splits
    assert [p.name for p in path.parent.iterdir()] == ["splits.json"]  # no temp file left behind
    chosen = select_fold(splits, 2, rows)
    assert [r["slide_id"] for r in chosen["test"]] == splits["folds"][2]["test"]
    with pytest.raises(IndexError):
        select_fold(splits, 5)


def test_fixed_test_set_mode():
    rows = _cohort()
    splits = make_splits(rows, num_folds=4, seed=0, test_fraction=0.2)
    tests = {tuple(f["test"]) for f in splits["folds"]}
    assert len(tests) == 1 and len(next(iter(tests))) > 0
    vals = []
    for fold in splits["folds"]:
        _check_fold(rows, fold)
        vals += fold["val"]
    assert len(vals) == len(set(vals)) == len(rows) - len(splits["folds"][0]["test"])


def test_splits_refuse_too_few_cases():
    with pytest.raises(ValueError, match="cases"):
        make_splits(_cohort(num_cases=3), num_folds=5)


def test_datalist_reports_every_problem_at_once(tmp_path):
    good = tissue_slide(tmp_path / "good.tif")
    for copy in ("odd", "same_patient", "badmpp"):  # each slide its own file (one file under two ids is refused)
        shutil.copy(good, tmp_path / f"{copy}.tif")
    (tmp_path / "notes.svs").write_text("not a slide\n")
    csv_path = write_csv(tmp_path / "labels.csv", [
        {"slide_id": "good", "path": "good.tif", "label": "a", "case_id": "p1", "mpp": ""},
        {"slide_id": "gone", "path": "missing.svs", "label": "a", "case_id": "p2", "mpp": ""},
        {"slide_id": "notes", "path": "notes.svs", "label": "b", "case_id": "p3", "mpp": ""},
        {"slide_id": "odd", "path": "odd.tif", "label": "zebra", "case_id": "p4", "mpp": ""},
        {"slide_id": "good", "path": "good.tif", "label": "a", "case_id": "p1", "mpp": ""},
        {"slide_id": "same_patient", "path": "same_patient.tif", "label": "b", "case_id": "p1", "mpp": ""},
        {"slide_id": "badmpp", "path": "badmpp.tif", "label": "a", "case_id": "p5", "mpp": "-1"},
    ])
    with pytest.raises(DatalistError) as info:
        load_datalist(csv_path, classes=["a", "b"], check_slides=True)
    text = str(info.value)
    expected = [
        r"line 3 \(slide gone\): file not found: .*missing\.svs",
        r"line 4 \(slide notes\): unreadable slide: .*notes\.svs",
        r"line 5 \(slide odd\): unknown label 'zebra'",
        r"line 6: duplicate slide_id 'good' \(first at line 2\)",
        r"case 'p1': slides with inconsistent labels \['a', 'b'\]",
        r"line 8 \(slide badmpp\): mpp '-1' is not a positive number",
    ]
    for pattern in expected:
        assert re.search(pattern, text), f"{pattern!r} not in\n{text}"
    assert len(info.value.problems) == len(expected), text
    # without the header check the unreadable slide is not opened (only existence is checked)
    with pytest.raises(DatalistError) as quick:
        load_datalist(csv_path, classes=["a", "b"])
    assert "unreadable" not in str(quick.value)
    # a valid table keeps its mpp column (the override reaches open_slide in extraction)
    ok = write_csv(tmp_path / "ok.csv", [{"slide_id": "good", "path": good, "label": "a", "mpp": "0.25"}])
    assert load_datalist(ok, classes=["a", "b"], check_slides=True)[0]["mpp"] == 0.25


def test_splits_file_with_a_patient_in_train_and_test_is_refused():
    rows = [{"slide_id": s, "label": 0, "case_id": c} for s, c in (("s1", "p1"), ("s2", "p1"), ("s3", "p2"), ("s4", "p3"))]
    leaky = {"folds": [{"train": ["s1", "s3"], "val": [], "test": ["s2", "s4"]}]}
    assert check_splits(leaky, rows, raise_error=False) == [
        "fold 0: patient 'p1' is split across ['test', 'train'] (train: ['s1']; test: ['s2'])"
    ]
    with pytest.raises(DatalistError, match="patient 'p1' is split across"):
        select_fold(leaky, 0, rows)
    twice = {"folds": [{"train": ["s3"], "val": ["s3"], "test": ["s4"]}]}
    assert "slide 's3' is in both train and val" in check_splits(twice, rows, raise_error=False)[0]
    clean = {"folds": [{"train": ["s1", "s2"], "val": ["s3"], "test": ["s4"]}]}
    assert check_splits(clean, rows) == [] and len(select_fold(clean, 0, rows)["train"]) == 2


def test_datalist_digest_follows_content_not_file_times(tmp_path):
    slide = tissue_slide(tmp_path / "a.tif")
    path = write_csv(tmp_path / "labels.csv", [{"slide_id": "a", "path": slide, "label": 1}])
    first = datalist_digest(load_datalist(path))
    os.utime(path, (1, 1))
    assert datalist_digest(load_datalist(path)) == first
    write_csv(path, [{"slide_id": "a", "path": slide, "label": 0}])
    assert datalist_digest(load_datalist(path)) != first


def test_excel_csv_with_a_bom_loads(tmp_path):
    """Excel's "CSV UTF-8" starts with a byte-order mark: the header read as '\\ufeffslide_id' (missing column)."""
    _touch(tmp_path, ["a.tif"])
    (tmp_path / "list.csv").write_bytes("slide_id,path,label\nA,a.tif,tumour\n".encode("utf-8-sig"))
    assert [r["slide_id"] for r in load_datalist(tmp_path / "list.csv", classes=CLASSES)] == ["A"]


def test_one_slide_file_under_two_ids_is_refused(tmp_path):
    """The same file under two ids was split into train and test (``train: ['synth_0003'], test: ['dup_of_0003']``)."""
    _touch(tmp_path, ["a.tif", "b.tif"])
    (tmp_path / "list.csv").write_text("slide_id,path,label\nA,a.tif,tumour\nB,b.tif,normal\nA2,a.tif,tumour\n")
    with pytest.raises(DatalistError, match=r"line 4 \(slide A2\): the same file as slide 'A' \(line 2\): one slide "
                                            r"listed twice can fall in training and in test"):
        load_datalist(tmp_path / "list.csv", classes=CLASSES)


def test_a_json_datalists_other_lists_are_named_as_unread(tmp_path, caplog):
    import logging

    _touch(tmp_path, ["s1.svs", "s2.svs"])
    content = {"training": [{"image": "s1.svs", "label": 1}], "validation": [{"image": "s2.svs", "label": 0}]}
    (tmp_path / "dl.json").write_text(json.dumps(content))
    with caplog.at_level(logging.WARNING, logger="fbta.prepare"):
        assert len(load_datalist(tmp_path / "dl.json")) == 1
    assert "only its 'training' list is read; ['validation'] is not" in caplog.text
