"""Package layering: every module imports on its own, and ``monai_fbta.data`` never imports ``transforms`` or ``pipeline``."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import monai_fbta

PACKAGE = Path(monai_fbta.__file__).parent
# data is the lowest layer above networks: transforms may import data.slide / data.store, never the reverse
FORBIDDEN = {"data": ("monai_fbta.transforms", "monai_fbta.pipeline", "monai_fbta.engines", "monai_fbta.handlers")}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _all_modules() -> list[str]:
    return sorted(_module_name(p) for p in PACKAGE.rglob("*.py") if p.name != "__main__.py")


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every ``import x`` / ``from x import y`` in the file, at any depth (lazy imports in functions included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def test_data_does_not_import_higher_layers():
    offences = []
    for layer, forbidden in FORBIDDEN.items():
        for path in sorted((PACKAGE / layer).rglob("*.py")):
            for line, name in _imports(path):
                if name.startswith(forbidden) or name == "monai_fbta" and layer == "data":
                    offences.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}")
    assert not offences, "\n".join(offences)


def test_every_module_imports_in_a_fresh_interpreter():
    """Each module imported first in its own interpreter (no load-order luck); after importing all of
    ``monai_fbta.data``, no ``monai_fbta.transforms`` module is loaded."""
    modules = _all_modules()
    assert "monai_fbta.data.store" in modules and "monai_fbta.transforms.store" in modules
    script = (
        "import importlib, json, sys\n"
        "failed = {}\n"
        "for name in json.loads(sys.argv[1]):\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as e:\n"
        "        failed[name] = f'{type(e).__name__}: {e}'\n"
        "print(json.dumps({'failed': failed, 'loaded': sorted(m for m in sys.modules if m.startswith('monai_fbta'))}))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE.parent), os.environ.get("PYTHONPATH", "")])}

    def run(names: list[str]) -> dict:
        out = subprocess.run([sys.executable, "-c", script, json.dumps(names)], capture_output=True, text=True, env=env,
                             timeout=600, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    data = [m for m in modules if m == "monai_fbta.data" or m.startswith("monai_fbta.data.")]
    result = run(data)
    assert not result["failed"], result["failed"]
    assert not [m for m in result["loaded"] if m.startswith("monai_fbta.transforms")], result["loaded"]
    result = run(modules[::-1])  # submodules before their packages: a cycle that works in one load order only fails here
    assert not result["failed"], result["failed"]
