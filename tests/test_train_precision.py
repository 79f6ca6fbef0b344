"""The GPU precision recipe, exercised on CPU: DeepSpeed's torch_autocast (bf16 compute) keeps
every parameter, gradient and AdamW state in float32, and the Mamba-sensitive parameters
(A_log, D, dt_proj.bias) out of the bf16 gradient communication."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.test_train_support import star_env

SCRIPT = """
import json, torch
from star.config import load_config
from star.train.distributed import init_distributed, resolve_device
from star.train.engine import build_ds_config, build_engine, plan_batches, resolve_ds_config_path
from star.train.param_groups import strip_names, weight_decay_groups
from star.train.runtime import build_model

cfg = load_config("smoke", ["model.embed_dim=32", "model.depth=2", "model.img_size=64", "ds_config=zero2_bf16",
                            "batch.global_images=8", "batch.micro_images=8"])
device = resolve_device("cpu")
init_distributed(device)
plan = plan_batches(cfg, 1)
ds = build_ds_config(resolve_ds_config_path(cfg.ds_config, device), plan, cfg.optim.grad_clip)
model = build_model(cfg)
engine = build_engine(model, strip_names(weight_decay_groups(model, 0.05)), cfg, ds)
out = engine(torch.randn(8, 3, 64, 64))
engine.backward(out["loss"])
engine.step()
comm = {n: str(getattr(p, "comm_dtype", p.dtype)) for n, p in engine.module.named_parameters()}
print("RESULT" + json.dumps({
    "param_dtypes": sorted({str(p.dtype) for p in engine.module.parameters()}),
    "pred_dtype": str(out["pred"].dtype), "comm": comm,
    "loss_finite": bool(torch.isfinite(out["loss"]).item())}))
"""


@pytest.mark.slow
def test_bf16_autocast_keeps_mamba_parameters_fp32(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tmp_path, env=star_env(), capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert result["param_dtypes"] == ["torch.float32"]          # nothing was cast to bf16
    assert result["pred_dtype"] == "torch.bfloat16"            # but the compute ran in bf16
    assert result["loss_finite"]
    comm = result["comm"]
    sensitive = [n for n in comm if n.endswith(("A_log", ".D", "dt_proj.bias"))]
    assert sensitive and all(comm[n] == "torch.float32" for n in sensitive)
    assert comm["layers.0.mixer.in_proj.weight"] == "torch.bfloat16"   # Linear weights: bf16 all-reduce
    assert comm["layers.0.mixer.dt_proj.weight"] == "torch.bfloat16"
