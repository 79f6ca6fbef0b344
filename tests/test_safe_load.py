"""No file of a run directory, and no weights file, is unpickled with arbitrary globals.

A planted pickle payload (a ``__reduce__`` that would create a marker file) must be refused by
name, never executed, by every command that reads checkpoints: export, eval, finetune --init
and resume; the files STAR and DeepSpeed write themselves must still load.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from star.train.checkpoint import capture_rng, tag_for
from star.train.safe_load import (
    UnsafeCheckpointError,
    check_checkpoint_dir,
    safe_load,
    unsafe_globals,
    use_safe_loading,
)
from star.train.weights import consolidate_run, read_weights

REPO = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this runs ``os.mkdir(marker)``: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"module": {"w": torch.zeros(2)}, "x": Payload(marker)}, path)


def fake_run_dir(root: Path, marker: Path, kind: str = "pretrain") -> Path:
    """A run directory whose committed checkpoint holds a planted model-states file."""
    from star.config import load_config

    run = root / "run"
    step = run / "checkpoints" / tag_for(1)
    plant(step / "mp_rank_00_model_states.pt", marker)
    (run / "checkpoints" / "latest").write_text(tag_for(1) + "\n")
    cfg = load_config("smoke" if kind == "pretrain" else "smoke_finetune")
    cfg.save(run / "config.yaml")
    return run


def test_payload_is_refused_by_name_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    plant(path, marker)
    with pytest.raises(UnsafeCheckpointError) as err:
        safe_load(path)
    assert str(path) in str(err.value) and "mkdir" in str(err.value)
    assert "posix.mkdir" in unsafe_globals(path) or "os.mkdir" in unsafe_globals(path)
    with pytest.raises(UnsafeCheckpointError, match="references .*mkdir"):
        check_checkpoint_dir(tmp_path)
    with pytest.raises(UnsafeCheckpointError):
        read_weights(path)
    assert not marker.exists()
    # The control: the same payload does run under the unrestricted unpickler.
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_what_star_and_deepspeed_write_loads(tmp_path):
    rng = tmp_path / "rng_rank00000.pt"
    torch.save(capture_rng({"g": torch.Generator().manual_seed(3)}), rng)
    state = safe_load(rng)
    assert np.array_equal(state["numpy"][1], np.random.get_state()[1])
    assert unsafe_globals(rng) == []
    # DeepSpeed's ZeRO optimizer shard types
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    optim = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.gradients,
                                         "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}],
                                         "base_optimizer_state": {"state": {0: {"exp_avg": torch.ones(3)}}}}},
               optim)
    loaded = safe_load(optim)
    assert loaded["optimizer_state_dict"]["zero_stage"] == ZeroStageEnum.gradients
    check_checkpoint_dir(tmp_path)


def test_legacy_non_zip_file_is_refused(tmp_path):
    path = tmp_path / "old.pt"
    torch.save({"w": torch.zeros(1)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError, match="not a PyTorch zip checkpoint"):
        unsafe_globals(path)


def test_deepspeed_engine_loader_is_replaced(tmp_path):
    marker = tmp_path / "pwned"
    plant(tmp_path / "f.pt", marker)

    class Engine:
        class checkpoint_engine:  # noqa: N801 - mimics DeepSpeed's attribute
            @staticmethod
            def load(path, map_location=None):
                return torch.load(path, map_location=map_location, weights_only=False)

    engine = Engine()
    use_safe_loading(engine)
    with pytest.raises(UnsafeCheckpointError):
        engine.checkpoint_engine.load(str(tmp_path / "f.pt"), map_location="cpu")
    assert not marker.exists()


def test_consolidate_refuses_before_zero_to_fp32(tmp_path):
    marker = tmp_path / "pwned"
    run = fake_run_dir(tmp_path, marker)
    # a second planted file that zero_to_fp32 would unpickle without the check
    plant(run / "checkpoints" / tag_for(1) / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    with pytest.raises(UnsafeCheckpointError):
        consolidate_run(run)
    assert not marker.exists()


def _star(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu")
    return subprocess.run([sys.executable, "-m", "star", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("command", ["export", "eval", "finetune_init", "resume"])
def test_every_command_refuses_a_planted_run_dir(tmp_path, command, synth_shards):
    marker = tmp_path / "pwned"
    run = fake_run_dir(tmp_path, marker, kind="finetune" if command == "eval" else "pretrain")
    shards = synth_shards
    if command == "export":
        done = _star("export", str(run), "--out", str(tmp_path / "w.pth"), cwd=tmp_path)
    elif command == "eval":
        done = _star("eval", "--ckpt", str(run), "--data", str(shards), cwd=tmp_path)
    elif command == "finetune_init":
        done = _star("finetune", "--config", "smoke_finetune", "--init", str(run), "--run-dir",
                     str(tmp_path / "ft"), f"data.dir={shards}", cwd=tmp_path)
    else:
        done = _star("pretrain", "--run-dir", str(run), f"data.dir={shards}", cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "refused to load" in done.stderr and "mp_rank_00_model_states.pt" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert not marker.exists()


@pytest.fixture(scope="module")
def synth_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("safe_shards")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for args in (["synth", "--out", str(root / "img"), "--classes", "2", "--per-class", "8",
                  "--val-per-class", "2"],
                 ["shard", "--src", str(root / "img" / "train"), "--out", str(root / "shards"), "--split", "train"],
                 ["shard", "--src", str(root / "img" / "val"), "--out", str(root / "shards"), "--split", "val"]):
        subprocess.run([sys.executable, "-m", "star", *args], env=env, check=True, capture_output=True,
                       timeout=300)
    yield root / "shards"
    shutil.rmtree(root, ignore_errors=True)
