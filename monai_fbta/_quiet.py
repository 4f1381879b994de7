"""Keep third-party native libraries quiet.

cuCIM initialises cuFile (which prints ``dlopen error libcuda.so.1`` and writes ``./cufile.log``
on machines without a GPU) and nvImageCodec prints nvJPEG2000/nvTIFF load errors when
``monai.handlers`` pulls it in. Those messages come from C code, so Python's ``sys.stderr``
cannot catch them: :func:`silence_native_output` redirects the process-level file descriptors, and
:func:`capture_native_output` collects what they print (cuCIM reports a corrupt JPEG tile only by
printing libjpeg's message on stdout, then returns pixels).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["configure_environment", "silence_native_output", "capture_native_output", "quiet_import"]


def configure_environment() -> None:
    """Point cuFile's log away from the working directory (unless the user set it)."""
    if "CUFILE_LOGFILE_PATH" not in os.environ:
        os.environ["CUFILE_LOGFILE_PATH"] = os.path.join(tempfile.gettempdir(), "monai_fbta_cufile.log")


_FD_LOCK = threading.RLock()  # fds 1 and 2 are process-wide: one redirection at a time
_capture: tuple[int, Any] | None = None  # (pid, temporary file) of this process


def _reset_after_fork() -> None:  # a child (DataLoader worker) must not inherit a lock held by another thread
    global _FD_LOCK
    _FD_LOCK = threading.RLock()


os.register_at_fork(after_in_child=_reset_after_fork)


@contextlib.contextmanager
def _redirect_fds(target: int) -> Iterator[None]:
    """Point fds 1 and 2 at ``target`` for the duration (flushing Python's streams around it)."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = []
    try:
        for fd in (1, 2):
            try:
                saved.append((fd, os.dup(fd)))
                os.dup2(target, fd)
            except OSError:
                pass
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        for fd, copy in saved:
            os.dup2(copy, fd)
            os.close(copy)


@contextlib.contextmanager
def silence_native_output() -> Iterator[None]:
    """Redirect fds 1 and 2 to /dev/null for the duration (C-level prints included).

    Python-level output written inside the block is flushed first so ordering is kept.
    Set ``MONAI_FBTA_VERBOSE_NATIVE=1`` to see the native messages when debugging.
    """
    if os.environ.get("MONAI_FBTA_VERBOSE_NATIVE") == "1":
        yield
        return
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        yield
        return
    try:
        with _FD_LOCK, _redirect_fds(devnull):
            yield
    finally:
        os.close(devnull)


@contextlib.contextmanager
def capture_native_output(limit: int = 1 << 16) -> Iterator[list[str]]:
    """Collect what native code writes on fds 1 and 2 during the block (e.g. a decoder's complaint
    about corrupt data): yields a list that holds the text (at most ``limit`` bytes) once the block ends.

    Nothing reaches the terminal; with ``MONAI_FBTA_VERBOSE_NATIVE=1`` the text is echoed on stderr
    afterwards. Captures are serialised across threads (fds are process-wide), so keep blocks short.
    """
    global _capture
    sink: list[str] = []
    with _FD_LOCK:
        if _capture is None or _capture[0] != os.getpid():  # a forked child must not share the parent's file offset
            _capture = (os.getpid(), tempfile.TemporaryFile())
        fd = _capture[1].fileno()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            with _redirect_fds(fd):
                yield sink
        finally:
            size = os.lseek(fd, 0, os.SEEK_CUR)
            text = os.pread(fd, min(size, limit), 0).decode(errors="replace") if size else ""
            sink.append(text)
            if text and os.environ.get("MONAI_FBTA_VERBOSE_NATIVE") == "1":
                os.write(2, text.encode())


def quiet_import(module: str):
    """Import ``module`` with native stdout/stderr silenced; returns the module or raises ImportError."""
    import importlib

    with silence_native_output():
        return importlib.import_module(module)
