"""Where the bundle lives and where it may write.

``python -m monai.bundle run training --config_file bundles/fbta_stad/configs/train.json`` can be
started from any directory, so the bundle root is found from the config file named on the command
line (or ``$FBTA_BUNDLE_ROOT``, or the working directory when it is a bundle). Every output path
the bundle writes goes through :func:`inside`, which refuses paths that escape the output folder.
"""

from __future__ import annotations

import ast
import os
import sys
from pathlib import Path

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


def bundle_root(default: str | None = None) -> str:
    """Absolute path of the bundle folder (the parent of ``configs/``)."""
    env = os.environ.get("FBTA_BUNDLE_ROOT")
    if env:
        return str(Path(env).resolve())
    config = next(iter(config_files_from_argv(sys.argv)), None)
    if config and Path(config).is_file():
        parent = Path(config).resolve().parent
        return str(parent.parent if parent.name == "configs" else parent)
    if (Path.cwd() / "configs" / "metadata.json").is_file():
        return str(Path.cwd())
    if default is not None:
        return str(Path(default).resolve())
    raise RuntimeError(
        "cannot tell where the bundle is: pass --bundle_root /path/to/fbta_stad or set FBTA_BUNDLE_ROOT"
    )


def safe_name(name: str) -> str:
    """A slide id made safe to use as a file name (no separators, no '..')."""
    cleaned = "".join(c if (c.isalnum() or c in "-_.") else "_" for c in str(name))
    cleaned = cleaned.lstrip(".") or "_"
    return cleaned


def inside(root: str | os.PathLike, *parts: str) -> str:
    """``root/parts...``, refusing any result outside ``root`` (e.g. a slide id of '../../x')."""
    base = Path(root).resolve()
    path = base.joinpath(*parts).resolve()
    if path != base and base not in path.parents:
        raise ValueError(f"refusing to write outside the output folder {base}: {path}")
    return str(path)
