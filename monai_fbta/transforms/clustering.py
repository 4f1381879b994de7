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

from monai.transforms import MapTransform, Transform  # noqa: E402

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
    """Dictionary form: ``d[out_key] = ClusterFeatures(...)(d[features_key])``; an existing
    ``d[out_key]`` is kept unless ``overwrite=True``."""

    def __init__(
        self, features_key: str = "features", out_key: str = "clusters", num_clusters: int = 100, seed: int = 0,
        method: str = "auto", overwrite: bool = False,
    ) -> None:
        super().__init__(keys=[features_key])
        self.out_key = out_key
        self.overwrite = overwrite
        self.cluster = ClusterFeatures(num_clusters, seed, method)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        if self.out_key in d and not self.overwrite:
            return d
        for key in self.key_iterator(d):
            d[self.out_key] = self.cluster(d[key])
        return d
