"""Shared fixtures: real test slides (skipped when ../shared is absent) and tiny synthetic slides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REAL_DIR = Path(os.environ.get("FBTA_REAL_SLIDES", REPO.parent / "shared" / "testdata" / "real"))


@pytest.fixture(scope="session")
def real_dir() -> Path:
    """Folder of real test slides; the test is skipped when it is not there."""
    if not REAL_DIR.is_dir():
        pytest.skip(f"real test slides not found at {REAL_DIR}")
    return REAL_DIR


def real_slide(name: str) -> Path:
    path = REAL_DIR / name
    if not path.is_file():
        pytest.skip(f"real test slide {path} not found")
    return path
