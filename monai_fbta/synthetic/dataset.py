"""Synthetic datasets: balanced slides, tumour masks, ``labels.csv`` and a MONAI ``datalist.json`` (resumable),
and a one-slide-per-class preview image."""

from __future__ import annotations

import csv
import dataclasses
import inspect
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.ndimage as ndi

from monai_fbta._io import atomic_open
from monai_fbta.environment import software_environment
from monai_fbta.synthetic.render import SyntheticSlideConfig, render_slide
from monai_fbta.synthetic.tiff import slide_is_valid, tumour_bboxes, write_pyramidal_tiff

__all__ = ["GENERATOR", "generate_dataset", "generated_settings_differences", "save_preview"]

GENERATOR = "monai_fbta.synthetic"
"""The ``Generator`` field of every slide's description (with the config digest: what makes a slide reusable)."""


def _plan(num_slides: int, num_classes: int, seed: int) -> tuple[list[int], list[str]]:
    """Balanced labels in shuffled order and case ids (about a quarter of cases have two slides)."""
    rng = np.random.default_rng([seed, 7919])
    labels = [int(v) for v in rng.permutation(np.arange(num_slides) % num_classes)]
    cases: list[str] = [""] * num_slides
    k = 0
    for c in range(num_classes):
        idx = [i for i, lab in enumerate(labels) if lab == c]
        while idx:
            take = 2 if len(idx) >= 3 and rng.random() < 0.3 else 1
            for i in idx[:take]:
                cases[i] = f"case_{k:04d}"
            idx, k = idx[take:], k + 1
    return labels, cases


def _load_mask(path: str, shape: tuple[int, int]) -> np.ndarray | None:
    try:
        mask = np.load(path)
    except Exception:
        return None
    return mask if mask.dtype == bool and mask.shape == shape else None


def _slide_config(config: SyntheticSlideConfig | None, num_classes: int, size: int, tumour_fraction: float, seed: int,
                  stain_jitter: float | None, classes: Sequence[str] | None) -> SyntheticSlideConfig:
    """The rendering settings :func:`generate_dataset` writes slides with."""
    cfg = dataclasses.replace(config or SyntheticSlideConfig(), num_classes=num_classes, size=size,
                              tumour_fraction=tumour_fraction, seed=seed)
    if stain_jitter is not None:
        cfg = dataclasses.replace(cfg, stain_jitter=stain_jitter)
    if classes is not None:
        cfg = dataclasses.replace(cfg, classes=tuple(classes))
    return cfg


def generated_settings_differences(out_dir: str | os.PathLike, **settings: Any) -> list[str]:
    """How the synthetic dataset in ``out_dir`` differs from what ``generate_dataset(out_dir, **settings)`` would
    write (``"tumour_fraction: 0.25 there, 0.08 asked"``); empty when it matches or was not written by it."""
    try:
        written = json.loads((Path(out_dir) / "datalist.json").read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(written, dict) or not isinstance(written.get("config"), dict):
        return []
    signature = inspect.signature(generate_dataset)  # keys it does not take are not generator settings: left out
    call = signature.bind(out_dir, **{k: v for k, v in settings.items() if k in signature.parameters})
    call.apply_defaults()  # generate_dataset's own defaults for what ``settings`` leaves out
    a = call.arguments
    asked = json.loads(json.dumps(dataclasses.asdict(_slide_config(
        a["config"], a["num_classes"], a["size"], a["tumour_fraction"], a["seed"], a["stain_jitter"], a["classes"]))))
    asked["num_slides"] = a["num_slides"]
    # a config written before SyntheticSlideConfig had ``classes`` drew the default classes (empty = default)
    there = {"classes": [], **written["config"], "num_slides": len(written.get("training", []))}
    return [f"{k}: {there.get(k)!r} there, {v!r} asked" for k, v in asked.items() if there.get(k) != v]


def generate_dataset(
    out_dir: str | os.PathLike,
    num_slides: int = 12,
    num_classes: int = 3,
    size: int = 4096,
    tumour_fraction: float = 0.15,
    seed: int = 0,
    progress: bool = True,
    overwrite: bool = False,
    config: SyntheticSlideConfig | None = None,
    stain_jitter: float | None = None,
    classes: Sequence[str] | None = None,
) -> list[dict]:
    """Write ``num_slides`` balanced synthetic slides, ``labels.csv`` and ``datalist.json`` to ``out_dir``.

    Per slide ``{slide_id}.tiff`` and ``{slide_id}_tumour_mask.npy`` (bool, 1 px per
    ``mask_downsample`` level-0 px). Slides that already exist, are intact and were written with
    the same config are kept (resumable); ``overwrite=True`` regenerates them. Slide ``i`` draws
    from ``default_rng([seed, i])``, so a slide is identical whether or not others were skipped.
    ``config`` overrides the other rendering fields (its ``num_classes`` / ``size`` /
    ``tumour_fraction`` / ``seed`` are replaced by the arguments, and ``stain_jitter`` / ``classes`` when given).

    Returns the datalist rows with absolute paths; the files store paths relative to ``out_dir``.
    """
    from tqdm.auto import tqdm

    if num_slides < 1:
        raise ValueError(f"num_slides must be >= 1, got {num_slides}")
    cfg = _slide_config(config, num_classes, size, tumour_fraction, seed, stain_jitter, classes)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labels, cases = _plan(num_slides, num_classes, seed)
    d = cfg.mask_downsample
    mask_shape = (-(-cfg.size // d), -(-cfg.size // d))
    rows, written = [], 0
    for i in tqdm(range(num_slides), desc="synthetic slides", disable=not progress, unit="slide"):
        slide_id, label = f"synth_{i:04d}", labels[i]
        image, mask_file = f"{slide_id}.tiff", f"{slide_id}_tumour_mask.npy"
        expect = {"Generator": GENERATOR, "Config": cfg.digest(), "Slide": i, "Label": label}
        mask = None if overwrite else _load_mask(str(out / mask_file), mask_shape)
        if mask is None or not slide_is_valid(out / image, expect, cfg.size):
            rgb, mask = render_slide(cfg, label, np.random.default_rng([seed, i]))
            with atomic_open(out / mask_file, "wb") as f:
                np.save(f, mask)
            write_pyramidal_tiff(out / image, rgb, cfg.mpp, cfg.tile, cfg.jpeg_quality, cfg.smallest_level, extra=expect)
            written += 1
        rows.append({"image": image, "label": label, "slide_id": slide_id, "case_id": cases[i],
                     "tumour_mask": mask_file, "mask_downsample": d, "tumour_bboxes": tumour_bboxes(mask, d)})
    _write_tables(out, rows, cfg)
    return [dict(r, image=str(out / r["image"]), tumour_mask=str(out / r["tumour_mask"])) for r in rows]


def _write_tables(out: Path, rows: list[dict], cfg: SyntheticSlideConfig) -> None:
    """``labels.csv`` (slide_id,path,label,case_id) and the MONAI ``datalist.json``, atomically."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["slide_id", "path", "label", "case_id"])
    writer.writerows([r["slide_id"], r["image"], r["label"], r["case_id"]] for r in rows)
    with atomic_open(out / "labels.csv", "w", newline="") as f:
        f.write(text.getvalue())
    datalist = {
        "description": "monai_fbta synthetic H&E-like slides; paths are relative to this file",
        "num_classes": cfg.num_classes,
        "class_names": list(cfg.class_names),
        "mpp": cfg.mpp,
        "config": dataclasses.asdict(cfg),
        "written_with": software_environment(),  # the slides' pixels depend on numpy, scipy, tifffile and imagecodecs
        "training": rows,
    }
    with atomic_open(out / "datalist.json", "w") as f:
        json.dump(datalist, f, indent=1)


def _largest_region_centre(mask: np.ndarray, downsample: int) -> tuple[int, int]:
    """Level-0 ``(x, y)`` centre of the largest connected region of ``mask``."""
    labels, n = ndi.label(mask)
    if n == 0:
        return mask.shape[1] * downsample // 2, mask.shape[0] * downsample // 2
    biggest = int(np.argmax(np.bincount(labels.ravel())[1:])) + 1
    cy, cx = ndi.center_of_mass(labels == biggest)
    return int((cx + 0.5) * downsample), int((cy + 0.5) * downsample)


def save_preview(out_png: str | os.PathLike, size: int = 2048, num_classes: int = 3, seed: int = 0,
                 zoom: int = 384, config: SyntheticSlideConfig | None = None) -> None:
    """Save a PNG: per class, a slide thumbnail (abnormal regions outlined) above a level-0
    ``zoom x zoom`` crop of its largest abnormal region and a crop of normal stroma."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cfg = dataclasses.replace(config or SyntheticSlideConfig(), size=size, num_classes=num_classes, seed=seed)
    fig = Figure(figsize=(3.2 * num_classes, 9.6), dpi=110)
    FigureCanvasAgg(fig)
    for label in range(num_classes):
        rgb, mask = render_slide(cfg, label, np.random.default_rng([seed, label]))
        d = cfg.mask_downsample
        step = max(size // 768, 1)
        ax = fig.add_subplot(3, num_classes, label + 1)
        ax.imshow(rgb[::step, ::step])
        ax.contour(np.kron(mask, np.ones((d // step, d // step))) if d >= step else mask, levels=[0.5], colors="k", linewidths=0.6)
        ax.set_title(f"class {label}: {cfg.class_names[label]}", fontsize=9)
        cx, cy = _largest_region_centre(mask, d)
        # a normal-stroma crop: the tissue point farthest from any region
        tissue_lo = rgb[d // 2 :: d, d // 2 :: d].min(axis=2) < 200
        tissue_lo = tissue_lo[: mask.shape[0], : mask.shape[1]]
        far = np.minimum(ndi.distance_transform_edt(~mask), ndi.distance_transform_edt(tissue_lo))
        ny, nx = np.unravel_index(np.argmax(far), far.shape)
        for row, (x, y), name in ((1, (cx, cy), "abnormal region"), (2, (nx * d, ny * d), "normal stroma")):
            x0, y0 = int(np.clip(x - zoom // 2, 0, size - zoom)), int(np.clip(y - zoom // 2, 0, size - zoom))
            ax = fig.add_subplot(3, num_classes, row * num_classes + label + 1)
            ax.imshow(rgb[y0 : y0 + zoom, x0 : x0 + zoom])
            ax.set_title(f"{name}, {zoom * cfg.mpp:.0f} um", fontsize=8)
    for ax in fig.axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    with atomic_open(out_png, "wb") as f:
        fig.savefig(f, format="png")
