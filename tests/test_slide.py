"""Slide I/O: levels, mpp, cross-backend equality, fallbacks, padding, errors, pickling."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest
from conftest import real_slide
from slide_factory import corrupt_tile, downsample2, textured_image, write_slide

from monai_fbta.data.errors import SlideError, SlideFormatError, SlideNotFoundError, SlideReadError
from monai_fbta.data.slide import BACKENDS, open_slide
from monai_fbta.synthetic import write_pyramidal_tiff

IMG = textured_image(600, 700)


def _padded(img: np.ndarray, pad: int = 300) -> np.ndarray:
    out = np.full((img.shape[0] + 2 * pad, img.shape[1] + 2 * pad, 3), 255, np.uint8)
    out[pad:-pad, pad:-pad] = img
    return out


@pytest.fixture(scope="module")
def lossless(tmp_path_factory) -> str:
    return write_slide(tmp_path_factory.mktemp("s") / "lossless.tif", IMG, levels=3, tile=64, compression="zlib", mpp=0.25)


def test_levels_and_mpp_generated(lossless):
    for backend in BACKENDS:
        with open_slide(lossless, backend=backend) as s:
            assert s.backend == backend
            assert s.level_count == 3
            assert s.level_dimensions == ((700, 600), (350, 300), (175, 150))
            np.testing.assert_allclose(s.level_downsamples, (1, 2, 4))
            assert s.mpp == pytest.approx(0.25) and s.mpp_source == "metadata"


def test_backends_agree_exactly_on_lossless(lossless):
    coords = np.array([[0, 0], [130, 70], [650, 560], [-20, 30], [5, 590]])  # last three cross the border
    ref = _padded(IMG)
    expect = np.stack([ref[300 + y : 300 + y + 64, 300 + x : 300 + x + 64] for x, y in coords])
    for backend in BACKENDS:
        with open_slide(lossless, backend=backend) as s:
            got = s.read_patches(coords, 0, 64)
            assert got.dtype == np.uint8 and got.shape == (5, 64, 64, 3)
            np.testing.assert_array_equal(got, expect, err_msg=backend)
            level1 = s.read_region((100, 60), 1, (50, 40))
            np.testing.assert_array_equal(level1, downsample2(IMG)[30:70, 50:100], err_msg=backend)


def test_backends_close_on_real_jpeg_svs():
    path = real_slide("cmu-1-small-region.svs")
    coords = np.array([[100, 200], [1000, 1500], [2100, 2900]])
    reads = {b: open_slide(path, backend=b).read_patches(coords, 0, 128) for b in BACKENDS}
    for b in BACKENDS:
        diff = np.abs(reads[b].astype(int) - reads["tifffile"].astype(int))
        assert diff.mean() < 2 and diff.max() < 40, b  # different JPEG decoders may differ slightly
    assert (reads["cucim"][2][-20:, -20:] == 255).all()  # beyond the 2220x2967 border: white


def test_real_slide_metadata():
    with open_slide(real_slide("cmu-1-small-region.svs")) as s:
        assert s.backend == "cucim"
        assert s.level_dimensions[0] == (2220, 2967)
        assert s.mpp == pytest.approx(0.499) and s.mpp_source == "metadata"
    with open_slide(real_slide("small.svs")) as s:
        assert s.level_dimensions[0] == (16, 16) and s.mpp == pytest.approx(0.499)
        assert s.thumbnail(8).shape == (8, 8, 3)
    with open_slide(real_slide("boxes.tiff")) as s:  # resolution 72 dpi is a placeholder, not a scan
        assert s.level_count == 4 and s.mpp is None and s.mpp_source == "missing"
        assert "placeholder" in s.mpp_note
        assert s.read_region((0, 0), 0, (8, 8)).shape == (8, 8, 3)


def test_missing_mpp_not_reported_as_one(tmp_path):
    path = write_slide(tmp_path / "nompp.tif", IMG, compression="jpeg", mpp=None)
    with open_slide(path, backend="cucim") as s:
        assert s.mpp is None and s.mpp_source == "missing"
    with open_slide(path, mpp=0.5) as s:
        assert s.mpp == 0.5 and s.mpp_source == "override"


def test_aperio_mpp_in_description(tmp_path):
    path = write_slide(tmp_path / "ap.tif", IMG, compression="jpeg", mpp=0.2527, aperio=True)
    assert open_slide(path).mpp == pytest.approx(0.2527)


@pytest.mark.parametrize(
    "kind, kwargs, expected_backend",
    [
        ("jpeg2000", dict(compression="jpeg2000"), "tifffile"),  # cuCIM and OpenSlide cannot decode 34712
        ("deflate+predictor", dict(compression="zlib", predictor=True), "openslide"),  # crashes cuCIM
        ("flat deflate", dict(compression="zlib", tile=None), "tifffile"),  # cuCIM fails on first read
        ("flat lzw", dict(compression="lzw", tile=None), "cucim"),  # cuCIM slow path returns RGBA
    ],
)
def test_auto_fallback(tmp_path, kind, kwargs, expected_backend):
    path = write_slide(tmp_path / "f.tif", IMG, **kwargs)
    with open_slide(path) as s:
        assert s.backend == expected_backend, kind
        got = s.read_region((650, 10), 0, (64, 64))
        assert got.shape == (64, 64, 3)
        np.testing.assert_array_equal(got, _padded(IMG)[310:374, 950:1014])


def test_errors_name_the_file(tmp_path):
    with pytest.raises(SlideNotFoundError, match="nope.svs"):
        open_slide(tmp_path / "nope.svs")
    text = tmp_path / "notes.svs"
    text.write_text("this is not a slide\n")
    with pytest.raises(SlideFormatError, match="notes.svs"):
        open_slide(text)
    good = write_slide(tmp_path / "good.tif", IMG, compression="jpeg")
    data = open(good, "rb").read()
    trunc = tmp_path / "trunc.tif"
    trunc.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(SlideFormatError, match="trunc.tif.*truncated"):
        open_slide(trunc)
    with pytest.raises(ValueError, match="level 7"):
        open_slide(good).read_region((0, 0), 7, (4, 4))
    assert issubclass(SlideNotFoundError, SlideError) and issubclass(SlideNotFoundError, FileNotFoundError)


def test_corrupt_tile_raises_read_error(tmp_path):
    import tifffile

    path = write_slide(tmp_path / "bad.tif", IMG, compression="jpeg", levels=1)
    with tifffile.TiffFile(path) as tif:
        offset, n = tif.pages[0].dataoffsets[3], tif.pages[0].databytecounts[3]
    data = bytearray(open(path, "rb").read())
    data[offset : offset + n] = b"\xff" * n
    open(path, "wb").write(bytes(data))
    with open_slide(path, backend="tifffile") as s:
        s.read_region((0, 0), 0, (64, 64))  # tile 0 is fine
        with pytest.raises(SlideReadError, match=r"bad.tif: corrupt or undecodable tile data at level 0, level-0 location \(192, 0\), size \(64, 64\).*tifffile failed"):
            s.read_region((3 * 64, 0), 0, (64, 64))


@pytest.mark.parametrize("how", ["garbage", "eoi", "zeros"])
def test_corrupt_jpeg_tile_is_never_silent(tmp_path, capfd, how):
    """cuCIM prints libjpeg's complaint on stdout and returns wrong pixels: we raise instead, quietly."""
    path = tmp_path / f"{how}.svs"
    write_pyramidal_tiff(path, textured_image(512, 512, seed=3), mpp=0.5, tile=128, smallest_level=128)
    with open_slide(path) as s:
        clean = s.read_region((0, 0), 0, (512, 512))
    x, y = corrupt_tile(path, 5, how)  # row 1, col 1 of level 0
    capfd.readouterr()
    with open_slide(path) as s:
        assert s.backend == "cucim"
        np.testing.assert_array_equal(s.read_region((0, 0), 0, (128, 128)), clean[:128, :128])  # other tiles fine
        with pytest.raises(SlideReadError, match=rf"{how}.svs: corrupt or undecodable tile data at level 0, level-0 location \(138, 140\), "
                           r"size \(64, 64\) .*: the cucim decoder reported: .*(Corrupt JPEG data|Premature end)"):
            s.read_region((x + 10, y + 12), 0, (64, 64))
        with pytest.raises(SlideReadError, match=rf"{how}.svs: corrupt or undecodable tile data at level 0, level-0 location \(128, 128\)"):
            s.read_patches(np.array([[0, 0], [x, y], [256, 0]]), 0, 128, num_workers=2)  # batch API, then patch by patch
        np.testing.assert_array_equal(s.read_patches(np.array([[0, 0], [256, 0]]), 0, 128, num_workers=2)[1],
                                      clean[:128, 256:384])
    printed = capfd.readouterr()
    assert printed.out == "" and printed.err == ""  # no decoder text from us


def test_pickle_reopens(lossless):
    s = open_slide(lossless)
    s.read_region((0, 0), 0, (4, 4))
    s2 = pickle.loads(pickle.dumps(s))
    assert s2._impl is None and s2.backend == s.backend
    np.testing.assert_array_equal(s2.read_region((64, 64), 0, (32, 32)), IMG[64:96, 64:96])


def test_thumbnail_uses_pyramid(lossless):
    with open_slide(lossless) as s:
        th = s.thumbnail(200)
        assert th.shape == (171, 200, 3)
        assert np.abs(th.astype(int).mean() - IMG.mean()) < 2


def test_open_and_read_print_nothing(tmp_path):
    path = real_slide("cmu-1-small-region.svs")
    code = (
        "import monai_fbta; from monai_fbta.data.slide import open_slide; "
        f"open_slide({str(path)!r}).read_region((0, 0), 0, (64, 64))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "" and out.stderr == ""
    assert list(tmp_path.iterdir()) == []
