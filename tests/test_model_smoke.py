"""The quick check of a registry model (`star profile model --model NAME`, alias `star smoke`) end
to end, and one forward+backward of the full-size STAR-B on CPU."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_check(*args: str) -> dict[str, str]:
    """``star ARGS`` in a fresh process; its ``name  value`` lines."""
    proc = subprocess.run([sys.executable, "-m", "star", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {m.group(1): m.group(2) for m in re.finditer(r"^(\w[\w+ ]*?)\s{2,}(.+)$", proc.stdout, re.M)}


@pytest.mark.parametrize("command", [("smoke", "--batch", "1"), ("profile", "model", "--batch-size", "1")],
                         ids=["star smoke", "star profile model --model"])
def test_quick_check_tiny_finetune_form(command):
    out = run_check(*command, "--model", "star_tiny_pz8_ft", "--device", "cpu")
    assert math.isfinite(float(out["loss"]))
    assert out["kernels"] == "torch"
    assert out["parameters"].startswith("3.")
    assert out["input"].startswith("1 images of ")


def test_smoke_counts_pretraining_batches_in_sequences():
    # the alias keeps `star smoke`'s unit: --batch 2 = two sequences of N = 2 images
    tiny = ("--model", "star_tiny_pz8", "--images-per-seq", "2", "--device", "cpu")
    smoke = run_check("smoke", "--batch", "2", *tiny)
    profile = run_check("profile", "model", "--batch-size", "4", *tiny)
    assert smoke["input"] == profile["input"] and smoke["input"].startswith("4 images of ")
    assert "2 sequence(s)" in smoke["input"]
    assert smoke["loss"] == profile["loss"]  # same seed, same model, same images


@pytest.mark.parametrize("command", [("smoke",), ("profile", "model")])
def test_quick_check_rejects_unknown_model(command):
    proc = subprocess.run([sys.executable, "-m", "star", *command, "--model", "star_base"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "unknown model 'star_base'" in proc.stderr


@pytest.mark.slow
def test_star_base_forward_backward_on_an_8_image_sequence():
    # STAR-B, one sequence of 8 images (1280 tokens), forward + backward on CPU. Measured peak
    # RSS about 2.1 GiB (weights + grads 0.8 GB, activations of 12 layers); bound 4 GiB.
    out = run_check("smoke", "--model", "star_base_pz16", "--batch", "1", "--device", "cpu")
    assert math.isfinite(float(out["loss"]))
    assert "1280 tokens" in out["input"]
    assert 98e6 < float(out["parameters"].split()[0]) * 1e6 < 100.5e6
    peak_mib = float(out["peak memory"].split()[0])
    assert peak_mib < 4096, f"peak RSS {peak_mib} MiB exceeds the 4 GiB bound"
