"""Whole-slide image access: ``open_slide(path) -> Slide`` over cuCIM, OpenSlide or tile-wise tifffile.

All reads return RGB ``uint8``; locations are level-0 ``(x, y)`` top-left (OpenSlide convention);
regions partly outside the slide are padded with white. ``backend="auto"`` tries cuCIM (fast), then
OpenSlide, then tifffile, skipping cuCIM up front for TIFF encodings it cannot decode (JPEG 2000,
deflate with a predictor, which crashes it) and falling back at read time when a decode fails.

The physical pixel size (``mpp``, um/px at level 0) is read from the file's own metadata (Aperio
``MPP =``, OME ``PhysicalSizeX``, TIFF X/YResolution, OpenSlide ``openslide.mpp-x``), never from
cuCIM's default of 1.0, and is reported as ``None`` / ``mpp_source="missing"`` when absent.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from monai_fbta._quiet import capture_native_output, quiet_import, silence_native_output
from monai_fbta.data.errors import SlideError, SlideFormatError, SlideNotFoundError, SlideReadError

__all__ = ["Slide", "open_slide", "SlideCache", "patches_to_tensor", "BACKENDS", "read_tiff_info", "to_rgb"]

BACKENDS = ("cucim", "openslide", "tifffile")
PLAUSIBLE_MPP = (0.02, 50.0)  # um/px; outside this a "resolution" is a placeholder (e.g. 72 dpi)
_JPEG2000 = {33003, 33004, 33005, 34712}  # Aperio YCbCr/RGB J2K, plain JPEG 2000
_CUCIM_COMPRESSIONS = {1, 5, 7, 8}  # none, LZW, JPEG, deflate (8 only without a predictor)


# ----------------------------------------------------------------------------- metadata


@dataclass(frozen=True)
class TiffInfo:
    """What we need from a TIFF's first page: encoding and physical size."""

    compression: int
    predictor: int
    tiled: bool
    samples: int
    description: str
    mpp: float | None
    mpp_note: str


def read_tiff_info(path: str) -> TiffInfo | None:
    """Encoding and mpp of the first page of a TIFF; ``None`` when ``path`` is not a TIFF.

    Walks the IFD chain once (cheap: tags only) to catch truncated files up front.

    Raises :class:`SlideFormatError` when the file looks like a TIFF but is truncated/corrupt.
    """
    import tifffile

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] not in (b"II", b"MM"):
        return None
    problems: list[str] = []
    handler = _ListHandler(problems)
    tifffile_logger = logging.getLogger("tifffile")
    tifffile_logger.addHandler(handler)
    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            len(tif.pages)  # walks the IFD chain; tifffile logs (not raises) offsets past the end
            size = os.path.getsize(path)
            end = max((o + n for p in tif.pages for o, n in zip(p.dataoffsets, p.databytecounts)), default=0)
            for i, p in enumerate(tif.pages):
                _check_layout(path, i, p)
            if end > size or problems:
                detail = "; ".join(problems) or f"image data runs to byte {end} but the file has {size} bytes"
                raise SlideFormatError(path, f"truncated or corrupt TIFF ({detail})")
            tags = page.tags
            desc = page.description or ""
            mpp, note = _mpp_from_tiff(desc, tags)
            return TiffInfo(
                compression=int(page.compression),
                predictor=int(page.predictor),
                tiled=bool(page.is_tiled),
                samples=int(page.samplesperpixel),
                description=desc,
                mpp=mpp,
                mpp_note=note,
            )
    except SlideError:
        raise
    except Exception as e:  # tifffile raises TiffFileError, struct.error, ValueError... on corrupt files
        raise SlideFormatError(path, f"not a readable TIFF ({type(e).__name__}: {e})") from e
    finally:
        tifffile_logger.removeHandler(handler)


_MAX_TILE = 1 << 16  # px per tile side; larger values are corrupt tags (and make decoders allocate terabytes)
_MAX_PIXELS = 1 << 38  # per level (a 500k x 500k slide)


def _check_layout(path: str, index: int, page) -> None:
    """Raise :class:`SlideFormatError` for a page whose geometry tags are impossible (corrupt header)."""
    width, height = int(page.imagewidth), int(page.imagelength)
    problem = None
    if not 0 < width * height <= _MAX_PIXELS:
        problem = f"image size {width}x{height}"
    elif page.is_tiled and not (0 < page.tilewidth <= _MAX_TILE and 0 < page.tilelength <= _MAX_TILE):
        problem = f"tile size {page.tilewidth}x{page.tilelength}"
    elif math.prod(page.chunked) != len(page.dataoffsets):
        problem = f"{len(page.dataoffsets)} tiles/strips where the geometry needs {math.prod(page.chunked)}"
    if problem:
        raise SlideFormatError(path, f"corrupt TIFF header: page {index} has an impossible {problem}")


class _ListHandler(logging.Handler):
    """Collects tifffile's warnings (it logs broken IFD offsets instead of raising)."""

    def __init__(self, sink: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record.getMessage())


def _plausible(mpp: float) -> bool:
    return PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]


def _mpp_from_tiff(description: str, tags) -> tuple[float | None, str]:
    """mpp from Aperio/OME descriptions or X/YResolution; returns (mpp or None, how it was found)."""
    m = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", description)
    if m and _plausible(float(m.group(1))):
        return float(m.group(1)), "aperio MPP"
    m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', description)
    if m:
        unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', description)
        scale = {"nm": 1e-3, "mm": 1e3, "cm": 1e4}.get(unit.group(1) if unit else "µm", 1.0)
        value = float(m.group(1)) * scale
        if _plausible(value):
            return value, "OME PhysicalSizeX"
    xres, unit = tags.get("XResolution"), tags.get("ResolutionUnit")
    if xres is not None and unit is not None and int(unit.value) in (2, 3):
        num, den = xres.value if isinstance(xres.value, tuple) else (xres.value, 1)
        if num and den:
            per_unit = num / den  # pixels per inch (2) or per cm (3)
            value = (25400.0 if int(unit.value) == 2 else 10000.0) / per_unit
            if _plausible(value):
                return value, "TIFF XResolution"
            return None, f"TIFF XResolution gives {value:.4g} um/px, a placeholder, not a scan resolution"
    return None, "no pixel size in the metadata"


def to_rgb(arr: np.ndarray) -> np.ndarray:
    """``[h, w, 1|3|4]`` uint8 -> ``[h, w, 3]`` RGB; alpha is composited onto white."""
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[..., None]
    c = arr.shape[-1]
    if c == 3:
        return np.ascontiguousarray(arr, dtype=np.uint8)
    if c == 1:
        return np.repeat(arr, 3, axis=-1).astype(np.uint8, copy=False)
    if c == 4:
        alpha = arr[..., 3:4]
        rgb = arr[..., :3]
        if alpha.min() == 255:
            return np.ascontiguousarray(rgb)
        a = alpha.astype(np.uint16)
        out = (rgb.astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
        return out.astype(np.uint8)
    raise ValueError(f"expected 1, 3 or 4 channels, got shape {arr.shape}")


# ----------------------------------------------------------------------------- backends
# Each backend reads an in-bounds region given in *level* pixel coordinates and returns RGB uint8.

# libjpeg's messages for corrupt data, which cuCIM prints on stdout ("ERROR in line 205 while
# decompressing JPEG image:" and the reason) before returning pixels anyway.
_DECODER_COMPLAINT = re.compile(
    r"while decompressing|Corrupt JPEG|Premature end of JPEG|Invalid JPEG|Bogus|Huffman|JPEG datastream|"
    r"Unsupported (JPEG|marker)|Improper call|ERROR in line", re.IGNORECASE)


class CorruptDataError(RuntimeError):
    """A decoder reported corrupt image data (its pixels for the region must not be used)."""


def _checked(read, *args, **kwargs):
    """``read(*args, **kwargs)`` with the native output captured; :class:`CorruptDataError` when a decoder complained."""
    with capture_native_output() as printed:
        result = read(*args, **kwargs)
    complaint = [line.strip() for line in printed[0].splitlines() if _DECODER_COMPLAINT.search(line)]
    if complaint:
        detail = [line.strip() for line in printed[0].splitlines() if line.strip() and "ERROR in line" not in line]
        raise CorruptDataError("; ".join(dict.fromkeys(detail or complaint)))
    return result


class _CuCIMBackend:
    name = "cucim"
    _first = True

    def __init__(self, path: str) -> None:
        quiet_import("cucim")
        self._reader = quiet_import("monai.data").WSIReader(backend="cucim")  # monai.data may load nvImageCodec
        with silence_native_output():  # cuFile prints "dlopen error libcuda.so.1" on first CuImage
            self._img = self._reader.read(path)
        n = self._reader.get_level_count(self._img)
        self.level_dimensions = tuple(tuple(reversed(self._reader.get_size(self._img, i))) for i in range(n))
        self.level_downsamples = tuple(float(d) for d in self._img.resolutions["level_downsamples"])
        self._probe()

    def _probe(self) -> None:
        """Fail early (slow-path warnings included) when cuCIM cannot decode this file at all: one pixel
        of the first and of the last level-0 tile. One damaged tile is not that: its reads raise later."""
        w, h = self.level_dimensions[0]
        with silence_native_output():
            for i, loc in enumerate(((0, 0), (w - 1, h - 1))):
                try:
                    self._img.read_region(location=loc, size=(1, 1), level=0)
                    return
                except Exception:
                    if i == 1:
                        raise

    def read(self, level: int, lx: int, ly: int, w: int, h: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        loc = (int(round(lx * ds)), int(round(ly * ds)))
        return to_rgb(np.asarray(_checked(self._img.read_region, location=loc, size=(w, h), level=level)))

    def read_batch(self, locations: np.ndarray, level: int, size: int, num_workers: int) -> np.ndarray:
        """``locations`` level-0 ``[N, 2]`` in-bounds top-lefts -> ``uint8 [N, size, size, 3]``.

        Per-patch reads in ``num_workers`` threads under one output capture. Not cuCIM's batch API:
        it aborts the whole process on a corrupt deflate tile (and is no faster, docs/benchmarks.md).
        """

        def one(xy: np.ndarray) -> np.ndarray:
            return to_rgb(np.asarray(self._img.read_region(location=(int(xy[0]), int(xy[1])), size=(size, size), level=level)))

        def read() -> np.ndarray:
            with ThreadPoolExecutor(num_workers) as pool:
                return np.stack(list(pool.map(one, locations)))

        return _checked(read)

    def close(self) -> None:
        self._img = None


class _OpenSlideBackend:
    name = "openslide"

    def __init__(self, path: str) -> None:
        import openslide

        self._os = openslide.OpenSlide(path)
        self.level_dimensions = tuple(tuple(d) for d in self._os.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in self._os.level_downsamples)
        mpp = self._os.properties.get("openslide.mpp-x")
        self.mpp = float(mpp) if mpp else None

    def read(self, level: int, lx: int, ly: int, w: int, h: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        loc = (int(round(lx * ds)), int(round(ly * ds)))
        return to_rgb(np.asarray(self._os.read_region(loc, level, (w, h))))

    def close(self) -> None:
        self._os.close()


class _TiffBackend:
    """Tile-wise tifffile reader: decodes only the tiles/strips a region overlaps."""

    name = "tifffile"

    def __init__(self, path: str) -> None:
        import tifffile

        self._tif = tifffile.TiffFile(path)
        self._fd = os.open(path, os.O_RDONLY)
        self._pages = []
        for lvl in self._tif.series[0].levels:
            page = lvl.pages[0]
            page = page.aspage() if hasattr(page, "aspage") else page
            if page.dtype != np.uint8 or page.planarconfig != 1:
                raise SlideFormatError(path, f"tifffile backend needs contiguous uint8 pages, got {page.dtype}, planar {page.planarconfig}")
            self._pages.append(page)
        self.level_dimensions = tuple((int(p.imagewidth), int(p.imagelength)) for p in self._pages)
        w0, h0 = self.level_dimensions[0]
        self.level_downsamples = tuple((w0 / w + h0 / h) / 2 for w, h in self.level_dimensions)

    def read(self, level: int, lx: int, ly: int, w: int, h: int) -> np.ndarray:
        page = self._pages[level]
        width, height = int(page.imagewidth), int(page.imagelength)
        if page.is_tiled:
            tw, th = int(page.tilewidth), int(page.tilelength)
        else:
            tw, th = width, int(min(page.rowsperstrip or height, height))
        cols = math.ceil(width / tw)
        samples = int(page.samplesperpixel)
        out = np.full((h, w, samples), 255, np.uint8)
        for row in range(ly // th, (ly + h - 1) // th + 1):
            for col in range(lx // tw, (lx + w - 1) // tw + 1):
                index = row * cols + col
                nbytes = page.databytecounts[index]
                if not nbytes:
                    continue  # sparse tile: background
                data = os.pread(self._fd, nbytes, page.dataoffsets[index])
                seg = page.decode(data, index, jpegtables=page.jpegtables)[0]
                seg = seg.reshape(seg.shape[-3:]) if seg.ndim > 3 else seg
                y0, x0 = row * th, col * tw
                sy, sx = max(ly, y0), max(lx, x0)
                ey, ex = min(ly + h, y0 + seg.shape[0], height), min(lx + w, x0 + seg.shape[1], width)
                if ey > sy and ex > sx:
                    out[sy - ly : ey - ly, sx - lx : ex - lx] = seg[sy - y0 : ey - y0, sx - x0 : ex - x0]
        return to_rgb(out)

    def close(self) -> None:
        self._tif.close()
        os.close(self._fd)


_BACKEND_CLASSES = {"cucim": _CuCIMBackend, "openslide": _OpenSlideBackend, "tifffile": _TiffBackend}


def _candidates(path: str, backend: str, info: TiffInfo | None) -> list[str]:
    if backend != "auto":
        if backend not in BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
        return [backend]
    if info is None:  # not a TIFF: only OpenSlide knows other formats (mrxs, scn via openslide, ...)
        return ["openslide"]
    names = ["cucim", "openslide", "tifffile"]
    cucim_ok = info.compression in _CUCIM_COMPRESSIONS and not (info.compression == 8 and info.predictor != 1)
    if not cucim_ok or not sys.platform.startswith("linux"):
        names.remove("cucim")
    if info.compression == 34712:  # plain JPEG 2000: OpenSlide's generic TIFF reader cannot decode it
        names.remove("openslide")
    return names


def _check_decodable(path: str, info: TiffInfo | None) -> None:
    """Raise :class:`SlideFormatError` for a TIFF compression no installed backend can decode."""
    import tifffile

    if info is not None and info.compression not in _CUCIM_COMPRESSIONS and info.compression not in tifffile.TIFF.DECOMPRESSORS:
        raise SlideFormatError(
            path, f"unsupported TIFF compression {info.compression}: no installed decoder (cuCIM, OpenSlide, "
            "tifffile/imagecodecs) can read it; convert the slide (e.g. to JPEG-compressed tiled TIFF)"
        )


def _in_dataloader_worker() -> bool:
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.utils.data.get_worker_info() is not None)


# ----------------------------------------------------------------------------- Slide


class Slide:
    """An open whole-slide image. Use :func:`open_slide`; picklable (the handle is reopened lazily).

    Attributes: ``path``, ``backend``, ``level_count``, ``level_dimensions`` (``(w, h)`` per level),
    ``level_downsamples``, ``mpp`` (um/px at level 0 or ``None``), ``mpp_source``
    (``"metadata" | "override" | "missing"``) and ``mpp_note`` (where it came from / why missing).
    """

    def __init__(self, path: str | os.PathLike, backend: str = "auto", mpp: float | None = None, num_workers: int | None = None):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise SlideNotFoundError(self.path, "file not found")
        info = read_tiff_info(self.path)
        _check_decodable(self.path, info)
        self._candidates = _candidates(self.path, backend, info)
        self.num_workers = num_workers
        self._lock = threading.Lock()
        self._impl = None
        self._open_first_working()
        self.level_dimensions = self._impl.level_dimensions
        self.level_downsamples = self._impl.level_downsamples
        self.level_count = len(self.level_dimensions)
        self.mpp, self.mpp_source, self.mpp_note = self._resolve_mpp(mpp, info)

    # -- opening
    def _open_first_working(self) -> None:
        errors = []
        while self._candidates:
            name = self._candidates[0]
            try:
                self._impl = _BACKEND_CLASSES[name](self.path)
                self.backend = name
                return
            except SlideError:
                raise
            except Exception as e:  # each library has its own exception types
                errors.append(f"{name}: {type(e).__name__}: {e}")
                self._candidates.pop(0)
        raise SlideFormatError(self.path, "no backend could open it (" + "; ".join(errors) + ")")

    def _resolve_mpp(self, override: float | None, info: TiffInfo | None) -> tuple[float | None, str, str]:
        if override is not None:
            if not override > 0:
                raise ValueError(f"{self.path}: mpp override must be > 0, got {override}")
            return float(override), "override", "given by the caller"
        if info is not None:
            return (info.mpp, "metadata", info.mpp_note) if info.mpp else (None, "missing", info.mpp_note)
        mpp = getattr(self._impl, "mpp", None)  # OpenSlide on non-TIFF formats
        if mpp and _plausible(mpp):
            return mpp, "metadata", "openslide.mpp-x"
        return None, "missing", "no pixel size in the metadata"

    @property
    def _backend_impl(self):
        if self._impl is None:
            self._impl = _BACKEND_CLASSES[self.backend](self.path)
        return self._impl

    # -- pickling: DataLoader workers get their own handle
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_impl"] = None
        state.pop("_lock")
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- reading
    def _check_level(self, level: int) -> None:
        if not 0 <= level < self.level_count:
            raise ValueError(f"{self.path}: level {level} out of range (slide has {self.level_count} levels)")

    def _read_inside(self, level: int, lx: int, ly: int, w: int, h: int) -> np.ndarray:
        """Read an in-bounds region; in auto mode fall back to the next backend when it cannot decode this level.

        Damaged data is final (:class:`SlideReadError`, no fallback): a decoder's complaint, or a read
        error where the same backend still reads this level elsewhere. Falling back then would hand the
        damaged bytes to a more lenient decoder: OpenSlide and tifffile return wrong pixels without a
        word for most corrupt JPEG tiles, OpenSlide for truncated deflate tiles.
        """
        while True:
            failed = self.backend
            try:
                return self._backend_impl.read(level, lx, ly, w, h)
            except CorruptDataError as e:
                problem = f"the {failed} decoder reported: {e}"
            except Exception as e:
                with self._lock:
                    if self.backend == failed:
                        self._impl = None  # a fresh handle: cuCIM's can be left unusable (or abort later) after a decode error
                if len(self._candidates) > 1 and not self._reads_elsewhere(level, lx, ly, w, h):
                    with self._lock:
                        if self.backend == failed:
                            self._candidates.pop(0)
                            self._impl = None
                            self.backend = self._candidates[0]
                    continue
                problem = f"{failed} failed: {e}"
            ds = self.level_downsamples[level]
            raise SlideReadError(
                self.path, f"corrupt or undecodable tile data at level {level}, level-0 location ({round(lx * ds)}, "
                f"{round(ly * ds)}), size ({w}, {h}) (level pixel ({lx}, {ly})): {problem}; its pixels would be wrong, "
                "so none are returned"
            )

    def _reads_elsewhere(self, level: int, lx: int, ly: int, w: int, h: int) -> bool:
        """True when the current backend reads the first or last pixel of ``level`` outside the failed
        region (then the region's data is damaged, not the backend unable to decode this level)."""
        lw, lh = self.level_dimensions[level]
        for px, py in ((0, 0), (lw - 1, lh - 1)):
            if not (lx <= px < lx + w and ly <= py < ly + h):
                try:
                    self._backend_impl.read(level, px, py, 1, 1)
                    return True
                except Exception:
                    self._impl = None
        return False

    def read_region(self, location: Sequence[int], level: int, size: Sequence[int]) -> np.ndarray:
        """``location`` level-0 ``(x, y)``; ``size`` ``(w, h)`` at ``level`` -> ``np.uint8 [h, w, 3]``."""
        self._check_level(level)
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise ValueError(f"{self.path}: region size must be positive, got {tuple(size)}")
        ds = self.level_downsamples[level]
        lx, ly = int(math.floor(location[0] / ds + 1e-9)), int(math.floor(location[1] / ds + 1e-9))
        lw, lh = self.level_dimensions[level]
        x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + w, lw), min(ly + h, lh)
        if x0 == lx and y0 == ly and x1 == lx + w and y1 == ly + h:
            return self._read_inside(level, lx, ly, w, h)
        out = np.full((h, w, 3), 255, np.uint8)
        if x1 > x0 and y1 > y0:
            out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = self._read_inside(level, x0, y0, x1 - x0, y1 - y0)
        return out

    def read_patches(self, coords: np.ndarray, level: int, size: int, num_workers: int | None = None) -> np.ndarray:
        """``coords`` level-0 top-lefts ``[N, 2]`` -> ``np.uint8 [N, size, size, 3]``.

        In-bounds patches with cuCIM: one output capture around a thread pool (a decoder complaint
        sends them through the per-patch path, which names the bad patch); a thread pool otherwise
        (OpenSlide and imagecodecs release the GIL). ``num_workers`` defaults to
        ``min(4, cpus)``, or 1 inside a DataLoader worker.
        """
        self._check_level(level)
        coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        n = len(coords)
        out = np.empty((n, size, size, 3), np.uint8)
        if n == 0:
            return out
        workers = num_workers or self.num_workers or (1 if _in_dataloader_worker() else min(4, os.cpu_count() or 1))
        if self.backend == "cucim" and n > 1 and workers > 1:
            ds = self.level_downsamples[level]
            lw, lh = self.level_dimensions[level]
            lxy = np.floor(coords / ds + 1e-9).astype(np.int64)
            inside = (lxy[:, 0] >= 0) & (lxy[:, 1] >= 0) & (lxy[:, 0] + size <= lw) & (lxy[:, 1] + size <= lh)
            if inside.any():
                try:
                    out[inside] = self._backend_impl.read_batch(coords[inside], level, size, workers)
                except Exception:
                    inside[:] = False  # decode problem: the per-patch path below falls back / explains
            rest = np.flatnonzero(~inside)
        else:
            rest = np.arange(n)

        def one(i: int) -> None:
            out[i] = self.read_region(coords[i], level, (size, size))

        if workers > 1 and len(rest) > 1:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(one, rest))
        else:
            for i in rest:
                one(i)
        return out

    def best_level_for_downsample(self, downsample: float) -> int:
        """Highest-index level whose downsample is <= ``downsample`` (OpenSlide semantics)."""
        ok = [i for i, d in enumerate(self.level_downsamples) if d <= downsample * (1 + 1e-6)]
        return max(ok) if ok else 0

    def thumbnail(self, max_size: int = 1024) -> np.ndarray:
        """Whole slide as ``np.uint8 [h, w, 3]`` with ``max(h, w) <= max_size`` (never upscaled).

        Reads the smallest level that is still at least ``max_size`` on its long side, block by
        block, so memory stays bounded on single-level slides.
        """
        from PIL import Image

        w0, h0 = self.level_dimensions[0]
        level = self.best_level_for_downsample(max(w0, h0) / max_size)
        lw, lh = self.level_dimensions[level]
        scale = min(1.0, max_size / max(lw, lh))
        tw, th = max(1, int(round(lw * scale))), max(1, int(round(lh * scale)))
        out = np.empty((th, tw, 3), np.uint8)
        block = 4096
        ds = self.level_downsamples[level]
        for by in range(0, lh, block):
            ty0, ty1 = int(round(by * scale)), int(round(min(by + block, lh) * scale))
            for bx in range(0, lw, block):
                tx0, tx1 = int(round(bx * scale)), int(round(min(bx + block, lw) * scale))
                if ty1 <= ty0 or tx1 <= tx0:
                    continue
                bw, bh = min(block, lw - bx), min(block, lh - by)
                region = self.read_region((int(round(bx * ds)), int(round(by * ds))), level, (bw, bh))
                out[ty0:ty1, tx0:tx1] = np.asarray(Image.fromarray(region).resize((tx1 - tx0, ty1 - ty0), Image.BOX))
        return out

    # -- lifetime
    def close(self) -> None:
        if self._impl is not None:
            self._impl.close()
            self._impl = None

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"Slide({self.path!r}, backend={self.backend!r}, levels={self.level_dimensions}, "
            f"mpp={self.mpp}, mpp_source={self.mpp_source!r})"
        )


def open_slide(path: str | os.PathLike, backend: str = "auto", mpp: float | None = None, num_workers: int | None = None) -> Slide:
    """Open a whole-slide image. ``backend``: ``"auto"`` (cucim -> openslide -> tifffile) or one of
    :data:`BACKENDS`; ``mpp`` overrides the file's pixel size (um/px at level 0).

    Raises :class:`SlideNotFoundError`, or :class:`SlideFormatError` when no backend can open it.
    """
    return Slide(path, backend=backend, mpp=mpp, num_workers=num_workers)


# ----------------------------------------------------------------------------- patches


def patches_to_tensor(patches: np.ndarray | torch.Tensor, out_size: int | None = None) -> torch.Tensor:
    """``uint8 [N, h, w, 3]`` (numpy or tensor) -> ``float32 [N, 3, out_size, out_size]`` in ``[0, 1]``."""
    x = torch.as_tensor(patches)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"patches must be [N, h, w, 3], got shape {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    if out_size is not None and (x.shape[-2] != out_size or x.shape[-1] != out_size) and x.shape[0] > 0:
        x = F.interpolate(x, size=(out_size, out_size), mode="bilinear", antialias=True, align_corners=False)
        x = x.clamp_(0.0, 1.0)
    if out_size is not None and x.shape[0] == 0:
        x = x.new_zeros((0, 3, out_size, out_size))
    return x.contiguous()


class SlideCache:
    """A small per-process LRU of open :class:`~monai_fbta.data.slide.Slide` handles.

    Pickling (DataLoader ``spawn`` workers) drops the handles; a fork is detected by the pid
    and the inherited handles are discarded (never shared across processes).
    """

    def __init__(self, max_open: int = 4, backend: str = "auto", mpp: float | None = None) -> None:
        self.max_open = max_open
        self.backend = backend
        self.mpp = mpp
        self._slides: OrderedDict[str, object] = OrderedDict()
        self._pid = os.getpid()

    def get(self, slide):
        """``slide`` may be a path or an open ``Slide`` (returned as is)."""
        if not isinstance(slide, (str, os.PathLike)):
            return slide
        if self._pid != os.getpid():  # forked: the parent's handles are not ours to use
            self._slides = OrderedDict()
            self._pid = os.getpid()
        key = os.fspath(slide)
        if key in self._slides:
            self._slides.move_to_end(key)
            return self._slides[key]
        handle = open_slide(key, backend=self.backend, mpp=self.mpp)
        self._slides[key] = handle
        while len(self._slides) > self.max_open:
            _, old = self._slides.popitem(last=False)
            old.close()
        return handle

    def close(self) -> None:
        for handle in self._slides.values():
            handle.close()
        self._slides.clear()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_slides"] = OrderedDict()
        return state
