"""How fast does a MIL head leave chance on cached frozen features? Plain two-stage MIL, no bundle, validation only.

For each setting of a grid (``lr``, ``hidden``, ``dropout``, ``wd``; other keys are the head's constructor
arguments, e.g. ``class_token_std``), trains the head (one slide per AdamW step,
inputs standardised with the training patches' mean/std, as the bundle does) on the training part of several
(fold, seed) pairs of a study's split and prints, per pair, the first epoch whose mean training cross-entropy is
below ``--start-ce`` (0.9; chance is ln 3 = 1.10 for 3 classes), and the mean over pairs of the best and the last
validation macro AUC. Test slides are never read. Used to choose the bundle's ``lr_mil`` (docs/method.md,
"Experiments")::

    python benchmarks/sweep_mil_head.py --workdir STUDY --dataset-dir DATA --grid "lr=[0.001,0.0001]"

``STUDY`` is a ``bench_accuracy.py`` workdir after its first run (``shared/splits.json`` and ``cache/``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_PAIRS = [(0, 0), (0, 1), (1, 1), (4, 2), (2, 2), (3, 0)]


def load_bags(cache_dir: Path, slide_ids: list[str]) -> dict[str, torch.Tensor]:
    """``{slide_id: features [N, D]}`` from the study's feature stores."""
    from monai_fbta.data.store import read_array, store_path

    return {s: torch.as_tensor(read_array(store_path(cache_dir, s), "features")).float() for s in slide_ids}


def train_head(bags, labels, split, seed: int, epochs: int, num_classes: int, cache_dir: Path, name: str = "abmil",
               lr: float = 1e-3, hidden: int = 512, dropout: float = 0.25, wd: float = 1e-4,
               **options: Any) -> list[tuple[float, float]]:
    """Train one head on ``split["train"]``; per epoch ``(mean training CE, validation macro AUC)``. ``options``: more
    constructor arguments of the head (e.g. TransMIL's ``class_token_std``)."""
    from monai_fbta.engines.evaluator import macro_auc
    from monai_fbta.networks.registry import build_mil_head
    from monai_fbta.pipeline.prepare import feature_stats

    train, val = split["train"], split["val"]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    head = build_mil_head(name, in_features=bags[train[0]].shape[1], num_classes=num_classes, hidden=hidden,
                          dropout=dropout, options=options)
    head.set_feature_stats(*feature_stats([{"slide_id": s} for s in train], cache_dir))  # the bundle's standardisation
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=wd)
    history = []
    for _ in range(epochs):
        head.train()
        losses = []
        for i in rng.permutation(len(train)):
            loss = F.cross_entropy(head(bags[train[i]][None]), torch.tensor([labels[train[i]]]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        head.eval()
        with torch.no_grad():
            probs = torch.cat([head(bags[s][None]).softmax(-1) for s in val]).numpy()
        y = np.array([labels[s] for s in val])
        history.append((float(np.mean(losses)), macro_auc(probs, y)))
    return history


def main(argv=None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", required=True, help="a bench_accuracy.py workdir (shared/splits.json, cache/)")
    p.add_argument("--dataset-dir", required=True, help="the study's slides (datalist.json)")
    p.add_argument("--grid", nargs="*", default=[], metavar="KEY=JSON_LIST", help='e.g. "lr=[0.001,0.0001]"')
    p.add_argument("--pairs", default=json.dumps(DEFAULT_PAIRS), help="JSON list of [fold, seed]")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--head", default="abmil")
    p.add_argument("--start-ce", type=float, default=0.9)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    workdir = Path(args.workdir)
    folds = json.loads((workdir / "shared" / "splits.json").read_text())["folds"]
    datalist = json.loads((Path(args.dataset_dir) / "datalist.json").read_text())
    labels = {r["slide_id"]: int(r["label"]) for r in datalist["training"]}
    num_classes = int(datalist.get("num_classes") or len(set(labels.values())))
    pairs = [tuple(x) for x in json.loads(args.pairs)]
    needed = sorted({s for fold, _ in pairs for part in ("train", "val") for s in folds[fold][part]})
    bags = load_bags(workdir / "cache", needed)
    keys = [item.partition("=")[0] for item in args.grid]
    values = [json.loads(item.partition("=")[2]) for item in args.grid]
    results = []
    for combo in itertools.product(*values):
        setting = dict(zip(keys, combo))
        start = time.perf_counter()
        runs = [train_head(bags, labels, folds[fold], seed, args.epochs, num_classes, workdir / "cache", args.head, **setting)
                for fold, seed in pairs]
        starts = [next((i + 1 for i, (ce, _) in enumerate(h) if ce < args.start_ce), None) for h in runs]
        row = {"setting": setting, "start_epoch": starts, "best_val_auc": float(np.mean([max(a for _, a in h) for h in runs])),
               "last_val_auc": float(np.mean([h[-1][1] for h in runs])), "seconds": time.perf_counter() - start}
        results.append(row)
        print(f"{setting or 'defaults'}: epoch leaving chance per (fold, seed) {pairs}: "
              f"{['never' if s is None else s for s in starts]}; best val AUC {row['best_val_auc']:.3f}, "
              f"last {row['last_val_auc']:.3f} ({row['seconds']:.0f} s)", flush=True)
    return results


if __name__ == "__main__":
    main()
