"""handlers/attention.py: AttentionWriter, per-patch attention as CSV and QuPath GeoJSON (alone and as an engine handler)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import check_attention_outputs

from monai_fbta.handlers.attention import AttentionWriter, attention_geojson

torch.set_num_threads(1)


def test_attention_writer_csv_and_geojson(tmp_path):
    coords = np.array([[0, 0], [64, 0], [64, 64], [100, 70]])
    attention = np.array([0.1, 0.4, 0.3, 0.2])
    csv_path, geo = AttentionWriter(tmp_path).write_one("s", coords, attention, 64, (140, 128))
    check_attention_outputs(csv_path, geo, coords, attention, 64, (140, 128))
    ring = json.load(open(geo))["features"][3]["geometry"]["coordinates"][0]
    assert max(p[0] for p in ring) == 140 and max(p[1] for p in ring) == 128  # clipped to the slide
    with pytest.raises(ValueError, match="outside the 100x100 slide"):
        attention_geojson(coords, attention, 64, (100, 100), "s")
    with pytest.raises(ValueError, match="4 patch coordinates but 3"):
        AttentionWriter(tmp_path / "x").write_one("s", coords, attention[:3], 64, (140, 128))
    assert not (tmp_path / "x").exists()

    from ignite.engine import Engine  # as an evaluator handler: attach(engine), one slide per iteration

    item = {"slide_id": "e", "coords": coords, "attention": attention, "patch_size_level0": 64, "slide_size": (140, 128)}
    writer = AttentionWriter(tmp_path / "engine")
    engine = Engine(lambda e, b: item)
    writer.attach(engine)
    engine.run([0])
    assert writer.written == [str(tmp_path / "engine" / "e_attention.csv"), str(tmp_path / "engine" / "e_attention.geojson")]
    check_attention_outputs(*writer.written, coords, attention, 64, (140, 128))
