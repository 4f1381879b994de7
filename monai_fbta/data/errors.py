"""Errors raised by slide I/O, tiling and the per-slide store.

Every message names the file and says what went wrong (and, where useful, what to do), so a
failure in a 1000-slide run points straight at the slide to look at.
"""

from __future__ import annotations

__all__ = [
    "SlideError",
    "SlideNotFoundError",
    "SlideFormatError",
    "SlideReadError",
    "NoTissueError",
    "MissingMPPError",
]


class SlideError(Exception):
    """Base class: something is wrong with one slide (or its store). ``path`` names the file."""

    def __init__(self, path: object, message: str) -> None:
        self.path = str(path)
        super().__init__(f"{self.path}: {message}")


class SlideNotFoundError(SlideError, FileNotFoundError):
    """The slide file does not exist."""


class SlideFormatError(SlideError):
    """Not a slide, truncated, corrupt, or a compression no installed backend can decode."""


class SlideReadError(SlideError):
    """A region failed to decode (e.g. a corrupt tile)."""


class NoTissueError(SlideError):
    """Tissue detection found nothing to tile."""


class MissingMPPError(SlideError):
    """The slide has no physical pixel size and none was given."""
