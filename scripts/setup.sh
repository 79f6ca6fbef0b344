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

# Without CUDA: mamba-ssm and causal-conv1d as pure Python (no kernels compiled), for
# tests/test_ops_upstream_contract.py, which checks every fused-kernel call against their
# own PyTorch references. The SKIP flags skip nvcc, the FORCE flags stop their setup.py from
# fetching prebuilt CUDA wheels; --no-deps keeps pip away from Triton, TileLang and a CUDA
# torch (their Python interfaces only need einops besides torch). star's kernel probe
# refuses these installs with a reason, so training still takes the torch path. Skipped when
# torch has CUDA: there, `pip install -e ".[cuda]"` must build the real kernels.
if .venv/bin/python -c "import sys, torch; sys.exit(torch.version.cuda is not None)"; then
    .venv/bin/pip install -q setuptools wheel packaging ninja einops
    MAMBA_SKIP_CUDA_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE \
    MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE \
        .venv/bin/pip install -q --no-build-isolation --no-deps \
        "mamba-ssm>=2.2.5" "causal-conv1d>=1.5.1"
fi
