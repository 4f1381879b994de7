"""Seconds per training epoch on the same slides: vanilla frozen MIL, FBTA, and direct end-to-end
with gradient checkpointing, measured in one run.

Setup (timed and reported, not part of the epochs): ``--slides`` textured H&E-coloured slides of
``--slide-size`` px (:func:`bench_frozen_pipeline.make_slide`), tiled at ``--patch`` px and 0.5 um/px
(~1.9k patches each by default), frozen features extracted with ``--encoder`` and clustered (C).

* ``vanilla``: :class:`~monai_fbta.engines.FBTATrainer`, views ``["frozen"]``, ``frozen_bag="full"``:
  ABMIL on the cached features of every patch; no patch is read.
* ``fbta``: the same trainer with all three views, C clusters x M patches read, augmented and
  back-propagated through the trainable extractor (:class:`~monai_fbta.transforms.chain.FBTADataset`).
* ``direct_e2e_ckpt``: every patch of each slide read (:class:`~monai_fbta.transforms.ReadPatches`),
  augmented with the same augmentation, encoded by the trainable extractor with gradient
  checkpointing in chunks, ABMIL, cross-entropy, backward, AdamW step (:func:`direct_e2e_epoch`).

Each method trains ``--epochs`` epochs; seconds/epoch is the mean over the epochs after the first
(warm-up) when there are several. Prints the ratio direct-e2e / FBTA (the paper: 306 s / 27 s).

    python benchmarks/bench_epoch_time.py [--slides 8] [--encoder resnet18] [--patch 32] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    add_common_args, finish, print_ratios, print_table, ratio, start_run, timed,
)
from bench_frozen_pipeline import make_slide  # noqa: E402


def direct_e2e_epoch(
    rows: Sequence[dict], store_dir: str, encoder: torch.nn.Module, head: torch.nn.Module,
    optimizer: torch.optim.Optimizer, augment, device: torch.device, chunk: int, seed: int = 0,
) -> None:
    """One epoch of direct end-to-end MIL: per slide, ALL its patches through ``encoder`` (gradient
    checkpointing per ``chunk``) then ``head``; cross-entropy, backward, optimiser step."""
    from monai_fbta.data.store import read_coords, slide_id_of, store_path
    from monai_fbta.engines.trainer import mil_logits
    from monai_fbta.networks.encode import encode_patches
    from monai_fbta.transforms.patches import ReadPatches

    reader = ReadPatches()
    encoder.train()
    head.train()
    for i, row in enumerate(rows):
        coords, attrs = read_coords(store_path(store_dir, slide_id_of(row)))
        patches = reader(row["image"], coords, int(attrs["patch_level"]), int(attrs["patch_size_level"]),
                         int(attrs["patch_size"]))
        augment.set_random_state(seed + i)
        images = augment({"pb_image": patches})["pb_image"].to(device)
        optimizer.zero_grad(set_to_none=True)
        feats = encode_patches(encoder, images, chunk, grad_checkpointing=True)
        logits = mil_logits(head, feats.unsqueeze(0))
        torch.nn.functional.cross_entropy(logits, torch.tensor([int(row["label"])], device=device)).backward()
        optimizer.step()


def _epoch_seconds(times: list[float]) -> float:
    return statistics.mean(times[1:]) if len(times) > 1 else times[0]


def _train_trainer(rows, store_dir, views, args, frozen, device) -> list[float]:
    """Per-epoch seconds of :class:`FBTATrainer` (vanilla when ``views == ["frozen"]``)."""
    from ignite.engine import Events
    from torch.utils.data import DataLoader

    from monai_fbta.transforms.chain import FBTADataset
    from monai_fbta.engines import FBTALoss, FBTATrainer
    from monai_fbta.engines.trainer import fbta_param_groups
    from monai_fbta.networks.encoder import copy_trainable
    from monai_fbta.networks.registry import build_mil_head, build_translator

    vanilla = list(views) == ["frozen"]
    ds = FBTADataset(rows, store_dir, num_per_cluster=args.m, num_clusters=args.clusters, load_patches=not vanilla)
    loader = DataLoader(ds, batch_size=None, shuffle=True, num_workers=args.workers)
    head = build_mil_head("abmil", in_features=args.dim, num_classes=2).to(device)
    translator = None if vanilla else build_translator(in_features=args.dim).to(device)
    encoder = None if vanilla else copy_trainable(frozen).to(device)
    opt = torch.optim.AdamW(fbta_param_groups(head, translator, encoder))
    trainer = FBTATrainer(device, args.epochs, loader, head, opt, FBTALoss(views=views), translator=translator,
                          trainable_encoder=encoder, frozen_bag="full" if vanilla else "pseudo",
                          encoder_chunk_size=args.chunk)
    times: list[float] = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: setattr(e, "_t0", time.perf_counter()))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: times.append(time.perf_counter() - e._t0))
    trainer.run()
    return times


def _train_direct(rows, store_dir, args, frozen, device) -> list[float]:
    from monai_fbta.networks.encoder import copy_trainable
    from monai_fbta.networks.registry import build_mil_head
    from monai_fbta.transforms.augment import make_e2e_augmentation

    encoder = copy_trainable(frozen).to(device)
    head = build_mil_head("abmil", in_features=args.dim, num_classes=2).to(device)
    opt = torch.optim.AdamW([*encoder.parameters(), *head.parameters()], lr=1e-5)
    augment = make_e2e_augmentation(keys="pb_image")
    times = []
    for epoch in range(args.epochs):
        seconds, _ = timed(lambda: direct_e2e_epoch(rows, store_dir, encoder, head, opt, augment, device, args.chunk,
                                                     seed=epoch * 1000), device)
        times.append(seconds)
    return times


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slides", type=int, default=8)
    p.add_argument("--slide-size", type=int, default=1536, help="px; 1536 at 32 px patches ~ 1.9k patches")
    p.add_argument("--patch", type=int, default=32)
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--clusters", type=int, default=100, help="C")
    p.add_argument("--m", type=int, default=1, help="M patches per cluster")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--chunk", type=int, default=256, help="encoder chunk / checkpoint segment")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers of the trainer runs")
    p.add_argument("--methods", nargs="+", default=["vanilla", "fbta", "direct_e2e_ckpt"])
    p.add_argument("--workdir", help="keep slides and stores here (default: a temp dir)")
    add_common_args(p)
    args = p.parse_args(argv)
    device, info = start_run(args, f"bench_epoch_time: {args.slides} slides, {args.encoder} at {args.patch} px")

    from monai_fbta.data.clustering import cluster_store
    from monai_fbta.data.extraction import extract_features
    from monai_fbta.data.store import slide_id_of, store_path
    from monai_fbta.networks.encoder import copy_frozen
    from monai_fbta.networks.registry import build_encoder

    tmp = None if args.workdir else tempfile.TemporaryDirectory(prefix="fbta_epoch_")
    work = args.workdir or tmp.name
    os.makedirs(work, exist_ok=True)
    setup: dict[str, float] = {}
    rows = []
    t = time.perf_counter()
    for i in range(args.slides):
        path = os.path.join(work, f"slide_{i:02d}.tiff")
        if not os.path.isfile(path):
            make_slide(path, args.slide_size, seed=i)
        rows.append({"image": path, "slide_id": f"slide_{i:02d}", "label": i % 2})
    setup["write_slides_s"] = time.perf_counter() - t
    torch.manual_seed(0)
    frozen = copy_frozen(build_encoder(args.encoder))
    store_dir = os.path.join(work, "stores")
    t = time.perf_counter()
    report = extract_features(rows, store_dir, frozen, {"patch_size": args.patch, "target_mpp": 0.5},
                              batch_size=256, device=device, progress=False, write_report=False, skip_errors=False)
    setup["extract_features_s"] = time.perf_counter() - t
    n_patches = [r.n_patches for r in report.results]
    t = time.perf_counter()
    for row in rows:
        cluster_store(store_path(store_dir, slide_id_of(row)), args.clusters, seed=0)
    setup["clustering_s"] = time.perf_counter() - t
    with torch.no_grad():
        args.dim = int(frozen(torch.rand(1, 3, args.patch, args.patch)).shape[-1])
    print(f"setup: {sum(n_patches)} patches ({min(n_patches)}-{max(n_patches)} per slide); "
          + ", ".join(f"{k} {v:.1f}" for k, v in setup.items()), flush=True)

    results = []
    for method in args.methods:
        torch.manual_seed(0)
        if method == "vanilla":
            times = _train_trainer(rows, store_dir, ["frozen"], args, frozen, device)
        elif method == "fbta":
            times = _train_trainer(rows, store_dir, ["frozen", "e2e", "translated"], args, frozen, device)
        elif method == "direct_e2e_ckpt":
            times = _train_direct(rows, store_dir, args, frozen, device)
        else:
            raise SystemExit(f"unknown method {method!r}: choose from vanilla, fbta, direct_e2e_ckpt")
        patches = {"vanilla": 0, "fbta": sum(min(n, args.clusters * args.m) for n in n_patches)}.get(method, sum(n_patches))
        results.append({"method": method, "s_per_epoch": _epoch_seconds(times), "epoch_times_s": times,
                        "patches_through_extractor_per_epoch": patches})
        print(f"  {method:<16s} {results[-1]['s_per_epoch']:.2f} s/epoch  (epochs: "
              + ", ".join(f"{x:.2f}" for x in times) + ")", flush=True)
    if tmp is not None:
        tmp.cleanup()

    print_table("Seconds per epoch", results, ["method", "s_per_epoch", "patches_through_extractor_per_epoch"])
    by = {r["method"]: r["s_per_epoch"] for r in results}
    ratios = {}
    if "fbta" in by and "direct_e2e_ckpt" in by:
        v = by["direct_e2e_ckpt"] / by["fbta"]
        ratios["direct_e2e_ckpt / fbta (s per epoch)"] = ratio(v, "> 1 (paper 306/27 = 11.3)", v > 1)
    if "fbta" in by and "vanilla" in by:
        ratios["fbta / vanilla (s per epoch)"] = ratio(by["fbta"] / by["vanilla"], "-", None)
    print_ratios(ratios)
    payload = {"machine": info, "settings": {k: v for k, v in vars(args).items() if k not in ("json", "plot")},
               "setup_s": setup, "patches_per_slide": n_patches, "rows": results, "ratios": ratios}

    def draw(ax) -> None:
        ax.bar([r["method"] for r in results], [r["s_per_epoch"] for r in results], color=["#999", "#c44", "#48c"][: len(results)])
        ax.set(ylabel="seconds per epoch", yscale="log",
               title=f"{args.slides} slides x ~{int(np.mean(n_patches))} patches, {args.encoder} {args.patch} px, {device}")

    finish(args, "epoch_time", payload, draw)
    return payload


if __name__ == "__main__":
    main()
