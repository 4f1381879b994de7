"""Frozen feature extraction: store contents, resume/skip, fingerprints, bad slides, kill + resume, torchrun."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
import torch
from conftest import tiny_encoder
from slide_factory import TILING, corrupt_tile, tissue_rect_image, tissue_slide, write_slide

from monai_fbta.data.errors import SlideError
from monai_fbta.data.extraction import encoder_fingerprint, extract_features
from monai_fbta.data.store import StoreError, read_array, read_coords, store_is_complete
from monai_fbta.transforms.patches import ReadPatches

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]


def _slides(folder: Path, n: int = 3, size: tuple[int, int] = (768, 1024)) -> list[dict]:
    """Tissue rectangles; slide 0 is single-level at 0.25 um/px (read 128 px, resized to 64)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    h, w = size
    for i in range(n):
        img = tissue_rect_image(h, w, (64 + 32 * i, 64, w - 64, h - 64 - 32 * i), seed=i)
        levels, mpp = (1, 0.25) if i == 0 else (3, 0.5)
        path = write_slide(folder / f"slide{i}.tif", img, levels=levels, tile=64, mpp=mpp)
        rows.append({"image": path, "label": i % 2})
    return rows


def test_store_contents_match_direct_encoding(tmp_path):
    rows = _slides(tmp_path / "slides")
    enc = tiny_encoder()
    report = extract_features(rows, tmp_path / "out", enc, TILING, batch_size=16, amp=False, progress=False)
    assert [r.status for r in report.results] == ["done"] * 3
    for row, res in zip(rows, report.results):
        h5 = tmp_path / "out" / f"{res.slide_id}.h5"
        coords, attrs = read_coords(h5)
        feats = read_array(h5, "features")
        assert coords.dtype == np.int64 and coords.shape == (res.n_patches, 2) and res.n_patches > 10
        assert feats.dtype == np.float16 and feats.shape[0] == res.n_patches and np.isfinite(feats).all()
        # same numbers as encoding the patches read directly (through the resize path for slide 0)
        patches = ReadPatches(attrs["patch_level"], attrs["patch_size_level"], 64)(row["image"], coords)
        with torch.inference_mode():
            expect = enc.eval()(patches).float().numpy()
        np.testing.assert_allclose(feats.astype(np.float32), expect, rtol=2e-3, atol=2e-3)
    assert read_coords(tmp_path / "out" / "slide0.h5")[1]["patch_size_level"] == 128
    assert (tmp_path / "out" / "extraction_report.csv").is_file()


def test_rerun_skips_and_fingerprint_change_recomputes(tmp_path):
    rows = _slides(tmp_path / "slides", n=2)
    out = tmp_path / "out"
    extract_features(rows, out, tiny_encoder(0), TILING, batch_size=32, progress=False)
    h5 = out / "slide1.h5"
    mtime, before = h5.stat().st_mtime_ns, read_array(h5, "features")
    again = extract_features(rows, out, tiny_encoder(0), TILING, batch_size=32, progress=False)
    assert [r.status for r in again.results] == ["skipped", "skipped"]
    assert h5.stat().st_mtime_ns == mtime
    # other weights -> recomputed
    other = extract_features(rows, out, tiny_encoder(1), TILING, batch_size=32, progress=False)
    assert [r.status for r in other.results] == ["done", "done"]
    assert not np.array_equal(read_array(h5, "features"), before)
    # other tiling -> recomputed with new coords
    tiling = {**TILING, "tissue_threshold": 0.9}
    assert [r.status for r in extract_features(rows, out, tiny_encoder(1), tiling, progress=False).results] == ["done"] * 2
    assert read_coords(h5)[1]["tissue_threshold"] == pytest.approx(0.9)
    # a file that is not HDF5 is neither trusted nor overwritten (we did not write it)
    h5.write_bytes(b"not an hdf5 file")
    with pytest.raises(StoreError, match="slide1.h5: exists but is not a readable HDF5 file"):
        extract_features(rows, out, tiny_encoder(1), tiling, progress=False)
    assert h5.read_bytes() == b"not an hdf5 file"


def test_clam_features_in_the_cache_folder_are_refused_before_any_work(tmp_path):
    rows = _slides(tmp_path / "slides", n=2)
    out = tmp_path / "clam_feats"
    out.mkdir()
    with h5py.File(out / "slide1.h5", "w") as f:  # CLAM's extract_features_fp output for this slide id
        f.create_dataset("coords", data=np.zeros((4, 2), np.int64)).attrs.update(patch_size=256, patch_level=0)
        f.create_dataset("features", data=np.ones((4, 1024), np.float32))
    before = (out / "slide1.h5").read_bytes()
    with pytest.raises(StoreError, match=r"1 file\(s\) in the feature cache were not written by monai_fbta(.|\n)*slide1.h5: not a monai_fbta store"):
        extract_features(rows, out, tiny_encoder(), TILING, progress=False)
    assert (out / "slide1.h5").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["slide1.h5"]  # slide0 was not started either


def test_a_changed_slide_file_is_recomputed_and_the_report_says_why(tmp_path):
    rows = _slides(tmp_path / "slides", n=3)
    out = tmp_path / "out"
    enc = tiny_encoder(0)
    first = [dict(rows[1], slide_id="s")]
    extract_features(first, out, enc, TILING, progress=False)
    h5 = out / "s.h5"
    old = read_array(h5, "features")
    # the same slide id now points at another file: before, its old features were reused ("skipped")
    other = [dict(rows[2], slide_id="s")]
    report = extract_features(other, out, enc, TILING, progress=False)
    res = report.by_id()["s"]
    assert res.status == "done" and res.note.startswith("slide file changed (size"), res
    assert read_coords(h5)[1]["slide_path"] == rows[2]["image"]
    fresh = extract_features([rows[2]], tmp_path / "fresh", enc, TILING, progress=False)
    assert fresh.results[0].status == "done"
    np.testing.assert_array_equal(read_array(h5, "features"), read_array(tmp_path / "fresh" / "slide2.h5", "features"))
    assert read_array(h5, "features").shape != old.shape or not np.array_equal(read_array(h5, "features"), old)
    with open(out / "extraction_report.csv") as f:
        assert next(csv.DictReader(f))["note"].startswith("slide file changed")
    # rewritten in place with the same bytes at both ends: the modification time gives it away
    path = Path(rows[2]["image"])
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert "modification time" in extract_features(other, out, enc, TILING, progress=False).results[0].note
    # moved with its times kept: the same file, reused
    moved = path.rename(tmp_path / "moved.tif")
    again = extract_features([{"image": str(moved), "slide_id": "s"}], out, enc, TILING, progress=False)
    assert again.results[0].status == "skipped"
    # a store written before slide fingerprints existed is recomputed once, saying so
    with h5py.File(h5, "a") as f:
        for name in ("coords", "features"):
            fp = json.loads(f[name].attrs["fingerprint"])
            del fp["slide"]
            f[name].attrs["fingerprint"] = json.dumps(fp)
    res = extract_features([{"image": str(moved), "slide_id": "s"}], out, enc, TILING, progress=False).results[0]
    assert res.status == "done" and "predates slide fingerprints" in res.note


def test_a_corrupt_tile_fails_the_slide_or_with_skip_bad_patches_drops_its_patches(tmp_path, capfd):
    from monai_fbta.synthetic import write_pyramidal_tiff

    path = tmp_path / "s.svs"
    write_pyramidal_tiff(path, tissue_rect_image(512, 512, (32, 32, 480, 480)), mpp=0.5, tile=128, smallest_level=128)
    x, y = corrupt_tile(path, 5)  # level-0 (128, 128)-(256, 256): four 64 px patches
    rows, enc, out = [{"image": str(path)}], tiny_encoder(), tmp_path / "out"
    tiling = {**TILING, "mask_max_size": 128}  # tissue mask from level 2, so tiling does not read the bad tile
    capfd.readouterr()
    res = extract_features(rows, out, enc, tiling, progress=False).results[0]
    assert res.status == "error" and res.error.startswith(f"{path}: reading patches failed")
    assert re.search(r"corrupt or undecodable tile data at level 0, level-0 location \((128|192), (128|192)\).*Corrupt JPEG data", res.error)
    assert "ERROR in line" not in capfd.readouterr().out  # the decoder's own text never reaches the user
    assert not store_is_complete(out / "s.h5")

    res = extract_features(rows, out, enc, tiling, progress=False, skip_bad_patches=True).results[0]
    assert res.status == "done" and "dropped 4 of 60 patches" in res.note and "level-0 location (128, 128)" in res.note
    coords, attrs = read_coords(out / "s.h5")
    assert len(coords) == res.n_patches == read_array(out / "s.h5", "features").shape[0]
    inside = (coords >= (x, y)).all(axis=1) & (coords < (x + 128, y + 128)).all(axis=1)
    assert not inside.any() and sorted(map(tuple, attrs["dropped_coords"])) == [(128, 128), (128, 192), (192, 128), (192, 192)]
    assert extract_features(rows, out, enc, tiling, progress=False, skip_bad_patches=True).results[0].status == "skipped"
    assert extract_features(rows, out, enc, tiling, progress=False).results[0].status == "error"  # not without the option


def test_encoder_fingerprint_tracks_weights():
    assert encoder_fingerprint(tiny_encoder(0)) == encoder_fingerprint(tiny_encoder(0))
    assert encoder_fingerprint(tiny_encoder(0))["weights"] != encoder_fingerprint(tiny_encoder(1))["weights"]


def test_bad_slides_reported_and_others_processed(tmp_path):
    rows = _slides(tmp_path / "slides", n=2)
    good = Path(rows[1]["image"]).read_bytes()
    truncated = tmp_path / "slides" / "truncated.tif"
    truncated.write_bytes(good[: len(good) // 3])
    text = tmp_path / "slides" / "notes.svs"
    text.write_text("this is not a slide\n")
    white = write_slide(tmp_path / "slides" / "white.tif", np.full((512, 512, 3), 255, np.uint8), levels=2, mpp=0.5)
    bad = [{"image": str(truncated)}, {"image": str(text)}, {"image": white}]
    report = extract_features(bad[:1] + rows + bad[1:], tmp_path / "out", tiny_encoder(), TILING, progress=False)
    status = {r.slide_id: r for r in report.results}
    assert status["slide0"].status == status["slide1"].status == "done"
    for name, path in (("truncated", truncated), ("notes", text), ("white", white)):
        assert status[name].status == "error", status[name]
        assert str(path) in status[name].error  # the message names the file
        assert not (tmp_path / "out" / f"{name}.h5").exists() or name == "white"
    with open(tmp_path / "out" / "extraction_report.csv") as f:
        table = {r["slide_id"]: r for r in csv.DictReader(f)}
    assert table["notes"]["status"] == "error" and "notes.svs" in table["notes"]["error"]
    assert table["slide1"]["status"] == "done" and int(table["slide1"]["n_patches"]) > 0
    with pytest.raises(SlideError, match="notes.svs"):
        extract_features([{"image": str(text)}], tmp_path / "out2", tiny_encoder(), TILING, skip_errors=False, progress=False)


# ----------------------------------------------------------------------------- CLI subprocesses


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cli(datalist: Path, out: Path, *extra: str) -> list[str]:
    return [
        "-m", "monai_fbta.data.extraction", "--datalist", str(datalist), "--out", str(out), "--encoder", "tiny_cnn",
        "--patch-size", "64", "--target-mpp", "0.5", "--batch-size", "4", "--num-workers", "0", "--no-progress", *extra,
    ]


def _run(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``python args`` in its own process group; the whole group is killed on timeout."""
    proc = subprocess.Popen([sys.executable, *args], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {args}\n{err[-3000:]}")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _datalist(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["slide_id", "path", "label"])
        writer.writeheader()
        writer.writerows({"slide_id": Path(r["image"]).stem, "path": r["image"], "label": r["label"]} for r in rows)
    return path


def _assert_same_stores(a: Path, b: Path, ids: list[str]) -> None:
    for sid in ids:
        for name in ("coords", "features"):
            x, y = read_array(a / f"{sid}.h5", name), read_array(b / f"{sid}.h5", name)
            assert np.array_equal(x, y), f"{sid}/{name} differs"


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
    rows = _slides(tmp_path / "slides", n=5, size=(1024, 1024))
    ids = [f"slide{i}" for i in range(5)]
    datalist = _datalist(rows, tmp_path / "slides.csv")
    ref = tmp_path / "ref"
    assert _run(_cli(datalist, ref)).returncode == 0

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, *_cli(datalist, out)], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not store_is_complete(out / "slide0.h5") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    done_at_kill = [sid for sid in ids if store_is_complete(out / f"{sid}.h5")]
    assert "slide0" in done_at_kill and len(done_at_kill) < len(ids), done_at_kill
    for h5 in out.glob("*.h5"):  # whatever exists is a whole, readable file (atomic writes)
        with h5py.File(h5, "r") as f:
            assert "coords" in f

    rerun = _run(_cli(datalist, out))
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    with open(out / "extraction_report.csv") as f:
        status = {r["slide_id"]: r["status"] for r in csv.DictReader(f)}
    assert all(status[sid] == "skipped" for sid in done_at_kill) and "done" in status.values()
    assert not list(out.glob(".*.tmp")), "stale temp files are cleaned up"
    _assert_same_stores(out, ref, ids)


def test_torchrun_two_processes_equal_one_process(tmp_path):
    rows = _slides(tmp_path / "slides", n=3)
    ids = [f"slide{i}" for i in range(3)]
    datalist = _datalist(rows, tmp_path / "slides.csv")
    one, two = tmp_path / "one", tmp_path / "two"
    assert _run(_cli(datalist, one)).returncode == 0
    run = _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *_cli(datalist, two)])
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    _assert_same_stores(one, two, ids)
    with open(two / "extraction_report.csv") as f:
        assert [r["slide_id"] for r in csv.DictReader(f)] == ids  # rank 0 gathered every rank's rows
    assert run.stdout.count("slide1") == 1, "only rank 0 prints the summary"


def _bad_slide_rows(folder: Path) -> tuple[list[dict], dict[str, str]]:
    """One good slide and one of each fault; returns rows and the expected message pattern per slide id."""
    folder.mkdir()
    good = tissue_slide(folder / "good.tif")
    data = Path(good).read_bytes()
    (folder / "truncated.tif").write_bytes(data[: len(data) // 3])
    (folder / "notaslide.svs").write_bytes(b"%PDF-1.4 definitely not a slide" * 10)
    weird = tissue_slide(folder / "weird.tif")
    with tifffile.TiffFile(weird, mode="r+b") as tif:
        for page in tif.pages:
            page.tags["Compression"].overwrite(60123)
    nompp = tissue_slide(folder / "nompp.tif", mpp=None)
    write_slide(folder / "blank.tif", np.full((512, 512, 3), 255, np.uint8), levels=2, tile=64)
    write_slide(folder / "tiny.tif", tissue_rect_image(40, 40, (0, 0, 40, 40)), tile=None)
    write_slide(folder / "flat.tif", tissue_rect_image(384, 384, (32, 32, 352, 352)), tile=None)
    rows = [{"image": str(folder / f"{n}")} for n in ("good.tif", "truncated.tif", "notaslide.svs", "weird.tif",
                                                       "nompp.tif", "blank.tif", "tiny.tif", "flat.tif")]
    rows.append({"image": nompp, "slide_id": "nompp_with_mpp_column", "mpp": 0.5})
    expected = {
        "truncated": r"truncated\.tif: truncated or corrupt TIFF",
        "notaslide": r"notaslide\.svs: no backend could open it",
        "weird": r"weird\.tif: unsupported TIFF compression 60123",
        "nompp": r"nompp\.tif: no pixel size in the metadata .*an mpp column in the datalist, the bundle's --assume_mpp",
        "blank": r"blank\.tif: .*tissue",
        "tiny": r"tiny\.tif: slide \(40x40 px\) is smaller than one patch",
    }
    return rows, expected


def test_each_bad_slide_is_skipped_with_a_specific_message(tmp_path):
    rows, expected = _bad_slide_rows(tmp_path / "slides")
    report = extract_features(rows, tmp_path / "out", tiny_encoder(), TILING, progress=False)
    with open(tmp_path / "out" / "extraction_report.csv") as f:
        table = {r["slide_id"]: r for r in csv.DictReader(f)}
    for sid, pattern in expected.items():
        assert table[sid]["status"] == "error" and re.search(pattern, table[sid]["error"]), table[sid]
        assert not store_is_complete(tmp_path / "out" / f"{sid}.h5")
    for sid in ("good", "flat", "nompp_with_mpp_column"):  # single-level flat TIFF and mpp override work
        assert table[sid]["status"] == "done" and int(table[sid]["n_patches"]) > 0, table[sid]
    assert len(report.failed) == len(expected)
    # fail fast: the first bad slide stops the run with its message
    with pytest.raises(SlideError, match=expected["truncated"]):
        extract_features(rows, tmp_path / "out2", tiny_encoder(), TILING, skip_errors=False, progress=False)


class _NaNEncoder(torch.nn.Module):
    """tiny_cnn whose output is NaN for every patch (a broken extractor or fp16 overflow)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = tiny_encoder()
        self.name = "nan_cnn"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * float("nan")


def test_nan_features_at_extraction_are_not_stored(tmp_path):
    row = {"image": tissue_slide(tmp_path / "s.tif"), "slide_id": "s"}
    report = extract_features([row], tmp_path / "out", _NaNEncoder(), TILING, amp=False, progress=False)
    assert report.results[0].status == "error"
    assert re.search(r"s\.tif: the encoder produced NaN/inf features for \d+ of \d+ patches", report.results[0].error)
    assert not store_is_complete(tmp_path / "out" / "s.h5")


def test_hostile_slide_id_is_written_inside_the_cache(tmp_path):
    row = {"image": tissue_slide(tmp_path / "s.tif"), "slide_id": "../../../escaped"}
    report = extract_features([row], tmp_path / "a" / "cache", tiny_encoder(), TILING, progress=False)
    assert report.results[0].status == "done"
    assert sorted(p.name for p in (tmp_path / "a" / "cache").iterdir()) == ["_.._.._escaped.h5", "extraction_report.csv"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "s.tif"]
    with pytest.raises(ValueError, match=r"stores would collide\): \['a b', 'a/b'\]"):
        extract_features([dict(row, slide_id="a/b"), dict(row, slide_id="a b")], tmp_path / "b", tiny_encoder(), TILING)
