"""Benchmark of the frozen-bag pipeline (FBTA steps 1-4) in the encoder-bound setting, measured in one run.

1. Extraction throughput (issue 14, item 3): our extraction, :func:`monai_fbta.data.extraction.extract_features`
   (read every patch from the JPEG TIFF, DataLoader with ``--workers`` readers, encode, write the store), against
   the bare encoder forward (:func:`~monai_fbta.data.extraction.encode_batch`) on pre-loaded tensors of the same
   batch sizes, same threads; ``--repeats`` interleaved repeats of each, medians. The slide's coordinates are cached
   (its features are dropped before each run), so tiling is not in the time. Target: extraction >= 0.85 x bare.
2. A stage profile of the same path, serial in this process: read (JPEG decode), to tensor, normalise, forward,
   write (milliseconds per patch), to show where the time goes.
3. KMeans time on ``--kmeans-n`` x ``--kmeans-d`` Gaussian-mixture features, C = ``--clusters``; and per training
   iteration (C = ``--clusters``, M = 1): pseudo-bag sampling, reading, augmentation, a whole ``FBTADataset`` item.

Default setting: ResNet-50 truncated after layer 3 (D = 1024), 256 px patches at 0.5 um/px, batch 32, on a
generated ``--tiles`` slide (rows x cols tissue patches, kept in ``--data-dir`` between runs).

    python benchmarks/bench_frozen_pipeline.py [--workers 0 1] [--repeats 3] [--json out.json --plot out.png]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import DATA_DIR, add_common_args, finish, interleaved, median, print_ratios, print_table, ratio, start_run, tiled_slide, timed  # noqa: E402


def make_slide(path: str, size: int, seed: int = 0) -> None:
    """White margin, tissue-coloured textured square covering ~85% of the area."""
    from scipy import ndimage as ndi

    from monai_fbta.synthetic.tiff import write_pyramidal_tiff

    rng = np.random.default_rng(seed)
    low = ndi.zoom(rng.random((size // 64, size // 64, 3), dtype=np.float32), (64, 64, 1), order=1)
    pink = np.array([200, 120, 180], np.float32)
    rgb = np.clip(pink * (0.75 + 0.5 * low), 0, 255).astype(np.uint8)
    rgb ^= rng.integers(0, 24, rgb.shape, dtype=np.uint8)
    margin = int(size * 0.04)
    rgb[:margin], rgb[-margin:], rgb[:, :margin], rgb[:, -margin:] = 255, 255, 255, 255
    write_pyramidal_tiff(path, rgb, mpp=0.5)


def bare_forward(encoder: torch.nn.Module, sizes: list[int], patch: int, device, amp_dtype, channels_last: bool):
    """A call running the encoder alone on pre-loaded ``[b, 3, patch, patch]`` tensors of the batch ``sizes``."""
    from monai_fbta.networks.encode import encode_batch

    batch = torch.rand(max(sizes), 3, patch, patch)

    def run() -> None:
        for b in sizes:
            encode_batch(encoder, batch[:b], device, amp_dtype, channels_last)

    return run


def drop_features(store: str) -> None:
    """Delete the store's features (its coords stay): the next extraction re-encodes without tiling."""
    import h5py

    with h5py.File(store, "a") as f:
        if "features" in f:
            del f["features"]


def extraction(rows: list[dict[str, Any]], out: str, encoder, tiling: dict[str, Any], workers: int, args, device):
    """A call of our extraction of ``rows`` into ``out`` (coords cached, features recomputed); checks it ran."""
    from monai_fbta.data.extraction import extract_features
    from monai_fbta.data.store import store_path

    store = store_path(out, rows[0]["slide_id"])

    def run() -> None:
        if os.path.exists(store):
            drop_features(store)
        report = extract_features(rows, out, encoder, tiling, batch_size=args.batch_size, num_workers=workers,
                                  device=device, progress=False, write_report=False)
        if report.results[0].status != "done":
            raise SystemExit(f"extraction did not run: {report.results[0]}")

    return run


def stage_profile(slide: str, coords: np.ndarray, encoder, args, device, amp_dtype) -> dict[str, float]:
    """Milliseconds per patch of each stage of extraction, run one after another in this process."""
    from monai_fbta.networks.encode import encode_batch
    from monai_fbta.data.slide import open_slide
    from monai_fbta.data.store import add_arrays, write_coords
    from monai_fbta.data.slide import patches_to_tensor

    totals = dict.fromkeys(("read (decode)", "to tensor", "normalise", "forward (incl. normalise)", "write store"), 0.0)
    feats = []
    with open_slide(slide) as sl:
        sl.read_patches(coords[:2], 0, args.patch_size)
        for i in range(0, len(coords), args.batch_size):
            dt, patches = timed(lambda: sl.read_patches(coords[i : i + args.batch_size], 0, args.patch_size))
            totals["read (decode)"] += dt
            dt, x = timed(lambda: patches_to_tensor(patches, args.patch_size))
            totals["to tensor"] += dt
            totals["normalise"] += timed(lambda: (x - encoder.mean) / encoder.std)[0]
            dt, f = timed(lambda: encode_batch(encoder, x, device, amp_dtype, True))
            totals["forward (incl. normalise)"] += dt
            feats.append(f)
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "p.h5")
        write_coords(store, coords)
        totals["write store"] = timed(lambda: add_arrays(store, {"features": torch.cat(feats).numpy()}))[0]
    return {k: 1000 * v / len(coords) for k, v in totals.items()}


def bench_kmeans(n: int, d: int, c: int, method: str) -> float:
    from monai_fbta.data.clustering import cluster_features

    rng = np.random.default_rng(0)
    centers = rng.normal(size=(c, d)).astype(np.float32)
    x = (centers[rng.integers(0, c, n)] + rng.normal(scale=2.0, size=(n, d)).astype(np.float32)).astype(np.float16)
    start = time.perf_counter()
    cluster_features(x, c, seed=0, method=method)
    return time.perf_counter() - start


def iteration_costs(slide: str, store: str, out: str, rows, args) -> dict[str, float]:
    """Per training iteration (M = 1): sampling, reading, augmentation, a whole dataset item (ms, medians)."""
    from monai_fbta.data.clustering import cluster_store
    from monai_fbta.transforms.chain import FBTADataset
    from monai_fbta.data.store import read_coords
    from monai_fbta.transforms.augment import make_e2e_augmentation
    from monai_fbta.transforms.patches import ReadPatches
    from monai_fbta.transforms.pseudobag import PseudoBagSample

    res: dict[str, float] = {}
    res["slide KMeans (s)"], clusters = timed(lambda: cluster_store(store, args.clusters, seed=0))
    coords, attrs = read_coords(store)
    sampler = PseudoBagSample(1).set_random_state(0)
    reader = ReadPatches(attrs["patch_level"], attrs["patch_size_level"], args.patch_size)
    aug = make_e2e_augmentation(keys="pb_image").set_random_state(0)
    reader(slide, coords[:8])  # open the slide handle
    times: dict[str, list[float]] = {"sample": [], "read": [], "augment": []}
    for _ in range(args.iterations):
        dt, idx = timed(lambda: sampler(clusters).numpy())
        times["sample"].append(dt)
        dt, patches = timed(lambda: reader(slide, coords[idx]))
        times["read"].append(dt)
        times["augment"].append(timed(lambda: aug({"pb_image": patches}))[0])
    res.update({f"iteration: {k} (ms)": 1000 * median(v) for k, v in times.items()})
    ds = FBTADataset(rows, out, num_clusters=args.clusters)
    ds[0]
    item = []
    for epoch in range(args.iterations):
        ds.set_epoch(epoch)
        item.append(timed(lambda: ds[0])[0])
    res["iteration: whole FBTADataset item (ms)"] = 1000 * median(item)
    res["pseudo-bag size"] = float(len(idx))
    return res


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=DATA_DIR, help="the generated slide is kept here between runs")
    p.add_argument("--tiles", type=int, nargs=2, default=[24, 32], metavar=("ROWS", "COLS"), help="tissue patches")
    p.add_argument("--encoder", default="resnet50_trunc")
    p.add_argument("--patch-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="DataLoader readers (each setting measured)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats (median)")
    p.add_argument("--profile-patches", type=int, default=256)
    p.add_argument("--kmeans-n", type=int, default=50_000)
    p.add_argument("--kmeans-d", type=int, default=1024)
    p.add_argument("--clusters", type=int, default=100)
    p.add_argument("--kmeans-method", default="auto")
    p.add_argument("--iterations", type=int, default=20)
    add_common_args(p)
    args = p.parse_args(argv)
    device, info = start_run(args, f"bench_frozen_pipeline: {args.encoder} at {args.patch_size} px, batch {args.batch_size}")

    from monai_fbta.data.extraction import extract_features
    from monai_fbta.data.store import store_path
    from monai_fbta.networks.encode import prepare_encoder, resolve_amp_dtype
    from monai_fbta.data.store import read_coords
    from monai_fbta.networks.registry import build_encoder

    rows_n, cols_n = args.tiles
    slide = tiled_slide(os.path.join(args.data_dir, f"bench_{rows_n}x{cols_n}.tiff"), (rows_n, cols_n), tile=args.patch_size)
    rows = [{"image": slide, "slide_id": "pipeline", "label": 0}]
    tiling = {"patch_size": args.patch_size, "target_mpp": 0.5}
    out = tempfile.mkdtemp(prefix="fbta_pipeline_")
    torch.manual_seed(0)
    encoder = build_encoder(args.encoder)
    first_s, report = timed(lambda: extract_features(rows, out, encoder, tiling, batch_size=args.batch_size,
                                                      device=device, progress=False, write_report=False))
    n = report.results[0].n_patches  # the first run tiled the slide (and warmed up): its coords are cached from here
    amp_dtype = resolve_amp_dtype(device, True)
    enc = prepare_encoder(encoder, device, True)
    sizes = [args.batch_size] * (n // args.batch_size) + ([n % args.batch_size] if n % args.batch_size else [])
    fns = {"bare forward": bare_forward(enc, sizes, args.patch_size, device, amp_dtype, True)}
    fns.update({f"extraction, {w} reader worker(s)": extraction(rows, out, encoder, tiling, w, args, device) for w in args.workers})
    times = interleaved(fns, args.repeats, warmup=False)
    rate = {name: n / median(v) for name, v in times.items()}
    table = [{"run": name, "patches": n, "seconds": median(times[name]), "patches_per_s": r,
              "vs_bare": r / rate["bare forward"],
              "vs_bare_each_repeat": ", ".join(f"{b / e:.2f}" for b, e in zip(times["bare forward"], times[name]))}
             for name, r in rate.items()]
    print_table(f"Extraction vs bare forward ({n} patches, median of {args.repeats} interleaved)", table)
    store = store_path(out, "pipeline")
    coords = read_coords(store)[0]
    profile = stage_profile(slide, coords[: args.profile_patches], enc, args, device, amp_dtype)
    print_table("Stage profile (ms per patch, serial)", [{"stage": k, "ms_per_patch": v} for k, v in profile.items()])
    ratios = {f"{name} / bare forward": ratio(r / rate["bare forward"], ">= 0.85", r / rate["bare forward"] >= 0.85)
              for name, r in rate.items() if name != "bare forward"}
    print_ratios(ratios)
    other = {"first extraction incl. tiling (s)": first_s, "KMeans (s), " + f"{args.kmeans_n}x{args.kmeans_d} C={args.clusters}":
             bench_kmeans(args.kmeans_n, args.kmeans_d, args.clusters, args.kmeans_method)}
    other.update(iteration_costs(slide, store, out, rows, args))
    print_table("KMeans and per-iteration costs", [{"what": k, "value": v} for k, v in other.items()])
    serial = sum(v for k, v in profile.items() if k != "normalise")
    notes = [f"encoder autocast dtype {amp_dtype}; {torch.get_num_threads()} torch threads; batch {args.batch_size}; "
             f"{args.repeats} interleaved repeats; the slide's coordinates cached (tiling not timed)",
             "stage profile (serial, first {} patches): ".format(len(coords[: args.profile_patches])) + ", ".join(
                 f"{k} {v / serial:.1%}" for k, v in profile.items() if k != "normalise")
             + f" of {serial:.1f} ms per patch; normalising alone (inside forward) {profile['normalise'] / serial:.1%}"]
    payload = {"machine": info, "settings": {k: v for k, v in vars(args).items() if k not in ("json", "plot")},
               "amp_dtype": str(amp_dtype), "rows": table, "profile_ms_per_patch": profile, "other": other,
               "ratios": ratios, "times": times, "notes": notes,
               "extra_tables": {f"Stage profile (ms per patch, serial, first {args.profile_patches} patches)":
                                [{"stage": k, "ms_per_patch": v} for k, v in profile.items()],
                                "KMeans and per-iteration costs": [{"what": k, "value": v} for k, v in other.items()]}}

    def draw(ax) -> None:
        names = [r["run"].replace(", ", "\n") for r in table]
        ax.bar(names, [r["patches_per_s"] for r in table], color=["#888"] + ["#48c"] * (len(table) - 1))
        ax.axhline(0.85 * rate["bare forward"], color="k", ls="--", lw=1, label="0.85 x bare")
        ax.set(ylabel="patches / s", title=f"{args.encoder} {args.patch_size} px, batch {args.batch_size} ({device})")
        ax.legend()

    finish(args, "frozen_pipeline", payload, draw)
    return payload


if __name__ == "__main__":
    main()
