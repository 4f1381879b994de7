"""Datalists (CSV or MONAI JSON) with all-at-once validation, and patient-level stratified splits.

Rows are ``{"slide_id": str, "image": str (absolute path), "label": int, "case_id": str}``; ``case_id``
defaults to the slide id (one slide per patient) when the datalist has none.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from monai_fbta._io import atomic_open
from monai_fbta.data.store import slide_id_of

__all__ = [
    "DatalistError",
    "load_datalist",
    "validate_rows",
    "class_problems",
    "make_splits",
    "save_splits",
    "load_splits",
    "select_fold",
    "check_slide_headers",
    "check_splits",
    "split_problems",
    "datalist_digest",
]

SPLIT_NAMES = ("train", "val", "test")

logger = logging.getLogger("fbta.prepare")


class DatalistError(ValueError):
    """Every problem found in a datalist, one per line (``.problems`` holds the list)."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s) in the datalist:\n{lines}")


def _read_entries(path: Path, data_list_key: str) -> list[dict[str, Any]]:
    """Raw entries (dicts of strings) of a CSV or MONAI datalist JSON, each with ``_where`` (row/entry name)."""
    if path.suffix.lower() == ".json":
        with open(path) as f:
            content = json.load(f)
        entries = content.get(data_list_key) if isinstance(content, dict) else content
        if not isinstance(entries, list):
            raise DatalistError(str(path), [f"no list under key {data_list_key!r}"])
        unread = sorted(k for k, v in content.items() if k != data_list_key and isinstance(v, list)) \
            if isinstance(content, dict) else []
        if unread:
            logger.warning("%s: only its %r list is read; %s %s not (splits are made by monai-fbta from the slides "
                           "listed under %r)", path, data_list_key, unread, "is" if len(unread) == 1 else "are",
                           data_list_key)
        out = []
        for i, e in enumerate(entries):
            entry = dict(e) if isinstance(e, Mapping) else {"image": e}
            entry["_where"] = f"entry {i}"
            out.append(entry)
        return out
    with open(path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: Excel's "CSV UTF-8" starts with a BOM
        reader = csv.DictReader(f)
        fields = [c.strip() for c in reader.fieldnames or []]
        missing = [c for c in ("slide_id", "path", "label") if c not in fields]
        if missing:
            raise DatalistError(str(path), [f"missing column(s) {missing}; expected slide_id,path,label[,case_id]"])
        rows = []
        for i, row in enumerate(reader, start=2):  # line 1 is the header
            entry = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            entry["image"] = entry.pop("path")
            entry["_where"] = f"line {i}"
            rows.append(entry)
        return rows


def _label_index(value: Any, classes: Sequence[str] | None) -> int | None:
    if classes is None:
        try:
            return int(value)
        except (TypeError, ValueError):
            return None
    text = str(value)
    if text in classes:
        return list(classes).index(text)
    if text.isdigit():  # an index into the class list (range checked by the caller)
        return int(text)
    return None


def load_datalist(
    path: str | os.PathLike,
    classes: Sequence[str] | None = None,
    base_dir: str | os.PathLike | None = None,
    data_list_key: str = "training",
    check_files: bool = True,
    check_slides: bool = False,
) -> list[dict[str, Any]]:
    """Load ``slide_id,path,label[,case_id][,mpp]`` CSV or a MONAI datalist JSON (``{"training": [{"image", "label"}]}``).

    Args:
        classes: class names in index order; labels are mapped through it. ``None``: labels must be integers.
        base_dir: folder relative paths are resolved against (default: the datalist's folder).
        data_list_key: list key in a JSON datalist.
        check_files: report slides whose file does not exist.
        check_slides: also open each existing slide's header (:func:`check_slide_headers`).

    An ``mpp`` column (um/px at level 0) overrides the pixel size of slides whose metadata lacks it.

    Raises:
        DatalistError: listing every problem (missing files, unknown labels, duplicates, empty list...).
    """
    path = Path(path)
    if not path.is_file():
        raise DatalistError(str(path), ["file does not exist"])
    base = Path(base_dir) if base_dir is not None else path.parent
    rows, problems = [], []
    for entry in _read_entries(path, data_list_key):
        where = entry.pop("_where")
        image = str(entry.get("image") or "")
        slide_id = slide_id_of({**entry, "image": image}) if image or entry.get("slide_id") else ""
        label = _label_index(entry.get("label"), classes)
        tag = f"{where} (slide {slide_id or '?'})"
        if not image:
            problems.append(f"{tag}: empty path")
        if not slide_id:
            problems.append(f"{tag}: empty slide_id")
        if label is None:
            known = f"known classes {list(classes)}" if classes is not None else "labels must be integers when no class list is given"
            problems.append(f"{tag}: unknown label {entry.get('label')!r} ({known})")
        elif label < 0 or (classes is not None and label >= len(classes)):
            problems.append(f"{tag}: label {label} out of range")
        resolved = str((base / image).resolve()) if image else ""
        if check_files and image and not os.path.exists(resolved):
            problems.append(f"{tag}: file not found: {resolved}")
        case_id = str(entry.get("case_id") or slide_id)
        row = {"slide_id": slide_id, "image": resolved, "label": label, "case_id": case_id, "_where": where}
        if str(entry.get("mpp") or "").strip():
            try:
                row["mpp"] = float(entry["mpp"])
            except ValueError:
                row["mpp"] = float("nan")
            if not row["mpp"] > 0:
                problems.append(f"{tag}: mpp {entry['mpp']!r} is not a positive number (um/px)")
        rows.append(row)
    problems += validate_rows(rows, classes, raise_error=False)
    if check_slides:
        problems += check_slide_headers([r for r in rows if os.path.exists(r["image"])])
    if problems:
        raise DatalistError(str(path), problems)
    for row in rows:
        row.pop("_where")
    return rows


def class_problems(
    rows: Sequence[Mapping[str, Any]], num_classes: int, classes: Sequence[str] | None = None
) -> list[str]:
    """Labels outside ``0 .. num_classes - 1`` and classes without a slide: a class the datalist never shows
    cannot be learned or scored (its validation AUC is undefined, and model selection stalls on NaN)."""
    counts = Counter(int(r["label"]) for r in rows)
    name = (lambda c: repr(classes[c])) if classes is not None and len(classes) == num_classes else str
    problems = [f"{n} slide(s) have label {label}, outside 0 .. {num_classes - 1} for --num_classes {num_classes}"
                for label, n in sorted(counts.items()) if not 0 <= label < num_classes]
    empty = [name(c) for c in range(num_classes) if not counts.get(c)]
    if empty:
        problems.append(f"class(es) {', '.join(empty)} have no slides in the datalist (of --num_classes "
                        f"{num_classes}): remove them from --class_names and lower --num_classes, or add their slides")
    return problems


def datalist_digest(rows: Sequence[Mapping[str, Any]]) -> str:
    """SHA-256 of the rows' content (slide id, path, label, case id, mpp), independent of row order and file times."""
    import hashlib

    keys = ("slide_id", "image", "label", "case_id", "mpp")
    content = sorted(json.dumps([str(r.get(k)) for k in keys]) for r in rows)
    return hashlib.sha256("\n".join(content).encode()).hexdigest()


def validate_rows(
    rows: Sequence[Mapping[str, Any]], classes: Sequence[str] | None = None, raise_error: bool = True
) -> list[str]:
    """Problems across rows: empty list, duplicate slide ids, one slide file under two ids (it could fall in training
    and test), a case with slides of different labels.

    Raises :class:`DatalistError` with all of them when ``raise_error`` (else returns them).
    """
    problems = []
    if not rows:
        problems.append("the datalist is empty")
    seen: dict[str, str] = {}
    files: dict[str, tuple[str, str]] = {}
    case_labels: dict[str, set] = defaultdict(set)
    for i, row in enumerate(rows):
        where = row.get("_where", f"row {i}")
        sid = row["slide_id"]
        if sid in seen:
            problems.append(f"{where}: duplicate slide_id {sid!r} (first at {seen[sid]})")
        else:
            seen[sid] = where
        image = str(row.get("image") or "")
        first_id, first_at = files.setdefault(image, (sid, where)) if image else (sid, where)
        if first_id != sid:
            problems.append(f"{where} (slide {sid}): the same file as slide {first_id!r} ({first_at}): one slide "
                            "listed twice can fall in training and in test; list it once")
        if row.get("label") is not None:
            case_labels[row.get("case_id", sid)].add(row["label"])
    for case, labels in case_labels.items():
        if len(labels) > 1:
            names = sorted(classes[x] if classes is not None else x for x in labels)
            problems.append(f"case {case!r}: slides with inconsistent labels {names}")
    if problems and raise_error:
        raise DatalistError("datalist", problems)
    return problems


def check_slide_headers(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Open each slide (header and one pixel only, no tiling) and return one problem per unreadable slide."""
    from monai_fbta.data.errors import SlideError
    from monai_fbta.data.slide import open_slide

    problems = []
    for i, row in enumerate(rows):
        where = f"{row.get('_where', f'row {i}')} (slide {row['slide_id']})"
        try:
            with open_slide(row["image"]):
                pass
        except SlideError as e:
            problems.append(f"{where}: unreadable slide: {e}")
    return problems


def check_splits(splits: Mapping[str, Any], rows: Sequence[Mapping[str, Any]] | None = None, raise_error: bool = True) -> list[str]:
    """Problems of a splits file: a slide in two parts of a fold, or a patient (``case_id`` of ``rows``) whose
    slides fall in different parts (train/val/test leakage). Raises :class:`DatalistError` when ``raise_error``."""
    case_of = {r["slide_id"]: r.get("case_id") or r["slide_id"] for r in rows or ()}
    problems = []
    for k, fold in enumerate(splits.get("folds", [])):
        part_of: dict[str, str] = {}
        for name in SPLIT_NAMES:
            for sid in fold.get(name, []):
                if sid in part_of:
                    problems.append(f"fold {k}: slide {sid!r} is in both {part_of[sid]} and {name}")
                part_of[sid] = name
        parts_of_case: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        for sid, name in part_of.items():
            parts_of_case[case_of.get(sid, sid)][name].append(sid)
        for case, parts in sorted(parts_of_case.items()):
            if len(parts) > 1:
                where = "; ".join(f"{n}: {sorted(s)}" for n, s in parts.items())
                problems.append(f"fold {k}: patient {case!r} is split across {sorted(parts)} ({where})")
    if problems and raise_error:
        raise DatalistError("splits", problems)
    return problems


def _group_split(idx: np.ndarray, labels: np.ndarray, groups: np.ndarray, n_splits: int, seed: int):
    """All folds of StratifiedGroupKFold over ``idx`` as lists of (rest, part) index arrays into ``idx``."""
    n_groups = len(np.unique(groups[idx]))
    if n_splits < 2 or n_groups < n_splits:
        raise ValueError(f"cannot make {n_splits} patient-level parts from {n_groups} cases")
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return [(idx[a], idx[b]) for a, b in sgkf.split(idx, labels[idx], groups[idx])]


def split_problems(
    rows: Sequence[Mapping[str, Any]],
    num_folds: int,
    val_fraction: float | None = None,
    test_fraction: float | None = None,
    classes: Sequence[str] | None = None,
) -> list[str]:
    """Classes with too few patients (``case_id``) for the stratified parts :func:`make_splits` would make.

    Each problem names the class and the option to change (``--num_folds``, ``--val_fraction``).
    """
    cases: dict[Any, set] = defaultdict(set)
    for row in rows:
        cases[row["label"]].add(row.get("case_id") or row["slide_id"])
    problems = []
    for label, members in sorted(cases.items()):
        name, n = (classes[label] if classes is not None else label), len(members)
        if test_fraction:
            outer, inner = round(1 / test_fraction), num_folds
        else:
            outer, inner = num_folds, round(1 / val_fraction) if val_fraction else 0
        if n < outer:
            option = "lower --num_folds" if not test_fraction else "raise the test fraction"
            problems.append(f"class {name!r} has {n} case(s) but {outer} parts need at least {outer} cases per class: "
                            f"{option} or add slides of this class")
        elif inner and n - -(-n // outer) < inner:
            problems.append(f"class {name!r} has {n} case(s): {n - -(-n // outer)} remain after the test part, too few for "
                            f"{inner} validation parts (--val_fraction {val_fraction}, --num_folds {num_folds}): raise "
                            "--val_fraction, lower --num_folds or add slides of this class")
    return problems


def make_splits(
    rows: Sequence[Mapping[str, Any]],
    num_folds: int = 5,
    seed: int = 0,
    val_fraction: float | None = 0.1,
    test_fraction: float | None = None,
) -> dict[str, Any]:
    """Stratified, patient-level (grouped by ``case_id``), reproducible splits.

    * ``test_fraction=None`` (k-fold cross-validation): fold k's test set is part k of a
      ``StratifiedGroupKFold(num_folds)``; ``val_fraction`` of the remaining cases (0/None: none) is the
      validation set, the rest trains.
    * ``test_fraction`` given: one fixed held-out test set of about that fraction; the remaining cases are
      split into ``num_folds`` parts, fold k validates on part k and trains on the rest (``val_fraction`` unused).

    Returns ``{"num_folds", "seed", "val_fraction", "test_fraction", "folds": [{"train", "val", "test"}: [slide ids]]}``.
    """
    validate_rows(rows)
    problems = split_problems(rows, num_folds, val_fraction, test_fraction)
    if problems:
        raise DatalistError("splits", problems)
    ids = np.array([r["slide_id"] for r in rows])
    labels = np.array([r["label"] for r in rows])
    groups = np.array([r.get("case_id") or r["slide_id"] for r in rows])
    everything = np.arange(len(rows))
    folds = []
    if test_fraction:
        rest, test = _group_split(everything, labels, groups, round(1 / test_fraction), seed)[0]
        for train, val in _group_split(rest, labels, groups, num_folds, seed + 1):
            folds.append({"train": train, "val": val, "test": test})
    else:
        for k, (rest, test) in enumerate(_group_split(everything, labels, groups, num_folds, seed)):
            train, val = rest, rest[:0]
            if val_fraction:
                train, val = _group_split(rest, labels, groups, round(1 / val_fraction), seed + 1 + k)[0]
            folds.append({"train": train, "val": val, "test": test})
    return {
        "num_folds": num_folds,
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "folds": [{name: sorted(ids[f[name]].tolist()) for name in SPLIT_NAMES} for f in folds],
    }


def save_splits(splits: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``splits`` as JSON atomically (temp file + ``os.replace``)."""
    with atomic_open(path, "w") as f:
        json.dump(splits, f, indent=1)
    return Path(path)


def load_splits(path: str | os.PathLike) -> dict[str, Any]:
    """Read a splits JSON written by :func:`save_splits`."""
    with open(path) as f:
        splits = json.load(f)
    if "folds" not in splits:
        raise DatalistError(str(path), ["not a splits file (no 'folds')"])
    return splits


def select_fold(
    splits: Mapping[str, Any], fold: int, rows: Sequence[Mapping[str, Any]] | None = None
) -> dict[str, list]:
    """``{"train", "val", "test"}`` of fold ``fold``: slide ids, or the matching rows when ``rows`` is given."""
    folds = splits["folds"]
    if not 0 <= fold < len(folds):
        raise IndexError(f"fold {fold} out of range: the splits have {len(folds)} folds")
    chosen = folds[fold]
    if rows is None:
        return {name: list(chosen[name]) for name in SPLIT_NAMES}
    by_id = {r["slide_id"]: r for r in rows}
    unknown = [s for name in SPLIT_NAMES for s in chosen[name] if s not in by_id]
    if unknown:
        raise KeyError(f"fold {fold} names slides not in the datalist: {unknown[:10]}")
    check_splits({"folds": [chosen]}, rows)  # no patient in two parts (a hand-made splits file may leak)
    return {name: [dict(by_id[s]) for s in chosen[name]] for name in SPLIT_NAMES}
