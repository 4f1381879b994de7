"""File-writing rules shared across the package: atomic writes (a temp file next to the target, then
``os.replace``), and safe names / paths for files named after slide ids (:func:`safe_name`, :func:`inside`).

:func:`atomic_path` is the one implementation (temp name, fsync, umask-derived permissions,
rename, clean-up); :func:`atomic_open` wraps it for plain file objects and the HDF5 store uses it
for ``h5py.File``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_open", "atomic_path", "inside", "safe_name"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, copy_existing: bool = False) -> Iterator[str]:
    """Yield a temporary path next to ``path``; after the block fsync it, give it the usual
    umask-derived permissions (``mkstemp`` makes ``0600`` files) and ``os.replace`` it over ``path``.

    ``copy_existing`` starts the temp file as a copy of ``path`` (for in-place edits). On any error
    the temporary file is removed and ``path`` is left untouched (never half-written).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if copy_existing:
            shutil.copyfile(path, tmp)
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs) -> Iterator:
    """Open a temporary file next to ``path`` (``open(tmp, mode, **kwargs)``); on success it is
    moved over ``path`` by :func:`atomic_path`."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def safe_name(name: str) -> str:
    """A slide id made safe to use as a file name (no separators, no '..')."""
    cleaned = "".join(c if (c.isalnum() or c in "-_.") else "_" for c in str(name))
    cleaned = cleaned.lstrip(".") or "_"
    return cleaned


def inside(root: str | os.PathLike, *parts: str) -> str:
    """``root/parts...``, refusing any result outside ``root`` (e.g. a slide id of '../../x')."""
    base = Path(root).resolve()
    path = base.joinpath(*parts).resolve()
    if path != base and base not in path.parents:
        raise ValueError(f"refusing to write outside the output folder {base}: {path}")
    return str(path)
