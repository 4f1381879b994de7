"""Tissue mask, tile_slide and the TissueTile(d) transforms on slides with known tissue."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import real_slide
from monai.data import MetaTensor
from monai.transforms import Compose
from skimage.color import rgb2hsv
from slide_factory import tissue_rect_image, write_slide

from monai_fbta.data.errors import MissingMPPError, NoTissueError, SlideError
from monai_fbta.data.slide import open_slide
from monai_fbta.data.tiling import tile_slide, tissue_fractions
from monai_fbta.data.tissue import saturation, tissue_mask
from monai_fbta.transforms.tiling import TissueTile, TissueTiled

# 1024 x 768 slide; tissue exactly covers 5 x 3 patches of 64 px at level 0 (x 128..448, y 192..384)
RECT = (128, 192, 128 + 5 * 64, 192 + 3 * 64)


@pytest.fixture(scope="module")
def rect_slide(tmp_path_factory) -> str:
    img = tissue_rect_image(768, 1024, RECT)
    return write_slide(tmp_path_factory.mktemp("t") / "rect.tif", img, levels=3, tile=64, compression="zlib", mpp=0.25)


def test_saturation_is_hsv_saturation_and_tissue_fractions_are_window_means():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    rgb[0, :3] = 0  # black: saturation 0
    assert np.allclose(saturation(rgb), rgb2hsv(rgb)[..., 1], atol=1e-6)
    mask = rng.random((40, 60)) < 0.3
    coords = np.array([[0, 0], [10, 20], [50, 30], [-8, 5], [55, 36]])  # level-0 px; the last two cross the border
    expected = []
    for x, y in coords:
        inside = mask[max(y, 0) : y + 8, max(x, 0) : x + 8]
        expected.append(inside.sum() / 64)  # the part outside the slide counts as background
    assert np.allclose(tissue_fractions(mask, coords, 8, (60, 40)), expected)


def test_tissue_mask_rectangle_and_white():
    img = tissue_rect_image(300, 400, (64, 32, 192, 160))
    mask = tissue_mask(img)
    expected = np.zeros((300, 400), bool)
    expected[32:160, 64:192] = True
    np.testing.assert_array_equal(mask, expected)
    assert not tissue_mask(np.full((50, 60, 3), 255, np.uint8)).any()
    assert not tissue_mask(np.full((50, 60, 3), 128, np.uint8)).any()  # grey glass / black padding
    with pytest.raises(ValueError, match="RGB"):
        tissue_mask(np.zeros((5, 5)))


@pytest.mark.parametrize("mask_max_size", [1024, 256])
def test_tile_counts_exact(rect_slide, mask_max_size):
    coords, attrs = tile_slide(rect_slide, patch_size=64, target_mpp=0.25, mask_max_size=mask_max_size)
    xs, ys = np.arange(RECT[0], RECT[2], 64), np.arange(RECT[1], RECT[3], 64)
    expected = np.array([(x, y) for y in ys for x in xs], np.int64)
    assert coords.dtype == np.int64
    np.testing.assert_array_equal(coords, expected)
    assert attrs["patch_level"] == 0 and attrs["patch_size_level"] == 64 and attrs["num_patches"] == 15


def test_level_selection_and_sizes(rect_slide):
    # 0.5 um/px from a 0.25 um/px slide: level 1 (0.5) read at 64 px -> 128 px at level 0
    coords, attrs = tile_slide(rect_slide, patch_size=64, target_mpp=0.5, mask_max_size=512, tissue_threshold=0.9)
    assert (attrs["patch_level"], attrs["patch_size_level"], attrs["patch_size_level0"]) == (1, 64, 128)
    assert attrs["level_mpp"] == pytest.approx(0.5) and attrs["magnification"] == pytest.approx(20)
    assert len(coords) > 0 and (coords % 128 == 0).all()
    # 0.75 um/px: best level is still 1 (level 2 is 1.0 > 0.75); 96 px read at level 1
    _, attrs = tile_slide(rect_slide, patch_size=64, magnification=10 / 0.75, mask_max_size=512, tissue_threshold=0.3)
    assert (attrs["patch_level"], attrs["patch_size_level"], attrs["patch_size_level0"]) == (1, 96, 192)
    # overlap shrinks the step
    _, attrs = tile_slide(rect_slide, patch_size=64, target_mpp=0.25, overlap=32, mask_max_size=512)
    assert attrs["step_level0"] == 32


def test_tiling_errors(tmp_path):
    white = write_slide(tmp_path / "white.tif", np.full((256, 256, 3), 255, np.uint8), levels=1)
    with pytest.raises(NoTissueError, match="white.tif"):
        tile_slide(white, patch_size=64, target_mpp=0.5)
    img = tissue_rect_image(256, 256, (0, 0, 256, 256))
    nompp = write_slide(tmp_path / "nompp.tif", img, levels=1, mpp=None)
    with pytest.raises(MissingMPPError, match="nompp.tif.*assume_mpp"):
        tile_slide(nompp, patch_size=64)
    with pytest.warns(UserWarning, match="nompp.tif.*ASSUMING 0.5"):
        coords, attrs = tile_slide(nompp, patch_size=64, assume_mpp=0.5)
    assert len(coords) == 16 and attrs["mpp_source"] == "assumed"
    with pytest.raises(SlideError, match="smaller than one patch"), pytest.warns(UserWarning):
        tile_slide(nompp, patch_size=512, assume_mpp=0.5)


def test_real_slide_patches_are_tissue():
    path = real_slide("cmu-1-small-region.svs")
    with open_slide(path) as slide:
        coords, attrs = tile_slide(slide, patch_size=256, target_mpp=0.5, mask_max_size=1024)
        assert attrs["mpp_source"] == "metadata" and attrs["patch_size_level"] == 257
        assert 10 < len(coords) < 100
        patches = slide.read_patches(coords, attrs["patch_level"], attrs["patch_size_level"])
    fractions = [tissue_mask(p[::4, ::4], min_object_fraction=0).mean() for p in patches]
    assert np.mean(np.array(fractions) >= 0.5) >= 0.9, fractions


def test_transforms(rect_slide):
    kw = dict(patch_size=64, target_mpp=0.25, mask_max_size=512)
    out = TissueTile(**kw)(rect_slide)
    assert isinstance(out, MetaTensor) and tuple(out.shape) == (15, 2)
    assert out.meta["patch_size_level"] == 64 and out.meta["filename_or_obj"] == rect_slide
    with open_slide(rect_slide) as slide:  # an open Slide works too
        np.testing.assert_array_equal(np.asarray(TissueTile(**kw)(slide)), np.asarray(out))
    d = Compose([TissueTiled(keys="image", **kw)])({"image": rect_slide, "label": 1})
    assert d["label"] == 1 and tuple(d["coords"].shape) == (15, 2)
    assert d["coords_meta_dict"]["patch_level"] == 0
    with pytest.raises(TypeError):
        TissueTile(patch_sise=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TissueTiled(keys="image", coords_key="c", **kw)({"image": rect_slide})
