"""Slide inference time: translating cached frozen features (FBTA, ``y = f*_MIL(f_T(F^FB))``) vs
re-extracting the features with the trainable encoder end to end, measured in one run.

* ``translate``: read the ``[N, D]`` fp16 features of an ``--n`` patch slide from its HDF5 store,
  translator + ABMIL (:class:`monai_fbta.networks.TranslatedMIL`, with attention); median of ``--repeats``.
* ``reextract``: read ``--subset`` patches of ``--patch`` px from a generated pyramidal TIFF with the
  extraction DataLoader (:class:`~monai_fbta.data.extraction.PatchBatches`, ``--workers``), encode
  them (``encode_batch``: inference mode, channels_last, bf16 autocast where the CPU has it), then
  ABMIL on the bag. Timed on the subset and **scaled linearly** to ``--n`` patches (reported as such)
  when ``--subset < --n``.

The features are random (the translation cost does not depend on their values); the slide is the
cheap textured slide of :func:`bench_frozen_pipeline.make_slide`, just big enough for the subset.

    python benchmarks/bench_inference.py [--n 20000] [--subset 1000] [--encoder resnet18] [--json out.json]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import add_common_args, finish, print_ratios, print_table, ratio, start_run, timed  # noqa: E402
from bench_frozen_pipeline import make_slide  # noqa: E402


def translate_time(store: str, head: torch.nn.Module, translator: torch.nn.Module, device: torch.device) -> float:
    """Seconds to load the cached features of ``store`` and predict with translation (one slide)."""
    from monai_fbta.data.store import read_array
    from monai_fbta.networks import TranslatedMIL

    network = TranslatedMIL(head, translator).to(device).eval()

    def run() -> None:
        feats = torch.from_numpy(read_array(store, "features")).to(device)
        with torch.no_grad():
            probs, attention = network(feats[None], return_attention=True)
        probs.cpu(), attention.cpu()

    return timed(run, device)[0]


def reextract_time(slide: str, coords: np.ndarray, patch: int, encoder: torch.nn.Module, head: torch.nn.Module,
                   device: torch.device, batch_size: int, workers: int) -> float:
    """Seconds to read ``coords`` patches from ``slide``, encode them and run ``head`` on the bag."""
    from torch.utils.data import DataLoader

    from monai_fbta.data.extraction import PatchBatches
    from monai_fbta.networks.encode import encode_batch, prepare_encoder, resolve_amp_dtype

    amp_dtype = resolve_amp_dtype(device, True)
    enc = prepare_encoder(encoder, device, channels_last=True)
    batches = PatchBatches(slide, coords, 0, patch, patch, batch_size)

    def run() -> None:
        loader = DataLoader(batches, batch_size=None, num_workers=workers)
        feats = []
        for x in loader:
            if isinstance(x, dict):
                raise RuntimeError(f"{slide}: {x['error']}")
            feats.append(encode_batch(enc, x, device, amp_dtype, True))
        with torch.no_grad():
            head(torch.cat(feats).unsqueeze(0).to(device))

    return timed(run, device)[0]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=20000, help="patches of the slide")
    p.add_argument("--subset", type=int, default=1000, help="patches actually re-extracted (scaled to --n)")
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--patch", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers for patch reading")
    p.add_argument("--repeats", type=int, default=5, help="translation repeats (median)")
    add_common_args(p)
    args = p.parse_args(argv)
    device, info = start_run(args, f"bench_inference: N={args.n}, {args.encoder} at {args.patch} px")

    from monai_fbta.data.store import write_coords, add_arrays
    from monai_fbta.data.tiling import tile_slide
    from monai_fbta.networks.registry import build_encoder, build_mil_head, build_translator

    torch.manual_seed(0)
    encoder = build_encoder(args.encoder)
    with torch.no_grad():
        dim = int(encoder.eval()(torch.rand(1, 3, args.patch, args.patch)).shape[-1])
    head = build_mil_head("abmil", in_features=dim, num_classes=2).to(device).eval()
    translator = build_translator(in_features=dim).to(device).eval()
    subset = min(args.subset, args.n)
    with tempfile.TemporaryDirectory(prefix="fbta_infer_") as work:
        side = math.ceil(math.sqrt(subset / 0.75)) * args.patch + 2 * args.patch
        slide = os.path.join(work, "slide.tiff")
        t = time.perf_counter()
        make_slide(slide, side)
        coords, _ = tile_slide(slide, patch_size=args.patch, target_mpp=0.5)
        setup_s = time.perf_counter() - t
        coords = coords[:subset]

        store = os.path.join(work, "slide.h5")
        rng = np.random.default_rng(0)
        write_coords(store, rng.integers(0, 100_000, (args.n, 2)).astype(np.int64), {"patch_size": args.patch})
        add_arrays(store, {"features": rng.standard_normal((args.n, dim), dtype=np.float32)})

        translate_time(store, head, translator, device)  # warm-up
        t_tr = statistics.median(translate_time(store, head, translator, device) for _ in range(args.repeats))
        reextract_time(slide, coords[: args.batch_size], args.patch, encoder, head, device, args.batch_size, 0)  # warm-up
        t_sub = reextract_time(slide, coords, args.patch, encoder, head, device, args.batch_size, args.workers)

    scaled = len(coords) < args.n
    t_re = t_sub * args.n / len(coords)
    rows = [
        {"method": "translate cached features", "patches": args.n, "seconds": t_tr, "source": "measured"},
        {"method": "re-extract (read + encode + ABMIL)", "patches": len(coords), "seconds": t_sub, "source": "measured"},
        {"method": "re-extract (read + encode + ABMIL)", "patches": args.n, "seconds": t_re,
         "source": f"scaled from {len(coords)}" if scaled else "measured"},
    ]
    print(f"setup (slide write + tiling, not timed below): {setup_s:.1f} s")
    print_table(f"Inference on one {args.n}-patch slide", rows)
    v = t_re / t_tr
    ratios = {f"reextract/translate at N={args.n}" + (" (re-extraction scaled)" if scaled else ""): ratio(v, ">= 200", v >= 200)}
    print_ratios(ratios)
    payload = {"machine": info, "settings": {k: v for k, v in vars(args).items() if k not in ("json", "plot")},
               "dim": dim, "rows": rows, "ratios": ratios, "reextract_patches_per_s": len(coords) / t_sub}

    def draw(ax) -> None:
        ax.bar(["translate\n(cached features)", "re-extract\n" + ("(scaled)" if scaled else "")], [t_tr, t_re],
               color=["#c44", "#48c"])
        ax.set(yscale="log", ylabel=f"seconds per {args.n}-patch slide", title=f"{args.encoder} {args.patch} px, {device}")

    finish(args, "inference", payload, draw)
    return payload


if __name__ == "__main__":
    main()
