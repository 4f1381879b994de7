"""The documented example runs as a script and its MONAI pipeline produces a sensible pseudo-bag."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "monai_pipeline.py"


def test_monai_pipeline_example_runs_quietly(tmp_path):
    out = subprocess.run([sys.executable, str(EXAMPLE)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "tissue patches, pseudo-bag of 8" in out.stdout
    assert "nvJPEG2000" not in out.stdout + out.stderr  # native codec noise stays silenced
    assert list(tmp_path.iterdir()) == []  # no cufile.log or other files left behind


def test_monai_pipeline_example_sample():
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        import monai_pipeline
    finally:
        sys.path.pop(0)
    result = monai_pipeline.main(["--clusters", "4"])
    sample = result["sample"]
    index = torch.as_tensor(sample["pb_index"])
    assert len(index) == 4 and torch.all(index[1:] > index[:-1])  # one per cluster, slide order
    assert sample["pb_image"].shape[1:] == (3, 64, 64)
    assert float(sample["pb_image"].min()) >= 0 and float(sample["pb_image"].max()) <= 1
    assert torch.allclose(result["attention"].sum(), torch.tensor(1.0), atol=1e-5)
