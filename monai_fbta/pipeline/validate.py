"""Checks of the bundle settings that need no slide, run as the first step of every bundle command.

A wrong head name, class list, encoder, datalist or fold count is reported in seconds, before any slide
is tiled, as one message naming the option and what is wrong (and the process exits non-zero without a
MONAI traceback). :func:`install_excepthook` makes any later failure end with its root cause too, so the
last lines the user sees are our message, not MONAI's "Failed to instantiate component".
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai_fbta.pipeline.paths import config_files_from_argv

__all__ = ["RENAMED_OPTIONS", "validate_settings", "settings_problems", "option_problems", "install_excepthook"]

RENAMED_OPTIONS = {"mpp": "assume_mpp", "batch_size": "extract_batch_size", "eval_model": "model_path"}
"""Old option name -> its name now (the same name in training, evaluation and inference)."""

_MONAI_RUN_ARGS = {"run_id", "init_id", "final_id", "meta_file", "config_file", "logging_file", "tracking", "args_file"}


def _argv_options(argv: Sequence[str]) -> list[str]:
    """Names of the ``--name value`` / ``--name=value`` options of a ``python -m monai.bundle run`` command line."""
    return [a[2:].split("=", 1)[0] for a in argv if a.startswith("--") and len(a) > 2]


def option_problems(argv: Sequence[str], known: Sequence[str]) -> list[str]:
    """Command-line options that the command does not know (a renamed option names its new name)."""
    problems = []
    for name in _argv_options(argv):
        root = name.split("#", 1)[0]
        if root in known or root in _MONAI_RUN_ARGS:
            continue
        if root in RENAMED_OPTIONS:
            problems.append(f"option --{root} was renamed: use --{RENAMED_OPTIONS[root]}")
            continue
        close = difflib.get_close_matches(root, known, n=1)
        hint = f"; did you mean --{close[0]}?" if close else ""
        problems.append(f"unknown option --{root} for this command{hint}")
    return problems


def _known_options(config_files: Sequence[str]) -> list[str] | None:
    """Top-level keys of the config files, or ``None`` when one cannot be read (then options are not checked)."""
    keys: set[str] = set()
    for path in config_files:
        try:
            with open(path) as f:
                keys.update(json.load(f))
        except (OSError, ValueError, TypeError):
            return None
    return sorted(keys)


def _choice_problem(option: str, value: Any, valid: Sequence[str], ignore_case: bool = False) -> list[str]:
    text = str(value).lower() if ignore_case else str(value)
    if text in valid:
        return []
    close = difflib.get_close_matches(text, valid, n=1)
    return [f"--{option} {value!r} is not one of {list(valid)}" + (f" (did you mean {close[0]!r}?)" if close else "")]


def _encoder_problems(name: str | None, weights: str | os.PathLike | None) -> list[str]:
    from monai_fbta.networks.encoder import ENCODER_NAMES, _is_weights_file

    problems = [] if name is None else _choice_problem("encoder_name", name, ENCODER_NAMES)
    if weights is not None and _is_weights_file(weights) and not os.path.isfile(weights):  # else a pretrained tag
        problems.append(f"--encoder_weights {os.fspath(weights)}: file not found")
    return problems


def _class_problems(num_classes: int | None, class_names: Sequence[str] | None) -> list[str]:
    if num_classes is None:
        return []
    if int(num_classes) < 2:
        return [f"--num_classes {num_classes}: a classifier needs at least 2 classes"]
    if class_names is None:
        return []
    names = [str(n) for n in class_names]
    problems = []
    if len(names) != int(num_classes):
        problems.append(f"--class_names has {len(names)} name(s) {names} but --num_classes is {num_classes}: "
                        "give one name per class")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        problems.append(f"--class_names {names} names {repeated} more than once: a label could then mean two classes")
    padded = [n for n in names if n != n.strip() or not n]
    if padded:
        problems.append(f"--class_names {names}: {padded} begin or end with spaces or are empty; a CSV datalist's "
                        "labels are read without surrounding spaces, so none would match them")
    return problems


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fold_problems(
    fold: int | None, num_folds: int | None, val_fraction: float | None, split_seed: int | None = None
) -> list[str]:
    whole = (("fold", fold), ("num_folds", num_folds), ("split_seed", split_seed))
    problems = [f"--{name} {value!r}: give a whole number" for name, value in whole
                if value is not None and not _is_int(value)]
    if problems:
        return problems
    if split_seed is not None and not 0 <= split_seed < 2**32:
        problems.append(f"--split_seed {split_seed}: give a whole number in 0 .. 2**32 - 1")
    if num_folds is not None and int(num_folds) < 2:
        problems.append(f"--num_folds {num_folds}: cross-validation needs at least 2 folds")
    elif fold is not None and num_folds is not None and not 0 <= int(fold) < int(num_folds):
        problems.append(f"--fold {fold} is out of range: folds are numbered 0..{int(num_folds) - 1} (--num_folds {num_folds})")
    if val_fraction and not 0 < float(val_fraction) <= 0.5:
        problems.append(f"--val_fraction {val_fraction}: give a fraction in (0, 0.5], or 0 for no validation set")
    return problems


def _datalist_problems(
    dataset_dir: str | os.PathLike | None,
    datalist: str | os.PathLike | None,
    class_names: Sequence[str] | None,
    num_folds: int | None,
    val_fraction: float | None,
) -> list[str]:
    """Problems of the datalist (or ``dataset_dir/labels.csv``); none when the synthetic demo will be generated."""
    from monai_fbta.data.datalist import DatalistError, load_datalist, split_problems

    if datalist:
        path = Path(datalist)
    elif dataset_dir is not None and (Path(dataset_dir) / "labels.csv").is_file():
        path = Path(dataset_dir) / "labels.csv"
    else:
        return []
    try:
        rows = load_datalist(path, classes=class_names, base_dir=dataset_dir if datalist else None)
    except DatalistError as err:
        return [f"--datalist {err}"]
    except (OSError, ValueError) as err:  # unreadable, not CSV/JSON
        return [f"--datalist {path}: cannot be read: {type(err).__name__}: {err}"]
    if num_folds is None:
        return []
    return split_problems(rows, int(num_folds), val_fraction, classes=class_names)


def settings_problems(
    mil_name: str | None = None,
    views: Sequence[str] | None = None,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    encoder_name: str | None = None,
    encoder_weights: str | os.PathLike | None = None,
    dataset_dir: str | os.PathLike | None = None,
    datalist: str | os.PathLike | None = None,
    fold: int | None = None,
    num_folds: int | None = None,
    val_fraction: float | None = None,
    model_path: str | os.PathLike | None = None,
    inputs: Any = None,
    assume_mpp: float | None = None,
    fbta_checkpoint: str | os.PathLike | None = None,
    lambda_dist: float | None = None,
    split_seed: int | None = None,
    eval_split: str | None = None,
) -> list[str]:
    """Every problem of the given settings (``None`` = not checked), each naming its bundle option."""
    from monai_fbta.engines.losses import VIEWS
    from monai_fbta.networks.registry import list_mil_heads

    problems = [] if mil_name is None else _choice_problem("mil_name", mil_name, list_mil_heads(), ignore_case=True)
    if views is not None:
        listed = [views] if isinstance(views, str) else list(views)
        bad = [v for v in listed if v not in VIEWS]
        if not listed or bad or len(set(listed)) != len(listed):
            problems.append(f"--views {listed}: give a non-empty list of distinct names from {list(VIEWS)}")
    problems += _class_problems(num_classes, class_names)
    problems += _encoder_problems(encoder_name, encoder_weights)
    problems += _fold_problems(fold, num_folds, val_fraction, split_seed)
    if eval_split is not None:
        from monai_fbta.data.datalist import SPLIT_NAMES

        problems += _choice_problem("eval_split", eval_split, SPLIT_NAMES)
    if not problems:  # the datalist check needs valid class names and folds
        problems += _datalist_problems(dataset_dir, datalist, class_names, num_folds, val_fraction)
    if model_path is not None and not os.path.isfile(model_path):
        problems.append(f"--model_path {model_path}: no trained model there (run the bundle's training first)")
    if isinstance(inputs, (str, os.PathLike)) and not os.path.exists(inputs):
        problems.append(f"--input {inputs}: no such file or folder")
    if assume_mpp is not None and not float(assume_mpp) > 0:
        problems.append(f"--assume_mpp {assume_mpp}: give the pixel size in um/px (> 0), e.g. 0.25 for 40x or 0.5 for 20x")
    if fbta_checkpoint is not None:
        problems += _translated_head_problems(fbta_checkpoint, views, lambda_dist)
    return problems


def _translated_head_problems(
    fbta_checkpoint: str | os.PathLike, views: Sequence[str] | None, lambda_dist: float | None
) -> list[str]:
    """Problems of the translated-head stage (``configs/translated_head.json``): its FBTA checkpoint must exist, and
    the head trains on the fixed translation alone."""
    problems = []
    if not os.path.isfile(fbta_checkpoint):
        problems.append(f"--fbta_checkpoint {os.fspath(fbta_checkpoint)}: no FBTA training checkpoint there (train FBTA "
                        "with configs/train.json first; give its ckpt_dir's last.pt)")
    listed = [views] if isinstance(views, str) else list(views or [])
    if listed != ["translated"] or float(lambda_dist or 0) != 0:
        problems.append(f"--views {listed} --lambda_dist {lambda_dist}: the translated-head stage trains the head on "
                        "the fixed translation alone; keep --views \"['translated']\" and --lambda_dist 0")
    return problems


def validate_settings(argv: Sequence[str] | None = None, **settings: Any) -> bool:
    """Check the command line options and ``settings`` (see :func:`settings_problems`) before any long work.

    On a problem, prints them all and exits with status 1 (``SystemExit``: no MONAI traceback); also installs
    :func:`install_excepthook`. Returns ``True`` so a config can use it as an expression.
    """
    install_excepthook()
    argv = sys.argv if argv is None else argv
    known = _known_options(config_files_from_argv(list(argv)))
    problems = [] if known is None else option_problems(argv, known)
    problems += settings_problems(**settings)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        sys.stderr.flush()
        raise SystemExit(f"error: {len(problems)} problem(s) in the settings, nothing was run:\n{lines}")
    return True


def _root_cause(err: BaseException) -> BaseException:
    seen = {id(err)}
    while True:
        nxt = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
        if nxt is None or id(nxt) in seen:
            return err
        seen.add(id(nxt))
        err = nxt


def _user_errors() -> tuple[type[BaseException], ...]:
    """Our errors whose message says everything the user needs (their traceback is noise)."""
    from monai_fbta._io import LockHeld
    from monai_fbta.data.datalist import DatalistError
    from monai_fbta.data.errors import SlideError
    from monai_fbta.handlers.checkpoint import RunMismatchError
    from monai_fbta.pipeline.infer import InferenceError, InferenceInputError

    return DatalistError, SlideError, RunMismatchError, InferenceError, InferenceInputError, LockHeld


INTERRUPTED = ("interrupted: rerun the same command to go on where it stopped (finished slides, cached features and "
               "the last finished epoch are kept)")


def install_excepthook() -> None:
    """Make an uncaught exception end with one line naming its root cause.

    For our own user-facing errors (bad datalist, bad slide, another run's checkpoint, a run another process
    holds, unusable inference inputs, nothing predicted) only that line is printed, and for Ctrl-C only
    :data:`INTERRUPTED`; set ``MONAI_FBTA_TRACEBACK=1`` to see the traceback too.
    """
    previous = sys.excepthook
    if getattr(previous, "_fbta", False):
        return

    def hook(etype: type[BaseException], value: BaseException, tb: Any) -> None:
        root = _root_cause(value)
        quiet = isinstance(root, (*_user_errors(), KeyboardInterrupt)) and os.environ.get("MONAI_FBTA_TRACEBACK") != "1"
        if not quiet:
            previous(etype, value, tb)
        if isinstance(root, KeyboardInterrupt):
            sys.stderr.write(f"\n{INTERRUPTED}\n")
        else:
            sys.stderr.write(f"\nerror: {type(root).__name__}: {root}\n")
        sys.stderr.flush()

    hook._fbta = True  # type: ignore[attr-defined]
    sys.excepthook = hook
