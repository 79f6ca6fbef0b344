#!/usr/bin/env bash
# Creates ./.venv with STAR and its test tools. On a CPU box torch==2.13.0 is installed
# first so pip does not pull a multi-GB CUDA build; on a GPU cluster install the torch
# build that matches your CUDA first, then `pip install -e ".[cuda]"` (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[dev]"
