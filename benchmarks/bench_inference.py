"""Slide inference at the paper's setting: translating cached frozen features (FBTA, ``y = f*_MIL(f_T(F^FB))``) vs
re-extracting the features from the slide file, both measured in one run on the same slide; and the time of
inference + heatmap per slide from cached features (issue 14, items 2 and 4).

Setting: ResNet-50 truncated after layer 3 (D = 1024, random weights: the cost does not depend on them), 256 px
patches at 0.5 um/px, a K = 10 translator (hidden = D, its MLPs at full scale rather than the near-identity
initialisation, so the bf16 check is not flattered) and an ABMIL head, saved as a bundle ``model.pt``. Wall and CPU seconds (CPU: this process and its
DataLoader workers) are both recorded.

* ``re-extract``: every patch of the ``--reextract-tiles`` slide (rows x cols tissue patches; >= 10,000 for the
  target) read from the JPEG TIFF by our extraction loader (:class:`~monai_fbta.data.extraction.PatchBatches`
  through :func:`~monai_fbta.data.extraction.patch_loader`, ``--workers`` reader processes) and encoded by
  :func:`~monai_fbta.data.extraction.encode_batch` (inference mode, channels_last, bf16 autocast where the CPU
  has it), then the ABMIL head on the bag. The coordinates are cached on both sides (tiling timed apart).
* ``translate``: the same slide's cached features through bundle inference's evaluator
  (:func:`monai_fbta.pipeline.infer.inference_evaluator`: load coords + features,
  :class:`~monai_fbta.networks.TranslatedMIL`), float32 and with
  ``--translator-dtype`` (bf16). One repeat of each runs every ``--interleave-every`` re-extraction batches
  while the re-extraction's clock is stopped (load drift hits both sides alike); medians.
* ``heatmap``: a ``--heatmap-tiles`` slide (>= 20,000 patches; random fp16 features in its store) through
  the evaluator with the heatmap PNG and the attention CSV/GeoJSON writers as handlers, as bundle inference runs it.

The bf16 translator's probabilities and attention are compared with float32 on both slides; the ratio's target
counts as met only when the predicted class is the same and ``max |dprob| <= --tolerance``.

    python benchmarks/bench_inference.py [--data-dir DIR] [--reextract-tiles 101 100]
        [--heatmap-tiles 101 200] [--workers 1] [--interleave-every 30] [--json out.json --plot out.png]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    DATA_DIR, add_common_args, finish, interleaved, machine_info, median, print_ratios, print_table, ratio, start_run, tiled_slide,
    timed_cpu,
)

CLASSES = ["a", "b"]


def make_model(models: str, encoder: str, tiling: dict[str, Any], heads: int, head: str) -> tuple[str, torch.nn.Module]:
    """A bundle ``model.pt`` (random weights; translator MLPs at full scale) and its frozen encoder."""
    from monai_fbta.handlers.checkpoint import save_inference_model
    from monai_fbta.networks import FeatureTranslator, build_mil_head
    from monai_fbta.pipeline.prepare import frozen_encoder
    from monai_fbta.handlers.checkpoint import model_metadata

    torch.manual_seed(0)
    enc = frozen_encoder(encoder, None, models)
    dim = enc.out_features
    meta = model_metadata(head, dim, len(CLASSES), CLASSES, ["frozen", "translated"], encoder, enc.weights_file, tiling,
                          512, heads)
    path = os.path.join(models, "model.pt")
    save_inference_model(path, build_mil_head(head, in_features=dim, num_classes=len(CLASSES)),
                         FeatureTranslator(dim, num_heads=heads, init_scale=1.0), meta)
    return path, enc


def write_store(store: str, coords: np.ndarray, attrs: dict[str, Any], features: np.ndarray | None, dim: int) -> None:
    """A feature store of ``coords`` with ``features`` (``None``: random fp16; the translation cost does not depend on them)."""
    from monai_fbta.data.store import add_arrays, write_coords

    if features is None:
        features = np.random.default_rng(0).standard_normal((len(coords), dim), dtype=np.float32)
    os.makedirs(os.path.dirname(store), exist_ok=True)
    write_coords(store, coords, attrs)
    add_arrays(store, {"features": np.asarray(features)})


def mil_on(network: torch.nn.Module, features: torch.Tensor, device: torch.device) -> None:
    """The re-extraction side's MIL: the head on the fresh features, without translation."""
    with torch.no_grad():
        network(features[None].to(device), return_attention=True, translate=False)


def reextract(slide: str, coords: np.ndarray, attrs: dict[str, Any], encoder: torch.nn.Module, network, args, device,
              pause: Callable[[], None]) -> tuple[dict[str, float], torch.Tensor]:
    """Re-extract every patch of ``slide`` (read from the file by our extraction loader, encode), then ABMIL on the bag.

    Timed batch by batch (wall and CPU seconds); every ``--interleave-every`` batches the clock stops and ``pause()``
    runs (one repeat of each translation timing), so load drift on the machine hits both sides alike. The DataLoader
    workers' CPU time is counted when they end, inside the timed part. Returns the times and the features.
    """
    from monai_fbta.data.extraction import PatchBatches, patch_loader
    from monai_fbta.networks.encode import encode_batch, prepare_encoder, resolve_amp_dtype

    amp_dtype = resolve_amp_dtype(device, True)
    enc = prepare_encoder(encoder, device, channels_last=True)
    batches = PatchBatches(slide, coords, int(attrs["patch_level"]), int(attrs["patch_size_level"]), int(attrs["patch_size"]),
                           args.batch_size)
    encode_batch(enc, torch.rand(2, 3, attrs["patch_size"], attrs["patch_size"]), device, amp_dtype, True)  # warm-up
    wall, cpu, feats = 0.0, 0.0, []

    def step(it) -> bool:
        try:
            x = next(it)
        except StopIteration:
            return False
        if isinstance(x, dict):
            raise SystemExit(f"re-extraction: reading {slide} failed: {x.get('error', x)}")
        feats.append(encode_batch(enc, x, device, amp_dtype, True))
        return True

    w, c, it = timed_cpu(lambda: iter(patch_loader(batches, args.workers, device)))
    wall, cpu = wall + w, cpu + c
    for i in range(len(batches) + 1):
        w, c, more = timed_cpu(lambda: step(it))
        wall, cpu = wall + w, cpu + c
        if not more:
            break
        if args.interleave_every and (i + 1) % args.interleave_every == 0:
            pause()
    features = torch.cat(feats)
    w, c, _ = timed_cpu(lambda: mil_on(network, features, device))
    return {"read_encode_s": wall, "read_encode_cpu_s": cpu, "mil_s": w, "mil_cpu_s": c, "n": len(features)}, features


def agreement(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """How far two predictions of one slide are apart (probabilities; same class)."""
    return {"max_abs_dprob": float(np.max(np.abs(np.subtract(a["probs"], b["probs"])))), "same_class": a["pred"] == b["pred"]}


def predictor(network, store: str, row: dict[str, Any], device, writers: Sequence[Any] = ()) -> Callable[[], dict]:
    """One slide through bundle inference's evaluator (:func:`monai_fbta.pipeline.infer.inference_evaluator`: load
    coords + features, :class:`~monai_fbta.networks.TranslatedMIL`, ``writers`` as its handlers); returns its record."""
    from monai_fbta.pipeline.infer import inference_evaluator

    row = dict(row, slide_id=os.path.splitext(os.path.basename(store))[0])
    evaluator = inference_evaluator(network, [row], os.path.dirname(store), device, writers)

    def run() -> dict:
        evaluator.run()
        return evaluator.state.predictions[0]

    return run


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=DATA_DIR, help="generated slides are kept here between runs")
    p.add_argument("--workdir", default=None, help="model, caches and outputs (default: a temp dir)")
    p.add_argument("--reextract-tiles", type=int, nargs=2, default=[101, 100], metavar=("ROWS", "COLS"))
    p.add_argument("--heatmap-tiles", type=int, nargs=2, default=[101, 200], metavar=("ROWS", "COLS"))
    p.add_argument("--encoder", default="resnet50_trunc")
    p.add_argument("--patch", type=int, default=256)
    p.add_argument("--heads", type=int, default=10, help="translator heads K")
    p.add_argument("--head", default="abmil")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=1, help="DataLoader readers of the re-extraction")
    p.add_argument("--repeats", type=int, default=5, help="interleaved repeats of the heatmap timings (median)")
    p.add_argument("--interleave-every", type=int, default=30, help="re-extraction batches between translation repeats")
    p.add_argument("--translator-dtype", default="bfloat16")
    p.add_argument("--tolerance", type=float, default=1e-2, help="max |dprob| of the low-precision translator")
    add_common_args(p)
    args = p.parse_args(argv)
    device, info = start_run(args, f"bench_inference: {args.encoder} at {args.patch} px, K={args.heads}, {args.head}")
    from monai_fbta.handlers.attention import AttentionWriter
    from monai_fbta.handlers.heatmap import HeatmapWriter
    from monai_fbta.handlers.checkpoint import build_inference_network

    tiling = {"patch_size": args.patch, "target_mpp": 0.5}
    slides = {k: tiled_slide(os.path.join(args.data_dir, f"bench_{r}x{c}.tiff"), (r, c), tile=args.patch)
              for k, (r, c) in (("re", args.reextract_tiles), ("hm", args.heatmap_tiles))}
    rows = {k: {"slide_id": f"bench_{k}", "image": path} for k, path in slides.items()}
    work = args.workdir or tempfile.mkdtemp(prefix="fbta_infer_")
    model, encoder = make_model(os.path.join(work, "models"), args.encoder, tiling, args.heads, args.head)
    nets = {"fp32": build_inference_network(model, device),
            args.translator_dtype: build_inference_network(model, device, translator_dtype=args.translator_dtype)}
    low = args.translator_dtype
    from monai_fbta.data.tiling import tile_slide

    tiles = {k: timed_cpu(lambda: tile_slide(slides[k], **tiling)) for k in rows}  # untimed below: coords are cached
    stores = {k: os.path.join(work, "cache", f"bench_{k}.h5") for k in rows}
    for k, (_, _, (coords, attrs)) in tiles.items():
        write_store(stores[k], coords, attrs, None, encoder.out_features)
    n_hm = len(tiles["hm"][2][0])
    out = os.path.join(work, "out")
    writers = (HeatmapWriter(os.path.join(out, "heatmaps")), AttentionWriter(os.path.join(out, "attention")))
    hm_fns = {f"{name} + heatmap + attention maps": predictor(net, stores["hm"], rows["hm"], device, writers)
              for name, net in nets.items()}
    hm_fns[f"{low}, no writers"] = predictor(nets[low], stores["hm"], rows["hm"], device)
    half = max(1, args.repeats // 2)
    hm_times = interleaved(hm_fns, half)  # before the long re-extraction ...

    tr_fns = {name: predictor(net, stores["re"], rows["re"], device) for name, net in nets.items()}
    cpu: dict[str, list[float]] = {}
    tr_times = interleaved(tr_fns, 1, cpu=cpu)  # warm-up + one repeat; then one repeat per pause of the re-extraction

    def pause() -> None:
        for name, values in interleaved(tr_fns, 1, warmup=False, cpu=cpu).items():
            tr_times[name] += values

    coords, attrs = tiles["re"][2]
    re, features = reextract(slides["re"], coords, attrs, encoder, nets["fp32"], args, device, pause)
    re.update(tiling_s=tiles["re"][0], tiling_cpu_s=tiles["re"][1])
    for name, values in interleaved(hm_fns, args.repeats - half, warmup=False).items():  # ... and after it
        hm_times[name] += values
    real = os.path.join(work, "cache", "bench_re_features.h5")  # the agreement check on the re-extracted features
    write_store(real, coords, attrs, features.numpy(), encoder.out_features)
    checks = {"re": agreement(predictor(nets["fp32"], real, rows["re"], device)(), predictor(nets[low], real, rows["re"], device)()),
              "hm": agreement(hm_fns[next(iter(hm_fns))](), hm_fns[f"{low}, no writers"]())}
    return report(args, info, device, re, tr_times, hm_times, checks, n_hm, low, cpu, encoder.out_features)


def report(args, info, device, re, tr_times, hm_times, checks, n_hm, low, cpu, dim) -> dict:
    """Print and write the tables and ratios of one run."""
    n_re = re["n"]
    reextract_s = re["read_encode_s"] + re["mil_s"]
    reextract_cpu = re["read_encode_cpu_s"] + re["mil_cpu_s"]
    tr = {name: median(v) for name, v in tr_times.items()}
    tr_cpu = {name: median(v) for name, v in cpu.items()}
    hm = {name: median(v) for name, v in hm_times.items()}
    rows = [
        {"method": "re-extract: read + encode (our extraction loader)", "patches": n_re, "seconds": re["read_encode_s"],
         "cpu_s": re["read_encode_cpu_s"]},
        {"method": "re-extract: ABMIL on the new features", "patches": n_re, "seconds": re["mil_s"], "cpu_s": re["mil_cpu_s"]},
        {"method": "re-extract: read + encode + MIL", "patches": n_re, "seconds": reextract_s, "cpu_s": reextract_cpu},
        {"method": "(not in either side: tiling, the coords being cached)", "patches": n_re, "seconds": re["tiling_s"],
         "cpu_s": re["tiling_cpu_s"]},
        *({"method": f"translate cached features ({name}): load + f_T + ABMIL", "patches": n_re, "seconds": s,
           "cpu_s": tr_cpu[name]} for name, s in tr.items()),
        *({"method": f"inference from cache, {name}", "patches": n_hm, "seconds": s} for name, s in hm.items()),
    ]
    print_table(f"Inference, {args.encoder} {args.patch} px, K={args.heads} (median of {args.repeats} where repeated)", rows)
    ok = all(c["same_class"] and c["max_abs_dprob"] <= args.tolerance for c in checks.values())
    worst = max(c["max_abs_dprob"] for c in checks.values())
    ratios = {
        f"re-extract / translate ({low} f_T) at N={n_re}": ratio(reextract_s / tr[low], ">= 200 (N >= 10,000)",
                                                                  reextract_s / tr[low] >= 200 and ok and n_re >= 10000),
        f"re-extract / translate (fp32 f_T) at N={n_re}": ratio(reextract_s / tr["fp32"], "-", None),
        f"the same in CPU seconds ({low} f_T; less sensitive to other jobs)": ratio(reextract_cpu / tr_cpu[low], "-", None),
        f"{low} f_T: max |dprob| vs fp32 (both slides; same class: {ok})": ratio(worst, f"<= {args.tolerance:g}", ok),
        f"heatmap from cache at N={n_hm} ({low}), seconds": ratio(hm[f"{low} + heatmap + attention maps"], "-", None),
        f"re-extract at N={n_re} / heatmap from cache at N={n_hm}":
            ratio(reextract_s / hm[f"{low} + heatmap + attention maps"], "-", None),
    }
    print_ratios(ratios)
    end = machine_info(device)
    notes = [
        f"{low} f_T vs float32 f_T on both slides: max |dprob| {worst:.2g} (tolerance {args.tolerance:g}), same predicted "
        f"class: {ok}; translator K = {args.heads}, hidden = D (the default width; {4 * args.heads * dim * dim / 1e6:.3g} "
        "MFLOP per patch), its MLPs at full scale (not the near-identity initialisation)",
        f"load average {info['load_avg_1m']:.2f} at start, {end['load_avg_1m']:.2f} at the end (other jobs share the "
        "machine); the translation repeats ran between re-extraction batches, so both sides saw the same load; CPU "
        "seconds (this process and its DataLoader workers) are a second view that other jobs change less",
        f"re-extraction throughput {n_re / re['read_encode_s']:.1f} patches/s with {args.workers} reader worker(s), batch "
        f"{args.batch_size}; {len(tr_times['fp32'])} translation repeats, {len(tr_times['fp32']) - 1} of them run while "
        f"the re-extraction's clock was stopped every {args.interleave_every} batches; the translation timing reads a "
        "store of the slide's coordinates with random fp16 features (its cost does not depend on them), the fp32/bf16 "
        "check uses the re-extracted features",
    ]
    payload = {"machine": info, "machine_at_end": end, "notes": notes,
               "settings": {k: v for k, v in vars(args).items() if k not in ("json", "plot")},
               "rows": rows, "ratios": ratios, "checks": checks, "reextract_patches_per_s": n_re / re["read_encode_s"],
               "times": {"translate": tr_times, "heatmap": hm_times}}

    def draw(ax) -> None:
        names = ["re-extract\n(read+encode+MIL)", f"translate\nfp32", f"translate\n{low}", f"heatmap {n_hm // 1000}k\n{low}"]
        values = [reextract_s, tr["fp32"], tr[low], hm[f"{low} + heatmap + attention maps"]]
        ax.bar(names, values, color=["#48c", "#c44", "#c84", "#8a4"])
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.3g} s", ha="center", va="bottom")
        ax.set(yscale="log", ylabel="seconds per slide", title=f"{args.encoder} {args.patch} px, N={n_re} ({device})")

    finish(args, "inference", payload, draw)
    return payload


if __name__ == "__main__":
    main()
