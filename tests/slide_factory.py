"""Write tiny real slide files for tests: pyramidal tiled TIFFs (JPEG, deflate, LZW, JPEG 2000),
flat (stripped) TIFFs, with or without a pixel size, plus a tissue-rectangle image helper."""

from __future__ import annotations

import numpy as np
import tifffile

TISSUE_RGB = (190, 110, 170)  # H&E-ish pink/purple


def textured_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth random RGB ``[H, W, 3]`` uint8 (non-constant so reads are checkable)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    img = np.repeat(np.repeat(small, 8, 0), 8, 1)[:height, :width]
    return np.ascontiguousarray(img ^ rng.integers(0, 16, img.shape, dtype=np.uint8))


def tissue_rect_image(height: int, width: int, rect: tuple[int, int, int, int], seed: int = 0) -> np.ndarray:
    """White ``[H, W, 3]`` background with a tissue-coloured, mildly noisy rectangle ``(x0, y0, x1, y1)``."""
    rng = np.random.default_rng(seed)
    img = np.full((height, width, 3), 255, np.uint8)
    x0, y0, x1, y1 = rect
    noise = rng.integers(-15, 16, (y1 - y0, x1 - x0, 3))
    img[y0:y1, x0:x1] = np.clip(np.array(TISSUE_RGB) + noise, 0, 255).astype(np.uint8)
    return img


def downsample2(img: np.ndarray) -> np.ndarray:
    """2x box downsample ``[H, W, 3] -> [H//2, W//2, 3]``."""
    h, w = img.shape[0] // 2 * 2, img.shape[1] // 2 * 2
    x = img[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).astype(np.uint16).mean(axis=(1, 3))
    return np.round(x).astype(np.uint8)


def write_slide(
    path,
    image: np.ndarray,
    levels: int = 3,
    tile: int | None = 64,
    compression: str | None = "zlib",
    mpp: float | None = 0.5,
    aperio: bool = False,
    predictor: bool = False,
) -> str:
    """Write ``image`` as a TIFF slide: level 0 plus ``levels - 1`` 2x-reduced IFDs.

    ``tile=None`` writes a flat, stripped, single-level TIFF. ``mpp`` is stored as X/YResolution
    (and as ``MPP =`` in an Aperio-style description when ``aperio``); ``None`` stores no pixel size.
    """
    kw: dict = {"photometric": "rgb", "compression": compression}
    if predictor:
        kw["predictor"] = True
    if tile is not None:
        kw["tile"] = (tile, tile)
    else:
        levels = 1
    first = dict(kw)
    if mpp is not None:
        first.update(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    if aperio:
        h, w = image.shape[:2]
        mpp_part = f"|MPP = {mpp}" if mpp is not None else ""
        first["description"] = f"Aperio Image Library v12.0.0 \r\n{w}x{h} ({tile}x{tile}) test|AppMag = 20{mpp_part}"
    with tifffile.TiffWriter(path) as tw:
        tw.write(image, **first)
        for _ in range(levels - 1):
            image = downsample2(image)
            tw.write(image, subfiletype=1, **kw)
    return str(path)


def corrupt_tile(path, index: int, how: str = "garbage", page: int = 0) -> tuple[int, int]:
    """Damage the compressed data of tile ``index`` of ``page`` in place; returns its level ``(x, y)``.

    ``how``: ``"garbage"`` overwrites 64 bytes in the middle of the entropy-coded data with random
    bytes (libjpeg: "Corrupt JPEG data: N extraneous bytes before marker"), ``"eoi"`` plants an
    early end-of-image marker, ``"zeros"`` zeroes the last two thirds ("Premature end of JPEG file").
    """
    with tifffile.TiffFile(path) as tif:
        p = tif.pages[page]
        offset, count = p.dataoffsets[index], p.databytecounts[index]
        cols = -(-p.imagewidth // p.tilewidth)
        xy = (index % cols * p.tilewidth, index // cols * p.tilelength)
    data = bytearray(open(path, "rb").read())
    mid = offset + count // 2
    if how == "garbage":
        data[mid : mid + 64] = np.random.default_rng(index).integers(0, 256, 64, dtype=np.uint8).tobytes()
    elif how == "eoi":
        data[offset + count // 3 : offset + count // 3 + 2] = b"\xff\xd9"
    elif how == "zeros":
        data[offset + count // 3 : offset + count] = bytes(count - count // 3)
    else:
        raise ValueError(f"unknown corruption {how!r}")
    with open(path, "wb") as f:
        f.write(bytes(data))
    return xy


TILING = {"patch_size": 64, "target_mpp": 0.5, "tissue_threshold": 0.5}  # tiling settings for tissue_slide's slides


def tissue_slide(path, size: int = 512, **kw) -> str:
    """A ``size``-px square slide (2 levels, 64-px tiles) with a tissue rectangle 48 px in from every edge."""
    return write_slide(path, tissue_rect_image(size, size, (48, 48, size - 48, size - 48)), **{"levels": 2, "tile": 64, **kw})
