"""File-writing rules shared across the package: atomic writes (a temp file next to the target, then
``os.replace``), and safe names / paths for files named after slide ids (:func:`safe_name`, :func:`inside`).

:func:`atomic_path` is the one implementation (temp name, fsync, umask-derived permissions,
rename, clean-up); :func:`atomic_open` wraps it for plain file objects and the HDF5 store uses it
for ``h5py.File``. Temp names carry the writer's host and pid (``.NAME.HOST-PID.XXXXXXXX.tmp``), so
:func:`remove_stale_temps` removes only what a dead writer left, never another live process's write.
:func:`exclusive_lock` keeps a second process out of work that one is doing.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import os
import re
import shutil
import socket
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LockHeld", "atomic_open", "atomic_path", "exclusive_lock", "inside", "remove_stale_temps", "safe_name"]

_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
_TEMP_OWNER = re.compile(r"^(?P<host>[A-Za-z0-9_-]+)-(?P<pid>\d+)\.[^.]+\.tmp$")


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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_HOST}-{os.getpid()}.", suffix=".tmp", dir=path.parent)
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def remove_stale_temps(path: str | os.PathLike, max_age_s: float = 24 * 3600) -> list[str]:
    """Remove the temp files :func:`atomic_path` left next to ``path`` when its writer died; the removed paths.

    A temp is stale when its writer's pid (in its name) no longer runs on this host, or when it was not
    modified for ``max_age_s`` (a writer on another host, or a name without owner). A live writer's temp,
    e.g. another process rewriting the same store, is kept.
    """
    path = Path(path)
    prefix = f".{path.name}."
    removed = []
    for tmp in glob.glob(os.path.join(glob.escape(str(path.parent)), glob.escape(prefix) + "*.tmp")):
        owner = _TEMP_OWNER.match(os.path.basename(tmp)[len(prefix):])
        try:
            age = time.time() - os.path.getmtime(tmp)
            dead = owner is not None and owner["host"] == _HOST and not _pid_alive(int(owner["pid"]))
            if dead or age > max_age_s:
                os.remove(tmp)
                removed.append(tmp)
        except OSError:  # gone meanwhile (its writer renamed it)
            continue
    return removed


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs) -> Iterator:
    """Open a temporary file next to ``path`` (``open(tmp, mode, **kwargs)``); on success it is
    moved over ``path`` by :func:`atomic_path`."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


class LockHeld(RuntimeError):
    """:func:`exclusive_lock` found its lock held by another live process."""


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold ``path`` as an exclusive lock (``flock``) for the block, or fail at once if another process holds it.

    The file records its holder (``HOST PID``) for the error, which names ``what``. The kernel releases the lock
    when its holder exits, however it exits, so a killed run never leaves a stale lock behind. The file itself
    stays (removing it would let a third process lock a different inode). Raises :class:`LockHeld`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise LockHeld(f"{what} is in use by another process (host and pid: {holder}; lock {path}): "
                           "wait for it to finish, or stop it first") from None
        except OSError as err:  # a file system without locks (some network mounts): run, but say so
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            warnings.warn(f"{path}: this file system cannot lock ({err.strerror}), so nothing keeps a second "
                          f"process out of {what}", RuntimeWarning, stacklevel=3)
            yield
            return
        f.seek(0)
        f.truncate()
        f.write(f"{_HOST} {os.getpid()}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def file_sha256(path: str | os.PathLike, digits: int = 16) -> str:
    """The first ``digits`` hex digits of the file's sha256, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:digits]


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
