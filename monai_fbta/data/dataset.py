"""``FBTADataset``: one slide per item, the frozen bag, a fresh pseudo-bag and its patches.

Item (see docs/architecture.md)::

    slide_id str, label int (-1 when the row has none), image str (slide path)
    features  float32 [N, D]      full frozen bag F^FB (omitted with load_full_bag=False)
    coords    int64   [N, 2]      level-0 top-left (x, y)
    clusters  int64   [N]         KMeans labels (cached in the store)
    pb_index  int64   [S]         sorted pseudo-bag indices, S = sum_c min(M, |c|) <= C*M
    pb_features float32 [S, D], pb_coords int64 [S, 2]
    pb_image_clean float32 [S, 3, P, P] in [0, 1]   un-augmented patches (load_patches=True)
    pb_image       float32 [S, 3, P, P] in [0, 1]   augmented patches (same as clean if augment=False)

Randomness is a function of ``(seed, epoch, index)`` only: call :meth:`FBTADataset.set_epoch`
every epoch for new pseudo-bags; the same seed gives the same items in any worker layout. The epoch
lives in shared memory, so ``set_epoch`` in the main process reaches DataLoader workers too, persistent
ones included (they hold a copy of the dataset made when they started).
Batch with :func:`collate_single` (batch size 1).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from monai_fbta.data.clustering import cluster_store
from monai_fbta.data.extraction import slide_id_of, store_path
from monai_fbta.data.store import StoreError, open_features, read_array, read_coords, store_is_complete
from monai_fbta.transforms.augment import make_e2e_augmentation
from monai_fbta.transforms.patches import ReadPatches
from monai_fbta.transforms.pseudobag import PseudoBagSample, gather_rows

__all__ = ["FBTADataset", "collate_single"]


def _seed_for(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class FBTADataset(torch.utils.data.Dataset):
    """Slides of a datalist with their stores (from :func:`~monai_fbta.data.extraction.extract_features`).

    Args:
        rows: datalist rows: ``"image"`` (slide path), optional ``"slide_id"``, ``"label"``, ``"mpp"``.
        store_dir: folder of the ``<slide_id>.h5`` stores.
        num_per_cluster: ``M``; num_clusters: ``C``; cluster_seed/cluster_method: KMeans settings
            (labels are computed once and cached in each store, see :func:`cluster_store`).
        patch_size: output patch size (default: the store's ``patch_size``); read level and read
            size come from the store's tiling attrs.
        augment: ``True`` for :func:`make_e2e_augmentation`, ``False``, or any callable/MONAI
            transform mapping ``{"pb_image": [S, 3, P, P]}`` to the same.
        load_patches: ``False`` yields only the frozen parts (vanilla MIL, inference).
        load_full_bag: ``False`` omits ``features`` and reads only the ``S`` pseudo-bag rows.
        seed: base seed; cluster_on_init: cluster every slide now (main process), not lazily.
    """

    def __init__(
        self,
        rows: Sequence[Mapping[str, Any]],
        store_dir: str | os.PathLike,
        num_per_cluster: int = 1,
        num_clusters: int = 100,
        patch_size: int | None = None,
        augment: bool | Callable = True,
        load_patches: bool = True,
        load_full_bag: bool = True,
        seed: int = 0,
        cluster_seed: int = 0,
        cluster_method: str = "auto",
        cluster_on_init: bool = True,
        backend: str = "auto",
    ) -> None:
        self.rows = [dict(r) for r in rows]
        self.store_dir = os.fspath(store_dir)
        self.num_clusters, self.cluster_seed, self.cluster_method = num_clusters, cluster_seed, cluster_method
        self.patch_size = patch_size
        self.load_patches, self.load_full_bag = load_patches, load_full_bag
        self.seed = int(seed)
        # one int64 in shared memory: workers (forked or spawned, persistent or not) see set_epoch's value
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.sampler = PseudoBagSample(num_per_cluster)
        self.reader = ReadPatches(backend=backend)
        self.augment = make_e2e_augmentation(keys="pb_image") if augment is True else (augment or None)
        for row in self.rows:
            path = self.store_of(row)
            if not store_is_complete(path, required=("coords", "features")):
                raise StoreError(path, f"no complete feature store for slide {row.get('image')!r}; run extract_features first")
            if not store_is_complete(path, required=("features",), check_finite=True):
                raise StoreError(path, f"features of slide {slide_id_of(row)!r} contain NaN/inf: delete this store to re-extract it")
            if cluster_on_init:
                self._clusters(path)

    def store_of(self, row: Mapping[str, Any]) -> str:
        return store_path(self.store_dir, slide_id_of(row))

    @property
    def epoch(self) -> int:
        """The epoch the pseudo-bags and augmentations are drawn for (see :meth:`set_epoch`)."""
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """New pseudo-bags (and augmentations) for ``epoch``; visible to running DataLoader workers.

        Call it before iterating the DataLoader for that epoch (``FBTATrainer`` does, on ``EPOCH_STARTED``).
        """
        self._epoch.fill_(int(epoch))

    def set_random_state(self, seed: int | None = None, state: Any = None) -> FBTADataset:
        """MONAI-style: set the base ``seed`` (``state`` is not supported: items are seeded per index)."""
        if seed is not None:
            self.seed = int(seed)
        return self

    def __len__(self) -> int:
        return len(self.rows)

    def _clusters(self, path: str) -> np.ndarray:
        return cluster_store(path, self.num_clusters, self.cluster_seed, self.cluster_method)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        path = self.store_of(row)
        coords, attrs = read_coords(path)
        clusters = self._clusters(path)
        item_seed = _seed_for(self.seed, self.epoch, index)
        self.sampler.set_random_state(item_seed)
        pb_index = self.sampler(clusters)
        d: dict[str, Any] = {
            "slide_id": slide_id_of(row),
            "label": int(row["label"]) if row.get("label") not in (None, "") else -1,
            "image": os.fspath(row["image"]),
            "coords": torch.as_tensor(coords),
            "clusters": torch.as_tensor(clusters),
            "pb_index": pb_index,
            "pb_coords": torch.as_tensor(coords[pb_index.numpy()]),
        }
        if self.load_full_bag:
            d["features"] = torch.as_tensor(read_array(path, "features")).float()
            d["pb_features"] = d["features"][pb_index]
        else:
            with open_features(path) as feats:
                d["pb_features"] = gather_rows(feats, pb_index.numpy()).float()
        if self.load_patches:
            d["pb_image_clean"] = self.reader(
                d["image"], d["pb_coords"], int(attrs["patch_level"]), int(attrs["patch_size_level"]),
                int(self.patch_size or attrs["patch_size"]),
            )
            d["pb_image"] = d["pb_image_clean"].clone()
            if self.augment is not None:
                if hasattr(self.augment, "set_random_state"):
                    self.augment.set_random_state(_seed_for(self.seed, self.epoch, index, 1))
                d["pb_image"] = self.augment({"pb_image": d["pb_image"]})["pb_image"]
        return d


def collate_single(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Collate a batch of **one** slide: every tensor gets a leading batch dim of 1
    (``features [N, D] -> [1, N, D]``, ``pb_image [S, 3, P, P] -> [1, S, 3, P, P]``), ints become
    a ``[1]`` tensor and other values (``slide_id``, ``image``) a 1-element list. Bags differ in
    size, so batches of several slides are refused (use gradient accumulation instead)."""
    if len(batch) != 1:
        raise ValueError(f"collate_single takes one slide per batch (bags differ in size), got {len(batch)}")
    out: dict[str, Any] = {}
    for key, value in batch[0].items():
        if isinstance(value, torch.Tensor):
            out[key] = value.unsqueeze(0)
        elif isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            out[key] = torch.tensor([int(value)])
        else:
            out[key] = [value]
    return out
