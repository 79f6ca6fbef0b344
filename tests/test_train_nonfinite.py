"""Non-finite diagnosis and loss spikes (star/train/nonfinite.py): the probe finds the first
module / Mamba stage that went non-finite, the re-run leaves training bit-identical, the
report names the injected module and the right samples, a streak writes one report, and loss
spikes match a recomputation from metrics.jsonl."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from star.config import ConfigError, load_config
from star.models import mamba as mamba_module
from star.models.blocks import MambaMLPBlock
from star.models.mamba import Mamba, ScanGrid
from star.train.nonfinite import (
    NonfiniteProbe,
    SpikeDetector,
    diagnose_micro_batch,
    inject_nonfinite,
    rng_snapshot,
)
from tests.test_train_support import (
    TINY_PRETRAIN,
    assert_bit_identical,
    free_port,
    metrics,
    shard_dir,
    star_env,
    weights,
)


def _forward_backward(model, x, grid=None):
    y = model(x, grid) if grid is not None else model(x)
    grads = torch.autograd.grad(y.float().square().mean(), [x] + [p for p in model.parameters()],
                                allow_unused=True)
    return y, grads


# ------------------------------------------------------------------ the probe on a mixer
@pytest.mark.parametrize("scans", [1, 4])
def test_probe_does_not_change_the_mixer_numbers(scans):
    torch.manual_seed(0)
    mixer = Mamba(16, num_scans=scans)
    grid = ScanGrid(4) if scans == 4 else None
    x = torch.randn(2, 16, 16, requires_grad=True)
    y_ref, g_ref = _forward_backward(mixer, x, grid)
    with NonfiniteProbe(mixer) as probe:
        assert mamba_module.STAGE_PROBE is probe
        y, g = _forward_backward(mixer, x, grid)
    assert mamba_module.STAGE_PROBE is None
    assert torch.equal(y, y_ref)
    assert all(torch.equal(a, b) for a, b in zip(g, g_ref))
    assert probe.result() == {"first_forward": None, "first_backward": None}


def _break(mixer: Mamba, where: str) -> None:
    """Make one stage of the mixer overflow (all in float32, inputs of order 1)."""
    with torch.no_grad():
        if where == "in_proj":
            mixer.in_proj.weight[0, 0] = float("inf")
        elif where == "conv":
            mixer.conv1d.bias[0] = float("inf")
        elif where == "x_proj/dt":
            mixer.x_proj.weight[0, 0] = float("inf")
        elif where == "scan":
            # delta = softplus(dt + 1e38) ~ 1e38 (finite), B ~ 1e3: delta * B * u overflows in the scan
            mixer.dt_proj.bias.fill_(1e38)
            mixer.x_proj.weight[mixer.dt_rank:].mul_(1e3)


@pytest.mark.parametrize("stage", ["in_proj", "conv", "x_proj/dt", "scan"])
def test_probe_names_the_mamba_stage_that_overflowed(stage):
    torch.manual_seed(0)
    block = MambaMLPBlock(16)
    _break(block.mixer, stage)
    x = torch.randn(2, 16, 16, requires_grad=True)
    with NonfiniteProbe(block) as probe:
        _forward_backward(block, x)
    first = probe.result()["first_forward"]
    assert (first["module"], first["kind"], first["stage"]) == ("mixer", "stage", stage)
    assert first["input_finite"] is True
    if stage == "in_proj":  # its input is norm1(x): an independent value to compare with
        assert first["input_max_abs"] == pytest.approx(block.norm1(x).abs().max().item())


def test_probe_tells_an_mlp_overflow_from_a_scan_overflow_and_names_the_4_scan_direction():
    torch.manual_seed(0)
    block = MambaMLPBlock(16)
    with torch.no_grad():
        block.mlp.w1.weight[0, 0] = float("inf")
    x = torch.randn(2, 16, 16, requires_grad=True)
    with NonfiniteProbe(block) as probe:
        _forward_backward(block, x)
    first = probe.result()["first_forward"]
    assert (first["module"], first["kind"]) == ("mlp.w1", "module")
    assert first["input_max_abs"] == pytest.approx(block.norm2(x + block.mixer(block.norm1(x))).abs().max().item())

    mixer = Mamba(16, num_scans=4)
    with torch.no_grad():  # only the column-major, backward direction overflows
        mixer.dt_proj_c_b.bias.fill_(1e38)
        mixer.x_proj_c_b.weight[mixer.dt_rank:].mul_(1e3)
    with NonfiniteProbe(mixer) as probe:
        _forward_backward(mixer, x, ScanGrid(4))
    first = probe.result()["first_forward"]
    assert (first["module"], first["stage"]) == ("", "col_backward:scan")


def test_probe_finds_the_first_nonfinite_gradient():
    torch.manual_seed(0)
    block = MambaMLPBlock(16)
    x = torch.randn(2, 16, 16, requires_grad=True)
    handles = inject_nonfinite(block, "mlp.w2", {0}, phase="backward")
    with NonfiniteProbe(block) as probe:
        _forward_backward(block, x)
    result = probe.result()
    assert result["first_forward"] is None
    assert result["first_backward"]["parameter"] == "mlp.w2.weight"
    assert result["first_backward"]["module"] == "mlp.w2"
    for h in handles:
        h.remove()
    # forward inf in the mixer's output: the loss is inf, so the first gradient event already
    # comes in non-finite, and the report says so instead of blaming that module
    inject_nonfinite(block, "mixer", {0})
    with NonfiniteProbe(block) as probe:
        _forward_backward(block, x)
    result = probe.result()
    assert (result["first_forward"]["module"], result["first_forward"]["kind"]) == ("mixer", "module")
    assert result["first_backward"]["grad_output_finite"] is False


# ------------------------------------------------------------------ the re-run leaves no trace
class _Task:
    """A loss that also draws from its own generator (as fine-tuning's mixup does)."""

    def __init__(self):
        self.gen = torch.Generator().manual_seed(7)
        self.rng_generators = {"noise": self.gen}

    def loss(self, engine, batch):
        noise = torch.randn(batch.images.shape, generator=self.gen)
        return engine(batch.images + 0.01 * noise).float().square().mean()


class _Batch:
    def __init__(self, images):
        self.images = images


def test_diagnose_micro_batch_replays_the_randomness_and_restores_everything():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), MambaMLPBlock(8, drop_path=0.5), nn.Linear(8, 8))
    model.add_module("bn", nn.BatchNorm1d(6))  # buffers the forward updates
    model.train()
    batch = _Batch(torch.randn(4, 6, 8))
    random.seed(1), np.random.seed(1)
    task = _Task()
    before = rng_snapshot(task.rng_generators)
    with torch.no_grad():  # the "real" micro-batch: draws drop-path masks and the task's noise
        real_loss = float(task.loss(model, batch))
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    grads_before = {n: p.grad.clone() for n, p in model.named_parameters()}
    buffers_before = {n: b.clone() for n, b in model.named_buffers()}
    after = rng_snapshot(task.rng_generators)
    result = diagnose_micro_batch(model, task.loss, batch, amp_dtype=None, rng_state=before,
                                  generators=task.rng_generators)
    assert result["loss"] == real_loss            # same drop-path masks and noise as the real forward
    now = rng_snapshot(task.rng_generators)
    assert torch.equal(now["generators"]["noise"], after["generators"]["noise"])
    assert torch.equal(now["torch"], after["torch"])
    assert now["python"] == after["python"]
    assert all(np.array_equal(a, b) for a, b in zip(now["numpy"], after["numpy"]))
    assert all(torch.equal(p.grad, grads_before[n]) for n, p in model.named_parameters())
    assert all(torch.equal(b, buffers_before[n]) for n, b in model.named_buffers())
    assert result["nonfinite"] is False and math.isfinite(result["grad_norm"]) and result["grad_norm"] > 0
    # the random draws that follow are those of a run without the re-run
    torch.set_rng_state(after["torch"])
    expected = torch.rand(3)
    torch.set_rng_state(now["torch"])
    assert torch.equal(torch.rand(3), expected)


# ------------------------------------------------------------------ loss spikes
def test_spike_detector_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    losses = list(1.0 + 0.01 * rng.standard_normal(300))
    for i in (80, 81, 150, 299):
        losses[i] += 0.5
    det = SpikeDetector(k=6.0, window=50, min_samples=20)
    flagged = [i for i, v in enumerate(losses) if det.update(v)[0]]
    expected = []
    for i, v in enumerate(losses):
        prev = np.asarray(losses[max(0, i - 50):i])
        if len(prev) >= 20 and v > prev.mean() + 6.0 * prev.std():
            expected.append(i)
    assert flagged == expected
    assert 80 in flagged and 150 in flagged and 299 in flagged


def test_spike_config_is_checked():
    cfg = load_config("smoke", ["log.spike_k=4", "log.spike_window=100", "log.spike_min_samples=10"])
    assert (cfg.log.spike_k, cfg.log.spike_window, cfg.log.spike_min_samples) == (4.0, 100, 10)
    assert cfg.log.diagnose_nonfinite is True
    with pytest.raises(ConfigError, match="log.spike_min_samples"):
        load_config("smoke", ["log.spike_min_samples=300"])
    with pytest.raises(ConfigError, match="log.spike_k"):
        load_config("smoke", ["log.spike_k=0"])
    with pytest.raises(ConfigError, match="log.spike_windw"):
        load_config("smoke", ["log.spike_windw=3"])


def test_a_resumed_run_cuts_the_spike_and_streak_logs_back(tmp_path):
    from star.train.distributed import DistEnv
    from star.train.nonfinite import StepWatch

    (tmp_path / "nonfinite" / "step_5").mkdir(parents=True)
    spikes, streak = tmp_path / "loss_spikes.jsonl", tmp_path / "nonfinite" / "step_5" / "streak.jsonl"
    spikes.write_text("".join(json.dumps({"step": s}) + "\n" for s in (3, 8)))
    streak.write_text("".join(json.dumps({"step": s}) + "\n" for s in (6, 7, 9)))
    env = DistEnv(0, 1, 0, "127.0.0.1", 0, "single")
    StepWatch.from_config(load_config("smoke"), tmp_path, env, None, {}, print, resume_step=7)
    assert [json.loads(line)["step"] for line in spikes.read_text().splitlines()] == [3]
    assert [json.loads(line)["step"] for line in streak.read_text().splitlines()] == [6, 7]


# ------------------------------------------------------------------ in training
SCRIPT = """
import inspect, json, os, sys
from pathlib import Path
from star.config import load_config
from star.train.nonfinite import inject_nonfinite
from star.train.runtime import build_model, run_training
# run_training(cfg, run_dir, make_task, ...) before the build_training refactor, without make_task after
task_args = ()
if "make_task" in inspect.signature(run_training).parameters:
    from star.train.pretrain import make_pretrain_task
    task_args = (make_pretrain_task,)

faults = json.loads(sys.argv[2])
rank = int(os.environ.get("RANK", "0"))

def factory(cfg):
    model = build_model(cfg)
    for fault in faults:
        if fault.get("rank", rank) != rank:
            continue
        # "LAST": the prediction head (the last module; its name differs between model layouts)
        name = [n for n, _ in model.named_modules()][-1] if fault["module"] == "LAST" else fault["module"]
        inject_nonfinite(model, name, set(fault["calls"]), phase=fault.get("phase", "forward"),
                         value=float(fault.get("value", "inf")))
    return model

cfg = load_config("smoke", sys.argv[3:])
sys.exit(run_training(cfg, Path(sys.argv[1]), *task_args, model_factory=factory))
"""

# 96 images, 8 per micro-batch, 2 micro-batches per step: forward call c is step c // 2 + 1,
# micro-batch c % 2. Step 3: inf out of an MLP; steps 5-6: inf in a gradient (a streak);
# step 8: a large finite error on the predictions (a loss spike).
FAULTS = [{"module": "layers.1.mlp.w2", "calls": [5]},
          {"module": "layers.0.mixer", "calls": [8, 10], "phase": "backward"},
          {"module": "LAST", "calls": [14], "value": 3000.0}]
OVERRIDES = ["batch.global_images=16", "batch.micro_images=8", "ds_config=cpu_zero2_fp32", "model.drop_path=0.2",
             "schedule.max_steps=9", "log.spike_window=4", "log.spike_min_samples=3", "log.spike_k=3"]


def _train(tmp_path, name: str, extra: list[str]) -> None:
    script = tmp_path / "faults.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / name), json.dumps(FAULTS),
                           f"data.dir={shard_dir()}", *TINY_PRETRAIN, *OVERRIDES, *extra],
                          cwd=tmp_path, env=star_env(), capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout + proc.stderr


def _expected_keys(loader_step: int, epoch: int = 0, rank: int = 0, world: int = 1, batch: int = 8) -> list[list[str]]:
    """Keys of a training micro-batch straight from the sampling plan and the shard index."""
    from pipelines.sampling import EpochPlan
    from pipelines.shards import ShardSet

    cfg = load_config("smoke", TINY_PRETRAIN)
    shards = ShardSet(shard_dir(), "train")
    _, indices, _ = EpochPlan(len(shards), batch, rank, world, cfg.seed, epoch, train=True).samples(loader_step)
    return [list(shards.name(int(i))) for i in indices]


@pytest.mark.slow
def test_nonfinite_reports_streaks_spikes_and_bit_identical_continuation(tmp_path):
    out = _train(tmp_path, "diag", [])
    run = tmp_path / "diag"
    records = metrics(run)
    assert [r["skipped"] for r in records] == [False, False, True, False, True, True, False, False, False]

    # step 3: forward inf out of layers.1.mlp.w2 in micro-batch 1 (loader step 5 of epoch 0)
    report = json.loads((run / "nonfinite" / "step_3" / "report.json").read_text())
    assert report["step"] == 3 and report["rank"] == 0 and report["micro_batch"] == 1
    first = report["first_nonfinite_forward"]
    assert (first["module"], first["kind"], first["input_finite"]) == ("layers.1.mlp.w2", "module", True)
    assert isinstance(first["input_max_abs"], float) and 0 < first["input_max_abs"] < 1e3
    assert report["keys"] == {"0": _expected_keys(5)}
    assert report["loss"] == "nan" and report["dtype_path"]["autocast"] is None
    assert report["dtype_path"]["kernel_path"] == "torch"
    assert [h["step"] for h in report["grad_norm_history"]] == [1, 2, 3]
    assert report["grad_norm_history"][0]["grad_norm"] == records[0]["grad_norm"]
    assert "non-finite step 3" in out and "layers.1.mlp.w2" in out

    # steps 5-6: a streak; one report for step 5 (inf in the gradient of layers.0.mixer's
    # first parameter, A_log; losses finite), one line for step 6
    report = json.loads((run / "nonfinite" / "step_5" / "report.json").read_text())
    assert report["first_nonfinite_forward"] is None
    assert report["first_nonfinite_backward"]["parameter"] == "layers.0.mixer.A_log"  # its first parameter
    assert report["micro_batch"] == 0 and report["keys"] == {"0": _expected_keys(8)}
    rank0 = report["ranks"][0]
    # the re-run drew the same drop-path masks: its loss is the step's micro-batch loss, exactly
    assert rank0["rerun"]["loss"] == rank0["micro_losses"][0] and rank0["rerun"]["loss_matches_step"]
    assert not (run / "nonfinite" / "step_6").exists()
    lines = (run / "nonfinite" / "step_5" / "streak.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [6]
    follower = json.loads(lines[0])["ranks"][0]  # finite losses: every micro-batch's keys
    assert follower["micro_batches"] == [0, 1] and follower["keys"] == [_expected_keys(10), _expected_keys(11)]
    assert sorted(p.name for p in (run / "nonfinite").iterdir()) == ["step_3", "step_5"]

    # loss spikes: exactly the finite steps a recomputation from metrics.jsonl flags; step 8 is one
    finite = [(r["step"], r["loss"]) for r in records if not r["skipped"]]
    expected = [s for i, (s, v) in enumerate(finite)
                if i >= 3 and v > np.mean([x for _, x in finite[max(0, i - 4):i]])
                + 3 * np.std([x for _, x in finite[max(0, i - 4):i]])]
    assert 8 in expected
    assert [r["step"] for r in records if r["loss_spike"]] == expected
    assert records[-1]["loss_spikes"] == len(expected)
    spikes = [json.loads(line) for line in (run / "loss_spikes.jsonl").read_text().splitlines()]
    assert [s["step"] for s in spikes] == expected
    step8 = next(s for s in spikes if s["step"] == 8)
    assert step8["keys"] == [[_expected_keys(2, epoch=1), _expected_keys(3, epoch=1)]]  # 12 per epoch

    # the same faults without diagnosis: the same trajectory, bit for bit
    _train(tmp_path, "plain", ["log.diagnose_nonfinite=false"])
    plain = metrics(tmp_path / "plain")
    assert [str(r["loss"]) for r in plain] == [str(r["loss"]) for r in records]
    assert [str(r["grad_norm"]) for r in plain] == [str(r["grad_norm"]) for r in records]
    assert_bit_identical(weights(tmp_path / "plain"), weights(run))
    assert not (tmp_path / "plain" / "nonfinite").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_gather_every_ranks_keys_and_find_the_rank_that_went_nonfinite(tmp_path):
    # 2 ranks x 4 images x 2 micro-batches; only rank 1 emits inf, at step 3 micro-batch 1
    script = tmp_path / "faults.py"
    script.write_text(SCRIPT)
    faults = [{"module": "layers.0.mlp.w1", "calls": [5], "rank": 1}]
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = star_env({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
        procs.append(subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "run"), json.dumps(faults), f"data.dir={shard_dir()}",
             *TINY_PRETRAIN, "batch.global_images=16", "batch.micro_images=4", "ds_config=cpu_zero2_fp32",
             "schedule.max_steps=4"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True))
    outs = []
    for proc in procs:
        try:
            outs.append(proc.communicate(timeout=400)[0])
        finally:
            if proc.poll() is None:
                proc.kill()
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert [r["skipped"] for r in metrics(tmp_path / "run")] == [False, False, True, False]
    report = json.loads((tmp_path / "run" / "nonfinite" / "step_3" / "report.json").read_text())
    assert (report["rank"], report["micro_batch"]) == (1, 1)
    assert report["keys"] == {str(r): _expected_keys(5, rank=r, world=2, batch=4) for r in (0, 1)}
    assert report["first_nonfinite_forward"]["module"] == "layers.0.mlp.w1"
    by_rank = {r["rank"]: r for r in report["ranks"]}
    assert by_rank[0]["micro_batch"] is None and by_rank[0]["reruns"] == 2  # searched both, all finite
    assert by_rank[1]["micro_batch"] == 1 and by_rank[1]["reruns"] == 1
