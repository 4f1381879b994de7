"""Render ``docs/benchmarks.md`` from ``benchmarks/results/*.json`` (every number comes from the JSON).

Each section gives the command that produced it, the date, the machine (CPUs, GPU or none, load
average when it started), the table, the measured ratios with their targets, and the plot when
``docs/images/bench_<name>.png`` exists.

    python benchmarks/report.py [--results-dir benchmarks/results] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from _common import (FBTA_SUFFIX, TRANSLATED_HEAD_SUFFIX, format_interval, format_table, parse_mean_std,  # noqa: E402
                     save_plot)

from monai_fbta._io import atomic_open  # noqa: E402

ORDER = ["accuracy", "memory", "memory_translated_full", "epoch_time", "inference", "read_patches", "frozen_pipeline",
         "scaling", "mil_heads"]
TITLES = {
    "accuracy": "Accuracy on the synthetic benchmark: vanilla ABMIL vs +FBTA, and the view ablation",
    "accuracy_transmil_lre": "Accuracy study, TransMIL rows at the bundle's CPU setting for TransMIL, `lr_encoder` 1e-4 (the "
                             "same hard set, splits, extractor and epochs; chosen on validation, docs/method.md)",
    "accuracy_mambamil": "Accuracy study, MambaMIL rows (the same hard set, splits, extractor and epochs; CPU-sized head; "
                         "`lr_encoder` 5e-4, the CPU setting for MambaMIL until session 16)",
    "accuracy_kinds": "Accuracy study, variant `kinds`: another kind of morphological difference (pleomorphic / glandular / "
                      "cords nuclei, generator seed 4; the same extractor, settings and epochs)",
    "accuracy_kinds_transmil": "Accuracy study, variant `kinds`, TransMIL rows (the bundle's CPU setting for TransMIL, "
                               "`lr_encoder` 1e-4; 5 folds x seed 0; both near chance, see docs/method.md)",
    "accuracy_transmil_exact_e60": "Accuracy study, TransMIL rows with exact attention in both layers and 60 epochs (`lr_encoder` "
                                   "5e-4; the same hard set, splits and extractor; chosen on validation, docs/method.md)",
    "accuracy_transmil_lr_encoder_5e-4": "Accuracy study, TransMIL rows with `lr_encoder` 5e-4 (the CPU default for every "
                                         "head before 2026-11-26, session 10; its extractor ran away in 3 of 5 folds)",
    "accuracy_transmil_bntrain": "Accuracy study, TransMIL rows with f_TFE's BatchNorm in train mode (`freeze_encoder_bn` "
                                 "False, `lr_encoder` 5e-4; otherwise as above; chosen on validation, docs/method.md)",
    "accuracy_seed0_rerun": "Accuracy study, ABMIL rows of seed 0 rerun on 2026-11-26, session 11 (the same hard set, splits, "
                            "extractor, settings and epochs; the spread between runs of the same settings, docs/method.md)",
    "accuracy_translator_refit": "Accuracy study, ABMIL rows with the translator refit (`refit_start_epoch` 10, "
                                 "`refit_every` 10; validation level, not adopted; docs/method.md, \"Refitting the translator\")",
    "accuracy_translated_head": "Accuracy study, ABMIL rows with FBTA's translated-head stage (2026-11-26, session 12; "
                                "3 seeds, vanilla and FBTA drawn again with the same bundle; adopted on validation, "
                                "docs/method.md, \"A second stage\")",
    "accuracy_kinds_translated_head": "Accuracy study, variant `kinds` with FBTA's translated-head stage (2026-11-27, "
                                      "seed 0 in session 13, seeds 1 and 2 in session 17; all three rows drawn again; "
                                      "the stage was not tuned on this set; `--config`: the bundle's train.json of "
                                      "commit 06a78bb)",
    "accuracy_transmil_translated_head": "Accuracy study, TransMIL rows with FBTA's translated-head stage (2026-11-27, "
                                         "seed 0 in session 13, seed 1 in session 19; the hard set, all three rows drawn "
                                         "again; the stage as built for ABMIL, not tuned for TransMIL; `--config`: "
                                         "commit 06a78bb's)",
    "accuracy_mambamil_translated_head": "Accuracy study, MambaMIL rows with FBTA's translated-head stage (2026-11-27, "
                                         "sessions 14-15; the hard set, seed 0, all three rows drawn again; CPU-sized "
                                         "head; the stage as built for ABMIL; `lr_encoder` 5e-4, the CPU setting "
                                         "for MambaMIL until session 16; `--config`: commit 06a78bb's)",
    "accuracy_abmil_lr_encoder_1e-4": "Accuracy study, ABMIL rows with `lr_encoder` 1e-4 (TransMIL's CPU setting; "
                                      "2026-11-27, sessions 13 and 15; 5 folds x 3 seeds; validation level for the "
                                      "second stage, lower over its last 5 epochs; not adopted; docs/method.md)",
    "accuracy_abmil_lr_encoder_1e-3": "Accuracy study, ABMIL rows with `lr_encoder` 1e-3 (2026-11-27, session 16; 5 folds "
                                      "x 3 seeds; validation level for the second stage; not adopted; "
                                      "docs/method.md)",
    "accuracy_mambamil_lr_encoder_1e-4": "Accuracy study, MambaMIL rows with `lr_encoder` 1e-4, the bundle's CPU "
                                         "setting for MambaMIL since session 16 (2026-11-27, sessions 15-16; 5 folds "
                                         "x seed 0; chosen on validation; CPU-sized head; docs/method.md)",
    "accuracy_medium_translated_head": "Accuracy study, variant `medium` with FBTA's translated-head stage (2026-11-27, "
                                       "sessions 17 and 19; lesions on 15% of the tissue, generator seed 2; seeds 0-2, "
                                       "all three rows drawn again; the bundle as it is, not tuned on this set)",
    "accuracy_v3_translated_head": "Accuracy study, variant `v3` with FBTA's translated-head stage (2026-11-27, sessions "
                                   "17-18; 3072 px slides, lesions on 5% of the tissue, generator seed 3; seeds 0-2, all "
                                   "three rows drawn again; the bundle as it is, not tuned on this set)",
    "accuracy_demo_scale": "Accuracy study at the README demo's scale: its 60 slides (generator seed 0), 5 folds, seed 0, "
                           "20 epochs, the bundle as the demo runs it (2026-11-27, session 21; docs/method.md)",
    "accuracy_demo_scale_epochs_40": "Accuracy study at the README demo's scale with the bundle's 40 epochs (the same 60 "
                                     "slides, folds and seed; 2026-11-27, session 21; docs/method.md)",
    "memory": "Peak memory of one training iteration vs bag size (the library default: the translated view on the "
              "pseudo-bag, `translated_bag=\"pseudo\"`)",
    "memory_translated_full": "Peak memory of one training iteration vs bag size, with the bundle's translated view on the "
                              "whole bag (`translated_bag=\"full\"`: f_T over all N in checkpointed chunks; 2026-11-27, "
                              "session 21)",
    "epoch_time": "Time per training epoch",
    "inference": "Slide inference: translation vs re-extraction",
    "read_patches": "Patch-read throughput",
    "frozen_pipeline": "Frozen-bag pipeline (extraction, KMeans, per-iteration costs)",
    "scaling": "Scaling over processes (torchrun, gloo on the CPU)",
    "mil_heads": "MIL heads: forward+backward time and memory",
}
# The studies of the bundle's current pipeline (its defaults, with the translated-head stage), in the order the summary
# at the top of docs/benchmarks.md lists them; each also has its own section below.
SUMMARY = ["accuracy_translated_head", "accuracy_transmil_translated_head", "accuracy_mambamil_lr_encoder_1e-4",
           "accuracy_kinds_translated_head", "accuracy_medium_translated_head", "accuracy_v3_translated_head"]
STAGES = {"": "vanilla", FBTA_SUFFIX: "FBTA, one head", TRANSLATED_HEAD_SUFFIX: "FBTA + translated-head stage"}
GAIN_COLUMN = "stage - vanilla, paired (95% interval over folds)"
COLUMNS = {
    "memory": ["config", "n", "source", "peak_gb", "saved_mb", "seconds"],
    "memory_translated_full": ["config", "n", "source", "peak_gb", "saved_mb", "seconds"],
    "epoch_time": ["method", "s_per_epoch", "patches_through_extractor_per_epoch"],
    "inference": ["method", "patches", "seconds", "cpu_s"],
    "frozen_pipeline": ["run", "patches", "seconds", "patches_per_s", "vs_bare", "vs_bare_each_repeat"],
}


def _scalars(d: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [{"key": k, "value": v} for k, v in d.items() if not isinstance(v, (dict, list))]


def _results_tables(results: Any) -> list[str]:
    """Tables for the results of a script we only wrap (list of rows, flat dict, or dict of dicts)."""
    if isinstance(results, list) and results and isinstance(results[0], Mapping):
        return [format_table(results, markdown=True)]
    if isinstance(results, Mapping):
        nested = {k: v for k, v in results.items() if isinstance(v, Mapping)}
        out = [format_table(_scalars(results), markdown=True)] if _scalars(results) else []
        for key, sub in nested.items():
            out.append(f"**{key}**\n\n" + format_table(_scalars(sub), markdown=True))
        return out
    return [f"```\n{json.dumps(results, indent=2)}\n```"]


def _repeat_rows(times: Mapping[str, Any], prefix: str = "") -> list[dict[str, str]]:
    """``{name: [seconds, ...]}`` (nested one level deep or not) as rows ``run | seconds of each repeat``."""
    rows = []
    for name, values in times.items():
        if isinstance(values, Mapping):
            rows += _repeat_rows(values, f"{prefix}{name}: ")
        else:
            rows.append({"run": f"{prefix}{name}", "seconds of each repeat": ", ".join(f"{v:.3g}" for v in values)})
    return rows


def _machine(m: Mapping[str, Any]) -> str:
    gpu = m.get("gpu") or "no GPU"
    load = m.get("load_avg_1m")
    load_txt = f", load average {load:.2f} at start" if isinstance(load, (int, float)) else ""
    return (f"{m.get('cpu_count')} CPUs ({m.get('cpu')}), {gpu}, {m.get('mem_total_gb')} GB RAM, "
            f"torch {m.get('torch')}, device `{m.get('device') or '-'}`{load_txt}")


def _memory_notes(payload: Mapping[str, Any]) -> list[str]:
    """What each FBTA head adds from its smallest to its largest N; how far direct e2e was measured."""
    rows = [r for r in payload.get("rows", []) if r.get("source") == "measured"]
    notes = []
    for config in dict.fromkeys(r["config"] for r in rows if r["config"].startswith("fbta_")):
        pts = sorted((r for r in rows if r["config"] == config), key=lambda r: r["n"])
        if len(pts) >= 2:
            lo, hi = pts[0], pts[-1]
            notes.append(f"- {config}: N = {lo['n']:,} -> {hi['n']:,} adds {hi['peak_gb'] - lo['peak_gb']:.2f} GB "
                         f"({(hi['peak_mb'] - lo['peak_mb']) / (hi['n'] - lo['n']) * 1024:.1f} KB per instance)")
    limit = payload.get("settings", {}).get("limit_gb", 24)
    for config, fit in payload.get("fits", {}).items():
        if "peak_mb_per_patch" in fit:
            notes.append(f"- {config}: largest N measured {fit['largest_measured_n']:,}; "
                         f"{fit['peak_mb_per_patch']:.1f} MB per patch; that slope passes {limit:g} GB at "
                         f"N ~ {fit.get('n_exceeding_limit_from_slope', 0):,} (slope of measured points, not a measurement)")
    return ["", *notes] if notes else []


def _data_label(data: Mapping[str, Any]) -> str:
    """``{'size': 2048, 'tumour_fraction': 0.08, 'seed': 1, ...}`` -> ``2048 px, lesions 8%, generator seed 1``."""
    parts = [f"{data.get('size', '?')} px", f"lesions {100 * float(data.get('tumour_fraction', 0)):g}%",
             f"generator seed {data.get('seed', '?')}"]
    if data.get("classes"):
        parts.append("classes " + " / ".join(data["classes"]))
    return ", ".join(parts)


def summary_rows(payloads: Mapping[str, Mapping[str, Any]]) -> list[dict[str, str]]:
    """A row per head of every study in ``SUMMARY`` that has results: its test balanced accuracy per stage."""
    rows = []
    for name in (n for n in SUMMARY if n in payloads):
        payload = payloads[name]
        by_method = {r["method"]: r for r in payload.get("tables", {}).get("main", [])}
        for head in (m for m in by_method if " + " not in m):
            row = {"head": head, "data": _data_label(payload.get("data", {}))}
            for suffix, column in STAGES.items():
                row[column] = by_method.get(head + suffix, {}).get("test balanced acc", "-")
            gain = payload.get("paired_gains", {}).get(head + TRANSLATED_HEAD_SUFFIX)
            row[GAIN_COLUMN] = f"{gain['gain']:+.3f} ({format_interval(gain['interval'])})" if gain else "-"
            row["folds x seeds"] = by_method[head].get("folds x seeds", "?")
            row["results"] = f"`{name}.json`"
            rows.append(row)
    return rows


def plot_summary(rows: Sequence[Mapping[str, str]], path: str) -> None:
    """Grouped horizontal bars: a group per summary row, a bar per stage, mean ± std."""
    def draw(ax: Any) -> None:
        height = 0.8 / len(STAGES)
        for j, column in enumerate(STAGES.values()):
            values = [parse_mean_std(r[column]) for r in rows]
            ax.barh([i + (j - 1) * height for i in range(len(rows))], [v[0] for v in values], height,
                    xerr=[v[1] for v in values], capsize=2, label=column)
        ax.set_yticks(range(len(rows)), ["\n".join([r["head"], *r["data"].split(", classes ")]) for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.axvline(1 / 3, color="grey", lw=0.8, ls="--", label="chance (3 classes)")
        ax.set_xlim(0, 1)
        ax.set_xlabel("test balanced accuracy (mean ± std over folds x seeds)")
        ax.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)

    save_plot(path, draw, figsize=(7.5, 1.0 + 0.9 * len(rows)))


def render_summary(payloads: Mapping[str, Mapping[str, Any]], images_dir: str, out_dir: str) -> str:
    """The summary table (and its plot when ``bench_summary.png`` exists); empty without summary studies."""
    rows = summary_rows(payloads)
    if not rows:
        return ""
    image = os.path.join(images_dir, "bench_summary.png")
    plot = [f"![summary]({os.path.relpath(image, out_dir)})", ""] if os.path.isfile(image) else []
    studies = [payloads[n] for n in SUMMARY if n in payloads]
    shared = {  # what every summarised study has in common, said once
        "synthetic slides": {p.get("data", {}).get("num_slides") for p in studies},
        "test folds": {len(p.get("folds", [])) for p in studies},
        "epochs": {p.get("epochs") for p in studies},
        "frozen extractor sha256": {p.get("frozen_encoder", {}).get("sha256") for p in studies}}
    common = "; ".join(f"{key} {values.pop()}" for key, values in shared.items() if len(values) == 1 and None not in values)
    return "\n".join(["## At a glance: the bundle's current pipeline", "",
                      "Test balanced accuracy (mean ± std over folds x seeds) of each study run with the bundle's "
                      "current settings, copied from the sections below; every row of a study was drawn in the same "
                      "workdir with the same head, optimiser, epochs, EMA teacher and model selection. The gain column "
                      "pairs each stage run with the vanilla run of the same fold and seed; its interval is a 95% t "
                      "interval over the per-fold mean gains, a rough guide (cross-validation folds are not "
                      "independent)"
                      + (f". All of them: {common}." if common else "."), "",
                      format_table(rows, markdown=True), "", *plot])


def render_section(name: str, payload: Mapping[str, Any], images_dir: str, out_dir: str) -> str:
    machine = payload.get("machine", {})
    title = TITLES.get(name) or (f"Accuracy study, variant `{name.partition('_')[2]}` (other data, extractor or settings)"
                                 if name.startswith("accuracy_") else name)
    lines = [f"## {title}", "",
             f"- command: `{payload.get('command', '?')}`",
             f"- date: {machine.get('date', '?')}",
             f"- machine: {_machine(machine)}"]
    if payload.get("stale"):
        lines.append(f"- **out of date**: {payload['stale']}")
    if payload.get("memory_metric"):
        lines.append(f"- memory metric: `{payload['memory_metric']}` (peak growth over the memory held after setup)")
    lines.append("")
    if "rows" in payload:
        lines.append(format_table(payload["rows"], COLUMNS.get(name), markdown=True))
    elif "results" in payload:
        lines.append("\n\n".join(_results_tables(payload["results"])))
    elif "tables" in payload:  # accuracy study
        lines.append(f"{payload.get('split')}; synthetic data {payload.get('data')}; bundle overrides "
                     f"{payload.get('study_overrides')}.\n")
        if payload.get("bundle_settings"):
            lines.append("Bundle training settings (`--config` with the study's `--epochs`; the bundle overrides above "
                         f"come on top): {payload['bundle_settings']}.\n")
        titles = {"main": "Vanilla MIL vs + FBTA (the same EMA teacher, head, optimiser, epochs, model selection)",
                  "ema": "What EMA buys (ABMIL; `ema_momentum 1` = no EMA teacher)",
                  "ablation": "View ablation (ABMIL)"}
        if payload.get("frozen_encoder"):
            lines.append(f"Frozen extractor of every run: {payload['frozen_encoder'].get('weights')} "
                         f"(sha256 {payload['frozen_encoder'].get('sha256')}).\n")
        for table, rows in payload["tables"].items():
            lines += [f"{titles.get(table, table)}:", "", format_table(rows, markdown=True), ""]
    if isinstance(payload.get("times"), Mapping):
        lines += ["", "Seconds of each repeat, in the order they ran (interleaved):", "",
                  format_table(_repeat_rows(payload["times"]), markdown=True)]
    for title, rows in payload.get("extra_tables", {}).items():
        lines += ["", f"{title}:", "", format_table(rows, markdown=True)]
    if payload.get("notes"):
        lines += [""] + [f"- {note}" for note in payload["notes"]]
    if name == "memory":
        lines += _memory_notes(payload)
    ratios: Mapping[str, Mapping[str, Any]] = payload.get("ratios", {})
    if ratios:
        lines += ["", "| ratio (this run) | value | target | met |", "|---|---|---|---|"]
        for key, r in ratios.items():
            met = "-" if r.get("met") is None else ("yes" if r["met"] else "**no**")
            lines.append(f"| {key} | {r['value']:.3g} | {r.get('target', '-')} | {met} |")
    image = os.path.join(images_dir, f"bench_{name}.png")
    if os.path.isfile(image):
        lines += ["", f"![{name}]({os.path.relpath(image, out_dir)})"]
    return "\n".join(lines) + "\n"


def load_results(results_dir: str) -> dict[str, Any]:
    """``{name: payload}`` of every ``*.json`` in ``results_dir``, in the order docs/benchmarks.md shows them."""
    files = {os.path.splitext(os.path.basename(f))[0]: f for f in glob.glob(os.path.join(results_dir, "*.json"))}
    if not files:
        raise SystemExit(f"no benchmark results in {results_dir}: run python benchmarks/run_all.py first")
    # after the main study: its other heads and settings (titled, in TITLES' order), then other data / extractor
    titled = list(TITLES)
    variants = sorted((n for n in files if n.startswith("accuracy_")),
                      key=lambda n: (n not in TITLES, titled.index(n) if n in TITLES else 0, n))
    names = [m for n in ORDER if n in files for m in [n, *(variants if n == "accuracy" else [])]]
    names += sorted(set(files) - set(names))
    payloads = {}
    for name in names:
        with open(files[name]) as f:
            try:
                payloads[name] = json.load(f)
            except json.JSONDecodeError as err:
                raise SystemExit(f"{files[name]}: not valid JSON ({err})") from None
    return payloads


def render(results_dir: str, images_dir: str, out_path: str) -> str:
    return render_payloads(load_results(results_dir), images_dir, out_path)


def render_payloads(payloads: Mapping[str, Mapping[str, Any]], images_dir: str, out_path: str) -> str:
    """docs/benchmarks.md from ``{name: payload}`` in :func:`load_results`' order."""
    out_dir = os.path.dirname(os.path.abspath(out_path))
    parts = ["# Benchmarks", "",
             "Generated by `python benchmarks/report.py` from `benchmarks/results/*.json` "
             "(written by `python benchmarks/run_all.py`); do not edit by hand. Timings on a shared CPU "
             "depend on its load, which each section records.", ""]
    summary = render_summary(payloads, images_dir, out_dir)
    parts += [summary] if summary else []
    parts += [render_section(name, payload, images_dir, out_dir) for name, payload in payloads.items()]
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    p.add_argument("--images-dir", default=os.path.join(ROOT, "docs", "images"))
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks.md"))
    args = p.parse_args(argv)
    payloads = load_results(args.results_dir)
    rows = summary_rows(payloads)
    if rows:
        plot_summary(rows, os.path.join(args.images_dir, "bench_summary.png"))
    text = render_payloads(payloads, args.images_dir, args.out)
    with atomic_open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
