"""Slide datasets: a MONAI ``Dataset`` of datalist rows whose ``Compose`` is re-seeded per epoch and item.

:class:`SlideDataset` is ``monai.data.Dataset`` plus one rule: before item ``i`` is transformed, the transform
(a ``Compose``) is seeded with ``seed_for(seed, epoch, i)``, so randomness is a function of ``(seed, epoch,
index)`` only: the same seed gives the same items in any worker layout, and :meth:`SlideDataset.set_epoch`
draws new pseudo-bags and augmentations. The epoch lives in shared memory, so ``set_epoch`` in the main
process reaches DataLoader workers too, persistent ones included (they hold a copy of the dataset made
when they started). ``FBTATrainer`` calls it on every ``EPOCH_STARTED``.

:class:`~monai_fbta.transforms.chain.FBTADataset` is a ``SlideDataset`` with the FBTA training transforms of
:func:`~monai_fbta.transforms.chain.fbta_transforms` (the bundle's train.json declares the same chain by
``_target_``). Its item (see docs/architecture.md)::

    slide_id str, label int (-1 when the row has none), image str (slide path)
    features  float32 [N, D]      full frozen bag F^FB (omitted with load_full_bag=False)
    coords    int64   [N, 2]      level-0 top-left (x, y); coords_meta_dict: the store's tiling attrs
    clusters  int64   [N]         KMeans labels (cached in the store)
    pb_index  int64   [S]         sorted pseudo-bag indices, S = sum_c min(M, |c|) <= C*M
    pb_features float32 [S, D], pb_coords int64 [S, 2]
    pb_image_clean float32 [S, 3, P, P] in [0, 1]   un-augmented patches (load_patches=True)
    pb_image       float32 [S, 3, P, P] in [0, 1]   augmented patches (same as clean if augment=False)

Load with ``DataLoader(dataset, batch_size=None)`` (one slide per item, no collation); the engines'
:class:`~monai_fbta.engines.utils.PrepareSlideBatch` turns a sample into their inputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from monai_fbta._quiet import quiet_import

quiet_import("monai")

from monai.data import Dataset  # noqa: E402
from monai.transforms import Randomizable  # noqa: E402

__all__ = ["SlideDataset", "seed_for"]


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
