"""Read patches of a slide at given coordinates: ``ReadPatches`` / ``ReadPatchesd``.

Output is a float tensor ``[S, 3, out_size, out_size]`` in ``[0, 1]``; patches read at a size
different from ``out_size`` (e.g. 512 px at level 0 for 256 px at twice the mpp) are resized
with antialiased bilinear interpolation. Slide handles are cached per process: a DataLoader
worker (fork or spawn) opens its own handle on first use and keeps it.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch

from monai_fbta._quiet import quiet_import

quiet_import("monai")

from monai.config import KeysCollection  # noqa: E402
from monai.data import MetaTensor  # noqa: E402
from monai.transforms import MapTransform, Transform  # noqa: E402
from monai.utils import ensure_tuple  # noqa: E402

from monai_fbta.data.slide import SlideCache, patches_to_tensor  # noqa: E402

__all__ = ["ReadPatches", "ReadPatchesd", "tiling_meta"]


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


def tiling_meta(data: Mapping[Hashable, Any], key: Hashable, meta_key_postfix: str = "meta_dict") -> Mapping[str, Any]:
    """The tiling attributes of ``data[key]``: ``data[f"{key}_{meta_key_postfix}"]``, else the MetaTensor's ``.meta``.

    :class:`~monai_fbta.transforms.TissueTiled` writes both; :class:`~monai_fbta.transforms.PseudoBagSampled`
    carries them to the pseudo-bag's keys.
    """
    meta = data.get(f"{key}_{meta_key_postfix}")
    if meta is None and isinstance(data.get(key), MetaTensor):
        meta = data[key].meta
    return meta or {}


class ReadPatchesd(MapTransform):
    """Dictionary form: for each coordinates key in ``keys``, reads those patches of slide ``d[slide_key]``.

    The read level and size default to the tiling's (``patch_level`` / ``patch_size_level`` in the key's
    metadata, see :func:`tiling_meta`), so ``TissueTiled`` then ``ReadPatchesd`` reads exactly the tiled
    patches; ``level`` / ``size`` given here override it. Coordinates with neither raise (never a guessed size).

    Args:
        keys: coordinates keys (``[S, 2]`` level-0 ``(x, y)``).
        slide_key: slide path or open ``Slide`` (default: the metadata's ``filename_or_obj``).
        out_keys: where the ``[S, 3, out, out]`` patches go, one per key (default ``<key>_image``).
        level, size, backend, mpp: see :class:`ReadPatches`.
        out_size: output size (default: the tiling's ``patch_size``, i.e. the size the frozen features saw, else
            the read size).
        meta_key_postfix: metadata of ``key`` is read from ``f"{key}_{meta_key_postfix}"``.
    """

    def __init__(
        self,
        keys: KeysCollection = "coords",
        slide_key: str = "image",
        out_keys: KeysCollection | None = None,
        level: int | None = None,
        size: int | None = None,
        out_size: int | None = None,
        backend: str = "auto",
        mpp: float | None = None,
        meta_key_postfix: str = "meta_dict",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.slide_key = slide_key
        self.out_keys = ensure_tuple(out_keys) if out_keys is not None else tuple(f"{k}_image" for k in self.keys)
        if len(self.out_keys) != len(self.keys):
            raise ValueError(f"ReadPatchesd: {len(self.keys)} keys but {len(self.out_keys)} out_keys")
        self.level, self.size, self.out_size = level, size, out_size
        self.meta_key_postfix = meta_key_postfix
        self.reader = ReadPatches(out_size=out_size, backend=backend, mpp=mpp)

    def _geometry(self, d: Mapping[Hashable, Any], key: Hashable) -> tuple[Any, int, int]:
        meta = tiling_meta(d, key, self.meta_key_postfix)
        slide = d.get(self.slide_key, meta.get("filename_or_obj"))
        level = self.level if self.level is not None else meta.get("patch_level")
        size = self.size if self.size is not None else meta.get("patch_size_level")
        if slide is None or level is None or size is None:
            raise KeyError(
                f"ReadPatchesd: for {key!r} no {'slide' if slide is None else 'read level/size'}: give slide_key / level= "
                f"and size=, or make {key!r} with TissueTiled (its metadata, in '{key}_{self.meta_key_postfix}', has them)"
            )
        return slide, int(level), int(size)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, out_key in self.key_iterator(d, self.out_keys):
            slide, level, size = self._geometry(d, key)
            out_size = self.out_size or tiling_meta(d, key, self.meta_key_postfix).get("patch_size") or size
            d[out_key] = self.reader(slide, d[key], level, size, int(out_size))
        return d
