"""The ``fbta-synth`` / ``python -m monai_fbta.synthetic`` command line."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import numpy as np

from monai_fbta.synthetic.dataset import generate_dataset, save_preview
from monai_fbta.synthetic.render import CLASS_NAMES, SyntheticSlideConfig

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """``fbta-synth`` / ``python -m monai_fbta.synthetic``: write a synthetic dataset."""
    p = argparse.ArgumentParser(prog="fbta-synth", description="Write a synthetic dataset of H&E-like pyramidal slides.")
    p.add_argument("--out", required=True, help="output folder (slides, masks, labels.csv, datalist.json)")
    p.add_argument("--num-slides", type=int, default=12)
    p.add_argument("--num-classes", type=int, default=None,
                   help=f"2..{len(CLASS_NAMES)} (default {SyntheticSlideConfig.num_classes}, "
                        "or as many as --classes names)")
    p.add_argument("--classes", metavar="NAME,NAME,...", default=None,
                   help=f"the morphology of each label, from {','.join(CLASS_NAMES)} (default: the first "
                        "--num-classes of them)")
    p.add_argument("--size", type=int, default=4096, help="level-0 side in pixels")
    p.add_argument("--tumour-fraction", type=float, default=0.15, help="share of the tissue in abnormal regions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mpp", type=float, default=0.5, help="microns per pixel at level 0")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--stain-jitter", type=float, default=1.0, help="per-slide colour variation (0 = none)")
    p.add_argument("--overwrite", action="store_true", help="regenerate slides that already exist")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--preview", metavar="PNG", help="also save a one-slide-per-class preview image")
    a = p.parse_args(argv)
    classes = tuple(c.strip() for c in a.classes.split(",")) if a.classes else ()
    if classes and a.num_classes not in (None, len(classes)):
        p.error(f"--num-classes {a.num_classes} but --classes names {len(classes)}: {','.join(classes)}")
    if a.num_classes is None:  # not `or`: --num-classes 0 must reach the config's check, not become the default
        a.num_classes = len(classes) or SyntheticSlideConfig.num_classes
    try:
        cfg = SyntheticSlideConfig(size=a.size, mpp=a.mpp, jpeg_quality=a.jpeg_quality, num_classes=a.num_classes,
                                   tumour_fraction=a.tumour_fraction, stain_jitter=a.stain_jitter, seed=a.seed,
                                   classes=classes)
        if a.num_slides < 1:
            raise ValueError(f"--num-slides must be >= 1, got {a.num_slides}")
    except ValueError as e:
        p.error(str(e))
    rows = generate_dataset(a.out, a.num_slides, a.num_classes, a.size, a.tumour_fraction, a.seed,
                            progress=not a.no_progress, overwrite=a.overwrite, config=cfg)
    if a.preview:
        save_preview(a.preview, size=min(a.size, 2048), num_classes=a.num_classes, seed=a.seed, config=cfg)
    counts = np.bincount([r["label"] for r in rows], minlength=a.num_classes).tolist()
    print(f"{len(rows)} slides (per class {counts}) in {os.path.abspath(a.out)}: labels.csv, datalist.json")
    return 0
