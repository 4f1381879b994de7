"""Keep third-party native libraries quiet.

cuCIM initialises cuFile (which prints ``dlopen error libcuda.so.1`` and writes ``./cufile.log``
on machines without a GPU) and nvImageCodec prints nvJPEG2000/nvTIFF load errors when
``monai.handlers`` pulls it in. Those messages come from C code, so Python's ``sys.stderr``
cannot catch them: :func:`silence_native_output` redirects the process-level file descriptors.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator

__all__ = ["configure_environment", "silence_native_output", "quiet_import"]


def configure_environment() -> None:
    """Point cuFile's log away from the working directory (unless the user set it)."""
    if "CUFILE_LOGFILE_PATH" not in os.environ:
        os.environ["CUFILE_LOGFILE_PATH"] = os.path.join(tempfile.gettempdir(), "monai_fbta_cufile.log")


@contextlib.contextmanager
def silence_native_output() -> Iterator[None]:
    """Redirect fds 1 and 2 to /dev/null for the duration (C-level prints included).

    Python-level output written inside the block is flushed first so ordering is kept.
    Set ``MONAI_FBTA_VERBOSE_NATIVE=1`` to see the native messages when debugging.
    """
    if os.environ.get("MONAI_FBTA_VERBOSE_NATIVE") == "1":
        yield
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = []
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        yield
        return
    try:
        for fd in (1, 2):
            try:
                saved.append((fd, os.dup(fd)))
                os.dup2(devnull, fd)
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
        os.close(devnull)


def quiet_import(module: str):
    """Import ``module`` with native stdout/stderr silenced; returns the module or raises ImportError."""
    import importlib

    with silence_native_output():
        return importlib.import_module(module)
