"""Benchmark of the frozen-bag pipeline (FBTA steps 1-4), all figures measured in one run.

1. Extraction throughput on one generated slide (patches/s, tiling time excluded) against the
   bare encoder forward on in-memory tensors (same batch size, autocast dtype, channels_last):
   the ratio says how close the DataLoader keeps the model to never waiting on I/O (target >= 0.85).
2. KMeans time on ``--kmeans-n`` x ``--kmeans-d`` Gaussian-mixture features, C = ``--clusters``.
3. Per training iteration (C = 100, M = 1): pseudo-bag sampling, patch reading, augmentation, and
   a whole ``FBTADataset`` item.

The slide is a cheap H&E-coloured texture (not the realistic generator, for speed) written with
``write_pyramidal_tiff``: ``--slide-size`` px square at 0.5 um/px with a white margin; with 64 px
patches at 0.5 um/px the default 10240 px slide holds ~21k tissue patches.

    python benchmarks/bench_frozen_pipeline.py [--encoder resnet18] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch


def make_slide(path: str, size: int, seed: int = 0) -> None:
    """White margin, tissue-coloured textured square covering ~85% of the area."""
    from scipy import ndimage as ndi

    from monai_fbta.synthetic import write_pyramidal_tiff

    rng = np.random.default_rng(seed)
    low = ndi.zoom(rng.random((size // 64, size // 64, 3), dtype=np.float32), (64, 64, 1), order=1)
    pink = np.array([200, 120, 180], np.float32)
    rgb = np.clip(pink * (0.75 + 0.5 * low), 0, 255).astype(np.uint8)
    rgb ^= rng.integers(0, 24, rgb.shape, dtype=np.uint8)
    margin = int(size * 0.04)
    rgb[:margin], rgb[-margin:], rgb[:, :margin], rgb[:, -margin:] = 255, 255, 255, 255
    write_pyramidal_tiff(path, rgb, mpp=0.5)


def bare_forward(encoder, batch_size: int, patch: int, n: int, device, amp_dtype, channels_last: bool) -> float:
    """Patches/s of the encoder alone on an in-memory batch (after 2 warm-up batches)."""
    from monai_fbta.networks.encode import encode_batch

    x = torch.rand(batch_size, 3, patch, patch)
    for _ in range(2):
        encode_batch(encoder, x, device, amp_dtype, channels_last)
    steps = max(1, n // batch_size)
    start = time.perf_counter()
    for _ in range(steps):
        encode_batch(encoder, x, device, amp_dtype, channels_last)
    return steps * batch_size / (time.perf_counter() - start)


def bench_kmeans(n: int, d: int, c: int, method: str) -> float:
    from monai_fbta.data.clustering import cluster_features

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(c, d)).astype(np.float32)
    x = (centers[rng.integers(0, c, n)] + rng.normal(scale=2.0, size=(n, d)).astype(np.float32)).astype(np.float16)
    start = time.perf_counter()
    cluster_features(x, c, seed=0, method=method)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--slide-size", type=int, default=10240)
    p.add_argument("--patch-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--kmeans-n", type=int, default=50_000)
    p.add_argument("--kmeans-d", type=int, default=1024)
    p.add_argument("--clusters", type=int, default=100)
    p.add_argument("--kmeans-method", default="auto")
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--workdir", default=None, help="keep the slide/stores here (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from monai_fbta.data.clustering import cluster_store
    from monai_fbta.transforms.chain import FBTADataset
    from monai_fbta.data.extraction import extract_features
    from monai_fbta.networks.encode import prepare_encoder, resolve_amp_dtype
    from monai_fbta.data.store import read_array, read_coords
    from monai_fbta.data.tiling import tile_slide
    from monai_fbta.networks.registry import build_encoder
    from monai_fbta.transforms.augment import make_e2e_augmentation
    from monai_fbta.transforms.patches import ReadPatches
    from monai_fbta.transforms.pseudobag import PseudoBagSample

    work = args.workdir or tempfile.mkdtemp(prefix="fbta_bench_")
    os.makedirs(work, exist_ok=True)
    slide = os.path.join(work, "bench_slide.tiff")
    res: dict[str, float | int | str] = {"encoder": args.encoder, "patch_size": args.patch_size, "batch_size": args.batch_size,
                                         "num_workers": args.num_workers, "torch_threads": torch.get_num_threads()}
    t = time.perf_counter()
    if not os.path.isfile(slide):
        make_slide(slide, args.slide_size)
    res["slide_write_s"] = time.perf_counter() - t

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiling = {"patch_size": args.patch_size, "target_mpp": 0.5}
    rows = [{"image": slide, "label": 0}]
    out = os.path.join(work, "stores")
    kw = dict(batch_size=args.batch_size, num_workers=args.num_workers, device=device, progress=False, write_report=False)
    h5 = os.path.join(out, "bench_slide.h5")
    if os.path.exists(h5):  # a kept workdir: extract again, never measure a skip
        os.remove(h5)
    t = time.perf_counter()
    tile_slide(slide, **tiling)
    res["tiling_s"] = time.perf_counter() - t
    torch.manual_seed(0)
    encoder = build_encoder(args.encoder)
    result = extract_features(rows, out, encoder, tiling, **kw).results[0]
    n = result.n_patches
    res["n_patches"] = n
    res["extract_total_s"] = result.seconds
    # extraction proper = the run minus its tiling (timed just above on the same slide)
    res["extract_patches_per_s"] = n / max(1e-9, result.seconds - res["tiling_s"])
    amp_dtype = resolve_amp_dtype(device, True)
    res["amp_dtype"] = str(amp_dtype)
    enc = prepare_encoder(encoder, device, True)
    res["bare_forward_patches_per_s"] = bare_forward(enc, args.batch_size, args.patch_size, min(n, 4096), device, amp_dtype, True)
    res["extract_over_forward"] = res["extract_patches_per_s"] / res["bare_forward_patches_per_s"]

    res["kmeans_s"] = bench_kmeans(args.kmeans_n, args.kmeans_d, args.clusters, args.kmeans_method)
    res["kmeans_shape"] = f"{args.kmeans_n}x{args.kmeans_d} C={args.clusters} ({args.kmeans_method})"

    t = time.perf_counter()
    clusters = cluster_store(h5, args.clusters, seed=0)
    res["slide_kmeans_s"] = time.perf_counter() - t
    coords, attrs = read_coords(h5)
    sampler = PseudoBagSample(1).set_random_state(0)
    reader = ReadPatches(attrs["patch_level"], attrs["patch_size_level"], args.patch_size)
    aug = make_e2e_augmentation(keys="pb_image").set_random_state(0)
    reader(slide, coords[:8])  # open the slide handle
    timings = {"sample": [], "read": [], "augment": []}
    for _ in range(args.iterations):
        t0 = time.perf_counter()
        idx = sampler(clusters).numpy()
        t1 = time.perf_counter()
        patches = reader(slide, coords[idx])
        t2 = time.perf_counter()
        aug({"pb_image": patches})
        t3 = time.perf_counter()
        for key, dt in zip(timings, (t1 - t0, t2 - t1, t3 - t2)):
            timings[key].append(dt)
    for key, values in timings.items():
        res[f"iter_{key}_ms"] = 1000 * float(np.median(values))
    res["pseudo_bag_size"] = int(len(idx))
    ds = FBTADataset(rows, out, num_clusters=args.clusters)
    ds[0]
    t = time.perf_counter()
    for epoch in range(args.iterations):
        ds.set_epoch(epoch)
        ds[0]
    res["dataset_item_ms"] = 1000 * (time.perf_counter() - t) / args.iterations
    res["features_shape"] = str(read_array(h5, "features").shape)

    if args.json:
        print(json.dumps(res, indent=2))
        return
    width = max(map(len, res))
    for key, value in res.items():
        print(f"{key.ljust(width)}  {value:.3f}" if isinstance(value, float) else f"{key.ljust(width)}  {value}")


if __name__ == "__main__":
    main()
