"""Where is a trained run's end-to-end signal lost? The MIL heads' cross-entropy on each kind of bag.

Loads a bundle training run's checkpoint (``last.pt`` in its ``--ckpt_dir``; checked against the run's identity:
datalist, classes, head, views, encoder, tiling, C, M, fold) and, for every slide of one split part, draws a
pseudo-bag and its patches as training does (augmented copy included) and prints the mean cross-entropy of the
student head f_MIL and of its EMA teacher f*_MIL on:

* the frozen bag F^FB (all patches) and the frozen pseudo-bag F^FB[S];
* the pseudo-bag patches through f_FFE (frozen), f_TFE (trained; clean and augmented) and f*_TFE (EMA);
* the translated bag f_T(F^FB), which translation-based inference classifies.

Chance is ln(num_classes). A head that reads F^FB but not f_TFE(patches) has not learnt from the e2e view
(docs/method.md, "Why the start was left to chance"). Only ``train`` or ``val`` slides are scored, never ``test``.
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

# bag name -> what it needs from the run's parts (``parts``) and the prepared sample (``s``)
BAGS: dict[str, Callable[[Mapping[str, Any], Mapping[str, Any]], torch.Tensor | None]] = {
    "frozen bag F^FB": lambda parts, s: s["features"],
    "frozen pseudo-bag F^FB[S]": lambda parts, s: s["pb_features"],
    "f_FFE(patches)": lambda parts, s: parts["encode"](parts["frozen_encoder"], s, "pb_image_clean"),
    "f_TFE(patches)": lambda parts, s: parts["encode"](parts["trainable_encoder"], s, "pb_image_clean"),
    "f_TFE(augmented patches)": lambda parts, s: parts["encode"](parts["trainable_encoder"], s, "pb_image"),
    "f*_TFE(patches)": lambda parts, s: parts["encode"](parts["ema_encoder"], s, "pb_image_clean"),
    "translated bag f_T(F^FB)": lambda parts, s: None if parts["translator"] is None
    else parts["translate"](parts["translator"], s["features"]),
}


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


def load_run(overrides: Mapping[str, Any], checkpoint: str | None = None) -> tuple[Any, str, dict[str, Any]]:
    """``(bundle parser, checkpoint path, networks with its weights)``; refuses a checkpoint of another run."""
    from monai.bundle import ConfigParser

    from monai_fbta.handlers.checkpoint import check_identity, checkpoint_identity

    overrides = dict(overrides)
    config_file = Path(overrides.pop("config_file"))
    overrides.setdefault("bundle_root", str(config_file.resolve().parent.parent))
    overrides.setdefault("show_progress", False)
    parser = ConfigParser()
    parser.read_config(str(config_file))
    parser.update(overrides)
    parser.parse()
    ckpt = checkpoint or parser.get_parsed_content("last_ckpt")
    check_identity(checkpoint_identity(ckpt), parser.get_parsed_content("run_identity"), f"checkpoint {ckpt}",
                   "give the overrides the run was trained with")
    blob = torch.load(ckpt, map_location="cpu", weights_only=True)
    parts: dict[str, Any] = {"frozen_encoder": parser.get_parsed_content("frozen_encoder").eval(), "translator": None}
    builders = {"mil_head": "mil_head_def", "ema_mil_head": "mil_head_def", "translator": "translator_def",
                "trainable_encoder": "trainable_encoder_def", "ema_encoder": "trainable_encoder_def"}
    for name, key in builders.items():
        if name in blob:  # each module a copy of the config's (untrained) one, then the checkpoint's weights
            module = copy.deepcopy(parser.get_parsed_content(key))
            module.load_state_dict(blob[name])
            parts[name] = module.eval()
    return parser, ckpt, parts


def view_losses(parts: dict[str, Any], samples) -> dict[str, dict[str, float]]:
    """``{bag: {head: mean cross-entropy}}`` over ``samples`` (prepared slide batches) for the heads in ``parts``."""
    from monai_fbta.networks.encode import encode_patches
    from monai_fbta.networks.mil_base import mil_logits
    from monai_fbta.networks.translator import translate_bag

    parts = {**parts, "encode": lambda enc, s, key: None if enc is None or key not in s
             else encode_patches(enc, s[key]).unsqueeze(0), "translate": translate_bag}
    heads = {h: parts[k] for h, k in (("f_MIL", "mil_head"), ("f*_MIL", "ema_mil_head")) if k in parts}
    losses: dict[str, dict[str, list[float]]] = {}
    with torch.no_grad():
        for s in samples:
            for bag_name, make in BAGS.items():
                try:
                    bag = make(parts, s)
                except KeyError:  # e.g. no patches in a vanilla run, no EMA encoder without L_dist
                    bag = None
                if bag is None:
                    continue
                for head_name, head in heads.items():
                    ce = F.cross_entropy(mil_logits(head, bag.float()), s["label"])
                    losses.setdefault(bag_name, {}).setdefault(head_name, []).append(float(ce))
    return {b: {h: float(np.mean(v)) for h, v in per_head.items()} for b, per_head in losses.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    own, bundle_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("train", "val"), default="train", help="which slides (never the test part)")
    p.add_argument("--checkpoint", default=None, help="default: the run's last.pt")
    p.add_argument("--epoch", type=int, default=0, help="which epoch's pseudo-bags and augmentations to draw")
    p.add_argument("--json", default=None, help="also write the table as JSON here")
    args = p.parse_args(own)
    overrides = bundle_overrides(bundle_args)
    if "config_file" not in overrides:
        p.error("give the run's bundle settings after '--', starting with --config_file")
    parser, ckpt, parts = load_run(overrides, args.checkpoint)
    from monai_fbta.data.datalist import load_splits, select_fold
    from monai_fbta.data.dataset import SlideDataset

    prepare = parser.get_parsed_content("prepare")  # read only: the run's datalist and splits, nothing extracted
    rows = select_fold(load_splits(prepare.splits_file), parser.get_parsed_content("fold"), prepare.rows)[args.part]
    dataset = SlideDataset(rows, parser.get_parsed_content("train#preprocessing"), seed=parser.get_parsed_content("seed"))
    dataset.set_epoch(args.epoch)
    prepare_batch = parser.get_parsed_content("prepare_batch")
    num_classes = int(parser.get_parsed_content("num_classes"))
    table = view_losses(parts, (prepare_batch(dataset[i], "cpu") for i in range(len(dataset))))
    print(f"mean cross-entropy on the {len(rows)} {args.part} slides (chance: ln {num_classes} = {math.log(num_classes):.3f})")
    rows_out = [{"bag": b, **{h: f"{v:.3f}" for h, v in per_head.items()}} for b, per_head in table.items()]
    print(format_table(rows_out, markdown=True))
    payload = {"part": args.part, "num_slides": len(rows), "checkpoint": str(ckpt),
               "cross_entropy": table}
    if args.json:
        write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
