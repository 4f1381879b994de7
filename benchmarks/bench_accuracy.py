"""Accuracy study on the synthetic benchmark: vanilla MIL vs +FBTA, and the view ablation (paper's table shape).

Every number comes from the bundle users run (``python -m monai.bundle run training`` with
``bundles/fbta_stad/configs/train.json``), one fresh subprocess per (row, seed), with ``--key value`` overrides.
The held-out metric is the bundle's test report (``<run>/eval/test_metrics.json``) of the best-on-validation model.

* Split: fixed. The first run makes ``splits.json`` (fold 0, split seed 0) and every later run gets a copy of it,
  so ``--seeds`` changes only the training seed (initialisation, pseudo-bags, augmentation, KMeans seed).
* Frozen extractor and feature cache are shared: the first run saves the random-init extractor; later runs
  load it (``--encoder_weights``), so all rows see the same ``F^FB``.
* Every row reports ``test_*``: the FBTA path ``f*_MIL(f_T(F^FB))`` wherever a translator was trained (the
  ``translated`` view or ``L_dist``), and the vanilla path ``f*_MIL(F^FB)`` for ``views=["frozen"]``, which
  the bundle evaluates without a translator.

    python benchmarks/bench_accuracy.py --workdir /tmp/acc --json acc.json --plot acc.png
    python benchmarks/bench_accuracy.py --quick            # 1 seed, 2 epochs, ABMIL only: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import add_common_args, finish, format_table, machine_info  # noqa: E402

BUNDLE_CONFIG = Path(__file__).resolve().parents[1] / "bundles" / "fbta_stad" / "configs" / "train.json"
ALL_VIEWS = ("frozen", "e2e", "translated")
HEAD_NAMES = {"abmil": "ABMIL", "transmil": "TransMIL", "mambamil": "MambaMIL"}
# ablation rows with ABMIL: (label, views, overrides) -- weights as in docs/method.md "Ablation rows"
ABLATION = (
    ("frozen", ("frozen",), {}),
    ("e2e", ("e2e",), {"cons_weight": 0, "lambda_dist": 0}),
    ("e2e + frozen", ("frozen", "e2e"), {"lambda_dist": 0}),
    ("e2e + frozen + translated (FBTA)", ALL_VIEWS, {}),
)
# rough seconds per epoch on a 2-core CPU (tiny_cnn, 36 slides) for the up-front estimate; refined as runs finish
EPOCH_S = {"vanilla": 4.0, "fbta": 9.0}
HEAD_FACTOR = {"abmil": 1.0, "transmil": 1.6, "mambamil": 1.4}
STARTUP_S, PREPARE_S = 15.0, 120.0


def plan_runs(heads: list[str], seeds: list[int]) -> list[dict[str, Any]]:
    """Distinct (head, views, overrides) settings x seeds; the main table and the ablation share runs."""
    wanted = [("abmil", views, extra) for _, views, extra in ABLATION] if "abmil" in heads else []  # ABMIL first
    wanted += [(head, views, {}) for head in heads for views in (("frozen",), ALL_VIEWS)]
    settings: dict[str, dict[str, Any]] = {}
    for head, views, extra in wanted:
        settings.setdefault(run_key(head, views, extra), {"head": head, "views": views, "extra": extra})
    return [{**s, "seed": seed, "key": k} for k, s in settings.items() for seed in seeds]


def run_key(head: str, views: tuple[str, ...], extra: dict[str, Any]) -> str:
    return "_".join([head, *views, *(f"{k}{v}" for k, v in sorted(extra.items()))])


def estimate_s(runs: list[dict[str, Any]], epochs: int, prepared: bool) -> float:
    total = 0.0 if prepared else PREPARE_S
    for r in runs:
        kind = "vanilla" if r["views"] == ("frozen",) else "fbta"
        total += STARTUP_S + epochs * EPOCH_S[kind] * HEAD_FACTOR.get(r["head"], 1.5)
    return total


def bundle_command(run: dict[str, Any], args, run_dir: Path, shared: Path) -> list[str]:
    """The ``monai.bundle run training`` command line of one run (overrides as ``--key value``)."""
    over: dict[str, Any] = {
        "dataset_dir": args.dataset_dir, "cache_dir": str(Path(args.workdir) / "cache"), "ckpt_dir": str(run_dir),
        "output_dir": str(run_dir / "eval"), "mil_name": run["head"], "views": list(run["views"]),
        "seed": run["seed"], "num_epochs": args.epochs, **run["extra"],
    }
    encoder_file = next(iter(sorted(shared.glob("frozen_encoder_*.pt"))), None)
    if encoder_file is not None:
        over["encoder_weights"] = str(encoder_file)
    for item in args.override or ():
        key, _, value = item.partition("=")
        over[key] = value
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(args.config)]
    for key, value in over.items():
        cmd += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    return cmd


def run_one(run: dict[str, Any], args, shared: Path) -> dict[str, Any]:
    """Train + test one setting in a subprocess; returns its test metrics (path chosen by the views)."""
    run_dir = Path(args.workdir) / "runs" / f"{run['key']}_seed{run['seed']}"
    metrics_file = run_dir / "eval" / "test_metrics.json"
    if not metrics_file.is_file():
        if run_dir.exists():
            shutil.rmtree(run_dir)  # an interrupted run: start it again
        run_dir.mkdir(parents=True)
        if (shared / "splits.json").is_file():
            shutil.copy2(shared / "splits.json", run_dir / "splits.json")
        start = time.perf_counter()
        log = run_dir / "log.txt"
        with open(log, "w") as f:
            proc = subprocess.run(bundle_command(run, args, run_dir, shared), stdout=f, stderr=subprocess.STDOUT,
                                  cwd=args.workdir, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if proc.returncode != 0 or not metrics_file.is_file():
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"bundle run {run_dir.name} failed (exit {proc.returncode}); log {log}:\n{tail}")
        run["seconds"] = time.perf_counter() - start
        for name in ("splits.json", *(p.name for p in run_dir.glob("frozen_encoder_*.pt"))):
            if not (shared / name).exists():
                shutil.copy2(run_dir / name, shared / name)
    report = json.loads(metrics_file.read_text())["metrics"]
    return {"bacc": report["test_bacc"], "auc": report["test_auc"], "seconds": run.get("seconds")}


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    arr = np.asarray(values, dtype=float)
    return f"{arr.mean():.3f} ± {arr.std(ddof=1) if len(arr) > 1 else 0.0:.3f}"


def summarise(results: dict[str, list[dict[str, Any]]], heads: list[str]) -> tuple[list[dict], list[dict]]:
    """Main table (per head: vanilla vs +FBTA) and the ABMIL view ablation, mean ± std over seeds."""
    def row(label: str, head: str, views, extra) -> dict[str, Any]:
        res = results.get(run_key(head, tuple(views), extra), [])
        return {"method": label, "test balanced acc": mean_std([r["bacc"] for r in res]),
                "test macro AUC": mean_std([r["auc"] for r in res]), "seeds": len(res)}

    main = []
    for head in heads:
        name = HEAD_NAMES.get(head, head)
        main += [row(name, head, ("frozen",), {}), row(f"{name} + FBTA", head, ALL_VIEWS, {})]
    ablation = [row(label, "abmil", views, extra) for label, views, extra in ABLATION] if "abmil" in heads else []
    return main, ablation


def draw_bars(main: list[dict], ablation: list[dict]):
    def draw(ax) -> None:
        rows = [r for r in main + [dict(r, method=f"ABMIL: {r['method']}") for r in ablation[1:3]] if r["seeds"]]
        means = [float(r["test macro AUC"].split(" ± ")[0]) for r in rows]
        stds = [float(r["test macro AUC"].split(" ± ")[1]) for r in rows]
        ax.barh(range(len(rows)), means, xerr=stds, color=["#999" if "FBTA" not in r["method"] else "#3a7" for r in rows])
        ax.set_yticks(range(len(rows)), [r["method"] for r in rows], fontsize=8)
        ax.axvline(0.5, color="k", ls=":", lw=1)
        ax.set_xlim(0, 1)
        ax.set_xlabel("held-out test macro AUC (mean ± std over seeds)")
        ax.invert_yaxis()
    return draw


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (the split stays fixed)")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the bundle's num_epochs)")
    p.add_argument("--heads", nargs="+", default=list(HEAD_NAMES), choices=list(HEAD_NAMES))
    p.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, ABMIL only")
    p.add_argument("--workdir", default=None, help="runs, shared cache and splits (default: a new temp folder); "
                   "rerunning with the same folder skips finished runs")
    p.add_argument("--dataset-dir", default=None, help="slides (default: <workdir>/data, generated by the first run)")
    p.add_argument("--config", default=str(BUNDLE_CONFIG), help="bundle training config")
    p.add_argument("--override", nargs="*", metavar="KEY=VALUE", help="extra bundle overrides for every run")
    p.add_argument("--estimate-only", action="store_true", help="print the plan and the time estimate, run nothing")
    add_common_args(p)
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.heads, args.epochs = args.seeds[:1], ["abmil"], args.epochs or 2
    if args.epochs is None:
        args.epochs = int(json.loads(Path(args.config).read_text())["num_epochs"])
    args.workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="fbta_acc_"))
    args.dataset_dir = os.path.abspath(args.dataset_dir or os.path.join(args.workdir, "data"))
    return args


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    shared = Path(args.workdir) / "shared"
    shared.mkdir(parents=True, exist_ok=True)
    runs = plan_runs(args.heads, args.seeds)
    est = estimate_s(runs, args.epochs, prepared=(shared / "splits.json").is_file())
    print(f"accuracy study: {len(runs)} bundle runs ({len(runs) // len(args.seeds)} settings x seeds {args.seeds}), "
          f"{args.epochs} epochs each, workdir {args.workdir}\nestimated time: {est / 60:.1f} min "
          f"(2-core CPU guess; refined after each run)", flush=True)
    if args.estimate_only:
        return {}
    results: dict[str, list[dict[str, Any]]] = {}
    start = time.perf_counter()
    for i, run in enumerate(runs, 1):
        res = run_one(run, args, shared)
        results.setdefault(run["key"], []).append({**res, "seed": run["seed"]})
        elapsed = time.perf_counter() - start
        left = estimate_s(runs[i:], args.epochs, True) * (elapsed / max(1.0, estimate_s(runs[:i], args.epochs, True)))
        print(f"[{i}/{len(runs)}] {run['key']} seed {run['seed']}: test bacc {res['bacc']:.3f} auc {res['auc']:.3f} "
              f"({elapsed / 60:.1f} min so far, ~{left / 60:.1f} min left)", flush=True)
    main_rows, ablation = summarise(results, args.heads)
    print(f"\nHeld-out test split (fold 0, fixed), {args.epochs} epochs, mean ± std over training seeds {args.seeds}\n")
    print(format_table(main_rows, markdown=True))
    if ablation:
        print("\nView ablation (ABMIL)\n")
        print(format_table(ablation, markdown=True))
    payload = {"seeds": args.seeds, "epochs": args.epochs, "heads": args.heads, "split": "fold 0 (fixed)",
               "main": main_rows, "ablation": ablation, "runs": results, "machine": machine_info(),
               "minutes": (time.perf_counter() - start) / 60}
    finish(args, "accuracy", payload, draw_bars(main_rows, ablation))
    return payload


if __name__ == "__main__":
    main()
