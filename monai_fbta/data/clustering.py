"""Per-slide KMeans of the frozen features (FBTA step 2), cached in the slide's store.

``C_eff = min(C, N)``: a bag with ``N <= C`` patches puts every patch in its own cluster.
Methods (``method=``):

* ``"kmeans"``: scikit-learn ``KMeans`` (Lloyd, k-means++ init, ``n_init=1``).
* ``"minibatch"``: scikit-learn ``MiniBatchKMeans`` (``batch_size=4096``, ``n_init=1``). Not
  the default: on 50k x 1024 features, C=100 (2 CPU cores) it took 32 s against 15 s for
  ``"kmeans"`` (see benchmarks/bench_frozen_pipeline.py).
* ``"torch"``: k-means++ + Lloyd in torch, on the GPU when one is available.
* ``"auto"``: ``"torch"`` when a CUDA device is used/available, else ``"kmeans"``.

All methods are deterministic for a given ``seed`` (on one device).
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np
import torch

from monai_fbta.data.store import SlideStore, add_arrays

__all__ = ["cached_clusters", "cluster_features", "cluster_settings", "cluster_store", "kmeans_torch", "resolve_method"]

_METHODS = ("auto", "kmeans", "minibatch", "torch")


def _as_float32(features) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().float().numpy()
    array = np.asarray(features, dtype=np.float32)
    if array.ndim != 2:
        raise ValueError(f"features must be [N, D], got shape {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError("features contain NaN or Inf; cannot cluster")
    return array


def resolve_method(method: str, device: str | torch.device | None = None) -> str:
    """The concrete method that ``"auto"`` (or ``method``) stands for."""
    if method not in _METHODS:
        raise ValueError(f"unknown clustering method {method!r}; choose one of {_METHODS}")
    if method != "auto":
        return method
    if device is not None and torch.device(device).type == "cuda":
        return "torch"
    if device is None and torch.cuda.is_available():
        return "torch"
    return "kmeans"


def kmeans_torch(
    x: torch.Tensor, num_clusters: int, seed: int = 0, max_iter: int = 100, tol: float = 1e-4
) -> torch.Tensor:
    """k-means++ initialisation and Lloyd iterations in torch.

    Args:
        x: ``[N, D]`` float features (any device).
        num_clusters: ``C <= N``.

    Returns:
        ``[N]`` int64 labels on ``x.device``.
    """
    n = x.shape[0]
    gen = torch.Generator(device=x.device).manual_seed(seed)
    x = x.float()
    centers = x[torch.randint(n, (1,), generator=gen, device=x.device)]
    closest = torch.cdist(x, centers).squeeze(1).pow(2)
    for _ in range(1, num_clusters):
        weights = closest.clamp_min(0)
        total = weights.sum()
        pick = (
            torch.multinomial(weights / total, 1, generator=gen)
            if total > 0
            else torch.randint(n, (1,), generator=gen, device=x.device)
        )
        centers = torch.cat([centers, x[pick]])
        closest = torch.minimum(closest, torch.cdist(x, x[pick]).squeeze(1).pow(2))
    labels = torch.cdist(x, centers).argmin(1)
    for _ in range(max_iter):
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=num_clusters).unsqueeze(1)
        new_centers = torch.where(counts > 0, sums / counts.clamp_min(1), centers)
        shift = (new_centers - centers).pow(2).sum()
        centers = new_centers
        labels = torch.cdist(x, centers).argmin(1)
        if shift <= tol * x.var(0).sum():
            break
    return labels


def cluster_features(
    features, num_clusters: int = 100, seed: int = 0, method: str = "auto", device: str | None = None
) -> np.ndarray:
    """KMeans cluster label of every patch.

    Args:
        features: ``[N, D]`` frozen features (numpy, torch or h5py; fp16 is upcast).
        num_clusters: ``C``; ``C_eff = min(C, N)``.
        seed: random seed (same seed -> same labels).
        method: ``"auto"``, ``"kmeans"``, ``"minibatch"`` or ``"torch"`` (see module docstring).
        device: device for ``"torch"`` (default: CUDA when available, else CPU).

    Returns:
        ``[N]`` int64 labels in ``[0, C_eff)``.
    """
    if num_clusters < 1:
        raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
    x = _as_float32(features)
    n = x.shape[0]
    if n == 0:
        raise ValueError("cannot cluster an empty bag (N = 0)")
    if n <= num_clusters:
        return np.arange(n, dtype=np.int64)
    resolved = resolve_method(method, device)
    if resolved == "torch":
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        return kmeans_torch(torch.from_numpy(x).to(dev), num_clusters, seed).cpu().numpy().astype(np.int64)
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if resolved == "kmeans":
        model = KMeans(n_clusters=num_clusters, n_init=1, random_state=seed)
    else:
        model = MiniBatchKMeans(n_clusters=num_clusters, n_init=1, batch_size=4096, random_state=seed)
    return model.fit_predict(x).astype(np.int64)


def cluster_settings(store: SlideStore, num_clusters: int, seed: int = 0, method: str = "auto") -> dict[str, Any]:
    """The attributes :func:`cluster_store` gives ``clusters`` of these settings and of the store's ``features``."""
    features_fp = store.attrs("features").get("fingerprint")
    return {
        "clusters_num_clusters": int(num_clusters),
        "clusters_seed": int(seed),
        "clusters_method": method,
        "clusters_features_fingerprint": hashlib.sha1(json.dumps(features_fp, sort_keys=True, default=str).encode()).hexdigest(),
    }


def cached_clusters(store: SlideStore, num_clusters: int, seed: int = 0, method: str = "auto") -> np.ndarray | None:
    """The ``[N]`` labels cached in ``store`` for these settings and its present features, else ``None``."""
    settings = cluster_settings(store, num_clusters, seed, method)
    if store.is_complete(("features", "clusters"), expect_dataset_attrs={"clusters": settings}):
        return store.array("clusters").astype(np.int64)
    return None


def cluster_store(
    store: str | os.PathLike | SlideStore, num_clusters: int = 100, seed: int = 0, method: str = "auto", force: bool = False
) -> np.ndarray:
    """Cluster the features of one slide store and cache ``"clusters"`` ``[N]`` in it.

    ``store``: a path, or an open :class:`~monai_fbta.data.store.SlideStore` (its reads reuse the open file).
    The settings and the fingerprint of the features they were computed from are stored as
    attributes of ``clusters`` (``clusters_num_clusters``, ``clusters_seed``, ``clusters_method``,
    ``clusters_features_fingerprint``, a hash); cached labels are reused only when all match (so new
    features invalidate old clusters), else recomputed and the store rewritten atomically.

    Returns:
        ``[N]`` int64 labels.
    """
    if not isinstance(store, SlideStore):
        with SlideStore(store) as opened:
            return cluster_store(opened, num_clusters, seed, method, force)
    cached = None if force else cached_clusters(store, num_clusters, seed, method)
    if cached is not None:
        return cached
    settings = cluster_settings(store, num_clusters, seed, method)
    labels = cluster_features(store.array("features"), num_clusters, seed, method)
    add_arrays(store.path, {"clusters": labels}, settings)  # atomic rewrite: the open handle keeps reading the old file
    return labels
