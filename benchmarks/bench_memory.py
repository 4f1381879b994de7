"""Peak memory of ONE training iteration vs bag size N: FBTA (per MIL head) vs direct end-to-end
(with and without gradient checkpointing), same patch encoder, every figure measured in one run.

Defaults are the paper's setting: ResNet-50 truncated after layer 3 (1024-d), 256 px patches,
C = 100 clusters x M = 1 patch, K = 10 translator heads, heads of width 512.

Configurations (random tensors as patches: the memory is the model's, not the reader's):

* ``fbta_<head>``: a real :class:`~monai_fbta.engines.FBTATrainer` iteration with all three views
  and the library defaults: the frozen view is the WHOLE bag ``F^FB [N, D]`` (``frozen_bag="full"``),
  the translated view ``f_T(F^FB[S])`` (``translated_bag="pseudo"``), C*M patches through the
  trainable extractor, the EMA extractor on the clean patches, the EMA teacher head on ``F^FB``
  (consistency), the shared MIL head with gradients over all N (chunked and checkpointed beyond
  ``bag_chunk_size`` instances, see ``monai_fbta.networks.mil_base``). ``--translated-bag full``
  measures the bundle's ``f_T(F^FB)`` instead.
* ``direct``: all N patches through the trainable extractor (chunks of ``--chunk``), then ABMIL,
  cross-entropy, backward, AdamW step: what FBTA avoids.
* ``direct_ckpt``: the same with gradient checkpointing per chunk
  (:func:`monai_fbta.networks.encode.encode_patches`).

Every configuration runs in a fresh subprocess. ``peak_mb`` = growth of the process's peak RSS
(CPU; ``VmHWM`` reset just before the step) or of ``torch.cuda.max_memory_allocated`` (CUDA) over
the memory held after the models, optimiser and inputs were created: it includes activations,
gradients, optimiser state and transient buffers, not the input patches themselves.
On CPU each child runs with glibc's ``M_MMAP_THRESHOLD`` fixed at 1 MiB (``MALLOC_MMAP_THRESHOLD_``):
buffers above it are returned to the OS when freed, so RSS follows the live tensors. With glibc's
default *dynamic* threshold, freed buffers of up to 32 MiB stay in the heap and the RSS peak
depends on allocation order and fragmentation (we saw a chunked MambaMIL "peak" grow when its
segments got smaller), not on what the iteration holds.
``saved_mb`` = the autograd saved-tensor bytes at the end of the forward pass (activations only).

Direct e2e is measured at ``--direct-n``, in increasing order, while the peak predicted from the
points measured so far stays under ``--cap-gb`` (and the machine's free memory): nothing is
extrapolated into the table. The N where direct training would pass ``--limit-gb`` is printed
from the measured slope, labelled as such.

    python benchmarks/bench_memory.py [--n 1000 5000 ...] [--heads abmil transmil mambamil]
        [--encoder resnet50_trunc] [--patch 256] [--cap-gb 16] [--json out.json] [--plot out.png]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    PeakMemory, SavedTensorMeter, add_common_args, child_main, finish, linear_fit, machine_info, mem_available_mb,
    print_ratios, print_table, ratio, resolve_device, rss_mb, run_child, timed,
)

DEFAULT_N = [1000, 5000, 20000, 50000, 100000]
DEFAULT_DIRECT_N = [16, 32, 64, 128, 256, 512, 1024, 2048]
LIMIT_GB = 24.0  # the "modest GPU" the method targets
CPU_ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}  # see the module docstring
TARGET_RATIO = 1.5  # issue 14: peak at N = 50k within 1.5x of N = 1k, every head


def _fbta_child(
    n: int, head_name: str, encoder: str, patch: int, pseudo: int, translated_bag: str, device: torch.device
) -> dict:
    from monai_fbta.engines import FBTALoss, FBTATrainer
    from monai_fbta.engines.trainer import fbta_param_groups
    from monai_fbta.networks.registry import build_encoder, build_mil_head, build_translator

    enc = build_encoder(encoder).to(device)
    with torch.no_grad():
        dim = int(enc(torch.rand(2, 3, patch, patch, device=device)).shape[-1])
    head = build_mil_head(head_name, in_features=dim, num_classes=2).to(device)
    translator = build_translator(in_features=dim).to(device)
    opt = torch.optim.AdamW(fbta_param_groups(head, translator, enc))
    s = min(pseudo, n)
    index = torch.randperm(n)[:s].sort().values
    features = torch.randn(n, dim)
    sample = {
        "slide_id": "bench", "label": 1, "features": features, "pb_index": index, "pb_features": features[index],
        "pb_image": torch.rand(s, 3, patch, patch), "pb_image_clean": torch.rand(s, 3, patch, patch),
    }
    trainer = FBTATrainer(device, 1, [sample], head, opt, FBTALoss(), translator=translator, trainable_encoder=enc,
                          frozen_bag="full", translated_bag=translated_bag)
    params = [p for g in opt.param_groups for p in g["params"]]
    meter = SavedTensorMeter(exclude=params)
    with PeakMemory(device) as peak, meter():
        seconds, _ = timed(trainer.run, device)
    return {"peak_mb": peak.peak_mb, "saved_mb": meter.mb, "seconds": seconds, "method": peak.method, "dim": dim,
            "patches_through_encoder": s}


def _direct_child(n: int, encoder: str, patch: int, chunk: int, ckpt: bool, device: torch.device) -> dict:
    from monai_fbta.networks.encode import encode_patches
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
    if config.startswith("fbta_"):
        out = _fbta_child(n, config[5:], args.encoder, args.patch, args.pseudo_bag, args.translated_bag, device)
    else:
        out = _direct_child(n, args.encoder, args.patch, args.chunk, config == "direct_ckpt", device)
    return {"config": config, "n": n, "rss_after_setup_mb": rss_mb(), **out}


def _measure(args, config: str, n: int) -> dict:
    """One configuration in a fresh child; reused from ``--rows-file`` when measured there with the same settings."""
    cli = ["--child", config, str(n), "--encoder", args.encoder, "--patch", str(args.patch), "--chunk", str(args.chunk),
           "--pseudo-bag", str(args.pseudo_bag), "--translated-bag", args.translated_bag, "--device", args.device]
    if args.threads:
        cli += ["--threads", str(args.threads)]
    done = _measured_rows(args.rows_file).get(" ".join(cli))
    if done is not None:
        print(f"  {config:<12s} N={n:<7d} {done['peak_mb']:.0f} MB peak (measured earlier, {args.rows_file})", flush=True)
        return done
    row = run_child(os.path.abspath(__file__), cli, timeout=args.child_timeout, env=CPU_ALLOCATOR_ENV)
    row.setdefault("config", config)
    row.setdefault("n", n)
    row["source"] = "measured" if "error" not in row else "failed"
    status = f"{row['peak_mb']:.0f} MB peak, {row['seconds']:.1f} s" if "error" not in row else row["error"]
    print(f"  {config:<12s} N={n:<7d} {status}", flush=True)
    if args.rows_file and row["source"] == "measured":
        with open(args.rows_file, "a") as f:  # one line per finished child: a stopped run resumes here
            f.write(json.dumps({"cli": " ".join(cli), "row": row}) + "\n")
    return row


def _measured_rows(path: str | None) -> dict[str, dict]:
    """``{child command line: row}`` from a ``--rows-file`` (a torn last line is ignored)."""
    if not path or not os.path.exists(path):
        return {}
    rows = {}
    with open(path) as f:
        for line in f:
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows[item["cli"]] = item["row"]
    return rows


def _fbta_sizes(args, head: str) -> list[int]:
    """``--n``, without the sizes above ``--max-n head=N`` for this head."""
    limit = dict(item.split("=") for item in args.max_n).get(head)
    return [n for n in args.n if limit is None or n <= int(limit)]


def _direct_rows(args, config: str, cap_mb: float) -> tuple[list[dict], dict]:
    """``config`` measured at ``--direct-n`` in increasing order while the predicted peak fits ``cap_mb``."""
    rows: list[dict] = []
    for n in sorted(args.direct_n):
        if len(rows) >= 2:
            intercept, slope = linear_fit([r["n"] for r in rows], [r["peak_mb"] for r in rows])
            if intercept + slope * n > cap_mb:
                print(f"  {config:<12s} N={n:<7d} not run: predicted {(intercept + slope * n) / 1024:.1f} GB > cap "
                      f"{cap_mb / 1024:.1f} GB", flush=True)
                break
        row = _measure(args, config, n)
        if row["source"] != "measured":
            break
        rows.append(row)
    fit: dict = {"largest_measured_n": max((r["n"] for r in rows), default=0)}
    if len(rows) >= 2:
        intercept, slope = linear_fit([r["n"] for r in rows], [r["peak_mb"] for r in rows])
        fit.update(peak_mb_intercept=intercept, peak_mb_per_patch=slope,
                   seconds_per_patch=linear_fit([r["n"] for r in rows], [r["seconds"] for r in rows])[1])
        if slope > 0:
            fit["n_exceeding_limit_from_slope"] = int(max(0.0, (args.limit_gb * 1024 - intercept) / slope))
    return rows, fit


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", nargs="+", type=int, default=DEFAULT_N, help="bag sizes N of the FBTA rows")
    p.add_argument("--heads", nargs="+", default=["abmil", "transmil", "mambamil"], help="MIL heads of the FBTA rows")
    p.add_argument("--encoder", default="resnet50_trunc")
    p.add_argument("--patch", type=int, default=256)
    p.add_argument("--pseudo-bag", type=int, default=100, help="C*M patches through the extractor in FBTA")
    p.add_argument("--translated-bag", choices=["pseudo", "full"], default="pseudo",
                   help="FBTA's translated view: f_T(F^FB[S]) (the paper) or f_T(F^FB) (the bundle's default)")
    p.add_argument("--max-n", nargs="*", default=[], metavar="HEAD=N",
                   help="largest N for a head's FBTA rows (e.g. mambamil=50000: its CPU scan is slow)")
    p.add_argument("--rows-file", default=None,
                   help="JSON-lines file of finished children: appended to, and rows already there are reused")
    p.add_argument("--chunk", type=int, default=16, help="encoder chunk (and checkpoint segment) size")
    p.add_argument("--direct-n", nargs="+", type=int, default=DEFAULT_DIRECT_N,
                   help="bag sizes of the direct e2e rows, measured in order while they fit --cap-gb")
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
            rows += [_measure(args, f"fbta_{head}", n) for head in args.heads for n in _fbta_sizes(args, head)]
        elif config in ("direct", "direct_ckpt"):
            config_rows, fits[config] = _direct_rows(args, config, cap_mb)
            rows += config_rows
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
    if "fbta" in args.configs:
        for head in args.heads:
            sizes = [n for n in _fbta_sizes(args, head) if peak(f"fbta_{head}", n) == peak(f"fbta_{head}", n)]
            if len(sizes) < 2:
                continue
            n_lo, n_hi = min(sizes), (50000 if 50000 in sizes else max(sizes))
            v = peak(f"fbta_{head}", n_hi) / peak(f"fbta_{head}", n_lo)
            on_target = n_lo <= 1000 and n_hi == 50000  # the target compares N = 50k with N = 1k
            ratios[f"{head} + FBTA peak N={n_hi} / N={n_lo}"] = (
                ratio(v, f"<= {TARGET_RATIO:g}", v <= TARGET_RATIO) if on_target else ratio(v, "-", None))
    for config, fit in fits.items():
        if "peak_mb_per_patch" in fit:
            n_big = fit["largest_measured_n"]
            print(f"{config}: measured up to N = {n_big} ({peak(config, n_big) / 1024:.1f} GB); "
                  f"{fit['peak_mb_per_patch']:.2f} MB per patch; the measured slope passes {args.limit_gb:g} GB at "
                  f"N ~ {fit.get('n_exceeding_limit_from_slope', 0):,}")
            if "fbta" in args.configs and "abmil" in args.heads:
                v = peak(config, n_big) / peak("fbta_abmil", min(args.n))
                ratios[f"{config} at N={n_big} / ABMIL + FBTA at N={min(args.n)} (both measured)"] = ratio(v, "-", None)
    print_ratios(ratios)

    payload = {"machine": info, "settings": {k: v for k, v in vars(args).items() if k not in ("child", "json", "plot")},
               "cap_mb": cap_mb, "memory_metric": rows[0].get("method") if rows else None,
               "rows": rows, "fits": fits, "ratios": ratios}

    def draw(ax) -> None:
        styles = [(f"fbta_{h}", m) for h, m in zip(args.heads, ("o-", "D-", "v-"))] + [("direct", "s--"), ("direct_ckpt", "^--")]
        for config, style in styles:
            pts = [r for r in rows if r["config"] == config and r["source"] == "measured"]
            if pts:
                ax.plot([r["n"] for r in pts], [r["peak_gb"] for r in pts], style, label=config)
        ax.axhline(args.limit_gb, color="grey", ls="--", lw=1, label=f"{args.limit_gb:g} GB")
        ax.set(xscale="log", yscale="log", xlabel="patches per slide N", ylabel="peak memory of one iteration (GB)",
               title=f"{args.encoder} {args.patch} px, C*M = {args.pseudo_bag}, on {device} (all measured)")
        ax.legend()

    finish(args, "memory", payload, draw)
    return payload


if __name__ == "__main__":
    main()
