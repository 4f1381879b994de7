"""How far can translation-based inference go? Fresh MIL heads trained on per-patch maps of the frozen features.

FBTA classifies a slide from its frozen features only: ``f*_MIL(f_T(F^FB))``. Whatever the trained extractor
learned reaches inference only through a per-patch map of F^FB. This script measures, for one trained bundle run
(its ``last.pt``), how much of the trained extractor's accuracy such a map can carry, on the run's **validation**
slides (never test). It reads every patch of the training and validation slides once and encodes it with the run's
EMA extractor f*_TFE, fits two offline maps from F^FB to f*_TFE(patch) on the training slides' patches (ridge
regression, and an MLP), then trains one fresh copy of the run's MIL head (same initial weights, AdamW at the
run's ``lr_mil`` and ``weight_decay``, the run's epochs, one slide per step, the epoch with the best validation AUC
selected) on each kind of bag:

* ``F^FB``: two-stage MIL on the frozen features (what vanilla MIL sees);
* ``f_T(F^FB)``: the run's own translator (what FBTA's inference sees), with a head trained on it alone;
* ``ridge(F^FB)``, ``MLP(F^FB)``: the offline maps, fitted to f*_TFE with far more (patch, target) pairs than
  training gives f_T, and a head trained on their output;
* ``f_T refit(F^FB)``: the run's translator refitted to f*_TFE on every training patch as the bundle's
  ``TranslatorRefit`` does (:func:`~monai_fbta.handlers.refit.fit_translator`), and a head trained on its output;
* ``f*_TFE(all patches)``: the trained extractor over every patch (what a re-extraction inference would classify;
  not the method, an upper bound).

It prints each map's R^2 against f*_TFE on the validation patches and each head's validation AUC and balanced
accuracy. The gap between ``F^FB`` and the maps is what translation-based inference can add over frozen MIL with
this frozen extractor; the gap between the maps and ``f*_TFE(all patches)`` is what it cannot carry.
Give the bundle config and the overrides the run was trained with, after ``--`` (as for diagnose_views.py)::

    python benchmarks/translation_ceiling.py --json out.json -- --config_file bundles/fbta_stad/configs/train.json \\
        --ckpt_dir RUN/models --dataset_dir DATA --cache_dir CACHE --fold 0 ...
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import format_table, write_json  # noqa: E402
from diagnose_views import encode_whole_slide, load_run, r_squared  # noqa: E402

from monai_fbta.handlers.refit import fit_translator  # noqa: E402

Bags = list[torch.Tensor]  # one [N_i, D] tensor per slide


def fit_ridge(x: torch.Tensor, y: torch.Tensor, alpha: float = 1.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """Ridge regression ``[M, D] -> [M, D']`` (closed form, intercept unpenalised); returns the fitted map."""
    xm, ym = x.double().mean(0), y.double().mean(0)
    xc, yc = x.double() - xm, y.double() - ym
    w = torch.linalg.solve(xc.T @ xc + alpha * torch.eye(x.shape[1], dtype=torch.float64), xc.T @ yc)
    return lambda f: ((f.double() - xm) @ w + ym).float()


def fit_mlp(x: torch.Tensor, y: torch.Tensor, hidden: int = 256, epochs: int = 60, seed: int = 0,
            batch_size: int = 512, lr: float = 1e-3) -> Callable[[torch.Tensor], torch.Tensor]:
    """A residual MLP ``f + W2 GELU(W1 f)`` fitted by MSE with AdamW (``[M, D] -> [M, D]``); returns the map."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(x.shape[1], hidden), nn.GELU(), nn.Linear(hidden, y.shape[1]))
    opt = torch.optim.AdamW(mlp.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            opt.zero_grad()
            F.mse_loss(x[idx] + mlp(x[idx]), y[idx]).backward()
            opt.step()
    mlp.eval()
    return lambda f: (f + mlp(f)).detach()


def train_head(head: nn.Module, train: tuple[Bags, Sequence[int]], val: tuple[Bags, Sequence[int]], epochs: int,
               lr: float, weight_decay: float, seed: int) -> dict[str, Any]:
    """Train ``head`` (standardised with the training bags' per-feature stats) with one slide per AdamW step;
    returns the validation AUC / balanced accuracy of the epoch with the best AUC (the first of equals) and of the
    last epoch."""
    from sklearn.metrics import balanced_accuracy_score

    from monai_fbta.engines.evaluator import macro_auc
    from monai_fbta.networks.mil_base import mil_logits

    torch.manual_seed(seed)  # the head's dropout: every bag's head sees the same random stream
    pooled = torch.cat(train[0]).double()
    head.set_feature_stats(pooled.mean(0).float(), pooled.std(0, unbiased=False).float())
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    labels = np.asarray(val[1])
    history = []
    for _ in range(epochs):
        head.train()
        for i in torch.randperm(len(train[0]), generator=gen).tolist():
            opt.zero_grad()
            F.cross_entropy(mil_logits(head, train[0][i].unsqueeze(0)), torch.tensor([train[1][i]])).backward()
            opt.step()
        head.eval()
        with torch.no_grad():
            probs = torch.cat([torch.softmax(mil_logits(head, b.unsqueeze(0)), -1) for b in val[0]]).numpy()
        history.append({"val_auc": macro_auc(probs, labels),
                        "val_bacc": float(balanced_accuracy_score(labels, probs.argmax(1)))})
    best = max(range(epochs), key=lambda e: np.nan_to_num(history[e]["val_auc"], nan=-1.0))  # NaN: one class only
    return {"best_epoch": best + 1, **history[best], "last_val_auc": history[-1]["val_auc"],
            "last_val_bacc": history[-1]["val_bacc"]}


def slide_features(rows: Sequence[Mapping[str, Any]], cache_dir: str, encoder: nn.Module) -> tuple[Bags, Bags]:
    """Per slide of ``rows``: the cached frozen bag F^FB ``[N, D]`` and ``encoder`` over every patch ``[N, D']``."""
    from tqdm.auto import tqdm

    from monai_fbta.data.store import read_array, slide_id_of, store_path

    frozen, trained = [], []
    for row in tqdm(rows, desc="slides: f*_TFE(all patches)", unit="slide"):
        feats = torch.as_tensor(read_array(store_path(cache_dir, slide_id_of(row)), "features")).float()
        enc = encode_whole_slide({"ema": encoder}, row, cache_dir)["ema"][0].float()
        if enc.shape[0] != feats.shape[0]:
            raise SystemExit(f"translation_ceiling: slide {slide_id_of(row)} has {feats.shape[0]} cached features "
                             f"but {enc.shape[0]} patches were read (its cache and slide file disagree)")
        frozen.append(feats)
        trained.append(enc)
    return frozen, trained


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    own, bundle_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="default: the run's last.pt")
    p.add_argument("--epochs", type=int, default=None, help="head training epochs (default: the run's num_epochs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the maps' and heads' training order")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    args = p.parse_args(own)
    if "--config_file" not in bundle_args:
        p.error("give the run's bundle settings after '--', starting with --config_file")
    parser, ckpt, parts = load_run(bundle_args, args.checkpoint)
    if "ema_encoder" not in parts or "translator" not in parts:
        raise SystemExit(f"translation_ceiling: {ckpt} has no trained extractor and translator (a vanilla run?)")
    from monai_fbta.data.datalist import load_splits, select_fold
    from monai_fbta.data.store import slide_id_of

    prepare = parser.get_parsed_content("prepare")
    split = select_fold(load_splits(prepare.splits_file), parser.get_parsed_content("fold"), prepare.rows)
    cache_dir = str(parser.get_parsed_content("cache_dir"))
    labels = {part: [int(r["label"]) for r in split[part]] for part in ("train", "val")}
    feats = {part: slide_features(split[part], cache_dir, parts["ema_encoder"]) for part in ("train", "val")}
    with torch.no_grad():
        translate = lambda bag: parts["translator"](bag)  # noqa: E731
        x, y = torch.cat(feats["train"][0]), torch.cat(feats["train"][1])
        maps = {"f_T(F^FB)": translate, "ridge(F^FB)": fit_ridge(x, y)}
    maps["MLP(F^FB)"] = fit_mlp(x, y, seed=args.seed)
    refitted = copy.deepcopy(parts["translator"])
    fit_translator(refitted, x, y, seed=args.seed)  # what the bundle's TranslatorRefit does, on every patch
    maps["f_T refit(F^FB)"] = lambda bag: refitted(bag).detach()
    bags: dict[str, dict[str, Bags]] = {"F^FB": {p: feats[p][0] for p in feats}}
    r2 = {}
    with torch.no_grad():
        for name, fn in maps.items():
            bags[name] = {p: [fn(b) for b in feats[p][0]] for p in feats}
            r2[name] = r_squared(torch.cat(bags[name]["val"]).unsqueeze(0), torch.cat(feats["val"][1]).unsqueeze(0))
    bags["f*_TFE(all patches)"] = {p: feats[p][1] for p in feats}
    epochs = args.epochs or int(parser.get_parsed_content("num_epochs"))
    head0 = copy.deepcopy(parser.get_parsed_content("mil_head_def"))
    lr, wd = float(parser.get_parsed_content("lr_mil")), float(parser.get_parsed_content("weight_decay"))
    results = {}
    for name, per_part in bags.items():
        print(f"training a fresh head on {name} ({epochs} epochs)", flush=True)
        results[name] = {**({"r2_val": r2[name]} if name in r2 else {}),
                         **train_head(copy.deepcopy(head0), (per_part["train"], labels["train"]),
                                      (per_part["val"], labels["val"]), epochs, lr, wd, args.seed)}
    print(f"fresh heads on {len(split['train'])} training slides, scored on the {len(split['val'])} validation slides "
          f"(fold {parser.get_parsed_content('fold')}, {ckpt})")
    print(format_table([{"bag": k, "R^2 vs f*_TFE (val)": f"{v['r2_val']:.3f}" if "r2_val" in v else "",
                         "best epoch": v["best_epoch"], "val AUC": f"{v['val_auc']:.3f}",
                         "val bacc": f"{v['val_bacc']:.3f}", "last val bacc": f"{v['last_val_bacc']:.3f}"}
                        for k, v in results.items()], markdown=True))
    payload = {"checkpoint": str(ckpt), "fold": parser.get_parsed_content("fold"), "epochs": epochs,
               "num_train_slides": len(split["train"]), "num_val_slides": len(split["val"]),
               "val_slides": [slide_id_of(r) for r in split["val"]], "results": results}
    if args.json:
        write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
