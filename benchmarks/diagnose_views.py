"""Where is a trained run's end-to-end signal lost? The MIL heads' cross-entropy on each kind of bag.

Loads a bundle training run's checkpoint (``last.pt`` in its ``--ckpt_dir``; checked against the run's identity:
datalist, classes, head, views, encoder, tiling, C, M, fold) and, for every slide of one split part, draws a
pseudo-bag and its patches as training does (augmented copy included) and prints the mean cross-entropy of the
student head f_MIL and of its EMA teacher f*_MIL on:

* the frozen bag F^FB (all patches) and the frozen pseudo-bag F^FB[S];
* the pseudo-bag patches through f_FFE (frozen), f_TFE (trained; clean and augmented) and f*_TFE (EMA);
* the translated bag f_T(F^FB), which translation-based inference classifies;
* with ``--whole-slide``, every patch of the slide re-read from the file and encoded by f_FFE (it must give F^FB
  back: a check of the read) and by f*_TFE: the bag a re-extraction inference would classify, so the table shows
  what the trained extractor knows that the translator does not carry; and how much of f*_TFE's features of all
  patches the translator reproduces (R^2 of f_T(F^FB) against f*_TFE(all patches), per slide, then the mean).

Each bag also gets both heads' balanced accuracy over the slides. Chance is ln(num_classes). A head that reads
F^FB but not f_TFE(patches) has not learnt from the e2e view (docs/method.md, "Why the start was left to chance"). Each bag's mean square feature is printed beside it: an
extractor whose features ran away from the frozen one's scale (f_TFE far above f_FFE; docs/method.md, "TransMIL:
its class token ...") shows there. Only ``train`` or ``val`` slides are scored, never ``test``.
Give the bundle config and the overrides the run was trained with, after ``--``::

    python benchmarks/diagnose_views.py --part train -- --config_file bundles/fbta_stad/configs/train.json \\
        --ckpt_dir RUN --dataset_dir DATA --cache_dir CACHE --fold 0 ...
"""

from __future__ import annotations

import argparse
import ast
import copy
import math
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import format_table, write_json  # noqa: E402

# the bags scored, in the order printed (a run has those its views and losses made: see slide_bags)
BAGS = ("frozen bag F^FB", "frozen pseudo-bag F^FB[S]", "f_FFE(patches)", "f_TFE(patches)", "f_TFE(augmented patches)",
        "f*_TFE(patches)", "translated bag f_T(F^FB)", "f_FFE(all patches)", "f*_TFE(all patches)")
WHOLE_SLIDE_BAGS = {"f_FFE(all patches)": "frozen_encoder", "f*_TFE(all patches)": "ema_encoder"}


def bundle_overrides(argv: list[str]) -> dict[str, Any]:
    """``--key value`` pairs as ``monai.bundle run`` reads them (Python literals where they parse, else strings)."""
    if len(argv) % 2 or any(not a.startswith("--") for a in argv[::2]):
        raise SystemExit(f"diagnose_views: expected '--key value' pairs after '--', got {argv}")
    out = {}
    for key, value in zip(argv[::2], argv[1::2]):
        try:
            out[key[2:]] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key[2:]] = value
    return out


def load_run(bundle_args: list[str], checkpoint: str | None = None) -> tuple[Any, str, dict[str, Any]]:
    """``(bundle parser, checkpoint path, networks with its weights)`` for the run that ``bundle_args`` (``--config_file
    ... --key value ...``) trained; its options and settings pass the bundle's own check (an unknown option or a bad
    value exits naming it), and a checkpoint of another run is refused."""
    from monai.bundle import ConfigParser

    from monai_fbta.handlers.checkpoint import check_identity, checkpoint_identity
    from monai_fbta.pipeline.validate import validate_settings

    overrides = bundle_overrides(bundle_args)
    config_file = Path(overrides.pop("config_file"))
    overrides.setdefault("bundle_root", str(config_file.resolve().parent.parent))
    overrides.setdefault("show_progress", False)
    parser = ConfigParser()
    parser.read_config(str(config_file))
    parser.update(overrides)
    parser.parse()
    # the bundle's own check of these options (not this script's) and of its validate_settings arguments
    checked = {k: parser.get_parsed_content(f"validate_settings#{k}")
               for k in parser["validate_settings"] if k != "_target_"}
    validate_settings(argv=list(bundle_args), **checked)
    ckpt = checkpoint or parser.get_parsed_content("last_ckpt")
    check_identity(checkpoint_identity(ckpt), parser.get_parsed_content("run_identity"), f"checkpoint {ckpt}",
                   "give the overrides the run was trained with")
    blob = torch.load(ckpt, map_location="cpu", weights_only=True)
    parts: dict[str, Any] = {"frozen_encoder": parser.get_parsed_content("frozen_encoder").eval()}
    builders = {"mil_head": "mil_head_def", "ema_mil_head": "mil_head_def", "translator": "translator_def",
                "trainable_encoder": "trainable_encoder_def", "ema_encoder": "trainable_encoder_def"}
    if not parser.get_parsed_content("uses_translator"):  # e.g. vanilla MIL: its checkpoint's f_T never trained
        del builders["translator"]
    for name, key in builders.items():
        if name in blob:  # each module a copy of the config's (untrained) one, then the checkpoint's weights
            module = copy.deepcopy(parser.get_parsed_content(key))
            module.load_state_dict(blob[name])
            parts[name] = module.eval()
    return parser, ckpt, parts


def encode_whole_slide(
    encoders: Mapping[str, torch.nn.Module], row: Mapping[str, Any], cache_dir: str, batch_size: int = 256
) -> dict[str, torch.Tensor]:
    """Every patch of the slide of ``row`` (its cached coords, read from the slide file as extraction reads
    them, once) through each of ``encoders``: ``{name: [1, N, D]}``."""
    from monai_fbta.data.errors import SlideError
    from monai_fbta.data.extraction import encode_slide_patches
    from monai_fbta.data.store import read_coords, slide_id_of, store_path

    coords, attrs = read_coords(store_path(cache_dir, slide_id_of(row)))
    try:
        feats = encode_slide_patches(encoders, row, coords, attrs, batch_size)
    except SlideError as err:
        raise SystemExit(f"diagnose_views: {err}") from None
    return {name: f.unsqueeze(0) for name, f in feats.items()}


def slide_bags(
    parts: Mapping[str, Any], sample: Mapping[str, Any],
    whole_slide: Callable[[Mapping[str, torch.nn.Module]], dict[str, torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """The bags ``[1, n, D]`` of one prepared sample that the run has (:data:`BAGS`): a vanilla run reads no
    patches, f*_TFE exists only with L_dist, f_T only with the translated view or L_dist; with ``whole_slide``
    (``{bag: encoder}`` -> ``{bag: its features of every patch of the slide}``, :func:`encode_whole_slide`), the
    :data:`WHOLE_SLIDE_BAGS` too."""
    from monai_fbta.networks.encode import encode_patches
    from monai_fbta.networks.translator import translate_bag

    def encode(encoder: str, images: str) -> torch.Tensor:
        return encode_patches(parts[encoder], sample[images]).unsqueeze(0)

    bags = {"frozen bag F^FB": sample["features"], "frozen pseudo-bag F^FB[S]": sample["pb_features"]}
    if "pb_image_clean" in sample:
        bags["f_FFE(patches)"] = encode("frozen_encoder", "pb_image_clean")
        if "trainable_encoder" in parts:
            bags["f_TFE(patches)"] = encode("trainable_encoder", "pb_image_clean")
            bags["f_TFE(augmented patches)"] = encode("trainable_encoder", "pb_image")
        if "ema_encoder" in parts:
            bags["f*_TFE(patches)"] = encode("ema_encoder", "pb_image_clean")
    if "translator" in parts:
        bags["translated bag f_T(F^FB)"] = translate_bag(parts["translator"], sample["features"])
    if whole_slide is not None:
        bags.update(whole_slide({b: parts[e] for b, e in WHOLE_SLIDE_BAGS.items() if e in parts}))
    return bags


def view_losses(parts: Mapping[str, Any], samples) -> dict[str, dict[str, Any]]:
    """Over ``samples`` (``(prepared slide batch, whole_slide or None)`` pairs), for the heads in ``parts``:
    ``{"cross_entropy": {bag: {head: mean}}, "balanced_accuracy": {bag: {head: value}}, "mean_square": {bag:
    mean}}``, with ``"translation_r2"`` (mean over slides of the R^2 of f_T(F^FB) against f*_TFE(all patches))
    when both bags are there; cross-entropy and mean square are means over slides of each slide's value."""
    from sklearn.metrics import balanced_accuracy_score

    from monai_fbta.networks.mil_base import mil_logits

    heads = {h: parts[k] for h, k in (("f_MIL", "mil_head"), ("f*_MIL", "ema_mil_head")) if k in parts}
    losses: dict[str, dict[str, list[float]]] = {}
    preds: dict[str, dict[str, list[int]]] = {}
    scales: dict[str, list[float]] = {}
    labels: list[int] = []
    r2: list[float] = []
    with torch.no_grad():
        for sample, whole_slide in samples:
            labels.append(int(sample["label"].reshape(-1)[0]))
            bags = slide_bags(parts, sample, whole_slide)
            if "translated bag f_T(F^FB)" in bags and "f*_TFE(all patches)" in bags:
                r2.append(r_squared(bags["translated bag f_T(F^FB)"], bags["f*_TFE(all patches)"]))
            for bag_name, bag in bags.items():
                scales.setdefault(bag_name, []).append(float(bag.float().pow(2).mean()))
                for head_name, head in heads.items():
                    logits = mil_logits(head, bag.float())
                    ce = float(F.cross_entropy(logits, sample["label"]))
                    losses.setdefault(bag_name, {}).setdefault(head_name, []).append(ce)
                    preds.setdefault(bag_name, {}).setdefault(head_name, []).append(int(logits.argmax(-1)[0]))
    bags = [b for b in BAGS if b in losses]
    return {"cross_entropy": {b: {h: float(np.mean(v)) for h, v in losses[b].items()} for b in bags},
            "balanced_accuracy": {b: {h: float(balanced_accuracy_score(labels, v)) for h, v in preds[b].items()}
                                  for b in bags},
            "mean_square": {b: float(np.mean(scales[b])) for b in bags},
            **({"translation_r2": float(np.mean(r2))} if r2 else {})}


def r_squared(pred: torch.Tensor, target: torch.Tensor) -> float:
    """:func:`monai_fbta.handlers.refit.r_squared` of ``pred`` against ``target`` (both ``[1, N, D]``); a clear
    exit when the two bags have different patches."""
    from monai_fbta.handlers.refit import r_squared as r2

    if pred.shape != target.shape:
        raise SystemExit(f"diagnose_views: translated bag {tuple(pred.shape)} and re-extracted bag "
                         f"{tuple(target.shape)} differ in shape (patches dropped since extraction?)")
    return r2(pred, target)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    own, bundle_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("train", "val"), default="train", help="which slides (never the test part)")
    p.add_argument("--checkpoint", default=None, help="default: the run's last.pt")
    p.add_argument("--epoch", type=int, default=0, help="which epoch's pseudo-bags and augmentations to draw")
    p.add_argument("--whole-slide", action="store_true", help="also score every patch of each slide re-read and "
                   "encoded by f_FFE and by f*_TFE (reads the slide files: slower)")
    p.add_argument("--json", default=None, help="also write the table as JSON here")
    args = p.parse_args(own)
    if "--config_file" not in bundle_args:
        p.error("give the run's bundle settings after '--', starting with --config_file")
    parser, ckpt, parts = load_run(bundle_args, args.checkpoint)
    from monai_fbta.data.datalist import load_splits, select_fold
    from monai_fbta.data.dataset import SlideDataset

    prepare = parser.get_parsed_content("prepare")  # read only: the run's datalist and splits, nothing extracted
    rows = select_fold(load_splits(prepare.splits_file), parser.get_parsed_content("fold"), prepare.rows)[args.part]
    dataset = SlideDataset(rows, parser.get_parsed_content("train#preprocessing"),
                           seed=parser.get_parsed_content("seed"))
    dataset.set_epoch(args.epoch)
    prepare_batch = parser.get_parsed_content("prepare_batch")
    num_classes = int(parser.get_parsed_content("num_classes"))
    cache_dir = str(parser.get_parsed_content("cache_dir"))

    def samples():
        for i in range(len(dataset)):
            whole = (lambda encs, row=rows[i]: encode_whole_slide(encs, row, cache_dir)) if args.whole_slide else None
            yield prepare_batch(dataset[i], "cpu"), whole

    scores = view_losses(parts, samples())
    table, bacc, scales = scores["cross_entropy"], scores["balanced_accuracy"], scores["mean_square"]
    print(f"mean cross-entropy on the {len(rows)} {args.part} slides (chance: ln {num_classes} = "
          f"{math.log(num_classes):.3f}), balanced accuracy, and each bag's mean square feature")
    rows_out = [{"bag": b, **{h: f"{v:.3f}" for h, v in per_head.items()},
                 **{f"{h} bacc": f"{v:.3f}" for h, v in bacc[b].items()}, "mean square": f"{scales[b]:.4g}"}
                for b, per_head in table.items()]
    print(format_table(rows_out, markdown=True))
    if "translation_r2" in scores:
        print(f"R^2 of the translated bag f_T(F^FB) against f*_TFE(all patches): {scores['translation_r2']:.3f}")
    payload = {"part": args.part, "num_slides": len(rows), "checkpoint": str(ckpt), **scores}
    if args.json:
        write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
