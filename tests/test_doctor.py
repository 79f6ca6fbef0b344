"""`star doctor` and `model.kernels`: the comparison functions on CPU against independent
references (the sequential scan of star/ops/reference.py, PIL's JPEG decoder), the kernels
setting and its refusal, the run record (log line, metrics.jsonl, run_info.json) of a real
`star pretrain`, and the doctor end to end on CPU (one rank and two)."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import sys

import numpy as np
import pytest
import torch

from star import doctor
from star.models.mamba import Mamba
from star.ops import dispatch
from star.ops.reference import causal_conv1d_reference, selective_scan_reference
from tests.test_train_support import TINY_PRETRAIN, metrics, read_log, run_star, shard_dir


@pytest.fixture(autouse=True)
def clean_switch(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    dispatch.set_kernel_backend(None)
    yield
    dispatch.set_kernel_backend(None)


# --- the mixer comparison (what the doctor runs fused-vs-torch on CUDA) ----------------------

def _fp32_inside(fn):
    """A reference op that computes in float32 and returns its input's dtype, as the fused
    kernels do under autocast (bf16 in, fp32 arithmetic, bf16 out)."""
    def wrapped(x, *args, **kwargs):
        up = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
        kw = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        return fn(x.float(), *up, **kw).to(x.dtype)
    return wrapped


def reference_path(scan=selective_scan_reference, conv=causal_conv1d_reference):
    """The mixer routed through the sequential references, via the switch's kernel-table seam
    (no mamba_inner in the table: conv and scan are called separately, as on CUDA when
    mamba_inner_fn is unusable)."""
    @contextlib.contextmanager
    def path():
        with doctor.fused_path(), dispatch._kernel_table({"selective_scan": scan, "causal_conv1d": conv}):
            yield
    return path


def small_mixer():
    torch.manual_seed(0)
    mixer = Mamba(8, d_state=4, num_scans=1)
    x = torch.randn(2, 10, 8)
    return mixer, x


def test_compare_mixer_paths_torch_equals_sequential_reference_fp32():
    mixer, x = small_mixer()
    res = doctor.compare_mixer_paths(reference_path(), doctor.torch_path, mixer, x,
                                     tol=doctor.TOLERANCES["fp32"])
    assert res["ok"], res
    assert res["max_rel_err"] < 1e-5, res  # far inside the stated fp32 tolerance
    # output, input gradient and a gradient for every parameter of the mixer were compared
    assert {"output", "input.grad", "in_proj.weight.grad", "A_log.grad", "D.grad", "dt_proj.bias.grad",
            "out_proj.weight.grad", "conv1d.weight.grad"} <= res["errors"].keys()
    assert all(p.grad is None for p in mixer.parameters())  # leaves the mixer clean


def test_compare_mixer_paths_bf16_autocast_within_tolerance():
    mixer, x = small_mixer()
    res = doctor.compare_mixer_paths(
        reference_path(_fp32_inside(selective_scan_reference), _fp32_inside(causal_conv1d_reference)),
        doctor.torch_path, mixer, x, autocast_dtype=torch.bfloat16, tol=doctor.TOLERANCES["bf16"])
    assert res["ok"], res
    assert res["max_rel_err"] > 0  # bf16 rounding does show: the two runs were not the same numbers


def test_compare_mixer_paths_catches_a_wrong_kernel():
    def scan_without_D(u, delta, A, B, C, D=None, **kwargs):  # a "fused" scan that drops the skip term
        return selective_scan_reference(u, delta, A, B, C, None, **kwargs)

    mixer, x = small_mixer()
    res = doctor.compare_mixer_paths(reference_path(), reference_path(scan_without_D), mixer, x,
                                     tol=doctor.TOLERANCES["fp32"])
    assert not res["ok"] and res["max_rel_err"] > 1e-2, res
    assert "D.grad" in res["worst"]  # D got no gradient at all: reported as missing


def test_compare_mixer_paths_catches_a_small_numeric_error():
    def scan_off_by_a_bit(*args, **kwargs):  # a scan 0.5 % off: outside the fp32 tolerance
        return selective_scan_reference(*args, **kwargs) * 1.005

    mixer, x = small_mixer()
    res = doctor.compare_mixer_paths(reference_path(), reference_path(scan_off_by_a_bit), mixer, x,
                                     tol=doctor.TOLERANCES["fp32"])
    assert not res["ok"] and 1e-3 < res["max_rel_err"] < 1e-1, res


def test_kernel_match_checks_are_skipped_without_cuda_with_a_reason():
    results = doctor.check_kernels_match("cpu", doctor.Check("kernels", doctor.PASS, ""))
    assert [(r.name, r.status) for r in results] == [("kernels.fp32", "skip"), ("kernels.bf16", "skip")]
    assert all("CUDA" in r.detail for r in results)


# --- the decode comparison -----------------------------------------------------------------

def _jpegs(n=6):
    from pipelines.shards import ShardSet

    shards = ShardSet(shard_dir(), "train")
    return [shards.read(i)[0] for i in range(n)]


def test_dali_cpu_decode_matches_pil_and_the_comparison_catches_a_difference():
    jpegs = _jpegs()
    dali = doctor.dali_decode(jpegs, "cpu")
    pil = [doctor.pil_decode(j) for j in jpegs]
    res = doctor.compare_decodes(dali, pil)
    assert res["ok"] and len(res["mads"]) == len(jpegs) and res["max_mad"] <= doctor.DECODE_MAD, res
    off = [np.clip(p.astype(np.int16) + 8, 0, 255).astype(np.uint8) for p in pil]  # +8 grey levels
    assert not doctor.compare_decodes(dali, off)["ok"]
    wrong_shape = doctor.compare_decodes(dali, [p[:-1] for p in pil])
    assert not wrong_shape["ok"] and "shape" in wrong_shape["problem"]


# --- rank merging and version floors --------------------------------------------------------

def test_merge_reports_the_worst_status_and_names_failing_ranks():
    ok = {"name": "allreduce", "status": "pass", "detail": "fine", "data": {}}
    bad = {"name": "allreduce", "status": "fail", "detail": "NCCL timeout", "data": {}}
    skip = {"name": "data.decode", "status": "skip", "detail": "no --data DIR given", "data": {}}
    rows = doctor.merge([[ok, skip], [bad, skip], [ok, skip]])
    assert [(r["name"], r["status"]) for r in rows] == [("allreduce", "fail"), ("data.decode", "skip")]
    assert rows[0]["detail"] == "rank 1: NCCL timeout" and rows[0]["failed_ranks"] == [1]
    assert rows[1]["detail"] == "no --data DIR given"


def test_version_floors(monkeypatch):
    assert doctor._below("0.18.9", "0.19.0") and not doctor._below("0.19.8", "0.19.0")
    assert doctor._below(None, "2.0") and not doctor._below("2.13.0+cpu", "2.3")
    assert not doctor._below("2.4.0 (nvidia-dali-cuda120)", "2.0")
    # the CUDA major of a DALI wheel name and of torch.version.cuda (compared on GPUs)
    assert [doctor._cuda_major(t) for t in ("nvidia-dali-cuda120)", "12.4", "11.8", "nvidia-dali-cuda110")] == \
        ["12", "12", "11", "11"]
    real = doctor.collect_versions()
    monkeypatch.setattr(doctor, "collect_versions", lambda: dict(real, deepspeed="0.18.9"))
    check = doctor.check_versions("cpu")
    assert check.status == "fail" and "deepspeed 0.18.9 (need >= 0.19.0)" in check.detail


@pytest.mark.parametrize("preset", ["smoke", "smoke_finetune"])
def test_train_step_check_passes_on_cpu_and_catches_non_finite_weights(preset, monkeypatch):
    from star.config import load_config
    from star.train import runtime

    cfg = load_config(preset)
    check = doctor.check_train_step(cfg, "cpu")
    assert check.status == "pass" and cfg.model.name in check.detail, check
    assert np.isfinite(check.data["loss"])

    build = runtime.build_model

    def poisoned(cfg):
        model = build(cfg)
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
        return model

    monkeypatch.setattr(runtime, "build_model", poisoned)
    check = doctor.check_train_step(cfg, "cpu")
    assert check.status == "fail" and "non-finite" in check.detail, check


# --- model.kernels -------------------------------------------------------------------------

def test_fused_setting_refuses_cpu_with_the_reason():
    with pytest.raises(dispatch.KernelsUnavailable, match="fused kernels need CUDA tensors"):
        dispatch.require_kernels("fused", "cpu")


def test_fused_setting_refuses_cuda_without_kernels_naming_the_import_error(monkeypatch):
    monkeypatch.setattr(dispatch, "_KERNELS", dict.fromkeys(dispatch.KERNEL_NAMES))
    monkeypatch.setattr(dispatch, "_REASONS", {n: "mamba_ssm not importable (ImportError: libcudart.so.12)"
                                               for n in dispatch.KERNEL_NAMES})
    with pytest.raises(dispatch.KernelsUnavailable, match=r"libcudart\.so\.12.*model\.kernels=auto"):
        dispatch.require_kernels("fused", "cuda:0")
    plan = dispatch.require_kernels("auto", "cuda:0")  # auto: the slow path, with the reason
    assert {p["path"] for p in plan["ops"].values()} == {"torch"}
    assert "libcudart.so.12" in plan["ops"]["mamba_inner"]["reason"]


def test_fused_setting_with_kernels_present_plans_cuda_and_beats_a_stale_env(monkeypatch):
    monkeypatch.setattr(dispatch, "_KERNELS", {n: (lambda *a, **k: None) for n in dispatch.KERNEL_NAMES})
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    plan = dispatch.require_kernels("fused", "cuda")
    assert {p["path"] for p in plan["ops"].values()} == {"cuda"}
    assert dispatch.kernel_backend_for(torch.zeros(1)) == "torch"  # a CPU tensor still runs torch


def test_torch_and_auto_settings_go_through_the_one_switch(monkeypatch):
    monkeypatch.setattr(dispatch, "_KERNELS", {n: (lambda *a, **k: None) for n in dispatch.KERNEL_NAMES})
    plan = dispatch.require_kernels("torch", "cuda")
    assert dispatch.get_kernel_backend() == "torch"
    assert {p["reason"] for p in plan["ops"].values()} == {"forced by model.kernels=torch"}
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    plan = dispatch.require_kernels("auto", "cuda")  # auto leaves STAR_KERNELS in charge
    assert {p["reason"] for p in plan["ops"].values()} == {"forced by STAR_KERNELS=torch"}
    with pytest.raises(dispatch.ConfigError, match="model.kernels"):
        dispatch.require_kernels("fast", "cpu")


# --- the CLI: refusal, the run record, the doctor -------------------------------------------

def _pretrain_args(run_dir, *extra):
    return ["pretrain", "--config", "smoke", "--run-dir", str(run_dir), f"data.dir={shard_dir()}", "device=cpu",
            *TINY_PRETRAIN, "schedule.max_steps=1", *extra]


@pytest.mark.slow
def test_pretrain_with_fused_kernels_on_cpu_exits_2_before_deepspeed(tmp_path):
    assert run_star(_pretrain_args(tmp_path / "run", "model.kernels=fused"), cwd=tmp_path) == [2]
    log = read_log(tmp_path)
    lines = [line for line in log.splitlines() if line.strip()]
    assert lines == [lines[0]] and lines[0].startswith("star pretrain: error: model.kernels=fused: fused kernels "
                                                       "need CUDA tensors"), log
    assert "Traceback" not in log and "DeepSpeed" not in log
    assert not (tmp_path / "run").exists()  # nothing started: no run dir, no config.yaml


@pytest.mark.slow
def test_training_logs_and_records_the_kernel_path(tmp_path):
    run_dir = tmp_path / "run"
    assert run_star(_pretrain_args(run_dir), cwd=tmp_path) == [0], read_log(tmp_path)[-3000:]
    log = read_log(tmp_path)
    expected = ("kernels (model.kernels=auto, device cpu): selective_scan/causal_conv1d/mamba_inner -> torch "
                "(device is cpu: fused kernels need CUDA tensors)")
    assert expected in log, log[-3000:]
    records = metrics(run_dir)
    info = json.loads((run_dir / "run_info.json").read_text())
    assert records[0]["run_info"] == info and all("run_info" not in r for r in records[1:])
    assert info["kernels"]["setting"] == "auto" and info["world_size"] == 1
    assert {p["path"] for p in info["kernels"]["ops"].values()} == {"torch"}
    assert info["versions"]["torch"] == torch.__version__
    assert {"cuda", "mamba_ssm", "causal_conv1d", "dali", "deepspeed", "nccl"} <= info["versions"].keys()
    assert [d["name"] for d in info["devices"]] == ["cpu"]


def _doctor(tmp_path, *args, world_size=1, log_name="doctor"):
    return run_star(["doctor", "--device", "cpu", *args], cwd=tmp_path, world_size=world_size,
                    log_name=log_name, timeout=300)


@pytest.mark.slow
def test_doctor_on_cpu_end_to_end(tmp_path):
    out = tmp_path / "doctor.json"
    assert _doctor(tmp_path, "--data", str(shard_dir()), "--json", str(out)) == [0], read_log(tmp_path, "doctor")
    log = read_log(tmp_path, "doctor")
    report = json.loads(out.read_text())
    assert report["ok"] is True and report["world_size"] == 1 and report["device"] == "cpu"
    status = {c["name"]: c["status"] for c in report["checks"]}
    assert status == {"versions": "pass", "kernels": "pass", "kernels.fp32": "skip", "kernels.bf16": "skip",
                      "data.shards": "pass", "data.verify": "pass", "data.decode": "pass", "allreduce": "skip",
                      "train_step": "pass"}
    detail = {c["name"]: c["detail"] for c in report["checks"]}
    assert "no CUDA" in detail["kernels.fp32"] and "single process" in detail["allreduce"]
    assert "96 samples" in detail["data.shards"] and "train-000000.tar" in detail["data.verify"]
    assert "star_tiny_pz8" in detail["train_step"]
    for name, state in status.items():  # one table line per check, skipped ones with their reason
        assert re.search(rf"│ {re.escape(name)}\s+│ {state}\s+│ \S", log), (name, log)
    assert re.search(r"│ kernels\.fp32\s+│ skip\s+│ no CUDA: the fused kernels run only on CUDA tensors", log)
    assert re.search(r"│ allreduce\s+│ skip\s+│ single process", log)
    assert "all checks that ran passed (skipped: kernels.fp32, kernels.bf16, allreduce)" in log


@pytest.mark.slow
def test_doctor_fails_on_a_corrupt_shard_and_on_fused_kernels_on_cpu(tmp_path):
    data = tmp_path / "shards"
    shutil.copytree(shard_dir(), data)
    tar = sorted(data.glob("train-*.tar"))[0]
    raw = bytearray(tar.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one flipped byte inside a JPEG: size unchanged, hash not
    tar.write_bytes(bytes(raw))
    out = tmp_path / "doctor.json"
    assert _doctor(tmp_path, "--data", str(data), "--json", str(out), "model.kernels=fused") == [1]
    checks = {c["name"]: c for c in json.loads(out.read_text())["checks"]}
    assert checks["data.verify"]["status"] == "fail" and tar.name in checks["data.verify"]["detail"]
    assert "sha256" in checks["data.verify"]["detail"]
    assert checks["kernels"]["status"] == "fail" and "fused kernels need CUDA tensors" in checks["kernels"]["detail"]
    assert checks["train_step"]["status"] == "skip"
    assert "FAILED" in read_log(tmp_path, "doctor")


@pytest.mark.slow
@pytest.mark.distributed
def test_doctor_all_reduces_over_two_ranks(tmp_path):
    out = tmp_path / "doctor.json"
    codes = _doctor(tmp_path, "--json", str(out), world_size=2)
    assert codes == [0, 0], read_log(tmp_path, "doctor") + read_log(tmp_path, "doctor", 1)
    checks = {c["name"]: c for c in json.loads(out.read_text())["checks"]}
    allreduce = checks["allreduce"]
    assert allreduce["status"] == "pass" and set(allreduce["ranks"]) == {"0", "1"}
    for rank in ("0", "1"):
        data = allreduce["ranks"][rank]["data"]
        assert data["ranks"] == 2 and data["wrong_values"] == 0 and data["busbw_gbps"] > 0
        # busbw = 2 (n - 1) / n * bytes / time, nccl-tests' definition
        assert data["busbw_gbps"] == pytest.approx(data["bytes"] / data["median_s"] / 1e9)
    assert not (tmp_path / "doctor.rank1.txt").read_text().count("star doctor:")  # rank 0 prints the table


def test_doctor_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        doctor.main(["--help"])
    assert exc.value.code == 0 and "allreduce" in capsys.readouterr().out
    assert doctor.main(["--device", "cpu", "--data", "/nonexistent/shards"]) == 2
    assert doctor.main(["--device", "cpu", "model.kernles=fused"]) == 2
    err = capsys.readouterr().err
    assert "/nonexistent/shards" in err and "model.kernles" in err


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
