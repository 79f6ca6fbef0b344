"""`star profile model|step|all` on CPU, the peak-TFLOP/s table and the report arithmetic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from star.flops import flops_for_name
from star.profiling.machine import describe_machine, lookup_peak_tflops, resolve_peak_tflops
from star.profiling.report import aggregate_model, projection
from star.profiling.timing import median_stages

REPO = Path(__file__).resolve().parents[1]
# smoke preset shrunk for CPU tests: star_tiny_pz8 at 64 px (8 x 8 patches), 32 wide, 2 deep, N = 2
TINY = ["model.embed_dim=32", "model.depth=2", "model.img_size=64", "data.num_threads=1", "log.tensorboard=false"]
TINY_MODEL = dict(embed_dim=32, depth=2, img_size=64, images_per_seq=2)

MACHINE_FIELDS = {"hostname", "date_utc", "cpu_model", "cpu_count", "gpu_model", "gpu_count", "torch_cuda",
                  "versions", "kernels"}
MODEL_FIELDS = {"batch_images", "forward_s", "backward_s", "step_s", "images_per_s", "tokens_per_s",
                "tokens_per_image", "peak_memory_bytes", "peak_memory_kind", "mamba_path", "flops",
                "achieved_tflops", "peak_tflops", "mfu", "parameters", "precision", "loss"}
STEP_FIELDS = {"images_per_s", "rank_images_per_s", "step_s", "phase_median_s", "data_wait_share",
               "optimizer_share", "accum_steps", "micro_images", "world_size", "peak_memory_bytes", "mfu",
               "achieved_tflops", "zero_stage", "precision", "loss_last"}


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA A100-SXM4-40GB", 312.0), ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100-PCIE-40GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0), ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 SXM5 80GB", 989.0),
    ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200", 989.0),
    ("NVIDIA H200 NVL", 835.0),
    ("NVIDIA GeForce RTX 4090", None), ("Tesla V100-SXM2-32GB", None),
])
def test_peak_table_matches_device_names(name, peak):
    assert lookup_peak_tflops(name)[0] == peak


def test_peak_resolution_on_cpu_and_override():
    assert resolve_peak_tflops("cpu", None)[0] is None
    assert resolve_peak_tflops("cpu", 2.5) == (2.5, "--peak-tflops")
    with pytest.raises(ValueError, match="-1"):
        resolve_peak_tflops("cpu", -1.0)


def test_medians_and_aggregates():
    samples = [{"forward": 1.0, "backward": 4.0}, {"forward": 3.0, "backward": 1.0}, {"forward": 2.0, "backward": 2.0}]
    # totals are 5, 4, 4: the median of the sums (4), not the sum of the medians (2 + 2)
    assert median_stages(samples) == {"forward": 2.0, "backward": 2.0, "total": 4.0}
    ranks = [dict(images_per_s=10.0, tokens_per_s=100.0, achieved_tflops=1.0, peak_tflops=10.0),
             dict(images_per_s=30.0, tokens_per_s=300.0, achieved_tflops=3.0, peak_tflops=10.0)]
    assert aggregate_model(ranks) == {"ranks": 2, "images_per_s": 40.0, "tokens_per_s": 400.0,
                                      "achieved_tflops": 4.0, "mfu": 0.2}
    proj = projection(1000.0, 1600, "test", dataset_images=1_280_000)
    assert proj["hours"] == pytest.approx(1_280_000 * 1600 / 1000 / 3600)


def test_cpu_peak_memory_sees_a_transient_allocation():
    # In a fresh process: in this long-lived pytest process, memory freed by earlier tests stays
    # resident in the allocator and is reused without raising RSS, which hides the allocation.
    code = """
import torch
from star.profiling.timing import PeakMemory
memory = PeakMemory("cpu")
memory.reset()
block = torch.ones(64 * 2**20 // 4)  # 64 MiB, every page written
del block
print(memory.peak_bytes())
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # freed before reading: only the high-water mark saw it
    assert int(proc.stdout.strip().splitlines()[-1]) >= 60 * 2**20


def test_machine_description_on_cpu():
    info = describe_machine("cpu")
    assert MACHINE_FIELDS <= info.keys()
    assert info["gpu_count"] == 0 and info["versions"]["torch"]


def _env(extra: dict | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(key, None)
    return {**env, **(extra or {})}


def run_profile(what: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "star", "profile", what, *args], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=300)


def _check_model(model: dict, batch: int, peak: float) -> None:
    assert MODEL_FIELDS <= model.keys()
    expected = flops_for_name("star_tiny_pz8", **TINY_MODEL)
    assert model["flops"]["forward_per_image"] == expected.forward_per_image
    assert model["batch_images"] == batch and model["mamba_path"] == "torch" and model["precision"] == "fp32"
    assert model["images_per_s"] == pytest.approx(batch / model["step_s"])
    assert model["step_s"] >= model["forward_s"] > 0 and model["backward_s"] > 0
    assert model["tokens_per_image"] == 8 * 8 + 16  # 64 patches + a 16-token separator per image
    assert model["tokens_per_s"] == pytest.approx(model["images_per_s"] * 80)
    assert model["achieved_tflops"] == pytest.approx(3 * expected.forward_per_image * model["images_per_s"] / 1e12)
    assert model["mfu"] == pytest.approx(model["achieved_tflops"] / peak)
    assert model["peak_memory_bytes"] >= 0  # RSS rise: may be 0 when freed memory is reused


@pytest.fixture
def in_process(monkeypatch):
    """`star profile` in this process (a single rank: no process group is started)."""
    from star.profiling.cli import main

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    return main


def test_profile_model_json(tmp_path, in_process, capsys):
    out = tmp_path / "model.json"
    code = in_process(["model", "--config", "smoke", *TINY, "--device", "cpu", "--batches", "2", "--warmup", "1",
                       "--batch-size", "4", "--peak-tflops", "1.5", "--json", str(out),
                       "--trace", str(tmp_path / "tr")])
    printed = capsys.readouterr()
    assert code == 0, printed.out + printed.err
    assert "MFU" in printed.out and "model" in printed.out
    result = json.loads(out.read_text())
    assert MACHINE_FIELDS <= result["machine"].keys()
    assert result["what"] == "model" and result["world_size"] == 1
    assert result["command"].startswith("star profile model --config smoke")
    _check_model(result["model_per_rank"][0], 4, 1.5)
    assert result["model"]["images_per_s"] == result["model_per_rank"][0]["images_per_s"]
    trace = result["model_per_rank"][0]["trace"]
    assert json.loads(Path(trace["chrome_trace"]).read_text())["traceEvents"]
    assert "aten::mm" in Path(trace["top_operators"]).read_text()
    assert result["projection"]["epochs"] == 4  # the smoke preset's schedule


@pytest.mark.slow
@pytest.mark.distributed
def test_profile_all_json(tmp_path):
    from tests.test_train_support import shard_dir

    out = tmp_path / "all.json"
    proc = run_profile("all", "--config", "smoke", *TINY, "--device", "cpu", "--batches", "2", "--batch-size", "4",
                       "--peak-tflops", "1.5", "--data", str(shard_dir()), "--json", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert {"machine", "data", "model", "model_per_rank", "step", "projection"} <= result.keys()
    _check_model(result["model_per_rank"][0], 4, 1.5)
    assert result["data"]["images_per_s"] > 0 and len(result["data"]["per_rank"]) == 1
    step = result["step"]
    assert STEP_FIELDS <= step.keys()
    assert step["micro_images"] == 4 and step["accum_steps"] == 1 and step["world_size"] == 1
    assert step["images_per_s"] == pytest.approx(4 / step["step_s"])
    assert 0 <= step["data_wait_share"] < 1 and 0 < step["optimizer_share"] < 1
    assert step["data_wait_share_per_rank"] == [step["data_wait_share"]]
    assert step["mfu"] == pytest.approx(step["achieved_tflops"] / 1.5)
    assert result["projection"]["based_on"] == "train step"
    assert result["projection"]["images_per_s"] == step["images_per_s"]


@pytest.mark.slow
@pytest.mark.distributed
def test_profile_model_two_ranks_reports_each_and_the_sum(tmp_path):
    """torchrun-style ranks: each times its own replica, rank 0 gathers them into one JSON."""
    from tests.test_train_support import free_port

    out = tmp_path / "model.json"
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "star", "profile", "model", "--config", "smoke", *TINY,
                               "--device", "cpu", "--batches", "1", "--warmup", "0", "--batch-size", "2",
                               "--projection-epochs", "1600", "--json", str(out)],
                              cwd=tmp_path, env=_env(dict(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                                                          MASTER_ADDR="127.0.0.1", MASTER_PORT=port)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    result = json.loads(out.read_text())
    ranks = result["model_per_rank"]
    assert result["world_size"] == 2 and len(ranks) == 2
    assert result["model"]["images_per_s"] == pytest.approx(sum(r["images_per_s"] for r in ranks))
    assert "model, 2 ranks" in logs[0] and "model, 2 ranks" not in logs[1]  # only rank 0 reports
    proj = result["projection"]
    assert proj["epochs"] == 1600
    assert proj["seconds"] == pytest.approx(1_281_167 * 1600 / result["model"]["images_per_s"])


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "3"], "batch size 3 images is not a positive multiple"),
    (["--batches", "0"], "--batches 0 (must be >= 1)"),
    (["model.sep_type=bogus"], "bogus"),
])
def test_bad_input_is_named(in_process, capsys, args, message):
    assert in_process(["model", "--config", "smoke", *TINY, "--device", "cpu", *args]) == 2
    assert message in capsys.readouterr().err


def test_step_without_shards_says_where_they_should_be(tmp_path, in_process, capsys):
    assert in_process(["step", "--config", "smoke", "--device", "cpu", "--data", str(tmp_path / "nowhere")]) == 2
    assert f"{tmp_path / 'nowhere' / 'train.json'} does not exist; give --data DIR" in capsys.readouterr().err


def test_profiling_builds_training_through_the_library_not_the_commands():
    # `star profile step` builds its run with star.train.runtime.build_training; the command modules
    # (option parsing of `star pretrain / finetune / eval / export`) are applications, not imported.
    code = ("import sys, star.profiling.cli, star.train.runtime as r, star.profiling.step as s; "
            "print(sorted(m for m in sys.modules if m in {'star.train.pretrain', 'star.train.finetune', "
            "'star.train.evaluate', 'star.train.export'})); print(s.build_training is r.build_training)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["[]", "True"]
