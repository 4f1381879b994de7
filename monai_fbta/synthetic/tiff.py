"""Aperio-style pyramidal TIFFs (tiled, JPEG, ``MPP = 0.5``) that cuCIM, OpenSlide and tifffile all open, and
their integrity check (used to resume dataset generation)."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping

import numpy as np
import scipy.ndimage as ndi
import tifffile

from monai_fbta._io import atomic_open

__all__ = ["write_pyramidal_tiff", "slide_is_valid", "tumour_bboxes"]


def _downsample2(img: np.ndarray) -> np.ndarray:
    """2x box downsample ``[H, W, 3] -> [H // 2, W // 2, 3]`` (uint8, rounded)."""
    h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
    s = img[0:h:2, 0:w:2].astype(np.uint16)
    s += img[1:h:2, 0:w:2]
    s += img[0:h:2, 1:w:2]
    s += img[1:h:2, 1:w:2]
    s += 2
    s >>= 2
    return s.astype(np.uint8)


def write_pyramidal_tiff(
    path: str | os.PathLike,
    rgb: np.ndarray,
    mpp: float | None = 0.5,
    tile: int = 256,
    quality: int = 90,
    smallest_level: int = 1024,
    extra: Mapping[str, object] | None = None,
) -> list[tuple[int, int]]:
    """Write ``rgb`` (uint8 ``[H, W, 3]``) as an Aperio-style pyramidal TIFF, atomically.

    Layout as in an Aperio ``.svs``: page 0 = level 0 (tiled, JPEG), page 1 = a small stripped
    thumbnail, then levels at downsample 2, 4, ... until the longest side is ``<= smallest_level``.
    The pixel size is stored twice: X/YResolution in pixels per centimetre and ``MPP = ..`` in
    the ImageDescription (with ``AppMag = 10 / mpp``); ``mpp=None`` stores neither. ``extra``
    adds ``|key = value`` fields to the description. cuCIM, OpenSlide (``aperio`` vendor) and
    tifffile (``svs`` series) read the result. Returns the ``(width, height)`` of every level.
    """
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"{path}: rgb must be uint8 [H, W, 3], got {rgb.dtype} {rgb.shape}")
    if mpp is not None and not mpp > 0:
        raise ValueError(f"{path}: mpp must be positive, got {mpp}")
    h, w = rgb.shape[:2]
    fields = {} if mpp is None else {"AppMag": f"{10.0 / mpp:g}", "MPP": f"{mpp:g}"}
    fields.update({str(k): str(v) for k, v in (extra or {}).items()})
    head = f"Aperio Image Library v12.0.15 \r\n{w}x{h} [0,0 {w}x{h}] ({tile}x{tile}) JPEG/RGB Q={quality}"
    description = "|".join([head] + [f"{k} = {v}" for k, v in fields.items()])
    common = dict(photometric="rgb", compression="jpeg", compressionargs={"level": int(quality)}, metadata=None)
    levels = [rgb]
    while max(levels[-1].shape[:2]) > smallest_level and min(levels[-1].shape[:2]) >= 2 * 16:
        levels.append(_downsample2(levels[-1]))
    thumb = levels[-1]
    while max(thumb.shape[:2]) > 768:
        thumb = _downsample2(thumb)
    buf = io.BytesIO()  # JPEG-compressed, so small; written out atomically below
    with tifffile.TiffWriter(buf, bigtiff=rgb.nbytes > 2**32 - 2**28) as tw:
        for i, level in enumerate(levels):
            lh, lw = level.shape[:2]
            kw = dict(common, tile=(tile, tile))
            if i == 0:
                kw["description"] = description
                if mpp is not None:
                    kw.update(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
            else:
                kw["description"] = f"Aperio Image Library v12.0.15 \r\n{w}x{h} -> {lw}x{lh} - ({tile}x{tile})"
            tw.write(level, **kw)
            if i == 0:  # Aperio keeps the thumbnail as the second page
                tw.write(thumb, rowsperstrip=16, description=f"Aperio Image Library v12.0.15 \r\n{w}x{h} -> {thumb.shape[1]}x{thumb.shape[0]} - ", **common)
    with atomic_open(path, "wb") as f:
        f.write(buf.getbuffer())
    return [(lv.shape[1], lv.shape[0]) for lv in levels]


def tumour_bboxes(mask: np.ndarray, downsample: int) -> list[list[int]]:
    """Level-0 boxes ``[x0, y0, x1, y1]`` (x1, y1 exclusive) of the connected regions of ``mask``."""
    labels, _ = ndi.label(mask)
    return [[sx.start * downsample, sy.start * downsample, sx.stop * downsample, sy.stop * downsample]
            for sy, sx in ndi.find_objects(labels) if sy is not None]


def _description_fields(description: str) -> dict[str, str]:
    parts = description.split("|")[1:]
    return {k.strip(): v.strip() for k, _, v in (p.partition("=") for p in parts)}


def slide_is_valid(path: str | os.PathLike, expect: Mapping[str, object] | None = None, size: int | None = None) -> bool:
    """Cheap integrity check of a written slide (used to resume): False if missing or damaged.

    Checks that the file parses, that every tile/strip lies inside the file (truncation), that
    the smallest level and the last level-0 tile decode, that level 0 is ``size`` square when
    given, and that the description holds the ``expect`` fields (e.g. the config digest).
    """
    try:
        file_size = os.path.getsize(path)
        with tifffile.TiffFile(path) as tf:
            pages = list(tf.pages)
            first = pages[0]
            if size is not None and first.shape[:2] != (size, size):
                return False
            fields = _description_fields(first.description)
            if any(fields.get(k) != str(v) for k, v in (expect or {}).items()):
                return False
            for page in pages:
                ends = np.asarray(page.dataoffsets, np.int64) + np.asarray(page.databytecounts, np.int64)
                if len(ends) == 0 or ends.max() > file_size or min(page.databytecounts) == 0:
                    return False
            pages[-1].asarray()
            decode = first.decode  # (this property may move the file pointer: read after it)
            with open(path, "rb") as f:
                f.seek(first.dataoffsets[-1])
                data = f.read(first.databytecounts[-1])
            decode(data, len(first.dataoffsets) - 1, jpegtables=first.jpegtables)
    except Exception:  # any parse/decode failure means "regenerate"
        return False
    return True
