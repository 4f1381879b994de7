"""Held-out test metrics of several bundle runs side by side (the README's main command ends with this table).

    python -m monai_fbta.pipeline.compare "ABMIL + FBTA=bundles/fbta_stad/eval/test_metrics.json" \
        "ABMIL (vanilla)=bundles/fbta_stad/eval/vanilla/test_metrics.json"

Each ``LABEL=PATH`` names a ``test_metrics.json`` written by the bundle's test report
(:func:`monai_fbta.pipeline.report.evaluate_checkpoint`). The runs must have been tested on the same slides
of the same classes; otherwise the comparison is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["load_report", "compare_reports", "main"]

COLUMNS = (("bacc", "balanced acc"), ("auc", "macro AUC"), ("acc", "accuracy"), ("f1", "macro F1"))


def load_report(path: str | os.PathLike) -> dict[str, Any]:
    """A ``test_metrics.json``; a missing or unreadable file is a ``FileNotFoundError``/``ValueError`` naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no test report (did that training run finish?)")
    try:
        with open(path) as f:
            report = json.load(f)
        report["metrics"], report["split"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a test report of the bundle ({err})") from None
    return report


def compare_reports(reports: Mapping[str, Mapping[str, Any]]) -> str:
    """A text table, one row per labelled report: test balanced accuracy, macro AUC, accuracy, macro F1.

    Raises ``ValueError`` when the reports were made on different slides, splits or class names."""
    items = list(reports.items())
    first = items[0][1]
    for label, report in items[1:]:
        for key in ("split", "num_slides", "class_names"):
            if report.get(key) != first.get(key):
                raise ValueError(f"cannot compare {items[0][0]!r} with {label!r}: their {key} differ "
                                 f"({first.get(key)!r} vs {report.get(key)!r})")
        slides = [report.get("slide_ids"), first.get("slide_ids")]
        if all(slides) and slides[0] != slides[1]:
            raise ValueError(f"cannot compare {items[0][0]!r} with {label!r}: they were tested on other slides")
    split = first["split"]
    header = ["method", *(name for _, name in COLUMNS)]
    rows = [[label, *(f"{r['metrics'].get(f'{split}_{key}', float('nan')):.3f}" for key, _ in COLUMNS)]
            for label, r in items]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    line = lambda row: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))  # noqa: E731
    title = f"held-out {split} slides: {first.get('num_slides')} ({', '.join(first.get('class_names') or [])})"
    return "\n".join([title, line(header), line(["-" * w for w in widths]), *map(line, rows), *_resolution(first)])


def _resolution(report: Mapping[str, Any]) -> list[str]:
    """What one slide is worth in balanced accuracy on this test set (from its confusion matrix's class counts), so
    that a difference of a slide or two is read as what it is."""
    matrix = report.get("confusion_matrix")
    counts = [sum(row) for row in matrix] if matrix else []
    if not counts or min(counts) < 1:
        return []
    step = 1 / (len(counts) * min(counts))
    return [f"one slide moves balanced accuracy by up to {step:.3f} here ({min(counts)} slide(s) in the smallest class);",
            "a difference of a slide or two does not rank methods: cross-validation does (benchmarks/bench_accuracy.py)"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="LABEL=PATH", help="a label and the run's test_metrics.json")
    args = parser.parse_args(argv)
    try:
        reports = {}
        for item in args.runs:
            label, sep, path = item.rpartition("=")
            if not sep or not label:
                raise ValueError(f"{item!r}: give LABEL=PATH")
            reports[label] = load_report(path)
        print("\n" + compare_reports(reports), flush=True)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0

if __name__ == "__main__":
    sys.exit(main())
