#!/usr/bin/env bash
# Create ./.venv (once) and install monai-fbta into it. Idempotent: a second run only checks.
# torch/torchvision are pinned to the build that works beside PyPI's timm and torchvision here
# (see docs/install.md); override with FBTA_TORCH_SPEC="torch==X torchvision==Y".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
    .venv/bin/pip install -q --disable-pip-version-check ${FBTA_TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
fi
if ! .venv/bin/python -c "import monai_fbta, pytest" >/dev/null 2>&1 || [ setup.cfg -nt .venv/.fbta-installed ]; then
    .venv/bin/pip install -q --disable-pip-version-check -e ".[test]"
    touch .venv/.fbta-installed
fi
