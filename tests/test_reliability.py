"""Hardening (issue 8): bad input is reported all at once, bad slides are skipped and explained,
NaN/inf never trains silently, outputs stay inside their folder, inference survives SIGKILL.

Each test backs rows of docs/reliability.md.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from conftest import tiny_encoder, tiny_model, write_csv
from slide_factory import TILING, tissue_rect_image, tissue_slide, write_slide

from monai_fbta.data.datalist import DatalistError, check_splits, load_datalist, select_fold
from monai_fbta.transforms.chain import FBTADataset
from monai_fbta.data.errors import SlideError
from monai_fbta.data.extraction import extract_features
from monai_fbta.data.store import StoreError, add_arrays, read_array, store_is_complete, store_path, write_coords
from monai_fbta.pipeline.infer import run_inference

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- 1. input validation


def test_datalist_reports_every_problem_at_once(tmp_path):
    good = tissue_slide(tmp_path / "good.tif")
    (tmp_path / "notes.svs").write_text("not a slide\n")
    csv_path = write_csv(tmp_path / "labels.csv", [
        {"slide_id": "good", "path": "good.tif", "label": "a", "case_id": "p1", "mpp": ""},
        {"slide_id": "gone", "path": "missing.svs", "label": "a", "case_id": "p2", "mpp": ""},
        {"slide_id": "notes", "path": "notes.svs", "label": "b", "case_id": "p3", "mpp": ""},
        {"slide_id": "odd", "path": "good.tif", "label": "zebra", "case_id": "p4", "mpp": ""},
        {"slide_id": "good", "path": "good.tif", "label": "a", "case_id": "p1", "mpp": ""},
        {"slide_id": "same_patient", "path": "good.tif", "label": "b", "case_id": "p1", "mpp": ""},
        {"slide_id": "badmpp", "path": "good.tif", "label": "a", "case_id": "p5", "mpp": "-1"},
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


# ----------------------------------------------------------------------------- 2. bad slides


def _bad_slide_rows(folder: Path) -> tuple[list[dict], dict[str, str]]:
    """One good slide and one of each fault; returns rows and the expected message pattern per slide id."""
    folder.mkdir()
    good = tissue_slide(folder / "good.tif")
    data = Path(good).read_bytes()
    (folder / "truncated.tif").write_bytes(data[: len(data) // 3])
    (folder / "notaslide.svs").write_bytes(b"%PDF-1.4 definitely not a slide" * 10)
    weird = tissue_slide(folder / "weird.tif")
    with tifffile.TiffFile(weird, mode="r+b") as tif:
        for page in tif.pages:
            page.tags["Compression"].overwrite(60123)
    nompp = tissue_slide(folder / "nompp.tif", mpp=None)
    write_slide(folder / "blank.tif", np.full((512, 512, 3), 255, np.uint8), levels=2, tile=64)
    write_slide(folder / "tiny.tif", tissue_rect_image(40, 40, (0, 0, 40, 40)), tile=None)
    write_slide(folder / "flat.tif", tissue_rect_image(384, 384, (32, 32, 352, 352)), tile=None)
    rows = [{"image": str(folder / f"{n}")} for n in ("good.tif", "truncated.tif", "notaslide.svs", "weird.tif",
                                                       "nompp.tif", "blank.tif", "tiny.tif", "flat.tif")]
    rows.append({"image": nompp, "slide_id": "nompp_with_mpp_column", "mpp": 0.5})
    expected = {
        "truncated": r"truncated\.tif: truncated or corrupt TIFF",
        "notaslide": r"notaslide\.svs: no backend could open it",
        "weird": r"weird\.tif: unsupported TIFF compression 60123",
        "nompp": r"nompp\.tif: no pixel size in the metadata .*an mpp column in the datalist, the bundle's --assume_mpp",
        "blank": r"blank\.tif: .*tissue",
        "tiny": r"tiny\.tif: slide \(40x40 px\) is smaller than one patch",
    }
    return rows, expected


def test_each_bad_slide_is_skipped_with_a_specific_message(tmp_path):
    rows, expected = _bad_slide_rows(tmp_path / "slides")
    report = extract_features(rows, tmp_path / "out", tiny_encoder(), TILING, progress=False)
    with open(tmp_path / "out" / "extraction_report.csv") as f:
        table = {r["slide_id"]: r for r in csv.DictReader(f)}
    for sid, pattern in expected.items():
        assert table[sid]["status"] == "error" and re.search(pattern, table[sid]["error"]), table[sid]
        assert not store_is_complete(tmp_path / "out" / f"{sid}.h5")
    for sid in ("good", "flat", "nompp_with_mpp_column"):  # single-level flat TIFF and mpp override work
        assert table[sid]["status"] == "done" and int(table[sid]["n_patches"]) > 0, table[sid]
    assert len(report.failed) == len(expected)
    # fail fast: the first bad slide stops the run with its message
    with pytest.raises(SlideError, match=expected["truncated"]):
        extract_features(rows, tmp_path / "out2", tiny_encoder(), TILING, skip_errors=False, progress=False)


def test_bundle_exposes_fail_fast_resume_assume_mpp_and_slide_check():
    train = json.loads((REPO / "bundles/fbta_stad/configs/train.json").read_text())
    infer = json.loads((REPO / "bundles/fbta_stad/configs/inference.json").read_text())
    assert train["fail_fast"] is False and infer["fail_fast"] is False and train["resume"] is True
    assert train["tiling"]["assume_mpp"] == "@assume_mpp" and train["assume_mpp"] is None
    prepare = train["prepare"]
    assert prepare["_target_"].endswith("Preprocessor") and prepare["fail_fast"] == "@fail_fast"
    assert prepare["check_slides"] == "@check_slides" and prepare["strict"] == "@strict"
    preprocess = infer["preprocess"]
    assert preprocess["fail_fast"] == "@fail_fast" and preprocess["assume_mpp"] == "@assume_mpp"
    assert preprocess["strict"] == "@strict"
    assert train["strict"] is False and infer["strict"] is False and infer["assume_mpp"] is None
    resume = [h for h in train["train"]["handlers"] if h["_target_"].endswith("ResumeTraining")]
    assert len(resume) == 1 and resume[0]["enabled"] == "@resume" and resume[0]["path"] == "@last_ckpt"
    assert train["last_ckpt"] == "$@ckpt_dir + '/last.pt'"


# ----------------------------------------------------------------------------- 4. numerics


class _NaNEncoder(torch.nn.Module):
    """tiny_cnn whose output is NaN for every patch (a broken extractor or fp16 overflow)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = tiny_encoder()
        self.name = "nan_cnn"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * float("nan")


def test_nan_features_at_extraction_are_not_stored(tmp_path):
    row = {"image": tissue_slide(tmp_path / "s.tif"), "slide_id": "s"}
    report = extract_features([row], tmp_path / "out", _NaNEncoder(), TILING, amp=False, progress=False)
    assert report.results[0].status == "error"
    assert re.search(r"s\.tif: the encoder produced NaN/inf features for \d+ of \d+ patches", report.results[0].error)
    assert not store_is_complete(tmp_path / "out" / "s.h5")


def _store(path: Path, n: int, d: int = 8, nan: bool = False, identical: bool = False) -> None:
    """A feature store of ``n`` patches (``identical``: every row the same, so KMeans has empty clusters)."""
    coords = np.stack([np.arange(n) * 64, np.zeros(n)], 1).astype(np.int64)
    write_coords(path, coords, {"patch_size": 64, "patch_level": 0, "patch_size_level": 64})
    feats = np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)
    if nan:
        feats[1, 3] = np.inf
    if identical:
        feats[:] = 1.0
    add_arrays(path, {"features": feats})


def test_nan_in_a_stored_bag_is_refused_naming_the_slide(tmp_path):
    _store(tmp_path / "bad.h5", 6, nan=True)
    with pytest.raises(StoreError, match=r"bad\.h5: features of slide 'bad' contain NaN/inf"):
        FBTADataset([{"slide_id": "bad", "image": "x", "label": 0}], tmp_path, num_clusters=2, load_patches=False)


def test_small_bags_and_empty_clusters_sample_every_patch(tmp_path):
    _store(tmp_path / "small.h5", 3)  # N=3 < C=16
    _store(tmp_path / "dup.h5", 10, identical=True)  # 10 identical patches: KMeans has empty clusters
    rows = [{"slide_id": "small", "image": "x", "label": 0}, {"slide_id": "dup", "image": "x", "label": 1}]
    ds = FBTADataset(rows, tmp_path, num_clusters=16, num_per_cluster=2, load_patches=False)
    small, dup = ds[0], ds[1]
    assert small["pb_index"].tolist() == [0, 1, 2] and small["pb_features"].shape == (3, 8)
    assert 1 <= len(dup["pb_index"]) <= 10 and torch.isfinite(dup["pb_features"]).all()


def test_trainer_stops_on_a_non_finite_loss_naming_the_slide(tmp_path):
    from monai_fbta.engines import FBTALoss, FBTATrainer
    from monai_fbta.networks import build_mil_head

    head = build_mil_head("abmil", in_features=8, num_classes=2, hidden=16)
    before = [p.detach().clone() for p in head.parameters()]
    bag = torch.randn(1, 5, 8)
    bag[0, 2, 0] = float("nan")
    data = [{"slide_id": "slide_nan", "label": torch.tensor([1]), "pb_features": bag, "features": bag}]
    trainer = FBTATrainer("cpu", 1, data, head, torch.optim.SGD(head.parameters(), lr=0.1), FBTALoss(views=["frozen"]))
    with pytest.raises(FloatingPointError, match=r"slide slide_nan: non-finite loss .* no step was taken"):
        trainer.run()
    assert all(torch.equal(a, b) for a, b in zip(before, head.parameters()))


# ----------------------------------------------------------------------------- 5. safety


@pytest.mark.parametrize("slide_id", ["../../escape", "a/b", "/abs/x", ".."])
def test_store_path_never_leaves_the_cache_folder(tmp_path, slide_id):
    out = tmp_path / "cache"
    path = Path(store_path(out, slide_id))
    assert path.parent == out.resolve() and path.suffix == ".h5"


def test_hostile_slide_id_is_written_inside_the_cache(tmp_path):
    row = {"image": tissue_slide(tmp_path / "s.tif"), "slide_id": "../../../escaped"}
    report = extract_features([row], tmp_path / "a" / "cache", tiny_encoder(), TILING, progress=False)
    assert report.results[0].status == "done"
    assert sorted(p.name for p in (tmp_path / "a" / "cache").iterdir()) == ["_.._.._escaped.h5", "extraction_report.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "s.tif"]
    with pytest.raises(ValueError, match=r"stores would collide\): \['a b', 'a/b'\]"):
        extract_features([dict(row, slide_id="a/b"), dict(row, slide_id="a b")], tmp_path / "b", tiny_encoder(), TILING)


def test_no_pickle_loads_and_no_shell_strings_in_the_package():
    sources = {p: p.read_text() for p in (REPO / "monai_fbta").rglob("*.py")}
    loads = [(p, line) for p, s in sources.items() for line in s.splitlines() if re.search(r"\btorch\.load\(", line)]
    assert loads, "expected the checkpoint/encoder loaders"
    assert all("weights_only=True" in line for _, line in loads), loads
    shell = [p for p, s in sources.items() if re.search(r"shell\s*=\s*True|os\.system\(|os\.popen\(", s)]
    assert shell == []


# ----------------------------------------------------------------------------- 3. inference: kill and rerun


def _inference_script(model: Path, slides: Path, out: Path) -> list[str]:
    code = (
        "import torch; torch.set_num_threads(1)\n"
        "from monai_fbta.pipeline.infer import run_inference\n"
        f"run_inference({str(model)!r}, {str(slides)!r}, {str(out)!r}, heatmaps=True, batch_size=8)\n"
    )
    return [sys.executable, "-c", code]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_model_pt_names_its_frozen_encoder_relative_to_itself_and_travels(tmp_path):
    """model.pt used to store the encoder file's absolute path: a moved bundle lost its encoder."""
    from monai_fbta.handlers.checkpoint import load_inference_model

    model_pt = tiny_model(tmp_path / "a", {"patch_size": 64})
    assert torch.load(model_pt, weights_only=True)["metadata"]["encoder_weights"] == "frozen_encoder_tiny_cnn.pt"
    moved = tmp_path / "b"
    (tmp_path / "a").rename(moved)
    assert load_inference_model(moved / "models" / "model.pt")["metadata"]["encoder_weights"] == str(
        moved / "models" / "frozen_encoder_tiny_cnn.pt")

    blob = torch.load(moved / "models" / "model.pt", weights_only=True)  # monai-fbta 0.1: nested, absolute path
    old = {"network": {k: v for k, v in blob.items() if k.startswith(("mil_head.", "translator."))}, "has_translator": True,
           "metadata": dict(blob["metadata"], encoder_weights=str(tmp_path / "a" / "models" / "frozen_encoder_tiny_cnn.pt"))}
    torch.save(old, moved / "models" / "old.pt")
    loaded = load_inference_model(moved / "models" / "old.pt")
    assert loaded["metadata"]["encoder_weights"] == str(moved / "models" / "frozen_encoder_tiny_cnn.pt")
    assert loaded["translator"] is not None and loaded["mil_head"].keys() == {k[9:] for k in old["network"] if k.startswith("mil_head.")}


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


def test_inference_killed_then_rerun_reuses_features_and_writes_whole_files(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    for i in range(3):
        write_slide(slides / f"s{i}.tif", tissue_rect_image(768, 768, (64, 64, 704, 704), seed=i), levels=2, tile=64)
    model = tiny_model(tmp_path, TILING)
    out = tmp_path / "out"
    proc = subprocess.Popen(_inference_script(model, slides, out), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 120
    while not store_is_complete(out / "cache" / "s0.h5") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    done_at_kill = [i for i in range(3) if store_is_complete(out / "cache" / f"s{i}.h5")]
    assert 0 in done_at_kill and len(done_at_kill) < 3 and not (out / "predictions.csv").exists()
    kept = {i: read_array(out / "cache" / f"s{i}.h5", "features") for i in done_at_kill}

    run_inference(model, slides, out, heatmaps=True, batch_size=8)  # the same command again
    with open(out / "cache" / "extraction_report.csv") as f:
        status = {r["slide_id"]: r["status"] for r in csv.DictReader(f)}
    assert all(status[f"s{i}"] == "skipped" for i in done_at_kill) and "done" in status.values()
    for i, feats in kept.items():
        assert np.array_equal(read_array(out / "cache" / f"s{i}.h5", "features"), feats)
    with open(out / "predictions.csv") as f:
        assert [r["slide_id"] for r in csv.DictReader(f)] == ["s0", "s1", "s2"]
    assert len(list((out / "heatmaps").glob("*.png"))) == 3
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]

    # a model using another patch size does not reuse the cached features: they are recomputed
    other = tiny_model(tmp_path / "other", {**TILING, "patch_size": 32})
    run_inference(other, slides, out, heatmaps=False, batch_size=8)
    with open(out / "cache" / "extraction_report.csv") as f:
        assert {r["status"] for r in csv.DictReader(f)} == {"done"}


def test_resume_restores_the_best_validation_metric(tmp_path):
    """After a resume, model.pt is only replaced by a model better than the one saved before the kill."""
    from ignite.engine import Engine

    from monai_fbta.handlers.checkpoint import save_checkpoint, save_inference_model
    from monai_fbta.networks import ABMIL
    from monai_fbta.handlers import ResumeTraining

    head = ABMIL(8, 2, hidden=8)
    save_checkpoint(tmp_path / "last.pt", {"head": head})
    save_inference_model(tmp_path / "model.pt", head, None, {"best_metric": 0.8, "epoch": 3})
    trainer, evaluator = Engine(lambda e, b: None), Engine(lambda e, b: None)
    trainer.state.max_epochs, evaluator.state.best_metric = 5, -1
    ResumeTraining(tmp_path / "last.pt", objects={"head": head}, evaluator=evaluator, best_model=tmp_path / "model.pt")(trainer)
    assert evaluator.state.best_metric == 0.8 and evaluator.state.best_metric_epoch == 3
