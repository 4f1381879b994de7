"""Accuracy study on the synthetic benchmark: vanilla MIL vs +FBTA, EMA's share and the view ablation, k-fold CV.

Every number comes from the bundle users run (``python -m monai.bundle run training`` with
``bundles/fbta_stad/configs/train.json``), one fresh subprocess per (setting, fold, seed), with ``--key value``
overrides. The held-out metric is the bundle's test report (``<run>/eval/test_metrics.json``) of the model chosen
on that fold's validation part; test folds are never looked at for any choice.

* Splits: ``--folds`` of one patient-level k-fold split (split seed 0), made by the first run and copied to every
  later one, so all settings and seeds see the same train / val / test slides of a fold.
* Frozen extractor and feature cache are shared: the first run saves the random-init extractor; later runs
  load it (``--encoder_weights``), so all rows see the same ``F^FB``.
* Every run has an EMA teacher of its MIL head, vanilla MIL too, and reports ``f*_MIL`` (on ``f_T(F^FB)`` where a
  translator was trained, on ``F^FB`` otherwise). The "no EMA" rows set ``ema_momentum=1`` (teacher = student):
  vanilla's row is plain two-stage MIL, FBTA's has no consistency target; the pairs show what EMA buys.
* Resumable: a run whose ``test_metrics.json`` exists is not run again; rerun the same command to continue. A
  finished run is reused only with the settings it had (its ``settings.json``: the bundle config's and the frozen
  extractor's sha256 and its overrides); other ``--epochs``, ``--override``, ``--config`` or extractor stop the study
  with the run's name and what differs. Existing slides in ``--dataset-dir`` must have the ``--data`` settings.
* Parallel: two processes may share a workdir with different ``--folds`` or ``--seeds`` (one per core). Each run is
  locked while it runs (``runs/.<run>.lock``), so a second process that reaches it stops with the holder's pid
  instead of deleting its folder as an interrupted run.

    python benchmarks/bench_accuracy.py --workdir /tmp/acc --dataset-dir DATA --json acc.json --plot acc.png
    python benchmarks/bench_accuracy.py --quick            # 1 fold, 1 seed, 2 epochs, ABMIL only: a smoke run
"""

from __future__ import annotations

import argparse
import csv
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
from scipy import stats

from monai_fbta._io import LockHeld, exclusive_lock, file_sha256

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (FBTA_SUFFIX, TRANSLATED_HEAD_SUFFIX, add_common_args, finish, format_interval,  # noqa: E402
                     format_table, machine_info, mean_std, parse_mean_std, write_json)

BUNDLE_CONFIG = Path(__file__).resolve().parents[1] / "bundles" / "fbta_stad" / "configs" / "train.json"
ALL_VIEWS = ("frozen", "e2e", "translated")
HEAD_NAMES = {"abmil": "ABMIL", "transmil": "TransMIL (hidden 128)", "mambamil": "MambaMIL (hidden 64, 1 layer)"}
# CPU-sized TransMIL / MambaMIL: hidden 512 costs ~0.5 s per 500-instance bag on one core (ABMIL: 0.02 s); MambaMIL
# at hidden 64 still costs ~0.28 s with its 2 SR-Mamba layers (pure-PyTorch scan), ~0.15 s with one
HEAD_OVERRIDES: dict[str, dict[str, Any]] = {"transmil": {"mil_hidden": 128},
                                             "mambamil": {"mil_hidden": 64, "mil_kwargs": {"num_layers": 1}}}
NO_EMA = {"ema_momentum": 1.0}
# the second stage over a finished FBTA run (configs/translated_head.json: f_T refitted to its extractor, then a head
# trained on f_T(F^FB) alone, the vanilla recipe); its run reads that FBTA run's last.pt, so it runs after it
TRANSLATED_HEAD = "translated_head"
HEAD_OVERLAY = "translated_head.json"
TABLES = ("main", "ema", "ablation")
# the bundle's training settings recorded with the study (their values in --config, then --epochs and --override):
# a later change of a bundle default must not pass for the setting these runs had
RECORDED_SETTINGS = ("num_epochs", "lr_mil", "lr_translator", "lr_encoder", "weight_decay", "mil_hidden", "num_clusters",
                     "num_per_cluster", "cluster_seed", "ema_momentum", "lambda_dist", "cons_weight", "encoder_warmup_epochs")
# the study's settings (chosen on fold 0's validation part, docs/method.md "Experiments"); --override adds to it
STUDY_OVERRIDES: dict[str, Any] = {"patch_size": 64, "num_clusters": 16, "translated_bag": "full"}
# the study's synthetic data (docs/synthetic_data.md): lesions on 8% of the tissue, doubled stain variation
DATA = {"num_slides": 120, "size": 2048, "tumour_fraction": 0.08, "stain_jitter": 2.0, "seed": 1}
# rough seconds per run of RUN_S_EPOCHS epochs on a 2-core CPU for the up-front estimate; refined from the runs
# that finished
RUN_S = {"vanilla": 60.0, "fbta": 150.0, TRANSLATED_HEAD: 70.0}
RUN_S_EPOCHS = 20
# bundle overrides naming places inside --workdir, left out of a run's identity; RUN_RECORD holds that identity
WORKDIR_PATHS = ("cache_dir", "ckpt_dir", "output_dir", "encoder_weights", "fbta_checkpoint")
RUN_RECORD = "settings.json"
VALIDATION_TITLE = ("Validation by fold: val AUC / balanced accuracy at the selected epoch, mean over the row's seeds "
                    "(settings are chosen on these figures, never on test)")
PAIRED_TITLE = ("Paired test gains over vanilla, run by run on the same fold and seed (the interval: 95%, t over "
                "the per-fold means, a rough guide: cross-validation folds are not independent)")
HEAD_FACTOR = {"abmil": 1.0, "transmil": 1.3, "mambamil": 2.5}  # MambaMIL (1 layer): its pure-PyTorch scan
PREPARE_S = 300.0
# one compute thread per run: on 2 cores, 2 OpenMP threads next to the 2 patch-reading workers (or any other
# process) stall at every parallel region (TransMIL fwd+bwd: 0.5 s alone, 7 s with one busy core beside it)
THREADS = {"OMP_NUM_THREADS": "1"}


def settings(heads: list[str], tables: tuple[str, ...] = TABLES) -> list[dict[str, Any]]:
    """Table rows: ``{"table", "label", "head", "views", "extra", "all_seeds", "stage"}`` of ``tables``; ABMIL
    first. ``stage`` is None, or :data:`TRANSLATED_HEAD` for the second stage over the row's FBTA run."""
    rows: list[dict[str, Any]] = []

    def add(table: str, label: str, head: str, views: tuple[str, ...], extra: dict[str, Any], all_seeds: bool,
            stage: str | None = None):
        rows.append({"table": table, "label": label, "head": head, "views": views,
                     "extra": {**HEAD_OVERRIDES.get(head, {}), **extra}, "all_seeds": all_seeds, "stage": stage})

    for head in sorted(heads, key=lambda h: h != "abmil"):
        name, abmil = HEAD_NAMES.get(head, head), head == "abmil"
        add("main", name, head, ("frozen",), {}, abmil)
        add("main", name + FBTA_SUFFIX, head, ALL_VIEWS, {}, abmil)
        add("main", name + TRANSLATED_HEAD_SUFFIX, head, ("translated",), {}, abmil, TRANSLATED_HEAD)
    if "abmil" in heads:
        add("ema", "ABMIL, no EMA teacher (plain two-stage MIL)", "abmil", ("frozen",), NO_EMA, False)
        add("ema", "ABMIL, EMA teacher", "abmil", ("frozen",), {}, False)
        add("ema", "ABMIL + FBTA, no EMA teacher", "abmil", ALL_VIEWS, NO_EMA, False)
        add("ema", "ABMIL + FBTA, EMA teacher", "abmil", ALL_VIEWS, {}, False)
        # the ablation compares rows on the first seed only (its e2e + frozen row runs one seed)
        add("ablation", "frozen", "abmil", ("frozen",), {}, False)
        add("ablation", "e2e + frozen", "abmil", ("frozen", "e2e"), {"lambda_dist": 0}, False)
        add("ablation", "e2e + frozen + translated (FBTA)", "abmil", ALL_VIEWS, {}, False)
    return [r for r in rows if r["table"] in tables]


def run_key(head: str, views: tuple[str, ...], extra: dict[str, Any], stage: str | None = None) -> str:
    """The run folder's name stem: head, views (or the stage), then each override as ``key + value`` (a dict's items
    flattened)."""
    def part(k: str, v: Any) -> str:
        return k + ("".join(f"{kk}{vv}" for kk, vv in sorted(v.items())) if isinstance(v, dict) else f"{v}")

    return "_".join([head, *([stage] if stage else views), *(part(k, v) for k, v in sorted(extra.items()))])


def source_key(run: dict[str, Any]) -> str:
    """The run key of the FBTA run that a second-stage run reads (same head and overrides, all three views)."""
    return run_key(run["head"], ALL_VIEWS, run["extra"])


def plan_runs(heads: list[str], seeds: list[int], folds: list[int], tables: tuple[str, ...] = TABLES,
              every_seed: bool = False) -> list[dict[str, Any]]:
    """Distinct (head, views, overrides) x folds x seeds; tables share runs (ABMIL's vanilla and FBTA rows). Every
    seed runs for ABMIL's main rows, the first for the others, or every seed for every head's main rows with
    ``every_seed``.

    Runs come in phases, each fold by fold, so a study stopped early has whole folds of the most important rows:
    ABMIL vanilla / FBTA / ablation (first seed), TransMIL, ABMIL's other seeds, the no-EMA rows, MambaMIL. A
    second-stage run comes right after the FBTA run it reads."""
    unique: dict[str, dict[str, Any]] = {}
    for s in settings(heads, tables):
        key = run_key(s["head"], s["views"], s["extra"], s["stage"])
        entry = unique.setdefault(key, {"head": s["head"], "views": s["views"], "extra": s["extra"], "all_seeds": False,
                                        "tables": set(), "stage": s["stage"]})
        entry["all_seeds"] |= s["all_seeds"] or (every_seed and s["table"] == "main")
        entry["tables"].add(s["table"])
    runs = [{"head": s["head"], "views": s["views"], "extra": s["extra"], "key": key, "fold": fold, "seed": seed,
             "phase": _phase(s, i), "stage": s["stage"]}
            for i, seed in enumerate(seeds) for fold in folds for key, s in unique.items() if i == 0 or s["all_seeds"]]
    runs.sort(key=lambda r: (r["phase"], r["seed"], r["fold"], r["stage"] is not None))
    return runs


def _phase(setting: dict[str, Any], seed_index: int) -> int:
    if seed_index > 0:
        return 2
    if setting["head"] != "abmil":
        return 1 if setting["head"] == "transmil" else 4
    return 3 if setting["tables"] == {"ema"} else 0


def recorded_settings(config: str | os.PathLike, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The :data:`RECORDED_SETTINGS` the runs had: the bundle config ``config`` as written there (expressions as
    strings), then ``overrides`` (the study's ``--epochs`` and ``--override`` values) on top."""
    values = {**json.loads(Path(config).read_text()), **(overrides or {})}
    return {k: values[k] for k in RECORDED_SETTINGS if k in values}


def run_name(run: dict[str, Any]) -> str:
    return f"{run['key']}_fold{run['fold']}_seed{run['seed']}"


def estimate_s(runs: list[dict[str, Any]], prepared: bool, scale: float = 1.0, epochs: int = RUN_S_EPOCHS) -> float:
    """Seconds ``runs`` of ``epochs`` epochs should take (``scale``: measured / estimated so far)."""
    total = 0.0 if prepared else PREPARE_S
    for r in runs:
        kind = r.get("stage") or ("vanilla" if r["views"] == ("frozen",) else "fbta")
        total += RUN_S[kind] * HEAD_FACTOR.get(r["head"], 1.5) * scale * epochs / RUN_S_EPOCHS
    return total


def bundle_overrides(run: dict[str, Any], args, run_dir: Path, shared: Path) -> dict[str, str]:
    """One run's ``--key value`` bundle overrides, values as its command line has them (JSON for non-strings)."""
    over: dict[str, Any] = {
        "dataset_dir": args.dataset_dir, "cache_dir": str(Path(args.workdir) / "cache"), "ckpt_dir": str(run_dir),
        "output_dir": str(run_dir / "eval"), "mil_name": run["head"], "views": list(run["views"]),
        "fold": run["fold"], "seed": run["seed"], "num_epochs": args.epochs, "show_progress": False,
        **STUDY_OVERRIDES, **run["extra"],
    }
    encoder_file = next(iter(sorted(shared.glob("frozen_encoder_*.pt"))), None)
    if encoder_file is not None:
        over["encoder_weights"] = str(encoder_file)
    if run.get("stage") == TRANSLATED_HEAD:
        source = {**run, "key": source_key(run)}
        over["fbta_checkpoint"] = str(Path(args.workdir) / "runs" / run_name(source) / "last.pt")
    for item in args.override or ():
        key, _, value = item.partition("=")
        over[key] = value
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in over.items()}


def config_files(run: dict[str, Any], args) -> list[Path]:
    """The bundle config files of one run: ``--config``, then the second stage's overlay beside it."""
    config = Path(args.config)
    return [config, config.parent / HEAD_OVERLAY] if run.get("stage") == TRANSLATED_HEAD else [config]


def bundle_command(run: dict[str, Any], args, run_dir: Path, shared: Path) -> list[str]:
    """The ``monai.bundle run training`` command line of one run (overrides as ``--key value``)."""
    files = config_files(run, args)
    config = str(files[0]) if len(files) == 1 else "[" + ",".join(f"'{f}'" for f in files) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", config]
    for key, value in bundle_overrides(run, args, run_dir, shared).items():
        cmd += [f"--{key}", value]
    return cmd


def run_identity(run: dict[str, Any], args, run_dir: Path, shared: Path) -> dict[str, Any]:
    """What a finished run must match to be reused: the bundle config's content, the frozen extractor's, and the
    overrides less the places inside ``--workdir`` (a moved workdir holds the same study)."""
    over = bundle_overrides(run, args, run_dir, shared)
    encoder = shared / "frozen_encoder_tiny_cnn.pt"
    overlays = {"overlay_sha256": file_sha256(f) for f in config_files(run, args)[1:]}
    return {"config_sha256": file_sha256(args.config), **overlays,
            "encoder_sha256": file_sha256(encoder) if encoder.is_file() else None,
            "overrides": {k: v for k, v in over.items() if k not in WORKDIR_PATHS}}


def check_finished_run(run_dir: Path, identity: dict[str, Any]) -> None:
    """Refuse to reuse a finished run whose recorded identity (``RUN_RECORD``) is missing or is not ``identity``."""
    record = run_dir / RUN_RECORD
    hint = "delete that run folder to run it again with these settings, or use another --workdir"
    if not record.is_file():
        raise SystemExit(f"{run_dir} finished without {RUN_RECORD} (an older bench_accuracy), so its settings cannot "
                         f"be checked; {hint}")
    had = json.loads(record.read_text())
    if had != identity:
        diff = [f"{k}: {had.get(k)!r} -> {identity[k]!r}" for k in ("config_sha256", "encoder_sha256")
                if had.get(k) != identity[k]]
        old, new = had.get("overrides", {}), identity["overrides"]
        diff += [f"--{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        raise SystemExit(f"{run_dir} finished with other settings ({'; '.join(diff)}); {hint}")


def validation_record(csv_path: Path, start_ce: float = 0.9, last: int = 5) -> dict[str, Any]:
    """What a run's ``eval/train_metrics.csv`` says on its validation part: the epoch the bundle selected (the first
    best ``val_auc``), that epoch's ``val_auc`` / ``val_bacc``, their means over the ``last`` epochs, the epochs
    trained, and ``e2e_start_epoch``, the first epoch whose e2e-view training cross-entropy fell below ``start_ce``
    (``None`` without that view, or never). Where several epochs share the best ``val_auc`` (``tied_epochs``), the
    balanced accuracy another rule would have kept: the last of them (``val_bacc_last_tied``, MONAI's
    ``metric_cmp_fn`` ``>=``), and the highest (``val_bacc_max_tied``: an upper bound, chosen on the figure it reports)."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    auc, bacc = ([float(r[k]) for r in rows] for k in ("val_auc", "val_bacc"))
    top = max(auc)
    tied = [i for i, a in enumerate(auc) if a == top]
    best = tied[0]  # the bundle keeps the first of equals
    e2e = [float(r["cls_e2e"]) for r in rows] if "cls_e2e" in rows[0] else []
    return {"best_epoch": best + 1, "epochs_trained": len(rows), "val_auc": auc[best], "val_bacc": bacc[best],
            "tied_epochs": len(tied), "val_bacc_last_tied": bacc[tied[-1]],
            "val_bacc_max_tied": max(bacc[i] for i in tied),
            f"val_auc_last{last}": float(np.mean(auc[-last:])), f"val_bacc_last{last}": float(np.mean(bacc[-last:])),
            "e2e_start_epoch": next((i + 1 for i, ce in enumerate(e2e) if ce < start_ce), None)}


def validation_summary(results: dict[str, list[dict[str, Any]]], last: int = 4) -> dict[str, dict[str, Any]]:
    """Per run key, over its runs: the mean ``val_auc`` / ``val_bacc`` at the selected epochs, how many runs selected
    one of their ``last`` epochs (still improving at the end), how many had several epochs at the best AUC and the
    mean ``val_bacc`` the other tie rules give (see :func:`validation_record`), and the e2e view's start epochs."""
    out = {}
    for key, runs in results.items():
        runs = [r for r in runs if "val_auc" in r]
        if runs:
            out[key] = {"runs": len(runs), "val_auc": float(np.mean([r["val_auc"] for r in runs])),
                        "val_bacc": float(np.mean([r["val_bacc"] for r in runs])),
                        f"best_in_last_{last}_epochs": sum(r["best_epoch"] > r["epochs_trained"] - last for r in runs),
                        "runs_with_tied_best_auc": sum(r["tied_epochs"] > 1 for r in runs),
                        "val_bacc_last_tied": float(np.mean([r["val_bacc_last_tied"] for r in runs])),
                        "val_bacc_max_tied": float(np.mean([r["val_bacc_max_tied"] for r in runs])),
                        "e2e_start_epochs": [r["e2e_start_epoch"] for r in runs]}
    return out


def run_one(run: dict[str, Any], args, shared: Path) -> dict[str, Any]:
    """Train + test one setting on one fold in a subprocess (skipped when finished); its test metrics."""
    run_dir = Path(args.workdir) / "runs" / run_name(run)
    # another bench on the same workdir (say, a second terminal given overlapping --folds) must not delete or
    # rewrite a run that is in progress: that process is named and this one stops
    try:
        with exclusive_lock(run_dir.parent / f".{run_dir.name}.lock", f"run {run_dir.name}"):
            return _run_locked(run, args, shared, run_dir)
    except LockHeld as err:
        raise SystemExit(str(err)) from None


def _run_locked(run: dict[str, Any], args, shared: Path, run_dir: Path) -> dict[str, Any]:
    metrics_file = run_dir / "eval" / "test_metrics.json"
    if metrics_file.is_file():
        check_finished_run(run_dir, run_identity(run, args, run_dir, shared))
    else:
        if run_dir.exists():
            shutil.rmtree(run_dir)  # an interrupted run: start it again
        run_dir.mkdir(parents=True)
        if (shared / "splits.json").is_file():
            shutil.copy2(shared / "splits.json", run_dir / "splits.json")
        start = time.perf_counter()
        log = run_dir / "log.txt"
        with open(log, "w") as f:
            proc = subprocess.run(bundle_command(run, args, run_dir, shared), stdout=f, stderr=subprocess.STDOUT,
                                  cwd=args.workdir, env={**os.environ, "PYTHONUNBUFFERED": "1", **THREADS})
        if proc.returncode != 0 or not metrics_file.is_file():
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"bundle run {run_dir.name} failed (exit {proc.returncode}); log {log}:\n{tail}")
        (run_dir / "seconds.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
        for name in ("splits.json", *(p.name for p in run_dir.glob("frozen_encoder_*.pt"))):
            if not (shared / name).exists():
                shutil.copy2(run_dir / name, shared / name)
        # once the shared extractor exists (a random-init study's first run saves it); a run stopped before this
        # line has no record and is refused, not reused
        write_json(run_dir / RUN_RECORD, run_identity(run, args, run_dir, shared))
    report = json.loads(metrics_file.read_text())["metrics"]
    seconds = run_dir / "seconds.txt"
    return {"bacc": report["test_bacc"], "auc": report["test_auc"], "fold": run["fold"], "seed": run["seed"],
            "seconds": float(seconds.read_text()) if seconds.is_file() else None,
            **validation_record(run_dir / "eval" / "train_metrics.csv")}


def share_encoder(weights: str | None, shared: Path) -> dict[str, Any]:
    """Put ``weights`` in ``shared`` as every run's frozen extractor (refused when the study already has another one);
    returns its description: ``{"weights": source or "random init", "sha256": ...}``."""
    target = shared / "frozen_encoder_tiny_cnn.pt"
    if weights is not None:
        if target.is_file() and file_sha256(target) != file_sha256(weights):
            raise SystemExit(f"{shared.parent} already holds runs with another frozen extractor ({target}); use a new "
                             "--workdir for --encoder-weights " + weights)
        if not target.is_file():
            shutil.copy2(weights, target)
    source = weights or "random init (saved by the first run)"
    return {"weights": source, "sha256": file_sha256(target) if target.is_file() else None}


def make_data(args) -> dict[str, Any]:
    """The synthetic dataset's settings; the slides are generated into ``--dataset-dir`` unless it has a datalist
    (the generator is deterministic, and it keeps intact slides written with the same settings), whose settings must
    then be the requested ones (:func:`check_dataset`)."""
    data = {**DATA, **{k: parse_data_value(v) for k, v in (i.split("=", 1) for i in args.data)}}
    datalist = Path(args.dataset_dir) / "datalist.json"
    if not datalist.is_file():
        from monai_fbta.synthetic import generate_dataset

        generate_dataset(args.dataset_dir, num_classes=len(data.get("classes", ())) or 3, **data)
    check_dataset(datalist, data)
    return data


def parse_data_value(text: str) -> int | float | list[str]:
    """A ``--data`` value: ``3`` -> int, ``0.05`` -> float, ``pleomorphic,glandular,cords`` -> list of names."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return [t.strip() for t in text.split(",")]


def check_dataset(datalist: Path, data: dict[str, Any]) -> None:
    """Refuse slides generated with other synthetic settings than ``data`` (the study records ``data``)."""
    written = json.loads(datalist.read_text())
    config = written.get("config")
    if not isinstance(config, dict):
        raise SystemExit(f"{datalist} has no synthetic generator settings ('config'): the accuracy study runs on "
                         "slides from monai_fbta.synthetic; give it an empty --dataset-dir to generate them")
    # classes: not in DATA; slides of other classes must not pass for the default ones (empty or absent = default)
    had = {**config, "num_slides": len(written.get("training", [])), "classes": config.get("classes") or None}
    asked = {"classes": None, **data}
    diff = [f"{k}={had.get(k)} (asked {v})" for k, v in asked.items() if had.get(k) != v]
    if diff:
        raise SystemExit(f"{datalist}: the slides there were generated with {', '.join(diff)}; pass those with "
                         "--data, or another --dataset-dir to generate the ones asked for")


def row_runs(results: dict[str, list[dict[str, Any]]], setting: dict[str, Any]) -> list[dict[str, Any]]:
    """The finished runs a table row reads: every seed for a main row (each head's main rows run the seeds the study
    planned for them), else the first seed's."""
    res = results.get(run_key(setting["head"], setting["views"], setting["extra"], setting["stage"]), [])
    if setting["table"] != "main" and res:
        first_seed = min(r["seed"] for r in res)
        res = [r for r in res if r["seed"] == first_seed]
    return res


def validation_by_fold(results: dict[str, list[dict[str, Any]]], heads: list[str], folds: list[int],
                       which: tuple[str, ...] = TABLES, last: int = 5) -> list[dict[str, Any]]:
    """One row per distinct run setting: per fold, ``val AUC / val bacc`` at the selected epoch (mean over the row's
    seeds), their mean over folds, and the mean over the ``last`` epochs; what the choices in docs/method.md read."""
    rows, seen = [], set()
    for s in settings(heads, which):
        key = run_key(s["head"], s["views"], s["extra"], s["stage"])
        res = [r for r in row_runs(results, s) if "val_auc" in r]
        if key in seen or not res:  # a run shared by two tables (vanilla is the ablation's "frozen"): once
            continue
        seen.add(key)
        row = {"method": s["label"]}
        row.update({f"fold {f}": _validation_cell([r for r in res if r["fold"] == f]) for f in folds})
        row["mean"] = _validation_cell(res)
        row[f"mean of the last {last} epochs"] = _validation_cell(res, f"_last{last}")
        rows.append(row)
    return rows


def _validation_cell(runs: list[dict[str, Any]], suffix: str = "") -> str:
    """``"val AUC / val bacc"`` averaged over ``runs`` (their ``val_auc{suffix}`` / ``val_bacc{suffix}``), or ``-``."""
    if not runs:
        return "-"
    auc, bacc = (np.mean([r[f"val_{m}{suffix}"] for r in runs]) for m in ("auc", "bacc"))
    return f"{auc:.3f} / {bacc:.3f}"


def summarise(results: dict[str, list[dict[str, Any]]], heads: list[str],
              which: tuple[str, ...] = TABLES) -> dict[str, list[dict[str, Any]]]:
    """``{table: rows}``; each row the mean ± std over folds and seeds of its runs."""
    tables: dict[str, list[dict[str, Any]]] = {}
    for s in settings(heads, which):
        res = row_runs(results, s)
        tables.setdefault(s["table"], []).append({
            "method": s["label"], "test balanced acc": mean_std([r["bacc"] for r in res]),
            "test macro AUC": mean_std([r["auc"] for r in res]),
            "folds x seeds": f"{len({r['fold'] for r in res})} x {len({r['seed'] for r in res})}" if res else "0",
        })
    return tables


def paired_gains(results: dict[str, list[dict[str, Any]]], heads: list[str]) -> dict[str, dict[str, Any]]:
    """Each FBTA row of the main table against its head's vanilla row, run by run on the same (fold, seed):
    ``{method: {"vs", "gain", "interval", "ahead", "level", "behind", "folds", "seeds"}}``. ``gain`` is the mean
    test balanced-accuracy difference; ``interval`` a 95% t interval over the per-fold means (seeds averaged within a
    fold, since a fold's seeds share its test slides; the folds taken as independent, which cross-validation folds
    are not quite, so a rough guide to how far the gain could move on other data)."""
    out: dict[str, dict[str, Any]] = {}
    rows = {s["label"]: s for s in settings(heads, ("main",))}
    for label, s in rows.items():
        vanilla = rows.get(HEAD_NAMES.get(s["head"], s["head"]))
        if vanilla is None or vanilla is s:
            continue
        base = {(r["fold"], r["seed"]): r["bacc"] for r in row_runs(results, vanilla)}
        diffs = {(r["fold"], r["seed"]): r["bacc"] - base[r["fold"], r["seed"]]
                 for r in row_runs(results, s) if (r["fold"], r["seed"]) in base}
        if not diffs:
            continue
        folds = sorted({f for f, _ in diffs})
        per_fold = np.array([np.mean([d for (f, _), d in diffs.items() if f == fold]) for fold in folds])
        half = (stats.t.ppf(0.975, len(folds) - 1) * per_fold.std(ddof=1) / np.sqrt(len(folds))
                if len(folds) > 1 else float("nan"))
        values = np.array(list(diffs.values()))
        out[label] = {"vs": vanilla["label"], "gain": float(values.mean()),
                      "interval": [float(per_fold.mean() - half), float(per_fold.mean() + half)],
                      "ahead": int((values > 1e-9).sum()), "level": int((np.abs(values) <= 1e-9).sum()),
                      "behind": int((values < -1e-9).sum()), "folds": len(folds),
                      "seeds": len({seed for _, seed in diffs})}
    return out


def paired_gain_rows(gains: dict[str, dict[str, Any]]) -> list[dict[str, str]]:
    """:func:`paired_gains` as table rows."""
    return [{"comparison": f"{method} - {g['vs']}", "mean gain (test bacc)": f"{g['gain']:+.3f}",
             "95% interval over folds": format_interval(g["interval"]),
             "runs ahead / level / behind": f"{g['ahead']} / {g['level']} / {g['behind']}",
             "folds x seeds": f"{g['folds']} x {g['seeds']}"} for method, g in gains.items()]


def _mean(cell: str) -> float:
    return parse_mean_std(cell)[0]


def checks(tables: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """The issue's targets, evaluated on this run's means (``met`` None where a row is missing)."""
    main = {r["method"]: _mean(r["test balanced acc"]) for r in tables.get("main", [])}
    out: dict[str, dict[str, Any]] = {}

    def put(name: str, value: float, target: str, met: bool) -> None:
        out[name] = {"value": value, "target": target, "met": None if np.isnan(value) else bool(met)}

    if "ABMIL" in main:
        fbta, van = main["ABMIL + FBTA"], main["ABMIL"]
        put("ABMIL + FBTA test bacc", fbta, ">= 0.80", fbta >= 0.80)
        put("ABMIL + FBTA - ABMIL (test bacc)", fbta - van, ">= 0.15", fbta - van >= 0.15)
        staged = main.get("ABMIL + FBTA + translated-head stage", float("nan"))
        put("ABMIL + FBTA + translated-head stage test bacc", staged, ">= 0.80", staged >= 0.80)
        put("ABMIL + FBTA + translated-head stage - ABMIL (test bacc)", staged - van, ">= 0.15", staged - van >= 0.15)
    for head in (HEAD_NAMES["transmil"], HEAD_NAMES["mambamil"]):
        for method in (f"{head} + FBTA", f"{head} + FBTA + translated-head stage"):
            if head in main and method in main:
                gain = main[method] - main[head]
                put(f"{method} - {head} (test bacc)", gain, "> 0", gain > 0)
    abl = [_mean(r["test balanced acc"]) for r in tables.get("ablation", [])]
    if len(abl) == 3:
        put("ablation: e2e+frozen - frozen", abl[1] - abl[0], "> 0", abl[1] > abl[0])
        put("ablation: FBTA - e2e+frozen", abl[2] - abl[1], "> 0", abl[2] > abl[1])
    return out


def draw_bars(tables: dict[str, list[dict[str, Any]]]):
    def draw(ax) -> None:
        rows = [r for t in ("main", "ema", "ablation") for r in tables.get(t, []) if r["folds x seeds"] != "0"]
        rows = list({r["method"]: r for r in rows}.values())
        means = [_mean(r["test balanced acc"]) for r in rows]
        stds = [parse_mean_std(r["test balanced acc"])[1] for r in rows]
        ax.barh(range(len(rows)), means, xerr=stds, color=["#3a7" if "FBTA" in r["method"] else "#999" for r in rows])
        ax.set_yticks(range(len(rows)), [f"{r['method']} ({r['folds x seeds']})" for r in rows], fontsize=7)
        ax.axvline(1 / 3, color="k", ls=":", lw=1)
        ax.set_xlim(0, 1)
        ax.set_xlabel("held-out test balanced accuracy, mean ± std (dotted: chance)")
        ax.invert_yaxis()
    return draw


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds of the ABMIL main rows "
                   "(other rows use the first)")
    p.add_argument("--every-seed", action="store_true", help="every head's main rows run (and average) every --seeds, "
                   "not only ABMIL's")
    p.add_argument("--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="test folds of the 5-fold split")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the bundle's num_epochs)")
    p.add_argument("--heads", nargs="+", default=list(HEAD_NAMES), choices=list(HEAD_NAMES))
    p.add_argument("--tables", nargs="+", default=list(TABLES), choices=TABLES, help="which tables' rows to run")
    p.add_argument("--quick", action="store_true", help="1 fold, 1 seed, 2 epochs, ABMIL only")
    p.add_argument("--workdir", default=None, help="runs, shared cache and splits (default: a new temp folder); "
                   "rerunning with the same folder skips finished runs")
    p.add_argument("--dataset-dir", default=None, help="slides (default: <workdir>/data, generated with --data)")
    p.add_argument("--data", nargs="*", metavar="KEY=VALUE", default=[], help=f"synthetic data settings, default {DATA}")
    p.add_argument("--config", default=str(BUNDLE_CONFIG), help="bundle training config")
    p.add_argument("--override", nargs="*", metavar="KEY=VALUE", help="extra bundle overrides for every run")
    p.add_argument("--encoder-weights", default=None, help="the frozen extractor of every run (a tiny_cnn state_dict, "
                   "e.g. from benchmarks/pretrain_ssl.py); default: the first run's random init")
    p.add_argument("--estimate-only", action="store_true", help="print the plan and the time estimate, run nothing")
    p.add_argument("--finished-only", action="store_true", help="summarise the runs that finished in --workdir, run "
                   "nothing else (a partial study: the tables' 'folds x seeds' column says what each row holds)")
    add_common_args(p)
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.folds, args.heads, args.epochs = args.seeds[:1], args.folds[:1], ["abmil"], args.epochs or 2
    if args.epochs is None:
        args.epochs = int(json.loads(Path(args.config).read_text())["num_epochs"])
    args.workdir = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="fbta_acc_"))
    args.dataset_dir = os.path.abspath(args.dataset_dir or os.path.join(args.workdir, "data"))
    return args


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    shared = Path(args.workdir) / "shared"
    shared.mkdir(parents=True, exist_ok=True)
    runs = plan_runs(args.heads, args.seeds, args.folds, tuple(args.tables), args.every_seed)
    data = make_data(args)
    share_encoder(args.encoder_weights, shared)
    est = estimate_s(runs, prepared=(shared / "splits.json").is_file(), epochs=args.epochs)
    print(f"accuracy study: {len(runs)} bundle runs, folds {args.folds}, seeds {args.seeds}, {args.epochs} epochs "
          f"each, workdir {args.workdir}\nestimated time: {est / 60:.1f} min (2-core CPU guess; finished runs are "
          "skipped; refined after each run)", flush=True)
    if args.estimate_only:
        return {}
    results: dict[str, list[dict[str, Any]]] = {}
    start = time.perf_counter()
    if args.finished_only:
        runs = [r for r in runs if (Path(args.workdir) / "runs" / run_name(r) / "eval" / "test_metrics.json").is_file()]
    for i, run in enumerate(runs, 1):
        res = run_one(run, args, shared)
        results.setdefault(run["key"], []).append(res)
        run["seconds"] = res["seconds"]
        timed = [r for r in runs[:i] if r["seconds"] is not None]
        scale = sum(r["seconds"] for r in timed) / estimate_s(timed, True, epochs=args.epochs) if timed else 1.0
        left, elapsed = estimate_s(runs[i:], True, scale, args.epochs), time.perf_counter() - start
        print(f"[{i}/{len(runs)}] {run_name(run)}: test bacc {res['bacc']:.3f} auc {res['auc']:.3f} "
              f"({elapsed / 60:.1f} min so far, ~{left / 60:.1f} min left)", flush=True)
    tables = summarise(results, args.heads, tuple(args.tables))
    head = (f"Held-out test folds {args.folds} of a 5-fold patient-level split, {args.epochs} epochs, mean ± std over "
            f"folds x training seeds {args.seeds} ({'main' if args.every_seed else 'ABMIL main'} rows; other rows: seed "
            f"{args.seeds[0]})")
    print(f"\n{head}\n")
    for name, rows in tables.items():
        print(f"{name}:\n{format_table(rows, markdown=True)}\n")
    targets = checks(tables)
    for name, r in targets.items():
        verdict = "not measured" if r["met"] is None else "met" if r["met"] else "NOT met"
        print(f"{name}: {r['value']:.3f} (target {r['target']}: {verdict})")
    validation = validation_summary(results)
    for key, v in validation.items():
        print(f"validation, {key}: selected-epoch val AUC {v['val_auc']:.3f}, val bacc {v['val_bacc']:.3f} "
              f"({v['runs']} runs; {v['best_in_last_4_epochs']} selected one of their last 4 epochs; "
              f"{v['runs_with_tied_best_auc']} had the best AUC at several epochs: val bacc {v['val_bacc_last_tied']:.3f} "
              f"keeping the last of them, {v['val_bacc_max_tied']:.3f} at most)")
    gains = paired_gains(results, args.heads)
    by_fold = {PAIRED_TITLE: paired_gain_rows(gains),
               VALIDATION_TITLE: validation_by_fold(results, args.heads, args.folds, tuple(args.tables))}
    for title, rows in by_fold.items():
        print(f"\n{title}:\n{format_table(rows, markdown=True)}\n")
    overrides = dict(o.partition("=")[::2] for o in args.override or ())
    payload = {"data": data, "seeds": args.seeds, "folds": args.folds, "epochs": args.epochs, "heads": args.heads, "split": head,
               "bundle_settings": recorded_settings(args.config, {"num_epochs": args.epochs, **overrides}),
               "study_overrides": {**STUDY_OVERRIDES, **overrides},
               "frozen_encoder": share_encoder(args.encoder_weights, shared), "tables": tables, "ratios": targets,
               "validation": validation, "paired_gains": gains, "extra_tables": by_fold,
               "runs": results, "machine": machine_info(),
               "minutes": (time.perf_counter() - start) / 60}
    finish(args, "accuracy", payload, draw_bars(tables))
    return payload


if __name__ == "__main__":
    main()
