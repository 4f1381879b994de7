"""Fuzzing ``open_slide`` with mutated and random bytes: every file either reads or raises our SlideError.

The opener and one read run in a child process (native decoders such as cuCIM could crash or hang on
hostile bytes; pytest must survive that and name the file). The child prints one JSON line per file
before and after each attempt (prefixed ``FUZZ``), so a crash or hang points at the file that caused it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from slide_factory import textured_image, write_slide

from monai_fbta.synthetic import write_pyramidal_tiff

REPO = Path(__file__).resolve().parents[1]
NUM_MUTATIONS = int(os.environ.get("FBTA_FUZZ_MUTATIONS", "80"))
NUM_RANDOM = 10

CHILD = r"""
import json, sys
import numpy as np
from monai_fbta.data.errors import SlideError
from monai_fbta.data.slide import open_slide

for path in sys.argv[1:]:
    print("FUZZ", json.dumps({"start": path}), flush=True)
    try:
        with open_slide(path) as slide:
            w, h = slide.level_dimensions[-1]
            region = slide.read_region((0, 0), slide.level_count - 1, (min(w, 64), min(h, 64)))
            patches = slide.read_patches(np.array([[0, 0], [32, 32]]), 0, 32)
            assert region.dtype == np.uint8 and region.shape[2] == 3 and patches.shape == (2, 32, 32, 3)
        outcome = {"file": path, "result": "read"}
    except SlideError as e:
        outcome = {"file": path, "result": "SlideError", "message": str(e)}
    except Exception as e:  # anything else is a finding
        outcome = {"file": path, "result": "other", "message": f"{type(e).__name__}: {e}"}
    print("FUZZ", json.dumps(outcome), flush=True)
"""


def _mutate(data: bytes, rng: np.random.Generator) -> bytes:
    """One of: flip a few bytes, truncate, zero a run, duplicate a chunk, overwrite the header area."""
    buf = bytearray(data)
    kind = rng.integers(5)
    if kind == 0:
        for pos in rng.integers(0, len(buf), rng.integers(1, 20)):
            buf[pos] = int(rng.integers(256))
    elif kind == 1:
        buf = buf[: int(rng.integers(8, len(buf)))]
    elif kind == 2:
        start = int(rng.integers(0, len(buf)))
        buf[start : start + int(rng.integers(1, 4096))] = b"\0" * len(buf[start : start + 4096])
    elif kind == 3:
        start, size = int(rng.integers(0, len(buf))), int(rng.integers(1, 2048))
        buf[start:start] = buf[start : start + size]
    else:
        for pos in rng.integers(0, min(len(buf), 512), rng.integers(1, 8)):  # IFD / tag area
            buf[pos] = int(rng.integers(256))
    return bytes(buf)


def _corpus(folder: Path) -> list[str]:
    rng = np.random.default_rng(int(os.environ.get("FBTA_FUZZ_SEED", "1234")))
    img = textured_image(384, 384, seed=3)
    seeds = [
        Path(folder / "aperio_jpeg.svs"),
        Path(write_slide(folder / "zlib.tif", img, levels=2, tile=64, compression="zlib")),
    ]
    write_pyramidal_tiff(seeds[0], img, mpp=0.5, tile=128, smallest_level=128)
    files = []
    for i in range(NUM_MUTATIONS):
        seed = seeds[i % len(seeds)]
        path = folder / f"mut{i:03d}{seed.suffix}"
        path.write_bytes(_mutate(seed.read_bytes(), rng))
        files.append(str(path))
    for i in range(NUM_RANDOM):
        head = b"II*\0" if i % 2 else b""
        path = folder / f"rand{i:02d}.svs"
        path.write_bytes(head + rng.integers(0, 256, int(rng.integers(16, 20000)), dtype=np.uint8).tobytes())
        files.append(str(path))
    return files


def _run_child(files: list[str], timeout: float, script: str = CHILD) -> tuple[dict[str, dict], str | None, str]:
    """Results per file; the file being processed when the child crashed or hung (or None)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen([sys.executable, "-c", script, *files], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
        hung = False
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        hung = True
    results, current = {}, None
    for line in out.splitlines():
        if not line.startswith("FUZZ "):
            results.setdefault("_stray_output", {"lines": []})["lines"].append(line)  # e.g. a decoder's complaint
            continue
        record = json.loads(line[5:])
        if "start" in record:
            current = record["start"]
        else:
            results[record["file"]] = record
            current = None
    problem = None
    if hung or proc.returncode != 0:
        problem = f"{'hung' if hung else f'exit code {proc.returncode}'} on {current}"
    return results, problem, err


def test_open_slide_on_mutated_and_random_bytes_never_crashes_or_hangs(tmp_path):
    files = _corpus(tmp_path)
    results, problem, err = _run_child(files, timeout=150)
    assert problem is None, f"{problem}\n{err[-2000:]}"
    assert set(results) == set(files)
    others = {f: r["message"] for f, r in results.items() if r["result"] == "other"}
    assert not others, others
    errors = [r for r in results.values() if r["result"] == "SlideError"]
    assert all(r["message"].startswith(r["file"]) for r in errors)  # every message names the file
    # the corpus exercises both outcomes (mutations that still read, and rejected files)
    assert errors and any(r["result"] == "read" for r in results.values())
    assert all(results[f]["result"] == "SlideError" for f in files if "rand" in Path(f).name)


@pytest.mark.parametrize("payload", [b"", b"II*\0", b"MM\0*" + b"\xff" * 100])
def test_degenerate_files_raise_slide_error_in_process(tmp_path, payload):
    from monai_fbta.data.errors import SlideError
    from monai_fbta.data.slide import open_slide

    path = tmp_path / "x.svs"
    path.write_bytes(payload)
    with pytest.raises(SlideError, match="x.svs"):
        open_slide(path)


# ----------------------------------------------------------------------------- damaged tile data

TILE_CHILD = r"""
import hashlib, json, sys
import numpy as np
from monai_fbta.data.errors import SlideError
from monai_fbta.data.slide import open_slide

def digest(a):
    return hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()

for path in sys.argv[1:]:
    print("FUZZ", json.dumps({"start": path}), flush=True)
    out = {"file": path, "tiles": []}
    try:
        with open_slide(path) as slide:
            tile = int(path.rsplit("_t", 1)[1].split(".")[0])
            w, h = slide.level_dimensions[0]
            origins = [(x, y) for y in range(0, h, tile) for x in range(0, w, tile)]
            for xy in origins:  # every level-0 tile on its own
                try:
                    out["tiles"].append(["ok", digest(slide.read_region(xy, 0, (tile, tile)))])
                except SlideError as e:
                    out["tiles"].append(["error", str(e)])
            try:  # all tiles at once (parallel reads under one capture)
                out["patches"] = ["ok", [digest(p) for p in slide.read_patches(np.array(origins), 0, tile, num_workers=2)]]
            except SlideError as e:
                out["patches"] = ["error", str(e)]
        out["result"] = "read"
    except SlideError as e:
        out.update(result="SlideError", message=str(e))
    except Exception as e:
        out.update(result="other", message=f"{type(e).__name__}: {e}")
    print("FUZZ", json.dumps(out), flush=True)
"""

# damage that breaks a tile's stream structure: must always be an error. "byte"/"bit"/"run" change
# values inside a JPEG entropy-coded segment, which has no checksum: often undetectable by any decoder
STRUCTURAL = {"jpeg": ("eoi", "tail0", "rst"), "zlib": ("eoi", "tail0", "rst", "byte", "bit", "run")}


def _damage_tile(data: bytes, offset: int, count: int, kind: str, rng: np.random.Generator) -> bytes:
    """Damage the compressed bytes ``data[offset:offset + count]`` of one tile (headers of the file untouched)."""
    buf = bytearray(data)
    start = offset + min(count // 4, 700) if count > 1400 else offset + 2  # past a JPEG tile's tables
    pos = int(rng.integers(start, offset + count * 9 // 10))
    if kind == "eoi":
        buf[pos : pos + 2] = b"\xff\xd9"
    elif kind == "rst":
        buf[pos : pos + 2] = b"\xff\xd3"
    elif kind == "tail0":
        buf[pos : offset + count] = bytes(offset + count - pos)
    elif kind == "byte":
        buf[pos] = (buf[pos] + int(rng.integers(1, 256))) % 256
    elif kind == "bit":
        buf[pos] ^= 1 << int(rng.integers(8))
    else:
        buf[pos : pos + 32] = rng.integers(0, 256, 32, dtype=np.uint8).tobytes()
    return bytes(buf)


def _tile_corpus(folder: Path, n: int) -> tuple[dict[str, str], list[tuple[str, str, int, str]]]:
    """Seed slides (JPEG .svs, zlib .tif) and ``n`` copies with one level-0 tile damaged:
    ``({codec: seed path}, [(path, codec, tile index, kind)])``. File names carry the tile size."""
    import tifffile

    rng = np.random.default_rng(int(os.environ.get("FBTA_FUZZ_SEED", "1234")))
    img = textured_image(384, 384, seed=5)
    seeds = {"jpeg": str(folder / "seed_jpeg_t128.svs"), "zlib": str(folder / "seed_zlib_t64.tif")}
    write_pyramidal_tiff(seeds["jpeg"], img, mpp=0.5, tile=128, smallest_level=128)
    write_slide(seeds["zlib"], img, levels=2, tile=64, compression="zlib")
    kinds = ("eoi", "tail0", "rst", "byte", "bit", "run")
    files = []
    for i in range(n):
        codec = ("jpeg", "zlib")[i % 2]
        with tifffile.TiffFile(seeds[codec]) as tif:
            page = tif.pages[0]
            index = int(rng.integers(len(page.dataoffsets)))
            offset, count = page.dataoffsets[index], page.databytecounts[index]
        kind = kinds[(i // 2) % len(kinds)]
        tile = seeds[codec].rsplit("_t", 1)[1]
        path = folder / f"tile{i:03d}_{codec}_{kind}_t{tile}"
        path.write_bytes(_damage_tile(Path(seeds[codec]).read_bytes(), offset, count, kind, rng))
        files.append((str(path), codec, index, kind))
    return seeds, files


def test_damaged_tile_data_is_an_error_never_a_crash_or_silently_wrong(tmp_path):
    seeds, damaged = _tile_corpus(tmp_path, int(os.environ.get("FBTA_FUZZ_TILE_MUTATIONS", "36")))
    results, problem, err = _run_child([*seeds.values(), *(d[0] for d in damaged)], timeout=240, script=TILE_CHILD)
    assert problem is None, f"{problem}\n{err[-2000:]}"
    assert "_stray_output" not in results, results.get("_stray_output")  # no decoder text on stdout
    clean = {codec: results[path] for codec, path in seeds.items()}
    assert all(c["result"] == "read" and all(t[0] == "ok" for t in c["tiles"]) for c in clean.values())
    undetected = []
    for path, codec, index, kind in damaged:
        got = results[path]
        assert got["result"] == "read", got  # a damaged tile never stops the slide from opening
        ref = clean[codec]["tiles"]
        for i, (status, value) in enumerate(got["tiles"]):
            if i != index:
                assert [status, value] == ref[i], (path, i, value)  # other tiles: exact pixels
        status, value = got["tiles"][index]
        if status == "error":
            assert value.startswith(path) and "level 0, level-0 location" in value, value
            assert got["patches"][0] == "error" and got["patches"][1].startswith(path)  # the parallel path too
        elif value != ref[index][1]:
            assert kind not in STRUCTURAL[codec], f"{path}: damaged tile {index} read as wrong pixels without an error"
            undetected.append(path)
        if got["patches"][0] == "ok":
            assert got["patches"][1] == [t[1] for t in got["tiles"]]
    # JPEG has no checksum: a changed value inside the entropy-coded data can decode without complaint
    # (measured: ~80% of single bit flips, ~20% of 32-byte runs); every such case is a JPEG value change
    assert all("_jpeg_" in p and any(f"_{k}_" in p for k in ("byte", "bit", "run")) for p in undetected)
