"""`--init` is read and checked before DeepSpeed starts: a file that is not a checkpoint, or one
that leaves encoder parameters at random initialisation, stops with one clear message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from star.config import ConfigError, load_config
from star.train.init_weights import check_init_covers_encoder
from star.train.runtime import build_model

REPO = Path(__file__).resolve().parents[1]


def _cfg(*overrides: str):
    cfg = load_config("smoke_finetune", ["model.num_classes=4", *overrides])
    cfg.init = "weights.pth"
    return cfg


def _pretrained(*overrides: str) -> dict:
    return build_model(load_config("smoke", list(overrides))).state_dict()


def test_a_matching_pretraining_checkpoint_passes():
    report = check_init_covers_encoder(_cfg(), _pretrained(), build_model(_cfg()))
    assert "missing" in report.lower() or report  # the report is returned for the log


def test_a_shallower_checkpoint_is_refused_with_a_table():
    with pytest.raises(ConfigError) as err:
        deeper = _cfg("model.depth=4")
        check_init_covers_encoder(deeper, _pretrained("model.depth=2"), build_model(deeper))
    message = str(err.value)
    assert "encoder parameters of" in message
    assert "layers.2.*" in message and "layers.3.*" in message and "all 40 tensors" in message, message
    assert "layers.0" not in message and "layers.1" not in message  # loaded ones are not listed
    assert "init_allow_partial=true" in message


def test_partial_init_may_be_allowed():
    cfg = _cfg("model.depth=4", "init_allow_partial=true")
    check_init_covers_encoder(cfg, _pretrained("model.depth=2"), build_model(cfg))


def test_a_checkpoint_that_matches_no_key_is_refused():
    with pytest.raises(ConfigError, match="at random initialisation"):
        check_init_covers_encoder(_cfg(), {"something.else": torch.zeros(3)}, build_model(_cfg()))


def test_wrong_width_is_one_clear_error():
    with pytest.raises(ConfigError, match="does not fit model"):
        check_init_covers_encoder(_cfg(), _pretrained("model.embed_dim=64"), build_model(_cfg()))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("init_shards")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for args in (["synth", "--out", str(root / "img"), "--classes", "2", "--per-class", "8", "--val-per-class", "2"],
                 ["shard", "--src", str(root / "img" / "train"), "--out", str(root / "s"), "--split", "train"],
                 ["shard", "--src", str(root / "img" / "val"), "--out", str(root / "s"), "--split", "val"]):
        subprocess.run([sys.executable, "-m", "star", *args], env=env, check=True, capture_output=True, timeout=300)
    return root / "s"


@pytest.mark.parametrize("kind", ["text", "shallow"])
def test_finetune_cli_refuses_before_deepspeed(tmp_path, shards, kind):
    if kind == "text":
        init = tmp_path / "notes.txt"
        init.write_text("these are not weights\n")
        expect = f"{init}: not a PyTorch checkpoint"
    else:
        init = tmp_path / "shallow.pth"
        torch.save(_pretrained("model.depth=1"), init)
        expect = "encoder parameters of"
    env = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu")
    done = subprocess.run([sys.executable, "-m", "star", "finetune", "--config", "smoke_finetune", "--init", str(init),
                           "--run-dir", str(tmp_path / "ft"), f"data.dir={shards}"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    assert expect in done.stderr and "Traceback" not in done.stderr
    assert "DeepSpeed" not in done.stdout + done.stderr  # refused before start-up
