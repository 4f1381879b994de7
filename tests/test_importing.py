"""Importing CLAM / TRIDENT coordinates and features into our stores, so extraction is not repeated."""

from __future__ import annotations

import csv

import h5py
import numpy as np
import pytest
import torch
from conftest import tiny_encoder
from slide_factory import TILING, tissue_rect_image, write_slide

from monai_fbta.data.extraction import extract_features
from monai_fbta.data.store import STORE_MARKER, StoreError, read_array, read_coords, store_path
from monai_fbta.data.importing import import_features, main
from monai_fbta.networks.registry import build_encoder
from monai_fbta.transforms.patches import ReadPatches

torch.set_num_threads(1)


@pytest.fixture()
def slide(tmp_path):
    img = tissue_rect_image(512, 640, (64, 64, 576, 448), seed=1)
    return write_slide(tmp_path / "s1.tif", img, levels=3, tile=64, mpp=0.5)


def _grid() -> np.ndarray:
    ys, xs = np.meshgrid(np.arange(64, 384, 64), np.arange(64, 512, 64), indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], 1).astype(np.int64)


def _clam_file(path, slide, encoder=None, coords=None):
    """As CLAM's extract_features_fp writes it: coords (attrs patch_size, patch_level) + float32 features."""
    coords = _grid() if coords is None else coords
    with h5py.File(path, "w") as f:
        f.create_dataset("coords", data=coords).attrs.update(patch_size=64, patch_level=0)
        if encoder is not None:
            with torch.inference_mode():
                feats = encoder.eval()(ReadPatches(0, 64, 64)(slide, coords)).float().numpy()
            f.create_dataset("features", data=feats.astype(np.float32))
    return path


def test_clam_features_are_imported_and_reused_by_extraction(tmp_path, slide):
    enc = tiny_encoder(0)
    (tmp_path / "clam").mkdir()
    clam = _clam_file(tmp_path / "clam" / "s1.h5", slide, enc)
    before = clam.read_bytes()
    cache = tmp_path / "cache"
    info = import_features(clam, slide, store_path(cache, "s1"), enc)
    assert info["n_patches"] == len(_grid()) and info["feature_dim"] == 64 and info["min_cosine"] > 0.999
    ours = cache / "s1.h5"
    with h5py.File(ours, "r") as f:
        assert f.attrs[STORE_MARKER] == 1
    coords, attrs = read_coords(ours)
    np.testing.assert_array_equal(coords, _grid())
    assert attrs["patch_level"] == 0 and attrs["patch_size_level"] == 64 and attrs["import_format"] == "clam"
    feats = read_array(ours, "features")
    assert feats.dtype == np.float32  # kept as imported, not cast to fp16
    np.testing.assert_array_equal(feats, read_array(clam, "features"))
    assert clam.read_bytes() == before  # the source is never touched

    mtime = ours.stat().st_mtime_ns
    report = extract_features([{"image": slide, "slide_id": "s1"}], cache, enc, TILING, progress=False)
    assert report.results[0].status == "skipped" and ours.stat().st_mtime_ns == mtime  # not extracted again
    other = extract_features([{"image": slide, "slide_id": "s1"}], cache, tiny_encoder(1), TILING, progress=False)
    assert other.results[0].status == "done" and "encoder weights" in other.results[0].note
    np.testing.assert_array_equal(read_coords(ours)[0], _grid())  # the imported coords are kept, only re-encoded

    from monai_fbta.transforms.chain import FBTADataset

    item = FBTADataset([{"image": slide, "slide_id": "s1", "label": 0}], cache, num_clusters=4, augment=False)[0]
    assert item["pb_image"].shape[1:] == (3, 64, 64) and item["features"].shape == (len(_grid()), 64)


def test_import_refuses_features_of_another_encoder_or_slide(tmp_path, slide):
    clam = _clam_file(tmp_path / "s1.h5", slide, tiny_encoder(0))
    with pytest.raises(StoreError, match="s1.h5: the encoder does not reproduce the imported features"):
        import_features(clam, slide, tmp_path / "cache" / "s1.h5", tiny_encoder(1))
    far = _clam_file(tmp_path / "far.h5", slide, coords=np.array([[0, 0], [5000, 64]]))
    with pytest.raises(StoreError, match=r"far.h5: coords reach \(5000, 64\) but .*s1.tif is 640x512 px"):
        import_features(far, slide, tmp_path / "cache" / "far.h5")
    with pytest.raises(ValueError, match="name the encoder"):
        import_features(clam, slide, tmp_path / "cache" / "s1.h5")
    with pytest.raises(StoreError, match="never overwrites files it did not write"):  # importing onto itself
        import_features(clam, slide, clam, tiny_encoder(0))
    assert not (tmp_path / "cache").exists()


def test_trident_coords_only_are_encoded_not_retiled(tmp_path, slide):
    src = tmp_path / "trident.h5"
    with h5py.File(src, "w") as f:  # TRIDENT's patching output: coords only
        ds = f.create_dataset("coords", data=_grid()[::2])
        ds.attrs.update(patch_size=64, patch_size_level0=64, level0_magnification=20, target_magnification=20)
    import_features(src, slide, tmp_path / "cache" / "s1.h5")
    res = extract_features([{"image": slide, "slide_id": "s1"}], tmp_path / "cache", tiny_encoder(), TILING, progress=False)
    assert res.results[0].status == "done" and res.results[0].n_patches == len(_grid()[::2])
    np.testing.assert_array_equal(read_coords(tmp_path / "cache" / "s1.h5")[0], _grid()[::2])


def test_cli_imports_a_folder(tmp_path, slide):
    (tmp_path / "h5").mkdir()
    _clam_file(tmp_path / "h5" / "s1.h5", slide, build_encoder("tiny_cnn"))  # random init; verified below
    datalist = tmp_path / "slides.csv"
    with open(datalist, "w", newline="") as f:
        csv.writer(f).writerows([["slide_id", "path", "label"], ["s1", slide, 0]])
    assert main(["--datalist", str(datalist), "--h5-dir", str(tmp_path / "h5"), "--out", str(tmp_path / "out"),
                 "--encoder", "tiny_cnn", "--verify", "0"]) == 0
    assert read_array(tmp_path / "out" / "s1.h5", "features").dtype == np.float32
