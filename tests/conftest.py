"""Shared fixtures and helpers: real test slides (skipped when ../shared is absent), feature stores of two tiny
slides, a tiny model.pt, the tiny_cnn encoder, a stepping ignite engine, datalist rows and CSVs, attention-file checks.

Tests import the plain helpers with ``from conftest import ...`` (``tests/`` is on ``sys.path`` under pytest).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from ignite.engine import Engine
from slide_factory import TILING, tissue_rect_image, write_slide

from monai_fbta.data.extraction import extract_features
from monai_fbta.handlers import FBTAEvents

REPO = Path(__file__).resolve().parents[1]
REAL_DIR = Path(os.environ.get("FBTA_REAL_SLIDES", REPO.parent / "shared" / "testdata" / "real"))


@pytest.fixture(scope="session")
def real_dir() -> Path:
    """Folder of real test slides; the test is skipped when it is not there."""
    if not REAL_DIR.is_dir():
        pytest.skip(f"real test slides not found at {REAL_DIR}")
    return REAL_DIR


def real_slide(name: str) -> Path:
    path = REAL_DIR / name
    if not path.is_file():
        pytest.skip(f"real test slide {path} not found")
    return path


# ----------------------------------------------------------------------------- runs, models, datalists


RUN_SETTINGS = {"mil_name": "abmil", "views": ["frozen", "e2e"], "tiling": TILING, "num_clusters": 8, "fold": 0}


@contextlib.contextmanager
def process_holding(take_lock: str) -> Iterator[subprocess.Popen]:
    """A child Python process that runs ``take_lock`` (code that takes a lock and keeps it), then sleeps; yielded
    once it holds the lock, killed after the block (the kernel then frees the lock)."""
    code = f"import time\n{take_lock}\nprint('held', flush=True)\ntime.sleep(120)"
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def datalist_rows(n: int = 12, labels: tuple[int, ...] = (0, 1)) -> list[dict]:
    return [{"slide_id": f"s{i}", "image": f"/data/s{i}.tif", "label": labels[i % len(labels)], "case_id": f"s{i}"}
            for i in range(n)]


def write_csv(path: Path, rows: list[dict]) -> Path:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def tiny_encoder(seed: int = 0) -> torch.nn.Module:
    from monai_fbta.networks.registry import build_encoder

    torch.manual_seed(seed)
    return build_encoder("tiny_cnn")


def tiny_model(tmp_path: Path, tiling: dict) -> Path:
    from monai_fbta.handlers.checkpoint import model_metadata, save_inference_model
    from monai_fbta.networks import FeatureTranslator, build_mil_head
    from monai_fbta.data.extraction import encoder_fingerprint
    from monai_fbta.pipeline.prepare import frozen_encoder

    models = tmp_path / "models"
    enc = frozen_encoder("tiny_cnn", None, models)  # saves its random weights beside model.pt
    d = enc.out_features
    meta = model_metadata("abmil", d, 2, ["a", "b"], ["frozen", "translated"], "tiny_cnn", enc.weights_file, tiling, 16, 2,
                          encoder_digest=encoder_fingerprint(enc)["weights"])
    torch.manual_seed(0)
    save_inference_model(models / "model.pt", build_mil_head("abmil", in_features=d, num_classes=2, hidden=16),
                         FeatureTranslator(d, num_heads=2), meta)
    return models / "model.pt"


# ----------------------------------------------------------------------------- feature stores of two tiny slides


def _frozen_encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 5, stride=4), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten()
    )


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds")
    rows = []
    for i in range(2):
        img = tissue_rect_image(768, 1024, (64, 64, 960, 704), seed=i)
        img[::7] = (img[::7] * 0.6).astype(np.uint8)  # some texture so features vary
        rows.append({"image": write_slide(root / f"s{i}.tif", img, levels=2, tile=64, mpp=0.5), "label": i})
    extract_features(rows, root / "out", _frozen_encoder(), {"patch_size": 64, "target_mpp": 0.5}, progress=False)
    return rows, root / "out"


# ----------------------------------------------------------------------------- engines and inference outputs


def stepping_engine(model: nn.Module, steps_per_event: int = 1) -> Engine:
    """An engine whose iteration perturbs ``model`` (an optimiser step stand-in) and fires the step event."""

    def step(engine, _):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        if engine.state.iteration % steps_per_event == 0:
            engine.state.optimizer_step += 1
            engine.fire_event(FBTAEvents.OPTIMIZER_STEP_COMPLETED)
        return {"loss": 1.0, "cls": 0.5, "cons": 0.25, "dist": 0.125}

    engine = Engine(step)
    engine.register_events(*FBTAEvents)
    engine.state.optimizer_step = 0
    return engine


def check_attention_outputs(csv_path: str, geojson_path: str, coords: np.ndarray, attention: np.ndarray, size: int,
                            slide_wh: tuple[int, int]) -> None:
    rows = list(csv.DictReader(open(csv_path)))
    assert list(rows[0]) == ["x", "y", "patch_size_level0", "attention", "attention_rank"]
    assert [(int(r["x"]), int(r["y"])) for r in rows] == [tuple(c) for c in coords.tolist()]
    assert {float(r["patch_size_level0"]) for r in rows} == {float(size)}
    np.testing.assert_allclose([float(r["attention"]) for r in rows], attention, rtol=1e-6)
    ranks = np.array([float(r["attention_rank"]) for r in rows])
    assert ranks.min() >= 0 and ranks.max() <= 1 and ranks[np.argmax(attention)] == ranks.max()

    collection = json.load(open(geojson_path))
    assert collection["type"] == "FeatureCollection" and len(collection["features"]) == len(coords)
    assert len({f["id"] for f in collection["features"]}) == len(coords)
    for i, (feature, (x, y), a) in enumerate(zip(collection["features"], coords.tolist(), attention)):
        assert feature["type"] == "Feature" and feature["geometry"]["type"] == "Polygon" and uuid.UUID(feature["id"])
        assert feature["properties"]["name"] == f"patch {i}"
        (ring,) = feature["geometry"]["coordinates"]
        assert len(ring) == 5 and ring[0] == ring[-1]  # closed ring
        xs, ys = [p[0] for p in ring], [p[1] for p in ring]
        assert min(xs) == x and min(ys) == y and 0 <= min(xs) < max(xs) <= slide_wh[0] and 0 <= min(ys) < max(ys) <= slide_wh[1]
        props = feature["properties"]
        assert props["objectType"] == "tile" and props["classification"]["name"] == "attention"
        assert props["measurements"]["attention"] == pytest.approx(a, rel=1e-6)


def load_benchmark(name: str):
    """The module of the script ``benchmarks/<name>.py`` (benchmarks are scripts, not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
