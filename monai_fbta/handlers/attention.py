"""Per-patch attention tables: a CSV and a QuPath-importable GeoJSON per slide, in level-0 pixel coordinates.

For each slide two files are written atomically into ``output_dir``:

* ``<slide_id>_attention.csv``: ``x, y, patch_size_level0, attention, attention_rank`` per patch (top-left
  corner and side at level 0; the raw attention weight; its rank-normalised score in [0, 1], as in the heatmaps);
* ``<slide_id>_attention.geojson``: a ``FeatureCollection`` with one ``Polygon`` per patch (closed ring,
  clipped to the slide), a deterministic UUID ``id``, ``properties`` in QuPath's GeoJSON form (0.4+):
  ``objectType: "tile"``, ``name`` (``patch <i>``, i the CSV's data row from 0), a ``classification``
  (name ``attention``), a per-object ``color`` (inferno colour of the rank score) and ``measurements``
  ``{"attention", "attention_rank"}``. In QuPath: *File > Import objects from file*.
"""

from __future__ import annotations

import csv
import io
import json
import os
import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np

from monai_fbta._io import atomic_open, inside, safe_name
from monai_fbta.handlers.heatmap import rank_normalise

__all__ = ["attention_table", "attention_geojson", "AttentionWriter"]

CSV_COLUMNS = ("x", "y", "patch_size_level0", "attention", "attention_rank")


def attention_table(coords: np.ndarray, attention: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Checked ``(coords int64 [N, 2], attention float64 [N], rank [N] in [0, 1])`` for one slide."""
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    attention = np.asarray(attention, dtype=np.float64).ravel()
    if len(coords) != len(attention):
        raise ValueError(f"{len(coords)} patch coordinates but {len(attention)} attention scores")
    return coords, attention, rank_normalise(attention)


def attention_geojson(
    coords: np.ndarray, attention: np.ndarray, patch_size_level0: float, slide_size: tuple[int, int],
    slide_id: str = "", cmap: str = "inferno",
) -> dict[str, Any]:
    """QuPath ``FeatureCollection``: one closed square ``Polygon`` per patch of ``coords [N, 2]`` (level-0 x, y),
    clipped to ``slide_size`` ``(width, height)``; patches wholly outside the slide are refused (``ValueError``)."""
    from matplotlib import colormaps

    coords, attention, rank = attention_table(coords, attention)
    width, height = slide_size
    x0, y0 = np.clip(coords[:, 0], 0, width), np.clip(coords[:, 1], 0, height)
    x1 = np.clip(coords[:, 0] + float(patch_size_level0), 0, width)
    y1 = np.clip(coords[:, 1] + float(patch_size_level0), 0, height)
    outside = (x1 <= x0) | (y1 <= y0)
    if outside.any():
        raise ValueError(f"{slide_id}: {int(outside.sum())} patch(es) lie outside the {width}x{height} slide, "
                         f"e.g. at {coords[outside][0].tolist()}: the feature store does not belong to this slide")
    colours = (np.asarray(colormaps[cmap](rank))[:, :3] * 255).round().astype(int)
    features = []
    for i in range(len(coords)):
        a, b, c, d = float(x0[i]), float(y0[i]), float(x1[i]), float(y1[i])
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"monai-fbta/{slide_id}/patch{i}")),  # QuPath reads ids as UUIDs
            "geometry": {"type": "Polygon", "coordinates": [[[a, b], [c, b], [c, d], [a, d], [a, b]]]},
            "properties": {
                "objectType": "tile",
                "name": f"patch {i}",
                "classification": {"name": "attention", "color": [255, 128, 0]},
                "color": colours[i].tolist(),
                "measurements": {"attention": float(attention[i]), "attention_rank": float(rank[i])},
            },
        })
    return {"type": "FeatureCollection", "features": features}


class AttentionWriter:
    """Writes ``<slide_id>_attention.csv`` and ``<slide_id>_attention.geojson`` per slide into ``output_dir`` (the id
    made a safe file name).

    ``attach(engine)`` registers on ``Events.ITERATION_COMPLETED`` for an evaluator whose output (a dict, or a list
    of them) holds ``slide_id``, ``coords [N, 2]``, ``attention [N]``, ``patch_size_level0`` and ``slide_size``
    (width, height), as :class:`~monai_fbta.engines.inference.FBTAInferenceEvaluator`'s does (bundle inference).
    :attr:`written` lists the files.
    """

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.output_dir = os.fspath(output_dir)
        self.written: list[str] = []

    def attach(self, engine) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def write_one(
        self, slide_id: str, coords: np.ndarray, attention: np.ndarray, patch_size_level0: float,
        slide_size: Sequence[int],
    ) -> tuple[str, str]:
        """Write both files of one slide; returns ``(csv_path, geojson_path)``."""
        coords, scores, rank = attention_table(coords, attention)
        collection = attention_geojson(coords, scores, patch_size_level0, (int(slide_size[0]), int(slide_size[1])), slide_id)
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for (x, y), a, r in zip(coords.tolist(), scores, rank):
            writer.writerow([x, y, f"{float(patch_size_level0):g}", f"{a:.8g}", f"{r:.6f}"])
        base = inside(self.output_dir, f"{safe_name(slide_id)}_attention")
        with atomic_open(base + ".csv", "w", newline="") as f:
            f.write(text.getvalue())
        with atomic_open(base + ".geojson", "w") as f:
            json.dump(collection, f)
        self.written += [base + ".csv", base + ".geojson"]
        return base + ".csv", base + ".geojson"

    def __call__(self, engine) -> None:
        outputs = engine.state.output
        for item in outputs if isinstance(outputs, list) else [outputs]:
            self.write_one(str(item["slide_id"]), item["coords"], item["attention"], float(item["patch_size_level0"]),
                           item["slide_size"])
