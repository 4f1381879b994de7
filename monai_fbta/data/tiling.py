"""Tissue tiling: a grid of level-0 patch coordinates at a target resolution, filtered by a tissue mask."""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np

from monai_fbta.data.errors import MissingMPPError, NoTissueError, SlideError
from monai_fbta.data.slide import Slide, open_slide
from monai_fbta.data.tissue import tissue_mask

__all__ = ["tile_slide", "select_level", "tissue_fractions"]


def select_level(slide: Slide, mpp: float, target_mpp: float) -> int:
    """Highest-index (lowest-resolution) level whose mpp is <= ``target_mpp`` (0.1 % tolerance)."""
    ok = [i for i, d in enumerate(slide.level_downsamples) if mpp * d <= target_mpp * 1.001]
    return max(ok) if ok else 0


def tissue_fractions(mask: np.ndarray, coords: np.ndarray, size0: int, slide_wh: tuple[int, int]) -> np.ndarray:
    """Tissue fraction of each level-0 square patch ``coords [N, 2]`` of side ``size0`` -> ``[N]``.

    ``mask`` ``bool [h, w]`` covers the whole slide (``slide_wh`` level-0 ``(w, h)``); the part of a
    patch outside the slide counts as background.
    """
    mh, mw = mask.shape
    sx, sy = mw / slide_wh[0], mh / slide_wh[1]
    count = np.int32 if mh * mw < 2**31 else np.int64  # the integral image's largest entry is mh * mw
    integral = np.zeros((mh + 1, mw + 1), count)
    integral[1:, 1:] = mask.astype(count).cumsum(0, dtype=count).cumsum(1, dtype=count)
    x0 = np.round(coords[:, 0] * sx).astype(np.int64)
    y0 = np.round(coords[:, 1] * sy).astype(np.int64)
    x1 = np.maximum(np.round((coords[:, 0] + size0) * sx).astype(np.int64), x0 + 1)
    y1 = np.maximum(np.round((coords[:, 1] + size0) * sy).astype(np.int64), y0 + 1)
    cx0, cx1 = np.clip(x0, 0, mw), np.clip(x1, 0, mw)
    cy0, cy1 = np.clip(y0, 0, mh), np.clip(y1, 0, mh)
    inside = integral[cy1, cx1] - integral[cy0, cx1] - integral[cy1, cx0] + integral[cy0, cx0]
    return inside / ((x1 - x0) * (y1 - y0))


def tile_slide(
    slide: Slide | str | os.PathLike,
    patch_size: int = 256,
    target_mpp: float | None = 0.5,
    magnification: float | None = None,
    tissue_threshold: float = 0.5,
    mask_max_size: int = 2048,
    overlap: int = 0,
    assume_mpp: float | None = None,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Level-0 top-left coords ``int64 [N, 2]`` of tissue patches, and their attrs.

    Patches are ``patch_size`` px at ``target_mpp`` um/px (or ``magnification``, 10 / mpp). They
    are read at ``attrs["patch_level"]`` with side ``attrs["patch_size_level"]`` and resized to
    ``patch_size`` later. The grid (step ``patch_size - overlap``) covers the whole slide; a patch
    is kept when its tissue fraction in ``mask`` (default: :func:`tissue_mask` of a thumbnail of
    at most ``mask_max_size`` px) is >= ``tissue_threshold``. Coordinates are in row-major order.

    Raises :class:`MissingMPPError` when the slide has no pixel size and ``assume_mpp`` is not
    given, :class:`NoTissueError` when no patch passes, :class:`SlideError` when the slide is
    smaller than one patch.
    """
    if not isinstance(slide, Slide):
        with open_slide(slide) as opened:
            return tile_slide(opened, patch_size, target_mpp, magnification, tissue_threshold, mask_max_size, overlap, assume_mpp, mask)
    if magnification is not None:
        target_mpp = 10.0 / magnification
    if target_mpp is None or target_mpp <= 0:
        raise ValueError(f"target_mpp must be > 0 (or give magnification), got {target_mpp}")
    if not 0 <= overlap < patch_size:
        raise ValueError(f"overlap must be in [0, patch_size), got {overlap}")
    mpp, mpp_source = slide.mpp, slide.mpp_source
    if mpp is None:
        if assume_mpp is None:
            raise MissingMPPError(
                slide.path, f"no pixel size in the metadata ({slide.mpp_note}); give it: an mpp column in the datalist, the bundle's "
                "--assume_mpp, or mpp= to open_slide / assume_mpp= to tile_slide"
            )
        warnings.warn(
            f"{slide.path}: no pixel size in the metadata; ASSUMING {assume_mpp} um/px. Tiles will be at the wrong "
            "scale if this is not true.",
            stacklevel=2,
        )
        mpp, mpp_source = float(assume_mpp), "assumed"

    level = select_level(slide, mpp, target_mpp)
    ds = slide.level_downsamples[level]
    level_mpp = mpp * ds
    if level_mpp > target_mpp * 1.001:
        warnings.warn(
            f"{slide.path}: slide resolution {level_mpp:.3f} um/px is coarser than target {target_mpp} um/px; patches will be upsampled",
            stacklevel=2,
        )
    scale = target_mpp / level_mpp
    size_level = max(1, int(round(patch_size * scale)))
    step_level = max(1, int(round((patch_size - overlap) * scale)))
    size0, step0 = int(round(size_level * ds)), int(round(step_level * ds))
    w0, h0 = slide.level_dimensions[0]
    if w0 < size0 or h0 < size0:
        raise SlideError(
            slide.path, f"slide ({w0}x{h0} px) is smaller than one patch ({size0} px at level 0); lower patch_size or target_mpp"
        )

    ys, xs = np.meshgrid(np.arange(0, h0, step0, dtype=np.int64), np.arange(0, w0, step0, dtype=np.int64), indexing="ij")
    grid = np.stack([xs.ravel(), ys.ravel()], axis=1)
    if mask is None:
        mask = tissue_mask(slide.thumbnail(mask_max_size))
    keep = tissue_fractions(mask, grid, size0, (w0, h0)) >= tissue_threshold
    coords = np.ascontiguousarray(grid[keep])
    if len(coords) == 0:
        raise NoTissueError(
            slide.path,
            f"no {patch_size} px patch at {target_mpp} um/px has >= {tissue_threshold:.0%} tissue "
            f"(tissue covers {mask.mean():.1%} of the thumbnail)",
        )
    attrs = {
        "patch_size": int(patch_size),
        "patch_level": int(level),
        "patch_size_level": int(size_level),
        "patch_size_level0": int(size0),
        "step_level0": int(step0),
        "overlap": int(overlap),
        "target_mpp": float(target_mpp),
        "level_mpp": float(level_mpp),
        "mpp": float(mpp),
        "mpp_source": mpp_source,
        "magnification": 10.0 / target_mpp,
        "target_magnification": 10.0 / target_mpp,
        "level0_magnification": 10.0 / mpp,
        "tissue_threshold": float(tissue_threshold),
        "slide_width": int(w0),
        "slide_height": int(h0),
        "backend": slide.backend,
        "slide_path": slide.path,
        "num_patches": int(len(coords)),
    }
    return coords, attrs
