"""Heatmap rendering: scores land on the right patches, background stays untouched, PNG is written."""

from __future__ import annotations

import numpy as np
from PIL import Image

from monai_fbta.handlers.heatmap import attention_to_grid, render_heatmap, write_heatmap


def test_grid_places_scores_on_their_patches():
    coords = np.array([[0, 0], [512, 0], [0, 512]])
    scores = np.array([0.1, 0.9, 0.5])
    values, covered = attention_to_grid(coords, scores, 512, (1024, 1024), (4, 4))
    assert covered[:2, :2].all() and covered[:2, 2:].all() and covered[2:, :2].all()
    assert not covered[2:, 2:].any()
    # rank-normalised: lowest -> 0, highest -> 1, middle -> 0.5
    assert values[0, 0] == 0.0 and values[0, 3] == 1.0 and values[3, 0] == 0.5


def test_overlay_keeps_background_and_colours_tissue(tmp_path):
    thumb = np.full((64, 64, 3), 255, np.uint8)
    coords = np.array([[0, 0], [256, 256]])
    out = render_heatmap(thumb, coords, np.array([0.0, 1.0]), 256, (1024, 1024))
    assert out.shape == thumb.shape and out.dtype == np.uint8
    assert (out[40:, :20] == 255).all()  # no patch there
    assert not (out[:16, :16] == 255).all()  # painted
    assert not np.array_equal(out[0, 0], out[20, 20])  # low and high attention differ
    path = write_heatmap(str(tmp_path / "s_heatmap.png"), thumb, coords, np.array([0.0, 1.0]), 256, (1024, 1024), title="s")
    img = Image.open(path)
    assert img.size[0] > 300 and img.mode in ("RGB", "RGBA")
    assert [p.name for p in tmp_path.iterdir()] == ["s_heatmap.png"]  # no temp file left
