"""Peak memory of ONE training iteration vs bag size N: FBTA vs direct end-to-end (with and without
gradient checkpointing), same patch encoder, all measured in one run.

Configurations (random tensors as patches: the memory is the model's, not the reader's):

* ``fbta``: a real :class:`~monai_fbta.engines.FBTATrainer` iteration with all three views, C*M
  patches (default 100) through the trainable extractor, the EMA extractor on the clean patches,
  the translator, and the shared ABMIL; the sample holds the full frozen bag ``[N, D]``.
* ``direct``: all N patches through the trainable extractor (chunks of ``--chunk``), then ABMIL,
  cross-entropy, backward, AdamW step: what FBTA avoids.
* ``direct_ckpt``: the same with gradient checkpointing per chunk
  (:func:`monai_fbta.engines.trainer.encode_patches`).

Every configuration runs in a fresh subprocess. ``peak_mb`` = growth of the process's peak RSS
(CPU; ``VmHWM`` reset just before the step) or of ``torch.cuda.max_memory_allocated`` (CUDA) over
the memory held after the models, optimiser and inputs were created: it includes activations,
gradients, optimiser state and transient buffers, not the input patches themselves.
``saved_mb`` = the autograd saved-tensor bytes at the end of the forward pass (activations only).

Direct e2e is measured at ``--calib-n`` (small N, fast) and at the bag sizes whose predicted
peak is under ``--cap-gb`` and that are ``<= --direct-max-n`` (time on a CPU); other sizes are
extrapolated linearly from the fit over every measured point and marked ``extrapolated``.

    python benchmarks/bench_memory.py [--n 1000 2000 ...] [--encoder resnet18] [--patch 224]
        [--cap-gb 16] [--json out.json] [--plot out.png]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    PeakMemory, SavedTensorMeter, add_common_args, child_main, finish, linear_fit, machine_info, mem_available_mb,
    print_ratios, print_table, ratio, resolve_device, rss_mb, run_child, timed,
)

DEFAULT_N = [1000, 2000, 5000, 10000, 20000, 50000, 100000]
LIMIT_GB = 24.0  # the "modest GPU" the method targets


def _fbta_child(n: int, encoder: str, patch: int, pseudo: int, device: torch.device) -> dict:
    from monai_fbta.engines import FBTALoss, FBTATrainer
    from monai_fbta.engines.trainer import fbta_param_groups
    from monai_fbta.networks.registry import build_encoder, build_mil_head, build_translator

    enc = build_encoder(encoder).to(device)
    with torch.no_grad():
        dim = int(enc(torch.rand(2, 3, patch, patch, device=device)).shape[-1])
    head = build_mil_head("abmil", in_features=dim, num_classes=2).to(device)
    translator = build_translator(in_features=dim).to(device)
    opt = torch.optim.AdamW(fbta_param_groups(head, translator, enc))
    s = min(pseudo, n)
    index = torch.randperm(n)[:s].sort().values
    features = torch.randn(n, dim)
    sample = {
        "slide_id": "bench", "label": 1, "features": features, "pb_index": index, "pb_features": features[index],
        "pb_image": torch.rand(s, 3, patch, patch), "pb_image_clean": torch.rand(s, 3, patch, patch),
    }
    trainer = FBTATrainer(device, 1, [sample], head, opt, FBTALoss(), translator=translator, trainable_encoder=enc)
    params = [p for g in opt.param_groups for p in g["params"]]
    meter = SavedTensorMeter(exclude=params)
    with PeakMemory(device) as peak, meter():
        seconds, _ = timed(trainer.run, device)
    return {"peak_mb": peak.peak_mb, "saved_mb": meter.mb, "seconds": seconds, "method": peak.method, "dim": dim,
            "patches_through_encoder": s}


def _direct_child(n: int, encoder: str, patch: int, chunk: int, ckpt: bool, device: torch.device) -> dict:
    from monai_fbta.engines.trainer import encode_patches
    from monai_fbta.networks.registry import build_encoder, build_mil_head

    enc = build_encoder(encoder).to(device).train()
    with torch.no_grad():
        dim = int(enc(torch.rand(2, 3, patch, patch, device=device)).shape[-1])
    head = build_mil_head("abmil", in_features=dim, num_classes=2).to(device).train()
    params = [*enc.parameters(), *head.parameters()]
    opt = torch.optim.AdamW(params)
    images = torch.rand(n, 3, patch, patch, device=device)
    label = torch.tensor([1], device=device)
    meter = SavedTensorMeter(exclude=[*params, images])

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with meter():
            feats = encode_patches(enc, images, chunk, grad_checkpointing=ckpt)
            loss = torch.nn.functional.cross_entropy(head(feats.unsqueeze(0)), label)
        loss.backward()
        opt.step()

    with PeakMemory(device) as peak:
        seconds, _ = timed(step, device)
    return {"peak_mb": peak.peak_mb, "saved_mb": meter.mb, "seconds": seconds, "method": peak.method, "dim": dim,
            "patches_through_encoder": n}


def child(args) -> dict:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    config, n = args.child[0], int(args.child[1])
    if config == "fbta":
        out = _fbta_child(n, args.encoder, args.patch, args.pseudo_bag, device)
    else:
        out = _direct_child(n, args.encoder, args.patch, args.chunk, config == "direct_ckpt", device)
    return {"config": config, "n": n, "rss_after_setup_mb": rss_mb(), **out}


def _measure(args, config: str, n: int) -> dict:
    cli = ["--child", config, str(n), "--encoder", args.encoder, "--patch", str(args.patch), "--chunk", str(args.chunk),
           "--pseudo-bag", str(args.pseudo_bag), "--device", args.device]
    if args.threads:
        cli += ["--threads", str(args.threads)]
    row = run_child(os.path.abspath(__file__), cli, timeout=args.child_timeout)
    row.setdefault("config", config)
    row.setdefault("n", n)
    row["source"] = "measured" if "error" not in row else "failed"
    status = f"{row['peak_mb']:.0f} MB peak, {row['seconds']:.1f} s" if "error" not in row else row["error"]
    print(f"  {config:<12s} N={n:<7d} {status}", flush=True)
    return row


def _direct_rows(args, config: str, cap_mb: float) -> tuple[list[dict], tuple[float, float], tuple[float, float]]:
    """Calibration points, then the requested N that fit the cap; the rest extrapolated."""
    measured = [r for r in (_measure(args, config, n) for n in args.calib_n) if r["source"] == "measured"]
    if len(measured) < 2:
        raise SystemExit(f"{config}: fewer than two calibration points succeeded: {measured}")
    rows = []
    for n in args.n:
        fit = linear_fit([r["n"] for r in measured], [r["peak_mb"] for r in measured])
        predicted = fit[0] + fit[1] * n
        if predicted <= cap_mb and n <= args.direct_max_n:
            row = _measure(args, config, n)
            if row["source"] == "measured":
                measured.append(row)
                rows.append(row)
                continue
        rows.append({"config": config, "n": n})
    peak_fit = linear_fit([r["n"] for r in measured], [r["peak_mb"] for r in measured])
    saved_fit = linear_fit([r["n"] for r in measured], [r["saved_mb"] for r in measured])
    time_fit = linear_fit([r["n"] for r in measured], [r["seconds"] for r in measured])
    for row in rows:
        if "peak_mb" not in row:
            n = row["n"]
            row.update(source="extrapolated", peak_mb=peak_fit[0] + peak_fit[1] * n,
                       saved_mb=saved_fit[0] + saved_fit[1] * n, seconds=max(0.0, time_fit[0] + time_fit[1] * n))
    calib = [dict(r, source="measured (calibration)") for r in measured if r["n"] not in args.n]
    return calib + rows, peak_fit, time_fit


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", nargs="+", type=int, default=DEFAULT_N, help="bag sizes N")
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--patch", type=int, default=224)
    p.add_argument("--pseudo-bag", type=int, default=100, help="C*M patches through the extractor in FBTA")
    p.add_argument("--chunk", type=int, default=16, help="encoder chunk (and checkpoint segment) size")
    p.add_argument("--calib-n", nargs="+", type=int, default=[16, 32, 64], help="small N always measured for direct e2e")
    p.add_argument("--direct-max-n", type=int, default=None,
                   help="largest requested N measured (not extrapolated) for direct e2e (default: 2000 on CUDA, 0 on CPU)")
    p.add_argument("--cap-gb", type=float, default=16.0, help="memory cap for measured direct e2e runs (GiB)")
    p.add_argument("--limit-gb", type=float, default=LIMIT_GB, help="report the N where direct e2e exceeds this")
    p.add_argument("--configs", nargs="+", default=["fbta", "direct", "direct_ckpt"])
    p.add_argument("--child-timeout", type=float, default=1800)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    add_common_args(p, threads=None)
    args = p.parse_args(argv)
    if args.child:
        child_main(child, args=args)
        return {}
    device = resolve_device(args.device)
    if args.direct_max_n is None:
        args.direct_max_n = 2000 if device.type == "cuda" else 0
    if device.type == "cuda":
        cap_mb = min(args.cap_gb * 1024, torch.cuda.get_device_properties(device).total_memory / 2**20 * 0.9)
    else:
        cap_mb = min(args.cap_gb * 1024, mem_available_mb() * 0.7)
    info = machine_info(device)
    print(f"bench_memory: {args.encoder} at {args.patch} px on {device}, cap {cap_mb / 1024:.1f} GiB, "
          f"load {info['load_avg_1m']:.2f} on {info['cpu_count']} CPUs", flush=True)

    rows, fits = [], {}
    for config in args.configs:
        if config == "fbta":
            rows += [_measure(args, "fbta", n) for n in args.n]
        elif config in ("direct", "direct_ckpt"):
            config_rows, peak_fit, time_fit = _direct_rows(args, config, cap_mb)
            rows += config_rows
            fits[config] = {"peak_mb_intercept": peak_fit[0], "peak_mb_per_patch": peak_fit[1],
                            "seconds_per_patch": time_fit[1]}
            if peak_fit[1] > 0:
                fits[config]["n_exceeding_limit"] = int(max(0.0, (args.limit_gb * 1024 - peak_fit[0]) / peak_fit[1]))
        else:
            raise SystemExit(f"unknown config {config!r}: choose from fbta, direct, direct_ckpt")
    for r in rows:
        r["peak_gb"] = r.get("peak_mb", float("nan")) / 1024
    table = [{k: r.get(k) for k in ("config", "n", "source", "peak_gb", "saved_mb", "seconds")} for r in rows]
    print_table("Peak memory of one training iteration (peak_gb: peak RSS/CUDA growth; saved_mb: autograd "
                "saved tensors)", table)

    def peak(config: str, n: int) -> float:
        return next((r["peak_mb"] for r in rows if r["config"] == config and r["n"] == n and "peak_mb" in r), float("nan"))

    ratios = {}
    n_lo, n_hi = min(args.n), (50000 if 50000 in args.n else max(args.n))
    if "fbta" in args.configs:
        v = peak("fbta", n_hi) / peak("fbta", n_lo)
        ratios[f"fbta_peak_N{n_hi}/N{n_lo}"] = ratio(v, "<= 1.2", v <= 1.2)
    n_cmp = 2000 if 2000 in args.n else n_lo
    for config in ("direct", "direct_ckpt"):
        if config in args.configs and "fbta" in args.configs:
            v = peak(config, n_cmp) / peak("fbta", n_cmp)
            src = next(r["source"] for r in rows if r["config"] == config and r["n"] == n_cmp)
            ratios[f"{config}/fbta peak at N={n_cmp} ({src})"] = ratio(v, ">= 10" if config == "direct" else "-",
                                                                       v >= 10 if config == "direct" else None)
    for config, fit in fits.items():
        if "n_exceeding_limit" in fit:
            print(f"{config}: {fit['peak_mb_per_patch']:.2f} MB per patch (+{fit['peak_mb_intercept']:.0f} MB); "
                  f"exceeds {args.limit_gb:g} GB at N ~ {fit['n_exceeding_limit']:,} (linear fit, on paper)")
    print_ratios(ratios)

    payload = {"machine": info, "settings": {k: v for k, v in vars(args).items() if k not in ("child", "json", "plot")},
               "cap_mb": cap_mb, "memory_metric": rows[0].get("method") if rows else None,
               "rows": rows, "fits": fits, "ratios": ratios}

    def draw(ax) -> None:
        for config, style in (("fbta", "o-"), ("direct", "s-"), ("direct_ckpt", "^-")):
            pts = [r for r in rows if r["config"] == config and r["n"] in args.n]
            if not pts:
                continue
            ax.plot([r["n"] for r in pts], [r["peak_gb"] for r in pts], style, label=config, mfc="none")
            meas = [r for r in pts if r["source"] == "measured"]
            ax.plot([r["n"] for r in meas], [r["peak_gb"] for r in meas], style[0], color=ax.lines[-1].get_color())
        ax.axhline(args.limit_gb, color="grey", ls="--", lw=1, label=f"{args.limit_gb:g} GB")
        ax.set(xscale="log", yscale="log", xlabel="patches per slide N", ylabel="peak memory of one iteration (GB)",
               title=f"{args.encoder} {args.patch} px on {device} (hollow = extrapolated)")
        ax.legend()

    finish(args, "memory", payload, draw)
    return payload


if __name__ == "__main__":
    main()
