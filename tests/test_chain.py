"""transforms/chain.py: FBTADataset, documented keys/shapes, cached clusters, seeds/epochs, DataLoader workers,
one store open per row, refused stores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from monai_fbta.data.store import StoreError, add_arrays, read_array, write_coords
from monai_fbta.transforms.chain import FBTADataset
from monai_fbta.transforms.patches import ReadPatches

torch.set_num_threads(1)


def test_item_keys_shapes_and_consistency(stores):
    rows, out = stores
    ds = FBTADataset(rows, out, num_per_cluster=2, num_clusters=5, seed=0)
    d = ds[1]
    n, dim = d["features"].shape
    s = len(d["pb_index"])
    assert d["slide_id"] == "s1" and d["label"] == 1 and dim == 32
    assert d["features"].dtype == torch.float32 and d["coords"].shape == (n, 2) and d["coords"].dtype == torch.int64
    assert s == 10 and torch.all(d["pb_index"][1:] > d["pb_index"][:-1])
    assert torch.equal(d["pb_features"], d["features"][d["pb_index"]])
    assert torch.equal(d["pb_coords"], d["coords"][d["pb_index"]])
    assert d["pb_image"].shape == d["pb_image_clean"].shape == (s, 3, 64, 64)
    clean = ReadPatches(0, 64)(rows[1]["image"], d["pb_coords"])
    assert torch.equal(d["pb_image_clean"], clean)
    assert not torch.equal(d["pb_image"], d["pb_image_clean"]), "e2e view is augmented"
    assert 0 <= float(d["pb_image"].min()) and float(d["pb_image"].max()) <= 1
    assert np.array_equal(read_array(out / "s1.h5", "clusters"), d["clusters"].numpy()), "clusters cached in the store"


def test_frozen_only_and_lazy_bag(stores):
    rows, out = stores
    full = FBTADataset(rows, out, num_clusters=5, load_patches=False)[0]
    assert "pb_image" not in full and "pb_image_clean" not in full
    lazy = FBTADataset(rows, out, num_clusters=5, load_patches=False, load_full_bag=False)[0]
    assert "features" not in lazy
    assert torch.equal(lazy["pb_index"], full["pb_index"])
    assert torch.equal(lazy["pb_features"], full["pb_features"])


def test_seed_and_epoch(stores):
    rows, out = stores
    a, b = FBTADataset(rows, out, num_clusters=5, seed=3), FBTADataset(rows, out, num_clusters=5, seed=3)
    first = a[0]
    assert torch.equal(first["pb_index"], b[0]["pb_index"]) and torch.equal(first["pb_image"], b[0]["pb_image"])
    assert torch.equal(a[0]["pb_index"], first["pb_index"]), "same epoch, same item"
    draws = set()
    for epoch in range(6):
        a.set_epoch(epoch)
        draws.add(tuple(a[0]["pb_index"].tolist()))
    assert len(draws) > 1, "pseudo-bags change across epochs"
    other = FBTADataset(rows, out, num_clusters=5, seed=4)
    assert any(not torch.equal(other[i]["pb_index"], a[i]["pb_index"]) for i in range(2))


def test_dataloader_workers_match_direct_indexing(stores):
    rows, out = stores
    ds = FBTADataset(rows, out, num_clusters=5, seed=1)
    ds.set_epoch(2)
    loader = DataLoader(ds, batch_size=None, num_workers=2)  # one slide per item, no collation
    for i, batch in enumerate(loader):
        direct = ds[i]
        assert batch["slide_id"] == direct["slide_id"]
        assert batch["features"].ndim == 2 and batch["pb_image"].ndim == 4
        assert batch["label"] == direct["label"]
        for key in ("pb_index", "pb_image", "pb_image_clean", "features"):
            assert torch.equal(batch[key], direct[key]), key


def test_missing_store_is_named(stores, tmp_path):
    rows, _ = stores
    with pytest.raises(StoreError, match="s0.h5"):
        FBTADataset(rows, tmp_path)


def _pseudo_bags_per_epoch(rows, out, seed: int, epochs: int = 3) -> list[tuple[tuple[str, tuple[int, ...]], ...]]:
    """Train FBTA (vanilla views, tiny head) with a persistent-worker DataLoader; the pb_index of every slide, per epoch."""
    from ignite.engine import Events

    from monai_fbta.engines import FBTALoss, FBTATrainer
    from monai_fbta.networks import ABMIL

    ds = FBTADataset(rows, out, num_clusters=5, num_per_cluster=1, load_patches=False, seed=seed)
    loader = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
    head = ABMIL(32, 2, hidden=8, attention_dim=4)
    trainer = FBTATrainer("cpu", epochs, loader, head, torch.optim.SGD(head.parameters(), lr=0.0), FBTALoss(views=["frozen"]))
    seen: dict[int, list] = {}
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda e: seen.setdefault(e.state.epoch, []).append((e.state.batch["slide_id"], tuple(e.state.batch["pb_index"].tolist()))),
    )
    trainer.run()
    return [tuple(sorted(seen[epoch])) for epoch in range(1, epochs + 1)]


def test_new_pseudo_bags_every_epoch_with_persistent_workers(stores):
    """Persistent DataLoader workers keep their own dataset copy: set_epoch in the main process must still reach them."""
    rows, out = stores
    epochs = _pseudo_bags_per_epoch(rows, out, seed=5)
    assert len(set(epochs)) == len(epochs), f"the same pseudo-bags in several epochs: {epochs}"
    assert _pseudo_bags_per_epoch(rows, out, seed=5) == epochs, "the same seed gives the same sequence"
    assert _pseudo_bags_per_epoch(rows, out, seed=6) != epochs


def test_construction_opens_each_store_once(stores, monkeypatch):
    """FBTADataset checks (complete, finite) and clusters each row's store through one open file (it used to open it
    up to three times: two completeness checks and the clustering)."""
    import os

    import h5py

    from monai_fbta.data import store

    rows, out = stores
    FBTADataset(rows, out, num_clusters=5)  # clusters computed and cached in the stores
    opened = []
    real = h5py.File
    monkeypatch.setattr(store.h5py, "File", lambda name, *a, **k: opened.append(os.fspath(name)) or real(name, *a, **k))
    for cluster_on_init in (True, False):
        opened.clear()
        FBTADataset(rows, out, num_clusters=5, cluster_on_init=cluster_on_init)
        assert opened == [os.fspath(out / f"s{i}.h5") for i in range(len(rows))]


def _store(path: Path, n: int, d: int = 8, nan: bool = False, identical: bool = False) -> None:
    """A feature store of ``n`` patches (``identical``: every row the same, so KMeans has empty clusters)."""
    coords = np.stack([np.arange(n) * 64, np.zeros(n)], 1).astype(np.int64)
    write_coords(path, coords, {"patch_size": 64, "patch_level": 0, "patch_size_level": 64})
    feats = np.random.default_rng(0).normal(size=(n, d)).astype(np.float32)
    if nan:
        feats[1, 3] = np.inf
    if identical:
        feats[:] = 1.0
    add_arrays(path, {"features": feats})


def test_nan_in_a_stored_bag_is_refused_naming_the_slide(tmp_path):
    _store(tmp_path / "bad.h5", 6, nan=True)
    with pytest.raises(StoreError, match=r"bad\.h5: features of slide 'bad' contain NaN/inf"):
        FBTADataset([{"slide_id": "bad", "image": "x", "label": 0}], tmp_path, num_clusters=2, load_patches=False)


def test_small_bags_and_empty_clusters_sample_every_patch(tmp_path):
    _store(tmp_path / "small.h5", 3)  # N=3 < C=16
    _store(tmp_path / "dup.h5", 10, identical=True)  # 10 identical patches: KMeans has empty clusters
    rows = [{"slide_id": "small", "image": "x", "label": 0}, {"slide_id": "dup", "image": "x", "label": 1}]
    ds = FBTADataset(rows, tmp_path, num_clusters=16, num_per_cluster=2, load_patches=False)
    small, dup = ds[0], ds[1]
    assert small["pb_index"].tolist() == [0, 1, 2] and small["pb_features"].shape == (3, 8)
    assert 1 <= len(dup["pb_index"]) <= 10 and torch.isfinite(dup["pb_features"]).all()
