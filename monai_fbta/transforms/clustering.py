"""KMeans cluster labels as a transform: ``ClusterFeatures`` / ``ClusterFeaturesd``.

Thin wrappers of :func:`monai_fbta.data.clustering.cluster_features` for pipelines that
cluster on the fly (the dataset reads cached labels from the store instead).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch

from monai_fbta._quiet import quiet_import
from monai_fbta.data.clustering import cluster_features

quiet_import("monai")

from monai.config import KeysCollection  # noqa: E402
from monai.transforms import MapTransform, Transform  # noqa: E402
from monai.utils import ensure_tuple  # noqa: E402

__all__ = ["ClusterFeatures", "ClusterFeaturesd"]


class ClusterFeatures(Transform):
    """``features [N, D]`` -> ``labels [N]`` int64 tensor, ``C_eff = min(num_clusters, N)``."""

    def __init__(self, num_clusters: int = 100, seed: int = 0, method: str = "auto") -> None:
        self.num_clusters = num_clusters
        self.seed = seed
        self.method = method

    def __call__(self, features) -> torch.Tensor:
        return torch.as_tensor(cluster_features(features, self.num_clusters, self.seed, self.method))


class ClusterFeaturesd(MapTransform):
    """Dictionary form: ``d[out_key] = ClusterFeatures(...)(d[key])`` for each features key in ``keys``.

    ``out_keys`` gives one output key per key (default ``"clusters"`` for one key); an existing output is
    kept unless ``overwrite=True``.
    """

    def __init__(
        self, keys: KeysCollection = "features", out_keys: KeysCollection = "clusters", num_clusters: int = 100,
        seed: int = 0, method: str = "auto", overwrite: bool = False, allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.out_keys = ensure_tuple(out_keys)
        if len(self.out_keys) != len(self.keys):
            raise ValueError(f"ClusterFeaturesd: {len(self.keys)} keys but {len(self.out_keys)} out_keys")
        self.overwrite = overwrite
        self.cluster = ClusterFeatures(num_clusters, seed, method)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key, out_key in self.key_iterator(d, self.out_keys):
            if out_key not in d or self.overwrite:
                d[out_key] = self.cluster(d[key])
        return d
