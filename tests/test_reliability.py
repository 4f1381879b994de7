"""Reliability of the package as a whole (issue 8), the tests no single module owns; each backs rows of
docs/reliability.md.

Left here, and why:
- ``test_no_pickle_loads_and_no_shell_strings_in_the_package`` reads the source of every module of ``monai_fbta``
  (``torch.load`` only with ``weights_only=True``, no shell strings): a rule for the whole package, not one module.
- ``test_inference_killed_then_rerun_reuses_features_and_writes_whole_files`` kills a real inference process with
  SIGKILL in the middle of feature extraction and reruns it: atomic stores (data/store.py), skip and fingerprint
  checks (data/extraction.py), inference (pipeline/infer.py) and its atomic predictions and heatmaps (handlers/)
  are checked together, as the process survives the crash.

The bundle training killed and resumed is in test_reliability_training.py. The module-level reliability tests
(datalist problems, bad slides, NaN features and bags, non-finite loss, store paths, model.pt portability, resume)
are in the module's own test file: test_datalist, test_extraction, test_chain, test_trainer, test_store,
test_checkpoint, test_prepare, test_resume, test_bundle; those of the former test_reliability_pipeline.py (run
identity, class names, splits, settings checks, exit status) in test_resume, test_report, test_prepare,
test_validate, test_datalist and test_infer.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from conftest import tiny_model
from slide_factory import TILING, tissue_rect_image, write_slide

from monai_fbta.data.store import read_array, store_is_complete
from monai_fbta.pipeline.infer import run_inference

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


def test_no_pickle_loads_and_no_shell_strings_in_the_package():
    sources = {p: p.read_text() for p in (REPO / "monai_fbta").rglob("*.py")}
    loads = [(p, line) for p, s in sources.items() for line in s.splitlines() if re.search(r"\btorch\.load\(", line)]
    assert loads, "expected the checkpoint/encoder loaders"
    assert all("weights_only=True" in line for _, line in loads), loads
    shell = [p for p, s in sources.items() if re.search(r"shell\s*=\s*True|os\.system\(|os\.popen\(", s)]
    assert shell == []


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
