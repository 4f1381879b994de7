"""Where the bundle lives and where it may write.

The bundle root is the parent of the ``configs/`` folder MONAI was given: ``python -m monai.bundle run
--config_file /anywhere/fbta_stad/configs/train.json`` (from any working directory), ``ckpt_export`` /
``verify_net_in_out`` with such a config, and ``monai.bundle.load("fbta_stad", bundle_dir=...)`` all
resolve ``@bundle_root`` to ``/anywhere/fbta_stad``. ``--bundle_root`` (or ``$FBTA_BUNDLE_ROOT``) overrides
it. Every output path the bundle writes goes through :func:`inside`, which refuses paths that escape the
output folder.
"""

from __future__ import annotations

import ast
import inspect
import os
import sys
from pathlib import Path

from monai_fbta._io import inside, safe_name  # noqa: F401  (re-exported: the bundle configs name them here)

__all__ = ["bundle_root", "config_files_from_argv", "inside", "safe_name"]


def config_files_from_argv(argv: list[str]) -> list[str]:
    """The ``--config_file`` value(s) of a command line: one path, a list literal or a comma-separated list."""
    for i, arg in enumerate(argv):
        if arg == "--config_file" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--config_file="):
            value = arg.split("=", 1)[1]
        else:
            continue
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value.strip("[] ").split(",")
        names = [parsed] if isinstance(parsed, str) else list(parsed)
        return [n for n in (str(p).strip("'\" ") for p in names) if n]
    return []


def _running_config_dir() -> Path | None:
    """The config folder of the MONAI bundle workflow or script that is evaluating this call, if any.

    ``ConfigWorkflow`` (``run``, ``monai.bundle.load``) keeps it as ``config_root_path``; the scripts that parse
    a config themselves (``ckpt_export``, ``verify_net_in_out``) hold the config file(s) as ``config_file_``.
    """
    workflows = sys.modules.get("monai.bundle.workflows")
    workflow_class = getattr(workflows, "ConfigWorkflow", ())
    frame = inspect.currentframe()
    try:
        while frame is not None:
            local = frame.f_locals
            if workflow_class and isinstance(local.get("self"), workflow_class):
                return Path(local["self"].config_root_path)
            files = local.get("config_file_") if frame.f_globals.get("__name__") == "monai.bundle.scripts" else None
            if files:
                first = files if isinstance(files, (str, os.PathLike)) else next(iter(files))
                return Path(first).parent
            frame = frame.f_back
        return None
    finally:
        del frame


def bundle_root() -> str:
    """Absolute path of the bundle folder (the parent of the ``configs/`` folder being run).

    Looked up in order: ``$FBTA_BUNDLE_ROOT``; the config folder of the running MONAI bundle workflow;
    the working directory when it holds ``configs/metadata.json``. Raises ``RuntimeError`` otherwise.
    """
    env = os.environ.get("FBTA_BUNDLE_ROOT")
    if env:
        return str(Path(env).resolve())
    configs = _running_config_dir()
    if configs is not None:
        configs = configs.resolve()
        return str(configs.parent if configs.name == "configs" else configs)
    if (Path.cwd() / "configs" / "metadata.json").is_file():
        return str(Path.cwd())
    raise RuntimeError(
        "cannot tell where the bundle is: pass --bundle_root /path/to/fbta_stad or set FBTA_BUNDLE_ROOT"
    )
