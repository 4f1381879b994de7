"""Transforms: clustering, patch reading, tiling, and our transforms in a MONAI Compose (augmentations: test_augment.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from slide_factory import textured_image, write_slide

from monai.transforms import Compose, EnsureTyped, ScaleIntensityd

from monai_fbta.data.clustering import cluster_features
from monai_fbta.data.slide import patches_to_tensor
from monai_fbta.transforms import (
    ClusterFeatures,
    ClusterFeaturesd,
    PseudoBagSampled,
    RandHEDJitterd,
    ReadPatches,
    ReadPatchesd,
    TissueTiled,
)

torch.set_num_threads(1)


def test_cluster_features_and_transform():
    rng = np.random.default_rng(0)
    centers = rng.normal(scale=10, size=(4, 8))
    x = (centers[np.repeat(np.arange(4), 25)] + rng.normal(size=(100, 8))).astype(np.float16)
    for method in ("kmeans", "minibatch", "torch"):
        labels = cluster_features(x, 4, seed=0, method=method)
        assert labels.shape == (100,) and labels.dtype == np.int64
        # well separated blobs are recovered exactly (up to label permutation)
        assert all(len(np.unique(labels[i * 25 : (i + 1) * 25])) == 1 for i in range(4)), method
        assert np.array_equal(labels, cluster_features(x, 4, seed=0, method=method))
    assert np.array_equal(cluster_features(x[:3], 10), np.arange(3)), "C_eff = min(C, N)"
    with pytest.raises(ValueError, match="empty"):
        cluster_features(np.zeros((0, 8)), 4)
    with pytest.raises(ValueError, match="unknown clustering method"):
        cluster_features(x, 4, method="dbscan")
    assert torch.equal(ClusterFeatures(4)(torch.as_tensor(x)), torch.as_tensor(cluster_features(x, 4)))
    d = ClusterFeaturesd(keys="features", num_clusters=4)({"features": x})
    assert d["clusters"].shape == (100,)
    assert ClusterFeaturesd(keys=["a", "b"], out_keys=["ca", "cb"], num_clusters=4, allow_missing_keys=True)({"a": x})["ca"].shape == (100,)


def test_patches_to_tensor_resizes():
    p = np.full((2, 32, 32, 3), 255, np.uint8)
    t = patches_to_tensor(p, 16)
    assert t.shape == (2, 3, 16, 16) and t.dtype == torch.float32 and torch.allclose(t, torch.ones_like(t))
    assert patches_to_tensor(p[:0], 16).shape == (0, 3, 16, 16)
    with pytest.raises(ValueError, match="patches must be"):
        patches_to_tensor(np.zeros((2, 3, 32, 32), np.uint8))


@pytest.fixture(scope="module")
def tiny_slide(tmp_path_factory):
    rgb = textured_image(256, 384)
    path = tmp_path_factory.mktemp("slides") / "tiny.tif"
    write_slide(path, rgb, levels=2, tile=64, compression="zlib", mpp=0.5)
    return path, rgb


def test_read_patches_matches_pixels(tiny_slide):
    path, rgb = tiny_slide
    coords = np.array([[0, 0], [64, 32], [320, 192]], np.int64)
    out = ReadPatches(level=0, size=64)(str(path), coords)
    assert out.shape == (3, 3, 64, 64)
    for (x, y), patch in zip(coords, out):
        expect = torch.as_tensor(rgb[y : y + 64, x : x + 64]).permute(2, 0, 1).float() / 255
        assert torch.allclose(patch, expect, atol=1 / 255 + 1e-6)
    small = ReadPatches(level=0, size=64, out_size=32)(str(path), coords)
    assert small.shape == (3, 3, 32, 32)


def test_transforms_in_monai_compose(tiny_slide):
    path, _ = tiny_slide
    n = 24
    coords = np.stack(np.meshgrid(np.arange(0, 384, 64), np.arange(0, 256, 64)), -1).reshape(-1, 2)[:n]
    data = {"image": str(path), "features": np.random.rand(n, 5).astype(np.float32), "coords": coords}
    pipeline = Compose(
        [
            EnsureTyped(keys="features"),
            ClusterFeaturesd(keys="features", num_clusters=6),
            PseudoBagSampled(num_per_cluster=1),
            ReadPatchesd(keys="pb_coords", slide_key="image", out_keys="pb_image_clean", level=0, size=64, out_size=32),
            ScaleIntensityd(keys="pb_features"),
            RandHEDJitterd(keys="pb_image_clean", prob=0.0),
        ]
    ).set_random_state(0)
    d = pipeline(data)
    s = len(d["pb_index"])
    assert s == 6
    assert d["pb_image_clean"].shape == (s, 3, 32, 32)
    assert d["pb_coords"].shape == (s, 2)
    assert float(d["pb_features"].max()) == pytest.approx(1.0)


def test_read_patchesd_reads_at_the_size_and_level_tissue_tiled_recorded(tiny_slide):
    """TissueTiled then ReadPatchesd, no extra argument: patches at the tiled size (128 px here, not a default 256),
    also for the pseudo-bag's coordinates (PseudoBagSampled carries the tiling metadata)."""
    path, rgb = tiny_slide
    tiled = Compose([TissueTiled(keys="image", patch_size=128, target_mpp=0.5, tissue_threshold=0.0)])({"image": str(path)})
    assert tiled["coords_meta_dict"]["patch_size_level"] == 128
    n = len(tiled["coords"])
    data = dict(tiled, features=np.random.rand(n, 4).astype(np.float32))
    pipeline = Compose([
        ReadPatchesd(keys="coords"),
        ClusterFeaturesd(keys="features", num_clusters=2),
        PseudoBagSampled(keys=("features", "coords"), num_per_cluster=1),
        ReadPatchesd(keys="pb_coords", out_keys="pb_image"),
    ]).set_random_state(0)
    d = pipeline(data)
    assert d["coords_image"].shape == (n, 3, 128, 128)
    for (x, y), patch in zip(np.asarray(tiled["coords"]), d["coords_image"]):
        expect = torch.as_tensor(rgb[y : y + 128, x : x + 128]).permute(2, 0, 1).float() / 255
        assert torch.allclose(patch, expect, atol=1 / 255 + 1e-6)
    assert d["pb_image"].shape == (len(d["pb_index"]), 3, 128, 128)
    assert d["pb_coords_meta_dict"]["patch_level"] == 0
    with pytest.raises(KeyError, match="read level/size.*TissueTiled"):
        ReadPatchesd(keys="c")({"image": str(path), "c": np.zeros((1, 2), np.int64)})
    assert ReadPatchesd(keys="c", allow_missing_keys=True)({"image": str(path)}) == {"image": str(path)}


def test_read_patchesd_outputs_the_tiled_patch_size_when_it_reads_a_larger_region(tiny_slide):
    """At target_mpp 0.75 on a 0.5 mpp slide a 32 px patch is a 48 px region at level 0: ReadPatchesd gives 32 px
    patches (what the frozen encoder saw), not the 48 px read size."""
    path, _ = tiny_slide
    tiled = TissueTiled(keys="image", patch_size=32, target_mpp=0.75, tissue_threshold=0.0)({"image": str(path)})
    meta = tiled["coords_meta_dict"]
    assert meta["patch_size"] == 32 and (meta["patch_level"], meta["patch_size_level"]) == (0, 48)
    d = ReadPatchesd(keys="coords")(tiled)
    assert d["coords_image"].shape == (len(tiled["coords"]), 3, 32, 32)
    expect = ReadPatches(0, 48, out_size=32)(str(path), tiled["coords"])
    assert torch.equal(d["coords_image"], expect)
