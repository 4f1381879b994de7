"""monai_fbta.pipeline.compare: the side-by-side table of the README's main command, and its refusals."""

from __future__ import annotations

import json

import pytest

from monai_fbta.pipeline.compare import compare_reports, load_report, main


def _report(path, bacc: float, slides=("a", "b"), classes=("x", "y")) -> str:
    payload = {"split": "test", "num_slides": len(slides), "slide_ids": list(slides), "class_names": list(classes),
               "metrics": {"test_bacc": bacc, "test_auc": 0.9, "test_acc": bacc, "test_f1": 0.5},
               "confusion_matrix": [[1, 0], [1, 0]]}  # one slide per class
    path.write_text(json.dumps(payload))
    return str(path)


def test_side_by_side_table(tmp_path, capsys):
    fbta, vanilla = _report(tmp_path / "f.json", 0.875), _report(tmp_path / "v.json", 0.5)
    assert main([f"ABMIL + FBTA={fbta}", f"ABMIL={vanilla}"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "held-out test slides: 2 (x, y)" in out[1]
    assert out[-4].split()[:4] == ["ABMIL", "+", "FBTA", "0.875"] and out[-3].split()[:2] == ["ABMIL", "0.500"]
    assert out[-2].startswith("one slide moves balanced accuracy by up to 0.500 here (1 slide(s) in the smallest class)")


def test_refuses_reports_of_other_slides_or_classes_and_missing_files(tmp_path, capsys):
    a = load_report(_report(tmp_path / "a.json", 0.5))
    with pytest.raises(ValueError, match="other slides"):
        compare_reports({"a": a, "b": load_report(_report(tmp_path / "b.json", 0.5, slides=("a", "c")))})
    with pytest.raises(ValueError, match="class_names differ"):
        compare_reports({"a": a, "c": load_report(_report(tmp_path / "c.json", 0.5, classes=("x", "z")))})
    assert main([f"a={tmp_path / 'a.json'}", f"b={tmp_path / 'missing.json'}"]) == 1
    assert "missing.json: no test report" in capsys.readouterr().err
