"""Per-slide HDF5 store with TRIDENT/CLAM-compatible names; every write is atomic.

Layout of ``<slide_id>.h5``::

    coords    int64 [N, 2]  level-0 top-left (x, y); attrs: patch_size, patch_level, ..., fingerprint
    features  float16 [N, D] (default dtype)
    clusters  int [N]

A ``fingerprint`` attr (JSON of the settings that produced a dataset) lets later stages detect a
cache made with other settings. The root attr ``monai_fbta_store`` (the format version) marks a file
as ours: we never overwrite or extend an ``.h5`` without it (e.g. CLAM/TRIDENT features in the same
folder): :func:`check_ours` raises :class:`StoreError` instead. Stores written before the marker
existed are recognised by their ``coords`` attrs ``fingerprint`` and ``patch_size_level`` and get the
marker on their next write. Writes go to a temporary file in the same folder which is fsynced
and ``os.replace``d over the target, so readers never see a half-written store.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import h5py
import numpy as np

from monai_fbta._io import atomic_path, inside, safe_name
from monai_fbta.data.errors import SlideError

__all__ = [
    "StoreError",
    "SlideStore",
    "slide_id_of",
    "store_path",
    "write_coords",
    "add_arrays",
    "read_coords",
    "read_attrs",
    "open_features",
    "LazyArray",
    "read_array",
    "dataset_names",
    "store_is_complete",
    "read_trident_coords",
    "check_ours",
    "STORE_MARKER",
    "STORE_FORMAT",
]

STORE_MARKER = "monai_fbta_store"  # root attr: the store format version
STORE_FORMAT = 1


class StoreError(SlideError):
    """A store file is missing, unreadable or inconsistent."""


# ----------------------------------------------------------------------------- identity


def slide_id_of(row: Mapping[str, Any] | str | os.PathLike) -> str:
    """``row["slide_id"]`` if given, else the slide file name without its extension."""
    if isinstance(row, Mapping) and row.get("slide_id"):
        return str(row["slide_id"])
    path = os.fspath(row["image"] if isinstance(row, Mapping) else row)
    return os.path.splitext(os.path.basename(path))[0]


def store_path(out_dir: str | os.PathLike, slide_id: str) -> str:
    """``<out_dir>/<safe slide_id>.h5``: ids like ``../../x`` or ``a/b`` cannot leave ``out_dir``."""
    return inside(os.fspath(out_dir), f"{safe_name(slide_id)}.h5")


# ----------------------------------------------------------------------------- attrs


def _encode_attr(value: Any) -> Any:
    if isinstance(value, Mapping):
        return json.dumps(value, sort_keys=True, default=str)
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)) and any(isinstance(v, str) for v in value):
        return json.dumps(list(value))
    return value


def _decode_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, str) and value[:1] in "{[" or value == "null":
        with contextlib.suppress(ValueError):
            return json.loads(value)
    return value


def _attrs_dict(obj: h5py.HLObject) -> dict[str, Any]:
    return {k: _decode_attr(v) for k, v in obj.attrs.items()}


def _same(stored: Any, expected: Any) -> bool:
    if isinstance(expected, Mapping):
        return isinstance(stored, Mapping) and json.dumps(stored, sort_keys=True, default=str) == json.dumps(
            expected, sort_keys=True, default=str
        )
    if isinstance(expected, float) or isinstance(stored, float):
        try:
            return math.isclose(float(stored), float(expected), rel_tol=1e-6, abs_tol=1e-9)
        except (TypeError, ValueError):
            return False
    if isinstance(expected, (list, tuple)):
        return list(np.ravel(stored)) == list(expected) if not isinstance(stored, str) else False
    return stored == expected


# ----------------------------------------------------------------------------- writing


@contextlib.contextmanager
def _atomic_h5(path: str, copy_existing: bool) -> Iterator[h5py.File]:
    """Yield an open temp HDF5 file next to ``path``, moved over ``path`` on success (:func:`atomic_path`)."""
    with atomic_path(path, copy_existing=copy_existing) as tmp, h5py.File(tmp, "a" if copy_existing else "w") as f:
        yield f


def _foreign_reason(path: str) -> str | None:
    """Why the existing file at ``path`` is not one of our stores (``None``: ours, or absent)."""
    if not os.path.lexists(path):
        return None
    try:
        with h5py.File(path, "r") as f:
            version = f.attrs.get(STORE_MARKER)
            if version is not None:
                if int(version) > STORE_FORMAT:
                    return f"written by a newer monai_fbta (store format {int(version)}, this one reads {STORE_FORMAT})"
                return None
            coords = f.get("coords")
            if isinstance(coords, h5py.Dataset) and {"fingerprint", "patch_size_level"} <= set(coords.attrs):
                return None  # our layout from before the marker
            return f"not a monai_fbta store (no {STORE_MARKER!r} attribute; datasets {sorted(f.keys())})"
    except OSError as e:
        return f"exists but is not a readable HDF5 file ({e})"


def check_ours(path: str | os.PathLike) -> None:
    """Raise :class:`StoreError` when a file exists at ``path`` that monai_fbta did not write.

    We never overwrite or delete such a file (e.g. CLAM/TRIDENT features in ``cache_dir``).
    """
    path = os.fspath(path)
    reason = _foreign_reason(path)
    if reason:
        raise StoreError(path, f"{reason}; monai_fbta never overwrites files it did not write: move it, use another "
                         "cache folder, or bring CLAM/TRIDENT features in with monai_fbta.data.importing")


def _set_attrs(obj: h5py.HLObject, attrs: Mapping[str, Any] | None, fingerprint: Mapping[str, Any] | None) -> None:
    for k, v in (attrs or {}).items():
        obj.attrs[k] = _encode_attr(v)
    if fingerprint is not None:
        obj.attrs["fingerprint"] = _encode_attr(dict(fingerprint))


def write_coords(
    path: str | os.PathLike, coords: np.ndarray, attrs: Mapping[str, Any] | None = None, fingerprint: Mapping[str, Any] | None = None
) -> None:
    """Create (or replace) the store at ``path`` with ``coords`` ``int64 [N, 2]`` and its attrs.

    Raises :class:`StoreError` when ``path`` holds a file we did not write (see :func:`check_ours`)."""
    path = os.fspath(path)
    coords = np.asarray(coords)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise StoreError(path, f"coords must be [N, 2], got shape {coords.shape}")
    check_ours(path)
    with _atomic_h5(path, copy_existing=False) as f:
        f.attrs[STORE_MARKER] = STORE_FORMAT
        ds = f.create_dataset("coords", data=coords.astype(np.int64))
        _set_attrs(ds, attrs, fingerprint)


def add_arrays(
    path: str | os.PathLike,
    arrays: Mapping[str, np.ndarray],
    attrs: Mapping[str, Any] | None = None,
    fingerprint: Mapping[str, Any] | None = None,
    feature_dtype: Any = np.float16,
) -> None:
    """Add or replace datasets (e.g. ``{"features": [N, D], "clusters": [N]}``) in an existing store.

    ``attrs`` and ``fingerprint`` are set on every added dataset. Floating ``features`` are stored
    as ``feature_dtype`` (fp16 by default; ``None`` keeps the dtype). Every array must have the
    same first dimension as ``coords``. Atomic: the old file is intact if anything fails.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise StoreError(path, "store not found; write_coords() first")
    check_ours(path)
    n = _num_coords(path)
    prepared = {}
    for name, arr in arrays.items():
        arr = np.asarray(arr)
        if arr.ndim == 0 or arr.shape[0] != n:
            raise StoreError(path, f"{name!r} has shape {arr.shape} but the store has {n} coords")
        if name == "features" and feature_dtype is not None and np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(feature_dtype)
        prepared[name] = arr
    with _atomic_h5(path, copy_existing=True) as f:
        f.attrs[STORE_MARKER] = STORE_FORMAT
        for name, arr in prepared.items():
            if name in f:
                del f[name]
            ds = f.create_dataset(name, data=arr)
            _set_attrs(ds, attrs, fingerprint)


# ----------------------------------------------------------------------------- reading


def _open(path: str | os.PathLike) -> h5py.File:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise StoreError(path, "store not found")
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise StoreError(path, f"not a readable HDF5 file ({e})") from e


def _dataset(f: h5py.File, name: str) -> h5py.Dataset:
    if name not in f:
        raise StoreError(f.filename, f"no dataset {name!r} (has {sorted(f.keys())})")
    return f[name]


def _gather(ds: h5py.Dataset, index: Any, path: str) -> np.ndarray:
    """``ds[index]`` for an int, slice, or index array (any order, repeats, negatives and masks allowed)."""
    if not isinstance(index, (Sequence, np.ndarray)) or isinstance(index, tuple):
        return ds[index]
    n = ds.shape[0]
    idx = np.asarray(index)
    if idx.dtype == bool:
        idx = np.flatnonzero(idx)
    idx = np.where(idx < 0, idx + n, idx).astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"{path}: index out of range for {n} rows")
    uniq, inverse = np.unique(idx, return_inverse=True)  # h5py needs increasing indices
    return ds[uniq][inverse] if uniq.size else np.empty((0, *ds.shape[1:]), ds.dtype)


class SlideStore:
    """One slide's store, opened once for every read of an item::

        with SlideStore(path) as store:
            coords, attrs = store.coords()          # int64 [N, 2], attrs of "coords"
            features = store.array("features")      # [N, D]
            pb = store.rows("features", index)      # [S, D], only those rows are read

    Raises :class:`StoreError` (naming the file) when it is missing, unreadable or lacks a dataset.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self._file: h5py.File | None = None

    def open(self) -> SlideStore:
        if self._file is None:
            self._file = _open(self.path)
        return self

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> SlideStore:
        return self.open()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def file(self) -> h5py.File:
        if self._file is None:
            raise StoreError(self.path, "store is not open (use `with SlideStore(path) as store:`)")
        return self._file

    def names(self) -> list[str]:
        """Names of the datasets at the root."""
        return sorted(self.file.keys())

    def dataset(self, name: str) -> h5py.Dataset:
        """The h5py dataset ``name`` (lazy)."""
        return _dataset(self.file, name)

    def num_coords(self) -> int:
        """``N``, the number of patches."""
        return int(self.dataset("coords").shape[0])

    def attrs(self, name: str = "coords") -> dict[str, Any]:
        """Attrs of dataset ``name``; a JSON fingerprint comes back as a dict."""
        return _attrs_dict(self.dataset(name))

    def coords(self) -> tuple[np.ndarray, dict[str, Any]]:
        """``(coords int64 [N, 2], attrs of "coords")``."""
        ds = self.dataset("coords")
        return ds[()].astype(np.int64), _attrs_dict(ds)

    def array(self, name: str) -> np.ndarray:
        """The whole dataset ``name``."""
        return self.dataset(name)[()]

    def rows(self, name: str, index: Any) -> np.ndarray:
        """``array(name)[index]`` reading only those rows (see :class:`LazyArray` for the index forms)."""
        return _gather(self.dataset(name), index, self.path)

    def is_complete(
        self,
        required: Sequence[str] = ("coords", "features"),
        expect_attrs: Mapping[str, Any] | None = None,
        expect_dataset_attrs: Mapping[str, Mapping[str, Any]] | None = None,
        check_finite: bool = False,
    ) -> bool:
        """See :func:`store_is_complete`."""
        f = self.file
        if any(name not in f for name in required) or "coords" not in f:
            return False
        coords = f["coords"]
        if coords.ndim != 2 or coords.shape[1] != 2:
            return False
        n = coords.shape[0]
        if any(f[name].ndim == 0 or f[name].shape[0] != n for name in required):
            return False
        checks = {"coords": dict(expect_attrs or {}), **{k: dict(v) for k, v in (expect_dataset_attrs or {}).items()}}
        for name, expected in checks.items():
            if expected and name not in f:
                return False
            stored = _attrs_dict(f[name]) if expected else {}
            if any(k not in stored or not _same(stored[k], v) for k, v in expected.items()):
                return False
        if check_finite:
            for name in required:
                ds = f[name]
                if np.issubdtype(ds.dtype, np.floating) and not all(
                    np.isfinite(ds[i : i + 65536]).all() for i in range(0, n, 65536)
                ):
                    return False
        return True


def _num_coords(path: str) -> int:
    with SlideStore(path) as store:
        return store.num_coords()


def read_coords(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """``(coords int64 [N, 2], attrs of "coords")``; a JSON fingerprint comes back as a dict."""
    with SlideStore(path) as store:
        return store.coords()


def read_attrs(path: str | os.PathLike, name: str = "coords") -> dict[str, Any]:
    """Attrs of dataset ``name``."""
    with SlideStore(path) as store:
        return store.attrs(name)


def dataset_names(path: str | os.PathLike) -> list[str]:
    """Names of the datasets at the root of the ``.h5`` file."""
    with SlideStore(path) as store:
        return store.names()


def read_array(path: str | os.PathLike, name: str) -> np.ndarray:
    """The whole dataset ``name`` as a numpy array."""
    with SlideStore(path) as store:
        return store.array(name)


class LazyArray:
    """An open dataset that reads only what is indexed: ``arr[idx]`` for ints, slices or index arrays
    (any order, repeats allowed). ``shape``, ``dtype``, ``len()``; close it or use ``with``."""

    def __init__(self, path: str | os.PathLike, name: str = "features") -> None:
        self.path = os.fspath(path)
        self._store = SlideStore(self.path).open()
        try:
            self._ds = self._store.dataset(name)
        except StoreError:
            self._store.close()
            raise
        self.shape, self.dtype = self._ds.shape, self._ds.dtype
        self.attrs = _attrs_dict(self._ds)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: Any) -> np.ndarray:
        return _gather(self._ds, index, self.path)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        arr = self._ds[()]
        return arr.astype(dtype) if dtype is not None else arr

    def close(self) -> None:
        self._store.close()

    def __enter__(self) -> LazyArray:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_features(path: str | os.PathLike, name: str = "features") -> LazyArray:
    """Lazy ``[N, D]`` view of the features (nothing is read until indexed)."""
    return LazyArray(path, name)


def store_is_complete(
    path: str | os.PathLike,
    required: Sequence[str] = ("coords", "features"),
    expect_attrs: Mapping[str, Any] | None = None,
    expect_dataset_attrs: Mapping[str, Mapping[str, Any]] | None = None,
    check_finite: bool = False,
) -> bool:
    """True when ``path`` opens, holds every ``required`` dataset with consistent shapes
    (coords ``[N, 2]``, every other dataset ``N`` rows), ``coords`` attrs match ``expect_attrs``
    (a dict expected value is compared with the stored JSON, e.g. ``fingerprint``), each
    ``expect_dataset_attrs[name]`` matches, and (with ``check_finite``) floating data is finite."""
    try:
        with SlideStore(path) as store:
            return store.is_complete(required, expect_attrs, expect_dataset_attrs, check_finite)
    except (StoreError, OSError, KeyError):
        return False


def read_trident_coords(h5_path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """Coordinates from a TRIDENT or CLAM ``.h5`` (or ours): ``(coords int64 [N, 2], attrs)``.

    ``attrs["format"]`` is ``"trident"`` (attrs ``patch_size`` at ``target_magnification``,
    ``patch_size_level0``, ``level0_magnification``), ``"clam"`` (``patch_level``, ``patch_size``
    at that level, optionally ``downsample``) or ``"monai_fbta"``. ``patch_size_level0`` is filled
    in when it can be derived.
    """
    coords, attrs = read_coords(h5_path)
    if "slide_path" in attrs and "patch_size_level" in attrs:
        attrs["format"] = "monai_fbta"
    elif "target_magnification" in attrs or "level0_magnification" in attrs or "patch_size_level0" in attrs:
        attrs["format"] = "trident"
        if "patch_size_level0" not in attrs and {"patch_size", "target_magnification", "level0_magnification"} <= attrs.keys():
            attrs["patch_size_level0"] = int(round(attrs["patch_size"] * attrs["level0_magnification"] / attrs["target_magnification"]))
    elif "patch_level" in attrs and "patch_size" in attrs:
        attrs["format"] = "clam"
        downsample = attrs.get("downsample")
        if downsample is not None:
            ds = float(np.ravel(downsample)[0])
            attrs["patch_size_level0"] = int(round(attrs["patch_size"] * ds))
    else:
        raise StoreError(os.fspath(h5_path), f"coords attrs match neither TRIDENT nor CLAM: {sorted(attrs)}")
    return coords, attrs
