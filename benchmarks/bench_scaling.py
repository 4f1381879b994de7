"""Scaling over processes (issue 14, item 5): extraction and training throughput with 1 and 2 processes under
``torchrun`` (gloo backend on the CPU), the same commands that spread over GPUs and nodes (docs/benchmarks.md).

* extraction: ``torchrun --standalone --nproc_per_node N -m monai_fbta.data.extraction`` over ``--slides``
  generated slides of ``--tiles`` patches each (ResNet-50 truncated, 256 px by default); each rank extracts
  ``rows[rank::N]``. Patches/s from the extraction report (total patches over the busiest rank's summed
  per-slide seconds: process start-up and model building left out) and from the command's wall time.
* training: ``torchrun --standalone --nproc_per_node N -m monai.bundle run training`` with ``train.json`` +
  ``multi_gpu_train.json`` (DDP, ``DistributedSampler``) at tiny settings (``TINY``: tiny_cnn, 64 px, generated
  slides; the features cached once before). Seconds per epoch are ignite's ``Epoch[k] Complete. Time taken``
  lines of ``train.log`` (training and that epoch's validation), epochs after the first; slides/s = training
  slides per epoch (all ranks) / seconds.

Runs alternate N = 1, 2, 1, 2, ... (``--repeats`` each; medians). torchrun gives each of N > 1 processes one
thread (``OMP_NUM_THREADS=1``); a single process uses every core.

    python benchmarks/bench_scaling.py [--nprocs 1 2] [--repeats 2] [--json out.json --plot out.png]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from _common import DATA_DIR, add_common_args, finish, median, print_ratios, print_table, ratio, start_run, tiled_slide, timed  # noqa: E402

CONFIGS = os.path.join(ROOT, "bundles", "fbta_stad", "configs")
TRAIN, MULTI = os.path.join(CONFIGS, "train.json"), os.path.join(CONFIGS, "multi_gpu_train.json")
TINY = ["--synthetic#num_slides", "12", "--synthetic#size", "1024", "--encoder_name", "tiny_cnn", "--num_workers", "0",
        "--num_folds", "3", "--val_fraction", "0.5", "--patch_size", "64", "--num_clusters", "8"]
EPOCH_LINE = re.compile(r"Epoch\[(\d+)\] Complete\. Time taken: (\d+):(\d+):([\d.]+)")


def torchrun(nproc: int, args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def run(cmd: Sequence[str], cwd: str) -> float:
    """Wall seconds of ``cmd``; a failure stops the benchmark with its output's tail."""
    seconds, done = timed(lambda: subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True))
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{(done.stdout + done.stderr)[-3000:]}")
    return seconds


def extraction(nproc: int, datalist: str, out: str, args) -> dict[str, float]:
    """One extraction of every slide with ``nproc`` processes into an empty ``out``."""
    shutil.rmtree(out, ignore_errors=True)
    wall = run(torchrun(nproc, ["-m", "monai_fbta.data.extraction", "--datalist", datalist, "--out", out, "--encoder",
                                args.encoder, "--patch-size", str(args.patch), "--batch-size", str(args.batch_size),
                                "--num-workers", "0", "--no-progress", "--strict"]), ROOT)
    with open(os.path.join(out, "extraction_report.csv")) as f:
        rows = list(csv.DictReader(f))
    if len(rows) != args.slides or any(r["status"] != "done" for r in rows):
        raise SystemExit(f"extraction with {nproc} process(es) did not extract every slide: {rows}")
    patches = sum(int(r["n_patches"]) for r in rows)
    busy = max(sum(float(r["seconds"]) for r in rows[rank::nproc]) for rank in range(nproc))  # rank r got rows[r::N]
    return {"patches": patches, "wall_s": wall, "busiest_rank_s": busy}


def training(nproc: int, work: str, i: int, args) -> dict[str, float]:
    """One tiny bundle training with ``nproc`` processes (fresh checkpoint/output folders; data and cache shared)."""
    out, ckpt = os.path.join(work, f"eval_{nproc}_{i}"), os.path.join(work, f"models_{nproc}_{i}")
    dirs = ["--dataset_dir", os.path.join(work, "data"), "--cache_dir", os.path.join(work, "cache"),
            "--ckpt_dir", ckpt, "--output_dir", out]
    wall = run(torchrun(nproc, ["-m", "monai.bundle", "run", "training", "--config_file", repr([TRAIN, MULTI]), *dirs,
                                *TINY, "--num_epochs", str(args.epochs)]), work)
    with open(os.path.join(out, "train.log")) as f:
        epochs = {int(m[1]): 3600 * int(m[2]) + 60 * int(m[3]) + float(m[4]) for m in EPOCH_LINE.finditer(f.read())}
    with open(os.path.join(ckpt, "splits.json")) as f:
        n_train = len(json.load(f)["folds"][0]["train"])
    later = [s for e, s in epochs.items() if e > 1]
    if not later:
        raise SystemExit(f"no 'Epoch[k] Complete' lines after the first epoch in {out}/train.log")
    return {"wall_s": wall, "s_per_epoch": median(later), "train_slides": n_train}


def make_slides(args) -> str:
    """``--slides`` generated slides (distinct seeds) and their datalist CSV; returns the CSV path."""
    rows_n, cols_n = args.tiles
    paths = [tiled_slide(os.path.join(args.data_dir, f"scaling_{rows_n}x{cols_n}_{i}.tiff"), (rows_n, cols_n),
                         tile=args.patch, seed=i) for i in range(args.slides)]
    datalist = os.path.join(args.data_dir, f"scaling_{rows_n}x{cols_n}_{args.slides}.csv")
    with open(datalist, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["slide_id", "path", "label"])
        writer.writerows([os.path.splitext(os.path.basename(p))[0], p, 0] for p in paths)
    return datalist


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nprocs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--data-dir", default=DATA_DIR)
    p.add_argument("--slides", type=int, default=4)
    p.add_argument("--tiles", type=int, nargs=2, default=[8, 16], metavar=("ROWS", "COLS"))
    p.add_argument("--encoder", default="resnet50_trunc")
    p.add_argument("--patch", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=4, help="training epochs per run (the first is not timed)")
    p.add_argument("--skip", nargs="*", default=[], choices=["extraction", "training"])
    add_common_args(p)
    args = p.parse_args(argv)
    device, info = start_run(args, f"bench_scaling: {args.nprocs} processes, torchrun (gloo)")
    if device.type != "cpu":
        raise SystemExit("bench_scaling measures CPU processes (gloo); on GPUs run the same commands with NCCL")
    work = tempfile.mkdtemp(prefix="fbta_scaling_")
    datalist = make_slides(args)
    if "training" not in args.skip:  # data generation + feature cache, once, not timed
        training(1, work, -1, argparse.Namespace(**{**vars(args), "epochs": 2}))
    results: dict[str, dict[int, list[dict[str, float]]]] = {"extraction": {}, "training": {}}
    for i in range(args.repeats):
        for n in args.nprocs:
            if "extraction" not in args.skip:
                results["extraction"].setdefault(n, []).append(extraction(n, datalist, os.path.join(work, "features"), args))
            if "training" not in args.skip:
                results["training"].setdefault(n, []).append(training(n, work, i, args))
    return report(args, info, results)


def _rows(results: dict[str, dict[int, list[dict[str, float]]]]) -> list[dict[str, Any]]:
    rows = []
    for n, runs in results["extraction"].items():
        patches = runs[0]["patches"]
        rows.append({"what": "extraction", "processes": n, "patches_or_slides": patches,
                     "per_s": median(patches / r["busiest_rank_s"] for r in runs),
                     "per_s_incl_startup": median(patches / r["wall_s"] for r in runs), "unit": "patches/s"})
    for n, runs in results["training"].items():
        slides = runs[0]["train_slides"]
        rows.append({"what": "training", "processes": n, "patches_or_slides": slides,
                     "per_s": median(slides / r["s_per_epoch"] for r in runs),
                     "per_s_incl_startup": median(r["wall_s"] for r in runs), "unit": "slides/s (last col: wall s per run)"})
    return rows


def report(args, info, results) -> dict:
    rows = _rows(results)
    print_table(f"Throughput vs processes (median of {args.repeats} alternating runs)", rows)
    ratios = {}
    for what in ("extraction", "training"):
        by_n = {r["processes"]: r["per_s"] for r in rows if r["what"] == what}
        if len(by_n) > 1:
            lo, hi = min(by_n), max(by_n)
            ratios[f"{what}: {hi} processes / {lo} process(es)"] = ratio(by_n[hi] / by_n[lo], "-", None)
    print_ratios(ratios)
    payload = {"machine": info, "settings": {k: v for k, v in vars(args).items() if k not in ("json", "plot")},
               "rows": rows, "ratios": ratios, "runs": {k: {str(n): v for n, v in d.items()} for k, d in results.items()}}

    def draw(ax) -> None:
        for what, colour in (("extraction", "#48c"), ("training", "#c84")):
            pts = [(r["processes"], r["per_s"]) for r in rows if r["what"] == what]
            if pts:
                base = pts[0][1]
                ax.plot([n for n, _ in pts], [v / base for _, v in pts], "o-", color=colour, label=what)
        ax.plot(args.nprocs, [n / args.nprocs[0] for n in args.nprocs], "k:", label="linear")
        ax.set(xlabel="processes (torchrun, gloo)", ylabel="throughput / 1 process", xticks=args.nprocs,
               title=f"{info['cpu_count']} CPU cores")
        ax.legend()

    finish(args, "scaling", payload, draw)
    return payload


if __name__ == "__main__":
    main()
