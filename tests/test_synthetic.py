"""Synthetic slide generator: real files that every reader opens, class signal, CLI, resumability."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.ndimage as ndi
import tifffile

from monai_fbta.synthetic import (
    CLASS_NAMES,
    SyntheticSlideConfig,
    generate_dataset,
    main,
    render_slide,
    slide_is_valid,
    write_pyramidal_tiff,
)

SIZE = 1024
SMALL = SyntheticSlideConfig(smallest_level=256)  # 1024 -> levels 1024, 512, 256


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    rows = generate_dataset(out, num_slides=3, num_classes=3, size=SIZE, seed=0, progress=False, config=SMALL)
    return out, rows


def _level0(path) -> np.ndarray:
    with tifffile.TiffFile(path) as tf:
        return tf.pages[0].asarray()


def test_tifffile_reads_pyramid_and_mpp(dataset):
    _, rows = dataset
    with tifffile.TiffFile(rows[0]["image"]) as tf:
        assert tf.is_svs
        levels = tf.series[0].levels
        assert [lv.shape for lv in levels] == [(1024, 1024, 3), (512, 512, 3), (256, 256, 3)]
        page = tf.pages[0]
        assert page.is_tiled and (page.tilewidth, page.tilelength) == (256, 256)
        assert page.compression == tifffile.COMPRESSION.JPEG
        assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        num, den = page.tags["XResolution"].value
        assert 1e4 / (num / den) == pytest.approx(0.5)
        assert "|MPP = 0.5" in page.description and "AppMag = 20" in page.description


def test_openslide_reads_aperio_pyramid(dataset):
    openslide = pytest.importorskip("openslide")
    _, rows = dataset
    ref = _level0(rows[0]["image"])
    with openslide.OpenSlide(rows[0]["image"]) as s:
        assert s.properties["openslide.vendor"] == "aperio"
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        assert float(s.properties["openslide.mpp-y"]) == pytest.approx(0.5)
        assert s.level_count == 3 and s.level_dimensions[2] == (256, 256)
        region = np.asarray(s.read_region((0, 0), 0, (SIZE, SIZE)))[..., :3]
    assert np.abs(region.astype(int) - ref).mean() < 1.0


def test_cucim_reads_pyramid_and_spacing(dataset):
    from monai_fbta._quiet import quiet_import, silence_native_output

    try:
        cucim = quiet_import("cucim")
    except ImportError:
        pytest.skip("cucim not installed")
    _, rows = dataset
    ref = _level0(rows[1]["image"])
    with silence_native_output():
        img = cucim.CuImage(rows[1]["image"])
        region = np.asarray(img.read_region((0, 0), (SIZE, SIZE), 0))[..., :3]
    assert img.resolutions["level_count"] == 3
    assert img.spacing()[:2] == pytest.approx([0.5, 0.5])
    assert img.spacing_units()[:2] == ["micrometer", "micrometer"]
    assert np.abs(region.astype(int) - ref).mean() < 1.0


def test_project_slide_reader_sees_metadata_mpp(dataset):
    slide_mod = pytest.importorskip("monai_fbta.data.slide")
    _, rows = dataset
    with slide_mod.open_slide(rows[2]["image"]) as slide:
        assert slide.mpp == pytest.approx(0.5) and slide.mpp_source == "metadata"
        assert slide.level_count == 3


def test_tissue_fraction_and_background(dataset):
    _, rows = dataset
    for row in rows:
        rgb = _level0(row["image"]).astype(int)
        saturation = rgb.max(axis=2) - rgb.min(axis=2)
        tissue = saturation > 25
        assert 0.35 < tissue.mean() < 0.65, row["slide_id"]
        assert rgb[~tissue].mean() > 225  # bright glass background
        corners = rgb[:32, :32]
        assert corners.min() > 200  # tissue keeps off the slide border


def test_render_is_deterministic_and_seed_dependent():
    cfg = SyntheticSlideConfig(size=512)
    a, ma = render_slide(cfg, 1, np.random.default_rng(5))
    b, mb = render_slide(cfg, 1, np.random.default_rng(5))
    c, _ = render_slide(cfg, 1, np.random.default_rng(6))
    assert a.dtype == np.uint8 and a.shape == (512, 512, 3)
    assert ma.dtype == bool and ma.shape == (32, 32)
    assert np.array_equal(a, b) and np.array_equal(ma, mb)
    assert np.abs(a.astype(int) - c).mean() > 5


def test_dataset_is_deterministic_on_disk(tmp_path, dataset):
    _, rows = dataset
    again = generate_dataset(tmp_path, num_slides=1, num_classes=3, size=SIZE, seed=0, progress=False, config=SMALL)
    assert np.array_equal(_level0(again[0]["image"]), _level0(rows[0]["image"]))
    assert again[0]["tumour_bboxes"] == rows[0]["tumour_bboxes"]


def _nuclear_stats(rgb: np.ndarray, mask: np.ndarray, d: int) -> tuple[float, float]:
    """Median nuclear blob area in the abnormal regions and the share of nuclear pixels in a ring
    around each lumen (white hole) there: measured from pixels, not from generator internals."""
    region = np.kron(mask, np.ones((d, d), bool))[: rgb.shape[0], : rgb.shape[1]]
    nuclear = rgb[..., 0] < 150
    blobs, _ = ndi.label(nuclear & region)
    areas = np.bincount(blobs.ravel())[1:]
    holes, _ = ndi.label((rgb.min(axis=2) > 215) & region)
    rings = []
    for i, sl in enumerate(ndi.find_objects(holes), 1):
        box = tuple(slice(max(s.start - 10, 0), s.stop + 10) for s in sl)
        hole = holes[box] == i
        if hole.sum() < 30:
            continue
        ring = ndi.binary_dilation(hole, iterations=8) & ~ndi.binary_dilation(hole, iterations=2)
        rings.append(nuclear[box][ring].mean())
    return float(np.median(areas[areas >= 8])), float(np.mean(rings))


def test_classes_differ_locally_not_globally():
    cfg = SyntheticSlideConfig(size=SIZE, num_classes=4, stain_jitter=0.0)
    stats, colours, nuclear_share = {}, {}, {}
    for label in range(4):
        rgb, mask = render_slide(cfg, label, np.random.default_rng([3, label]))
        assert 0.05 < mask.mean() / ((rgb.max(2).astype(int) - rgb.min(2)) > 25).mean() < 0.3
        stats[label] = _nuclear_stats(rgb, mask, cfg.mask_downsample)
        tissue = (rgb.max(2).astype(int) - rgb.min(2)) > 25
        colours[label] = rgb[tissue].mean(axis=0)
        nuclear_share[label] = (rgb[..., 0] < 150)[tissue].mean()
    # local signal: pleomorphic nuclei are much larger; glands put nuclei around lumens
    assert stats[1][0] > 1.6 * stats[0][0]
    assert stats[2][1] > 3 * max(stats[0][1], stats[1][1], stats[3][1])
    assert stats[3][0] > 1.2 * stats[0][0]  # chains: medium nuclei touching in lines
    # global: mean tissue colour and nuclear pixel share nearly equal across classes
    spread = np.ptp(np.stack(list(colours.values())), axis=0)
    assert spread.max() < 6, colours
    shares = np.array(list(nuclear_share.values()))
    assert shares.max() / shares.min() < 1.3, nuclear_share


def test_cli_writes_balanced_tables(tmp_path):
    out = tmp_path / "cli"
    assert main(["--out", str(out), "--num-slides", "4", "--num-classes", "2", "--size", "512", "--no-progress"]) == 0
    with open(out / "labels.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [list(r) for r in table[:1]] == [["slide_id", "path", "label", "case_id"]]
    assert sorted(int(r["label"]) for r in table) == [0, 0, 1, 1]
    datalist = json.loads((out / "datalist.json").read_text())
    assert datalist["class_names"] == list(CLASS_NAMES[:2])
    items = datalist["training"]
    assert [i["slide_id"] for i in items] == [r["slide_id"] for r in table]
    for item in items:
        assert (out / item["image"]).is_file() and (out / item["tumour_mask"]).is_file()
        assert item["tumour_bboxes"] and all(x1 > x0 and y1 > y0 for x0, y0, x1, y1 in item["tumour_bboxes"])
        mask = np.load(out / item["tumour_mask"])
        assert mask.any() and mask.shape == (32, 32)
    for slides in _by_case(items).values():  # a case never mixes labels
        assert len({s["label"] for s in slides}) == 1
    datalist_mod = pytest.importorskip("monai_fbta.data.datalist")
    for table_file in ("labels.csv", "datalist.json"):  # the project's loader accepts both tables
        loaded = datalist_mod.load_datalist(out / table_file)
        assert [r["label"] for r in loaded] == [int(r["label"]) for r in table]
        assert all(os.path.isfile(r["image"]) for r in loaded)
    from monai.data import load_decathlon_datalist

    loaded = load_decathlon_datalist(str(out / "datalist.json"), data_list_key="training")
    assert os.path.isfile(loaded[0]["image"])
    assert not [p for p in os.listdir(out) if ".tmp" in p]


def _by_case(items):
    cases: dict[str, list] = {}
    for item in items:
        cases.setdefault(item["case_id"], []).append(item)
    return cases


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--num-classes", "5"])
    assert "num_classes must be 2..4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path), "--num-classes", "0"])
    assert "num_classes must be 2..4, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="label must be in 0..1"):
        render_slide(SyntheticSlideConfig(size=256, num_classes=2), 2, np.random.default_rng(0))


def test_classes_choose_the_morphology_of_each_label():
    cfg = SyntheticSlideConfig(size=512, classes=("pleomorphic", "glandular", "cords"))
    assert cfg.class_names == ("pleomorphic", "glandular", "cords")
    default = SyntheticSlideConfig(size=512)
    for label, same_as in ((0, 1), (2, 3)):  # label 0 renders pleomorphic nuclei: the default's label 1
        a, ma = render_slide(cfg, label, np.random.default_rng(7))
        b, mb = render_slide(SyntheticSlideConfig(size=512, num_classes=4), same_as, np.random.default_rng(7))
        assert np.array_equal(a, b) and np.array_equal(ma, mb)
    # the default classes render and hash as before the option existed (existing slides stay valid)
    assert SyntheticSlideConfig(size=512, classes=CLASS_NAMES[:3]).class_names == default.class_names
    assert SyntheticSlideConfig().digest() == "c506fd4e4805"
    assert cfg.digest() != SyntheticSlideConfig(size=512, classes=("cords", "glandular", "pleomorphic")).digest()
    with pytest.raises(ValueError, match="classes must be 3 different names"):
        SyntheticSlideConfig(classes=("pleomorphic", "glandular", "glandular"))
    with pytest.raises(ValueError, match="classes must be 2 different names"):
        SyntheticSlideConfig(num_classes=2, classes=("tumour", "cords"))


def test_cli_classes_option_names_the_labels(tmp_path, capsys):
    out = tmp_path / "kinds"
    assert main(["--out", str(out), "--num-slides", "2", "--classes", "glandular,cords", "--size", "256",
                 "--no-progress"]) == 0
    datalist = json.loads((out / "datalist.json").read_text())
    assert datalist["num_classes"] == 2 and datalist["class_names"] == ["glandular", "cords"]
    assert datalist["config"]["classes"] == ["glandular", "cords"]
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "bad"), "--classes", "glandular,tumour"])
    assert "got ['glandular', 'tumour']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "bad"), "--num-classes", "3", "--classes", "glandular,cords"])
    assert "--num-classes 3 but --classes names 2: glandular,cords" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_resume_skips_valid_and_regenerates_damaged(tmp_path):
    kw = dict(num_slides=2, num_classes=2, size=512, seed=1, progress=False)
    rows = generate_dataset(tmp_path, **kw)
    paths = [r["image"] for r in rows]
    first_pixels = _level0(paths[0])
    stamps = [os.stat(p).st_mtime_ns for p in paths]
    generate_dataset(tmp_path, **kw)
    assert [os.stat(p).st_mtime_ns for p in paths] == stamps  # skipped
    data = open(paths[0], "rb").read()
    with open(paths[0], "wb") as f:  # truncate: the last tiles are gone
        f.write(data[: len(data) * 2 // 3])
    assert not slide_is_valid(paths[0])
    generate_dataset(tmp_path, **kw)
    assert slide_is_valid(paths[0]) and np.array_equal(_level0(paths[0]), first_pixels)
    assert os.stat(paths[1]).st_mtime_ns == stamps[1]
    generate_dataset(tmp_path, **dict(kw, tumour_fraction=0.2))  # other config: regenerated
    assert os.stat(paths[1]).st_mtime_ns != stamps[1]
    stamp = os.stat(paths[1]).st_mtime_ns
    generate_dataset(tmp_path, **dict(kw, tumour_fraction=0.2), overwrite=True)
    assert os.stat(paths[1]).st_mtime_ns != stamp


def test_write_pyramidal_tiff_is_reusable(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (300, 700, 3), dtype=np.uint8)
    dims = write_pyramidal_tiff(tmp_path / "a.tiff", rgb, mpp=None, tile=128, smallest_level=200)
    assert dims == [(700, 300), (350, 150), (175, 75)]
    with tifffile.TiffFile(tmp_path / "a.tiff") as tf:
        page = tf.pages[0]
        assert "MPP =" not in page.description
        assert page.tags.valueof("ResolutionUnit", tifffile.RESUNIT.NONE) == tifffile.RESUNIT.NONE
        assert tf.series[0].levels[0].shape == (300, 700, 3)
    with pytest.raises(ValueError, match="b.tiff: rgb must be uint8"):
        write_pyramidal_tiff(tmp_path / "b.tiff", rgb.astype(np.float32))
    assert os.listdir(tmp_path) == ["a.tiff"]


def test_import_is_silent(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import monai_fbta.synthetic"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""
    assert os.listdir(tmp_path) == []


def test_python_m_monai_fbta_synthetic(tmp_path):
    """``python -m monai_fbta.synthetic`` is the CLI (the subpackage's __main__)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "monai_fbta.synthetic", "--out", str(tmp_path / "m"), "--num-slides", "2",
                           "--num-classes", "2", "--size", "512", "--no-progress"], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "2 slides (per class [1, 1])" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "m").glob("*.tiff")) == ["synth_0000.tiff", "synth_0001.tiff"]


def test_a_dataset_of_other_generator_settings_is_named_and_used_as_it_is(tmp_path, caplog):
    """The bundle's demo folder from an older default (other ``synthetic`` settings) is kept, with a warning."""
    import logging

    from monai_fbta.pipeline.prepare import find_or_make_dataset
    from monai_fbta.synthetic import generated_settings_differences

    kw = dict(num_slides=3, num_classes=3, size=512, tumour_fraction=0.25, seed=0)
    generate_dataset(tmp_path, progress=False, **kw)
    assert generated_settings_differences(tmp_path, **kw) == []
    asked = dict(kw, tumour_fraction=0.08, stain_jitter=2.0)
    assert sorted(generated_settings_differences(tmp_path, **asked)) == [
        "stain_jitter: 1.0 there, 2.0 asked", "tumour_fraction: 0.25 there, 0.08 asked"]
    stamp = os.stat(tmp_path / "synth_0000.tiff").st_mtime_ns
    with caplog.at_level(logging.WARNING):
        rows = find_or_make_dataset(tmp_path, synthetic=asked)
    assert len(rows) == 3 and os.stat(tmp_path / "synth_0000.tiff").st_mtime_ns == stamp
    assert "tumour_fraction: 0.25 there, 0.08 asked" in caplog.text and "delete the folder" in caplog.text
    written = json.loads((tmp_path / "datalist.json").read_text())
    del written["config"]["classes"]  # written before the config had classes: the default ones
    (tmp_path / "datalist.json").write_text(json.dumps(written))
    assert generated_settings_differences(tmp_path, **kw) == []
    (tmp_path / "datalist.json").unlink()  # a folder the generator did not write: nothing to compare
    assert generated_settings_differences(tmp_path, **asked) == []
