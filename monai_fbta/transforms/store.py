"""Load a slide's cached feature store into a sample: ``LoadStored``.

A datalist row ``{"image": slide path, "slide_id"?, "label"?}`` becomes a sample with the arrays of
``<store_dir>/<slide_id>.h5`` (written by :func:`~monai_fbta.data.extraction.extract_features`)::

    slide_id str, label int (-1 when the row has none), image str
    coords   int64   [N, 2]   level-0 top-left (x, y); coords_meta_dict: the tiling attrs
                              (patch_level, patch_size_level, patch_size: what ReadPatchesd reads)
    features float32 [N, D]   the frozen bag F^FB
    clusters int64   [N]      KMeans labels (computed once and cached in the store, see cluster_store)

With ``index_key`` it reads only the rows ``d[index_key]`` of each key into ``<prefix><key>`` (e.g. the
pseudo-bag's ``pb_features [S, D]`` without loading the whole bag).
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch

from monai_fbta._quiet import quiet_import

quiet_import("monai")

from monai.config import KeysCollection  # noqa: E402
from monai.transforms import MapTransform  # noqa: E402

from monai_fbta.data.clustering import cluster_store  # noqa: E402
from monai_fbta.data.store import SlideStore, StoreError, slide_id_of, store_path  # noqa: E402

__all__ = ["LoadStored"]


class LoadStored(MapTransform):
    """Dictionary transform: the arrays ``keys`` of the slide's store, plus ``slide_id``, ``label`` and ``image``.

    Args:
        store_dir: folder of the ``<slide_id>.h5`` stores.
        keys: store arrays to load: ``"coords"`` (with its tiling attrs in ``coords_meta_dict``),
            ``"features"``, ``"clusters"`` (KMeans labels, made and cached on first use with ``num_clusters``).
        num_clusters, cluster_seed, cluster_method: the KMeans settings of ``"clusters"``.
        index_key: when given, read only the rows ``d[index_key]`` (sorted ``[S]``) of each key, into
            ``f"{prefix}{key}"``; the full arrays are not loaded.
        prefix: output key prefix with ``index_key`` (default ``"pb_"``).
        meta_key_postfix: ``coords``' tiling attrs go to ``f"coords_{meta_key_postfix}"``.
        allow_missing_keys: skip arrays the store does not have instead of raising ``StoreError``.
        features_of: entries the ``features``' fingerprint must hold, e.g. ``encoder_fingerprint(frozen_encoder)``
            (:func:`~monai_fbta.data.extraction.encoder_fingerprint`): a store written by another extractor, say by
            another run sharing the cache folder, raises ``StoreError`` instead of being read as this run's.
    """

    def __init__(
        self,
        store_dir: str | os.PathLike,
        keys: KeysCollection = ("coords", "features", "clusters"),
        num_clusters: int = 100,
        cluster_seed: int = 0,
        cluster_method: str = "auto",
        index_key: str | None = None,
        prefix: str = "pb_",
        meta_key_postfix: str = "meta_dict",
        allow_missing_keys: bool = False,
        features_of: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.features_of = dict(features_of or {})
        self.store_dir = os.fspath(store_dir)
        self.num_clusters, self.cluster_seed, self.cluster_method = num_clusters, cluster_seed, cluster_method
        self.index_key, self.prefix = index_key, prefix
        self.meta_key_postfix = meta_key_postfix

    def locate(self, row: Mapping[Hashable, Any]) -> tuple[str, str]:
        """``(slide_id, store path)`` of ``row``."""
        slide_id = slide_id_of(row)
        return slide_id, store_path(self.store_dir, slide_id)

    def clusters(self, store: str | SlideStore) -> np.ndarray:
        """``[N]`` KMeans labels of ``store`` (a path or an open store), computed and cached in it on first use."""
        return cluster_store(store, self.num_clusters, self.cluster_seed, self.cluster_method)

    def _check_features(self, store: SlideStore, slide_id: str) -> None:
        made_by = store.attrs("features").get("fingerprint") or {}
        differ = sorted(k for k, v in self.features_of.items() if made_by.get(k) != v)
        if differ:
            raise StoreError(store.path, f"the features of slide {slide_id} were made with other {', '.join(differ)} "
                             f"than this run's frozen extractor ({', '.join(f'{k} {made_by.get(k)!r}' for k in differ)}"
                             "): another run may have rewritten this cache folder. Give each extractor and tiling "
                             "its own --cache_dir, and run preprocessing again")

    def _read(self, store: SlideStore, key: str) -> tuple[np.ndarray, dict[str, Any] | None]:
        if key == "coords":
            return store.coords()
        return (self.clusters(store) if key == "clusters" else store.array(key)), None

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        slide_id, path = self.locate(d)
        if self.index_key is None:
            d["slide_id"] = slide_id
            d["label"] = int(d["label"]) if d.get("label") not in (None, "") else -1
            d["image"] = os.fspath(d["image"])
        with SlideStore(path) as store:  # one open file for every read of this item
            if self.features_of and "features" in self.keys:
                self._check_features(store, slide_id)
            have = set(store.names()) | {"clusters"} if self.allow_missing_keys else None
            for key in self.keys:
                if have is not None and key not in have:
                    continue
                if self.index_key is not None:
                    d[f"{self.prefix}{key}"] = _tensor(store.rows(key, np.asarray(d[self.index_key])))
                    continue
                array, attrs = self._read(store, key)
                d[key] = _tensor(array)
                if attrs is not None:
                    d[f"{key}_{self.meta_key_postfix}"] = attrs
        return d


def _tensor(array: Any) -> torch.Tensor:
    """Store arrays as tensors: features ``float32``, coords and labels ``int64``."""
    t = array if isinstance(array, torch.Tensor) else torch.as_tensor(np.asarray(array))
    return t.float() if t.is_floating_point() else t.long()
