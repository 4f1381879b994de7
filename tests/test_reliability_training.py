"""Bundle training killed with SIGKILL after an epoch resumes on the rerun of the same command (issue 8)."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 30


def _command(tmp: Path) -> list[str]:
    return [
        sys.executable, "-m", "monai.bundle", "run", "training",
        "--config_file", str(REPO / "bundles/fbta_stad/configs/train.json"),
        "--dataset_dir", str(tmp / "data"), "--ckpt_dir", str(tmp / "models"), "--cache_dir", str(tmp / "cache"),
        "--output_dir", str(tmp / "eval"), "--synthetic#num_slides", "12", "--synthetic#size", "1024",
        "--num_epochs", str(EPOCHS), "--encoder_name", "tiny_cnn", "--num_workers", "0", "--num_folds", "3",
        "--val_fraction", "0.5",
    ]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _saved_epoch(path: Path) -> int:
    state = torch.load(path, map_location="cpu", weights_only=True)["trainer"]  # ignite saves the iteration
    return int(state["iteration"]) // int(state["epoch_length"])


def test_bundle_training_killed_after_an_epoch_resumes_and_finishes(tmp_path):
    last = tmp_path / "models" / "last.pt"
    proc = subprocess.Popen(_command(tmp_path), cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 180
    while not last.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]
    killed_at = _saved_epoch(last)  # whole file (atomic write) from a finished epoch
    assert 1 <= killed_at < EPOCHS
    assert not (tmp_path / "eval" / "test_metrics.json").exists()

    rerun = subprocess.run(_command(tmp_path), cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    match = re.search(rf"resuming from epoch (\d+) of {EPOCHS}", rerun.stdout)
    assert match and int(match.group(1)) == killed_at, rerun.stdout[-3000:]
    epochs = [int(e) for e in re.findall(r"FBTATrainer - INFO - Epoch\[(\d+)\] Complete", rerun.stdout + rerun.stderr)]
    assert epochs == list(range(killed_at + 1, EPOCHS + 1)), epochs  # no finished epoch is trained again
    assert _saved_epoch(last) == EPOCHS
    assert (tmp_path / "eval" / "test_metrics.json").is_file() and (tmp_path / "models" / "model.pt").is_file()
    with open(tmp_path / "cache" / "extraction_report.csv") as f:  # preprocessing was not redone
        assert {r["status"] for r in csv.DictReader(f)} == {"skipped"}
    assert not list(tmp_path.rglob("*.tmp"))

    # a third run of a finished training trains nothing and still writes the report
    third = subprocess.run(_command(tmp_path), cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=240)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"is from a finished run ({EPOCHS}/{EPOCHS} epochs)" in third.stdout
