"""Slide datasets: a MONAI ``Dataset`` of datalist rows whose ``Compose`` is re-seeded per epoch and item.

:class:`SlideDataset` is ``monai.data.Dataset`` plus one rule: before item ``i`` is transformed, the transform
(a ``Compose``) is seeded with ``seed_for(seed, epoch, i)``, so randomness is a function of ``(seed, epoch,
index)`` only: the same seed gives the same items in any worker layout, and :meth:`SlideDataset.set_epoch`
draws new pseudo-bags and augmentations. The epoch lives in shared memory, so ``set_epoch`` in the main
process reaches DataLoader workers too, persistent ones included (they hold a copy of the dataset made
when they started). ``FBTATrainer`` calls it on every ``EPOCH_STARTED``.

:class:`FBTADataset` is a ``SlideDataset`` with the FBTA training transforms of :func:`fbta_transforms`
(the bundle's train.json declares the same chain by ``_target_``). Its item (see docs/architecture.md)::

    slide_id str, label int (-1 when the row has none), image str (slide path)
    features  float32 [N, D]      full frozen bag F^FB (omitted with load_full_bag=False)
    coords    int64   [N, 2]      level-0 top-left (x, y); coords_meta_dict: the store's tiling attrs
    clusters  int64   [N]         KMeans labels (cached in the store)
    pb_index  int64   [S]         sorted pseudo-bag indices, S = sum_c min(M, |c|) <= C*M
    pb_features float32 [S, D], pb_coords int64 [S, 2]
    pb_image_clean float32 [S, 3, P, P] in [0, 1]   un-augmented patches (load_patches=True)
    pb_image       float32 [S, 3, P, P] in [0, 1]   augmented patches (same as clean if augment=False)

Batch with :func:`collate_single` (batch size 1).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from monai_fbta._quiet import quiet_import

quiet_import("monai")

from monai.data import Dataset  # noqa: E402
from monai.transforms import Compose, CopyItemsd, Randomizable  # noqa: E402

from monai_fbta.data.store import StoreError, store_is_complete  # noqa: E402
from monai_fbta.transforms.augment import make_e2e_augmentation  # noqa: E402
from monai_fbta.transforms.patches import ReadPatchesd  # noqa: E402
from monai_fbta.transforms.pseudobag import PseudoBagSampled  # noqa: E402
from monai_fbta.transforms.store import LoadStored  # noqa: E402

__all__ = ["SlideDataset", "FBTADataset", "fbta_transforms", "seed_for", "collate_single"]


def seed_for(*parts: int) -> int:
    """A 32-bit seed that depends on every one of ``parts`` (e.g. ``(seed, epoch, index)``)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class SlideDataset(Dataset):
    """``monai.data.Dataset`` whose random transforms get a per-item seed from ``(seed, epoch, index)``.

    Args:
        data: datalist rows (``{"image", "slide_id"?, "label"?}``).
        transform: a ``Compose`` (or callables, wrapped in one) turning a row into a sample, e.g. ``LoadStored``,
            ``PseudoBagSampled``, ``ReadPatchesd`` and augmentations.
        seed: base seed of the per-item seeds.
    """

    def __init__(self, data: Sequence[Any], transform: Sequence[Callable] | Callable | None = None, seed: int = 0) -> None:
        super().__init__(data, transform)
        self.seed = int(seed)
        # one int64 in shared memory: workers (forked or spawned, persistent or not) see set_epoch's value
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        """The epoch the pseudo-bags and augmentations are drawn for (see :meth:`set_epoch`)."""
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """New random draws for ``epoch``; visible to running DataLoader workers.

        Call it before iterating the DataLoader for that epoch (``FBTATrainer`` does, on ``EPOCH_STARTED``).
        """
        self._epoch.fill_(int(epoch))

    def set_random_state(self, seed: int | None = None, state: Any = None) -> SlideDataset:
        """MONAI-style: set the base ``seed`` (``state`` is not supported: items are seeded per index)."""
        if seed is not None:
            self.seed = int(seed)
        return self

    def _transform(self, index: int) -> Any:
        if isinstance(self.transform, Randomizable):
            self.transform.set_random_state(seed=seed_for(self.seed, self.epoch, index))
        return super()._transform(index)


def fbta_transforms(
    store_dir: str | os.PathLike,
    num_per_cluster: int = 1,
    num_clusters: int = 100,
    patch_size: int | None = None,
    augment: bool | Callable = True,
    load_patches: bool = True,
    load_full_bag: bool = True,
    cluster_seed: int = 0,
    cluster_method: str = "auto",
    backend: str = "auto",
) -> Compose:
    """The FBTA training chain: load the store, sample the pseudo-bag, read its patches, augment a copy.

    ``LoadStored -> PseudoBagSampled [-> LoadStored(pb_features only)] [-> ReadPatchesd -> CopyItemsd -> augment]``.
    ``augment``: ``True`` for :func:`make_e2e_augmentation` on ``pb_image``, ``False``, or a dictionary transform.
    ``patch_size``: output patch size (default: the store's ``patch_size``).
    """
    stored = ("coords", "features", "clusters") if load_full_bag else ("coords", "clusters")
    chain: list[Callable] = [
        LoadStored(store_dir, stored, num_clusters, cluster_seed, cluster_method),
        PseudoBagSampled(("features", "coords"), num_per_cluster=num_per_cluster, allow_missing_keys=True),
    ]
    if not load_full_bag:
        chain.append(LoadStored(store_dir, "features", index_key="pb_index", prefix="pb_"))
    if load_patches:
        chain += [ReadPatchesd("pb_coords", out_keys="pb_image_clean", out_size=patch_size, backend=backend),
                  CopyItemsd("pb_image_clean", names="pb_image")]
        augmentation = make_e2e_augmentation(keys="pb_image") if augment is True else (augment or None)
        if augmentation is not None:
            chain.append(augmentation)
    return Compose(chain)


class FBTADataset(SlideDataset):
    """Slides of a datalist with their stores (from :func:`~monai_fbta.data.extraction.extract_features`) and the
    FBTA training transforms of :func:`fbta_transforms`; the stores are checked now (complete, finite).

    Args:
        rows: datalist rows: ``"image"`` (slide path), optional ``"slide_id"``, ``"label"``, ``"mpp"``.
        store_dir: folder of the ``<slide_id>.h5`` stores.
        seed: base seed of the per-item draws.
        cluster_on_init: cluster every slide now (main process), not lazily in the workers.
        transform_kwargs: :func:`fbta_transforms`' ``num_per_cluster`` (M), ``num_clusters`` (C), ``patch_size``,
            ``augment``, ``load_patches`` (``False``: vanilla MIL, no patches read), ``load_full_bag``,
            ``cluster_seed``, ``cluster_method``, ``backend``.
    """

    def __init__(
        self,
        rows: Sequence[Mapping[str, Any]],
        store_dir: str | os.PathLike,
        seed: int = 0,
        cluster_on_init: bool = True,
        **transform_kwargs: Any,
    ) -> None:
        transform = fbta_transforms(store_dir, **transform_kwargs)
        super().__init__([dict(r) for r in rows], transform, seed)
        loader: LoadStored = transform.transforms[0]
        for row in self.data:
            slide_id, path = loader.locate(row)
            if not store_is_complete(path, required=("coords", "features")):
                raise StoreError(path, f"no complete feature store for slide {row.get('image')!r}; run extract_features first")
            if not store_is_complete(path, required=("features",), check_finite=True):
                raise StoreError(path, f"features of slide {slide_id!r} contain NaN/inf: delete this store to re-extract it")
            if cluster_on_init:
                loader.clusters(path)

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The datalist rows (``self.data``)."""
        return self.data


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
