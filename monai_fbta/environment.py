"""The software a result was made with: Python and the versions of the packages that change pixels or numbers.

Recorded in ``model.pt``'s metadata, each ``<split>_metrics.json``, a synthetic dataset's ``datalist.json`` and every
benchmark result's ``machine`` entry, so that two runs that disagree can be traced to a changed package. Installs
are unpinned (``setup.cfg``): a fresh ``./.venv`` may resolve newer releases than the one a result came from.
"""

from __future__ import annotations

import platform
from importlib import metadata

__all__ = ["NUMERIC_PACKAGES", "package_versions"]

NUMERIC_PACKAGES: tuple[str, ...] = (
    "monai-fbta", "torch", "torchvision", "monai", "pytorch-ignite", "timm",  # training numerics
    "numpy", "scipy", "scikit-learn", "scikit-image",  # synthetic rendering, tissue masks, KMeans, metrics
    "tifffile", "imagecodecs", "pillow", "h5py",  # slide writing and reading, caches
    "cucim-cu13", "cucim-cu12", "cucim", "openslide-python", "openslide-bin",  # slide readers
)
"""Distribution names whose version can change a slide's pixels, its features or a training run."""


def package_versions(packages: tuple[str, ...] = NUMERIC_PACKAGES) -> dict[str, str]:
    """``{"python": "3.11.7", "torch": "2.14.1+cu130", ...}`` for the installed ones of ``packages``
    (distribution names; those not installed are left out)."""
    versions = {"python": platform.python_version()}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions
