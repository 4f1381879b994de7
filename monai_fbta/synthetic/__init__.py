"""Synthetic pyramidal H&E-like whole-slide images with a subtle, local class signal.

Every slide has the same ingredients: pink fibrous stroma on white glass, lumen holes,
scattered stromal nuclei, and a few small *abnormal regions* (``tumour_fraction`` of the
tissue area). Only the nuclei inside those regions differ between classes (see
:data:`CLASS_NAMES`); their nuclear "stain mass" per area is matched, and every region has the
same small lumens, so the slide's global colour histogram and nuclear density say little about
the label. A frozen extractor with mean pooling therefore separates classes poorly, which is the
setting where end-to-end fine-tuning (FBTA) should help. See ``docs/synthetic_data.md``.

Files are real Aperio-style pyramidal TIFFs (tiled, JPEG, ``MPP = 0.5``) that cuCIM, OpenSlide
and tifffile all open. Modules: :mod:`.render` (one slide in memory), :mod:`.tiff` (the
file), :mod:`.dataset` (datasets and a preview), :mod:`.cli`. CLI::

    python -m monai_fbta.synthetic --out DIR --num-slides 12 --num-classes 3 --size 4096
"""

from monai_fbta.synthetic.cli import main
from monai_fbta.synthetic.dataset import GENERATOR, generate_dataset, generated_settings_differences, save_preview
from monai_fbta.synthetic.render import CLASS_NAMES, SyntheticSlideConfig, render_slide
from monai_fbta.synthetic.tiff import slide_is_valid, tumour_bboxes, write_pyramidal_tiff

__all__ = [
    "CLASS_NAMES",
    "GENERATOR",
    "SyntheticSlideConfig",
    "render_slide",
    "write_pyramidal_tiff",
    "slide_is_valid",
    "tumour_bboxes",
    "generate_dataset",
    "generated_settings_differences",
    "save_preview",
    "main",
]
