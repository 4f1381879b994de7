"""pipeline/validate.py: settings and options checked before anything runs (the option named, what is wrong, old
names refused). The same faults through real ``python -m monai.bundle`` commands are in ``test_bundle.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_csv

from monai_fbta.data.datalist import DatalistError, load_datalist, make_splits
from monai_fbta.pipeline.validate import INTERRUPTED, RENAMED_OPTIONS, option_problems, settings_problems

torch.set_num_threads(1)


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
    # a fold or split seed that is not a whole number, and an unknown evaluation split, are named before any work
    assert settings_problems(fold=1.5, num_folds=5, split_seed=-3) == ["--fold 1.5: give a whole number"]
    assert settings_problems(fold=1, num_folds=5, split_seed=-3) == ["--split_seed -3: give a whole number in 0 .. 2**32 - 1"]
    assert settings_problems(eval_split="tst") == ["--eval_split 'tst' is not one of ['train', 'val', 'test'] (did you mean 'test'?)"]
    # a repeated or space-padded class name is named as such (it used to end in "unknown label" for every slide)
    assert settings_problems(num_classes=2, class_names=["a", "a"]) == [
        "--class_names ['a', 'a'] names ['a'] more than once: a label could then mean two classes"]
    assert settings_problems(num_classes=2, class_names=["a", " b"])[0].startswith("--class_names ['a', ' b']: [' b'] begin")


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


def _last_stderr_lines(code: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "MONAI_FBTA_TRACEBACK"}
    done = subprocess.run([sys.executable, "-c", "from monai_fbta.pipeline.validate import install_excepthook\n"
                           "install_excepthook()\n" + code], capture_output=True, text=True, env=env, timeout=120)
    return done.returncode, done.stderr


def test_ctrl_c_and_unusable_inference_inputs_end_in_one_line_without_a_traceback(tmp_path):
    rc, err = _last_stderr_lines("raise KeyboardInterrupt")
    assert rc != 0 and "Traceback" not in err and err.strip().splitlines()[-1] == INTERRUPTED
    for folder in ("a", "b"):  # one slide id, two files
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "s1.tif").write_bytes(b"")
    rc, err = _last_stderr_lines("from monai_fbta.pipeline.infer import inference_rows\n"
                                 f"inference_rows([{str(tmp_path / 'a' / 's1.tif')!r}, {str(tmp_path / 'b' / 's1.tif')!r}])")
    assert rc == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: InferenceInputError: several input slides share the slide id(s) ['s1']")
    rc, err = _last_stderr_lines(f"from monai_fbta.pipeline.infer import inference_rows\ninference_rows({str(tmp_path / 'c.tif')!r})")
    assert rc == 1 and "Traceback" not in err and "error: MissingInputError: slide file(s) not found" in err.splitlines()[-1]
