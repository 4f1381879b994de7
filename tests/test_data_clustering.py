"""data/clustering.py: cluster_store, clusters cached in the store and invalidated by new features."""

from __future__ import annotations

import numpy as np
import torch

from monai_fbta.data.clustering import cluster_store
from monai_fbta.data.store import add_arrays, read_array, read_attrs

torch.set_num_threads(1)


def test_cluster_store_cache_and_invalidation(stores, tmp_path):
    rows, out = stores
    import shutil

    h5 = tmp_path / "s0.h5"
    shutil.copy(out / "s0.h5", h5)
    labels = cluster_store(h5, 4, seed=0)
    assert labels.max() == 3
    mtime = h5.stat().st_mtime_ns
    assert np.array_equal(cluster_store(h5, 4, seed=0), labels) and h5.stat().st_mtime_ns == mtime
    assert cluster_store(h5, 6, seed=0).max() == 5 and read_attrs(h5, "clusters")["clusters_num_clusters"] == 6
    # new features (other fingerprint) invalidate the cached clusters
    feats = read_array(h5, "features")
    add_arrays(h5, {"features": feats[:, ::-1]}, fingerprint={"encoder": "other"})
    mtime = h5.stat().st_mtime_ns
    cluster_store(h5, 6, seed=0)
    assert h5.stat().st_mtime_ns != mtime
