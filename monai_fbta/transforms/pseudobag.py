"""Stratified pseudo-bag sampling (FBTA step 3).

Every iteration ``M`` patches are drawn per cluster without replacement (a cluster smaller
than ``M`` gives all it has). The index set ``S`` is returned sorted, i.e. in slide order,
so that sequence MIL heads (TransMIL, MambaMIL) see patches in a stable order.
``|S| = sum_c min(M, |cluster_c|) <= C * M``.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch

from monai_fbta._quiet import quiet_import

quiet_import("monai")

from monai.config import KeysCollection  # noqa: E402
from monai.transforms import MapTransform, Randomizable, Transform  # noqa: E402

from monai_fbta.transforms.patches import tiling_meta  # noqa: E402

__all__ = ["sample_pseudo_bag", "PseudoBagSample", "PseudoBagSampled"]


def sample_pseudo_bag(clusters: np.ndarray, num_per_cluster: int, rng: np.random.RandomState) -> np.ndarray:
    """Draw ``num_per_cluster`` indices per cluster label, without replacement.

    Args:
        clusters: ``[N]`` integer cluster label of every patch.
        num_per_cluster: ``M >= 1``.
        rng: source of randomness.

    Returns:
        ``[S]`` int64 sorted indices into the bag, ``S = sum_c min(M, |c|)``.
    """
    if num_per_cluster < 1:
        raise ValueError(f"num_per_cluster must be >= 1, got {num_per_cluster}")
    labels = np.asarray(clusters).reshape(-1)
    n = labels.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    # Sort by (cluster, random key): inside each cluster the order is a uniform permutation,
    # so the first M of each group are a uniform sample without replacement.
    order = np.lexsort((rng.random_sample(n), labels))
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    group_sizes = np.diff(np.r_[starts, n])
    rank = np.arange(n) - np.repeat(starts, group_sizes)
    return np.sort(order[rank < num_per_cluster]).astype(np.int64)


def _to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class PseudoBagSample(Randomizable, Transform):
    """Cluster labels ``[N]`` -> sorted pseudo-bag indices ``[S]`` (int64 tensor).

    Args:
        num_per_cluster: ``M``, patches drawn per cluster.
    """

    def __init__(self, num_per_cluster: int = 1) -> None:
        if num_per_cluster < 1:
            raise ValueError(f"num_per_cluster must be >= 1, got {num_per_cluster}")
        self.num_per_cluster = num_per_cluster
        self._index: np.ndarray | None = None

    def randomize(self, data: np.ndarray) -> None:
        self._index = sample_pseudo_bag(data, self.num_per_cluster, self.R)

    def __call__(self, clusters, randomize: bool = True) -> torch.Tensor:
        labels = _to_numpy(clusters)
        if randomize or self._index is None:
            self.randomize(labels)
        return torch.as_tensor(self._index)


class PseudoBagSampled(Randomizable, MapTransform):
    """Dictionary form: samples ``index_key`` from ``cluster_key`` and gathers ``keys`` at it.

    For ``keys=("features", "coords")`` and ``prefix="pb_"`` it adds ``pb_index`` ``[S]``,
    ``pb_features`` ``[S, D]`` and ``pb_coords`` ``[S, 2]``; the inputs are left untouched.
    ``features`` may be an ``h5py`` dataset (read lazily: only the ``S`` rows are loaded). A key's metadata
    (``<key>_meta_dict``, e.g. the tiling attributes :class:`TissueTiled` records) is carried to
    ``<prefix><key>_meta_dict``, so ``ReadPatchesd`` reads the pseudo-bag at the tiled level and size.
    """

    def __init__(
        self,
        keys: KeysCollection = ("features", "coords"),
        cluster_key: str = "clusters",
        index_key: str = "pb_index",
        num_per_cluster: int = 1,
        prefix: str = "pb_",
        meta_key_postfix: str = "meta_dict",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.meta_key_postfix = meta_key_postfix
        self.cluster_key = cluster_key
        self.index_key = index_key
        self.prefix = prefix
        self.sampler = PseudoBagSample(num_per_cluster)

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None):
        super().set_random_state(seed, state)
        self.sampler.set_random_state(seed, state)
        return self

    def randomize(self, data: np.ndarray) -> None:
        self.sampler.randomize(data)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        if self.cluster_key not in d:
            raise KeyError(f"PseudoBagSampled: cluster key {self.cluster_key!r} missing (have {sorted(map(str, d))})")
        index = self.sampler(d[self.cluster_key])
        d[self.index_key] = index
        for key in self.key_iterator(d):
            d[f"{self.prefix}{key}"] = gather_rows(d[key], index.numpy())
            meta = tiling_meta(d, key, self.meta_key_postfix)
            if meta:
                d[f"{self.prefix}{key}_{self.meta_key_postfix}"] = dict(meta)
        return d


def gather_rows(array, index: np.ndarray | Sequence[int]):
    """``array[index]`` for tensors, numpy arrays and lazy h5py datasets (sorted ``index``)."""
    if isinstance(array, torch.Tensor):
        return array[torch.as_tensor(index, dtype=torch.long, device=array.device)]
    if isinstance(array, np.ndarray):
        return torch.as_tensor(array[np.asarray(index)])
    # h5py datasets need strictly increasing indices (our index is sorted and unique)
    return torch.as_tensor(np.asarray(array[np.asarray(index)]))
