"""Read patches of a slide at given coordinates: ``ReadPatches`` / ``ReadPatchesd``.

Output is a float tensor ``[S, 3, out_size, out_size]`` in ``[0, 1]``; patches read at a size
different from ``out_size`` (e.g. 512 px at level 0 for 256 px at twice the mpp) are resized
with antialiased bilinear interpolation. Slide handles are cached per process: a DataLoader
worker (fork or spawn) opens its own handle on first use and keeps it.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Hashable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from monai_fbta._quiet import quiet_import

quiet_import("monai")

from monai.config import KeysCollection  # noqa: E402
from monai.transforms import MapTransform, Transform  # noqa: E402

__all__ = ["patches_to_tensor", "SlideCache", "ReadPatches", "ReadPatchesd"]


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
        from monai_fbta.data.slide import open_slide

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


class ReadPatches(Transform):
    """``(slide, coords [S, 2])`` -> ``float32 [S, 3, out_size, out_size]`` in ``[0, 1]``.

    Args:
        level: pyramid level to read from.
        size: read size in pixels at ``level``.
        out_size: output size (default ``size``); resized when different.
        backend, mpp: passed to ``open_slide`` when ``slide`` is a path.
    """

    def __init__(
        self, level: int = 0, size: int = 256, out_size: int | None = None, backend: str = "auto", mpp: float | None = None
    ) -> None:
        self.level = level
        self.size = size
        self.out_size = out_size or size
        self.cache = SlideCache(backend=backend, mpp=mpp)

    def __call__(
        self, slide, coords, level: int | None = None, size: int | None = None, out_size: int | None = None
    ) -> torch.Tensor:
        """``slide``: path or open ``Slide``; ``level``/``size``/``out_size`` override the constructor's."""
        coords = coords.cpu().numpy() if isinstance(coords, torch.Tensor) else np.asarray(coords)
        handle = self.cache.get(slide)
        level = self.level if level is None else level
        size = self.size if size is None else size
        return patches_to_tensor(handle.read_patches(coords, level, size), out_size or self.out_size)


class ReadPatchesd(MapTransform):
    """Dictionary form: reads ``d[coords_key]`` from slide ``d[slide_key]`` into ``d[out_key]``.

    ``level``/``size`` may be overridden per sample with ``d[level_key]`` / ``d[size_key]``
    (e.g. stored in the slide's feature store when the read size depends on the slide's mpp).
    """

    def __init__(
        self,
        slide_key: str = "image",
        coords_key: str = "pb_coords",
        out_key: str = "pb_image_clean",
        level: int = 0,
        size: int = 256,
        out_size: int | None = None,
        level_key: str | None = "patch_level",
        size_key: str | None = "patch_size_level",
        backend: str = "auto",
        mpp: float | None = None,
    ) -> None:
        super().__init__(keys=[coords_key])
        self.slide_key = slide_key
        self.coords_key = coords_key
        self.out_key = out_key
        self.level_key = level_key
        self.size_key = size_key
        self.reader = ReadPatches(level, size, out_size, backend, mpp)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in (self.slide_key, self.coords_key):
            if key not in d:
                raise KeyError(f"ReadPatchesd: key {key!r} missing (have {sorted(map(str, d))})")
        level = int(d[self.level_key]) if self.level_key and self.level_key in d else None
        size = int(d[self.size_key]) if self.size_key and self.size_key in d else None
        d[self.out_key] = self.reader(d[self.slide_key], d[self.coords_key], level, size)
        return d
