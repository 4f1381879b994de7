"""MONAI transforms for tissue tiling: ``TissueTile`` (array) and ``TissueTiled`` (dictionary)."""

from __future__ import annotations

import inspect
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import ensure_tuple_rep

from monai_fbta.data.slide import Slide, open_slide
from monai_fbta.data.tiling import tile_slide

__all__ = ["TissueTile", "TissueTiled"]


class TissueTile(Transform):
    """Slide path (or open :class:`Slide`) -> ``MetaTensor int64 [N, 2]`` of level-0 tissue patch coords.

    The tiling attrs of :func:`~monai_fbta.data.tiling.tile_slide` (patch_level, patch_size_level,
    mpp, ...) are in ``.meta``, with ``filename_or_obj`` set to the slide path. ``backend``/``mpp``
    go to :func:`open_slide`; other keyword arguments (``patch_size``, ``target_mpp``,
    ``magnification``, ``tissue_threshold``, ``mask_max_size``, ``overlap``, ``assume_mpp``) to
    :func:`tile_slide`.
    """

    def __init__(self, backend: str = "auto", mpp: float | None = None, **tile_kwargs: Any) -> None:
        inspect.signature(tile_slide).bind(None, **tile_kwargs)  # a typo fails here, not per slide
        self.tile_kwargs = tile_kwargs
        self.backend, self.mpp = backend, mpp

    def __call__(self, slide: str | os.PathLike | Slide) -> MetaTensor:
        if isinstance(slide, Slide):
            coords, attrs = tile_slide(slide, **self.tile_kwargs)
        else:
            with open_slide(slide, backend=self.backend, mpp=self.mpp) as opened:
                coords, attrs = tile_slide(opened, **self.tile_kwargs)
        attrs["filename_or_obj"] = attrs["slide_path"]
        return MetaTensor(torch.from_numpy(coords), meta=attrs)


class TissueTiled(MapTransform):
    """Dictionary form of :class:`TissueTile`: ``d[key]`` (slide path) -> ``d[coords_key]`` coords.

    The attrs also go to ``d[f"{coords_key}_{meta_key_postfix}"]`` (a plain dict), MONAI style.
    With several ``keys``, give one ``coords_key`` per key.
    Example: ``Compose([TissueTiled("image", patch_size=256)])({"image": "a.svs", "label": 1})``.
    """

    def __init__(
        self,
        keys: KeysCollection = ("image",),
        coords_key: str | Sequence[str] = "coords",
        meta_key_postfix: str = "meta_dict",
        allow_missing_keys: bool = False,
        **tile_kwargs: Any,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.coords_keys = ensure_tuple_rep(coords_key, len(self.keys))
        self.meta_key_postfix = meta_key_postfix
        self.tiler = TissueTile(**tile_kwargs)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, coords_key in self.key_iterator(d, self.coords_keys):
            coords = self.tiler(d[key])
            d[coords_key] = coords
            d[f"{coords_key}_{self.meta_key_postfix}"] = dict(coords.meta)
        return d

