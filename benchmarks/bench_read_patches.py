"""Patch-read throughput: ``Slide.read_patches`` vs raw cuCIM / OpenSlide, measured in one run.

Random in-tissue 256 px level-0 patches from cmu-1-small-region.svs (when present) and from a
generated 8192 x 8192 JPEG-tiled pyramidal TIFF. Prints patches/s per method and the ratios
``ours/raw_cucim`` (target >= 0.9) and ``ours/openslide`` (target >= 2).

    python benchmarks/bench_read_patches.py [--n 400] [--workers 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from monai_fbta._quiet import quiet_import, silence_native_output
from monai_fbta.data.slide import open_slide
from monai_fbta.data.tiling import tile_slide

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "testdata" / "real" / "cmu-1-small-region.svs"
SIZE = 256


def make_big_slide(path: str, side: int = 8192) -> str:
    """An 8192^2 JPEG-tiled 3-level TIFF: textured pink blobs on white, 0.5 um/px."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from slide_factory import textured_image, write_slide

    rng = np.random.default_rng(0)
    img = np.full((side, side, 3), 255, np.uint8)
    tex = textured_image(1024, 1024)
    tissue = (tex // 3 + np.array([150, 60, 110], np.uint8)).astype(np.uint8)
    for _ in range(12):
        x, y = rng.integers(0, side - 2048, 2)
        img[y : y + 2048, x : x + 2048] = np.tile(tissue, (2, 2, 1))
    return write_slide(path, img, levels=3, tile=256, compression="jpeg", mpp=0.5)


def rate(fn: Callable[[np.ndarray], object], sets: list[np.ndarray]) -> float:
    """Best patches/s over the coordinate sets after the first (a warm-up); each set is read once,
    so no method is helped by a tile cache primed with the same patches."""
    fn(sets[0])
    best = 0.0
    for coords in sets[1:]:
        t0 = time.perf_counter()
        fn(coords)
        best = max(best, len(coords) / (time.perf_counter() - t0))
    return best


def bench(path: str, n: int, workers: int, repeats: int = 3) -> dict[str, float]:
    with open_slide(path) as slide:
        tissue, _ = tile_slide(slide, patch_size=SIZE, target_mpp=slide.mpp, mask_max_size=1024)
        w0, h0 = slide.level_dimensions[0]
    rng = np.random.default_rng(0)
    sets = []
    for _ in range(repeats + 1):
        c = tissue[rng.integers(0, len(tissue), n)] + rng.integers(0, SIZE // 2, (n, 2))
        sets.append(np.minimum(c, [w0 - SIZE, h0 - SIZE]))  # fully inside: every method reads the same

    quiet_import("cucim")
    import openslide
    from cucim import CuImage

    with silence_native_output():
        cu = CuImage(path)
    osl = openslide.OpenSlide(path)
    ours = {b: open_slide(path, backend=b) for b in ("cucim", "openslide", "tifffile")}

    def raw_loop(c):
        return [np.asarray(cu.read_region((int(x), int(y)), (SIZE, SIZE), 0)) for x, y in c]

    def raw_batch(c):
        it = cu.read_region(c.ravel().tolist(), (SIZE, SIZE), 0, num_workers=workers, batch_size=len(c))
        return np.asarray(next(iter(it)))

    def raw_openslide(c):
        return [np.asarray(osl.read_region((int(x), int(y)), 0, (SIZE, SIZE))) for x, y in c]

    def ours_fn(backend, k):
        return lambda c: ours[backend].read_patches(c, 0, SIZE, num_workers=k)

    methods = {
        "raw cuCIM read_region loop": raw_loop,
        f"raw cuCIM batch API ({workers} workers)": raw_batch,
        "raw OpenSlide loop (RGBA)": raw_openslide,
        "ours cucim, 1 worker": ours_fn("cucim", 1),
        f"ours cucim, {workers} workers": ours_fn("cucim", workers),
        "ours openslide, 1 worker": ours_fn("openslide", 1),
        "ours tifffile, 1 worker": ours_fn("tifffile", 1),
        f"ours tifffile, {workers} workers": ours_fn("tifffile", workers),
    }
    return {name: rate(fn, sets) for name, fn in methods.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400, help="patches per measurement")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        slides = {"generated 8192^2 JPEG TIFF": make_big_slide(os.path.join(tmp, "big.tif"))}
        if REAL.is_file():
            slides = {"cmu-1-small-region.svs": str(REAL), **slides}
        for name, path in slides.items():
            results[name] = r = bench(path, args.n, args.workers)
            print(f"\n{name}: best of 3 x {args.n} random in-tissue {SIZE} px level-0 patches, {os.cpu_count()} CPUs")
            for method, v in r.items():
                print(f"  {method:<36s} {v:8.0f} patches/s")
            raw, raw_batch = r["raw cuCIM read_region loop"], r[f"raw cuCIM batch API ({args.workers} workers)"]
            ours1, oursw = r["ours cucim, 1 worker"], r[f"ours cucim, {args.workers} workers"]
            ratios = {
                "ours/raw_cucim (1 worker vs loop)": ours1 / raw,
                f"ours/raw_cucim ({args.workers} workers vs batch API)": oursw / raw_batch,
                "ours/openslide (1 worker vs loop)": ours1 / r["raw OpenSlide loop (RGBA)"],
                f"ours/openslide ({args.workers} workers vs loop)": oursw / r["raw OpenSlide loop (RGBA)"],
            }
            for k, v in ratios.items():
                print(f"  {k:<44s} {v:5.2f}")
            r.update(ratios)
    if args.json:
        tmp_json = args.json + ".tmp"
        with open(tmp_json, "w") as f:
            json.dump(results, f, indent=2)
        os.replace(tmp_json, args.json)


if __name__ == "__main__":
    main()
