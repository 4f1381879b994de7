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

from monai_fbta.data.synthetic import write_pyramidal_tiff

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


def _run_child(files: list[str], timeout: float) -> tuple[dict[str, dict], str | None, str]:
    """Results per file; the file being processed when the child crashed or hung (or None)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *files], env=env, stdout=subprocess.PIPE,
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
            continue  # native decoders print their own complaints on stdout
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
