"""What a result was made with: Python, the versions of the packages that change pixels or numbers, and what else
decides float results on the CPU (its model, the SIMD kernels torch chose, torch's thread count).

Recorded in ``model.pt``'s metadata, each ``<split>_metrics.json``, a synthetic dataset's ``datalist.json`` and every
benchmark result's ``machine`` entry, so that two runs that disagree can be traced to a changed package. Installs
are unpinned (``setup.cfg``): a fresh ``./.venv`` may resolve newer releases than the one a result came from.
"""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Any

import torch

__all__ = ["NUMERIC_PACKAGES", "software_environment"]

NUMERIC_PACKAGES: tuple[str, ...] = (
    "monai-fbta", "torch", "torchvision", "monai", "pytorch-ignite", "timm",  # training numerics
    "numpy", "scipy", "scikit-learn", "scikit-image",  # synthetic rendering, tissue masks, KMeans, metrics
    "tifffile", "imagecodecs", "pillow", "h5py",  # slide writing and reading, caches
    "cucim-cu13", "cucim-cu12", "cucim", "openslide-python", "openslide-bin",  # slide readers
)
"""Distribution names whose version can change a slide's pixels, its features or a training run."""


def software_environment(packages: tuple[str, ...] = NUMERIC_PACKAGES) -> dict[str, Any]:
    """``{"python": "3.11.7", "torch": "2.14.1", ..., "cpu": "AMD EPYC", "torch_cpu_capability": "AVX2",
    "torch_threads": 2}``: the installed ones of ``packages`` (distribution names; the others are left out), then the
    CPU model, the kernels torch uses on it (another CPU may round differently) and torch's thread count (sums are
    split by threads)."""
    env: dict[str, Any] = {"python": platform.python_version()}
    for name in packages:
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    env["cpu"] = _cpu_model()
    env["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    env["torch_threads"] = torch.get_num_threads()
    return env


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
