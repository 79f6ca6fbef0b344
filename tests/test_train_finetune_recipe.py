"""Fine-tuning recipe settings against ARM's Finetuning/main_finetune.py (docs/fidelity.md,
section 3): no gradient clipping (DeepSpeed JSON and the step DeepSpeed takes), the absolute
min_lr floor, and the fine-tuning presets that carry them."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from star.config import ConfigError, load_config
from star.train.engine import build_ds_config, plan_batches, resolve_ds_config_path, set_lr
from star.train.schedule import lr_at, lr_bounds
from tests.test_train_support import star_env


# ------------------------------------------------------------------ gradient clipping
def test_grad_clip_null_writes_no_clipping_into_the_deepspeed_json():
    cfg = load_config("finetune_b")
    assert cfg.optim.grad_clip is None  # ARM main_finetune.py: --clip_grad default None
    plan = plan_batches(cfg, world_size=8)
    for clip in (None, 0.0, 0):
        ds = build_ds_config(resolve_ds_config_path("auto", "cuda"), plan, clip)
        # DeepSpeed clips only when gradient_clipping > 0; left out it would clip at 1.0
        assert ds["gradient_clipping"] == 0.0
    assert build_ds_config(resolve_ds_config_path("auto", "cuda"), plan, 2.5)["gradient_clipping"] == 2.5
    assert load_config("finetune_b", ["optim.grad_clip=1.0"]).optim.grad_clip == 1.0
    assert load_config("star_b_1600ep").optim.grad_clip == 3.0  # pretraining: ARM's --clip_grad 3.0
    with pytest.raises(ConfigError, match=r"optim\.grad_clip"):
        load_config("finetune_b", ["optim.grad_clip=-1"])


NO_CLIP_SCRIPT = """
import copy, json, torch
import torch.nn.functional as F
from star.config import load_config
from star.train.distributed import init_distributed, resolve_device
from star.train.engine import build_ds_config, build_engine, plan_batches, resolve_ds_config_path, set_lr
from star.train.runtime import build_model

init_distributed(resolve_device("cpu"))
out = {}
for clip in ("null", "1.0"):
    cfg = load_config("smoke_finetune", ["model.embed_dim=32", "model.depth=2", "model.img_size=64",
                                         "model.num_classes=4", "ds_config=cpu_zero2_fp32",
                                         "batch.global_images=8", "batch.micro_images=8",
                                         "optim.grad_clip=" + clip])
    torch.manual_seed(0)
    model = build_model(cfg)
    images, labels = torch.randn(8, 3, 64, 64), torch.arange(8) % 4
    # the reference: the same model's gradient in plain PyTorch
    ref = copy.deepcopy(model)
    (100.0 * F.cross_entropy(ref(images), labels)).backward()
    ref_norm = torch.cat([p.grad.flatten() for p in ref.parameters()]).norm().item()
    ds = build_ds_config(resolve_ds_config_path(cfg.ds_config, "cpu"), plan_batches(cfg, 1), cfg.optim.grad_clip)
    engine = build_engine(model, [{"params": list(model.parameters()), "lr_scale": 1.0, "weight_decay": 0.0}],
                          cfg, ds)
    set_lr(engine.optimizer, 1e-3)
    loss = 100.0 * F.cross_entropy(engine(images), labels)
    engine.backward(loss)
    engine.step()
    # AdamW's first moment after one step is (1 - beta1) x the gradient it was given
    beta1 = cfg.optim.betas[0]
    states = engine.optimizer.optimizer.state.values()
    used = torch.cat([s["exp_avg"].flatten() for s in states]).norm().item() / (1 - beta1)
    out[clip] = {"ref_norm": ref_norm, "used_norm": used, "ds_clip": ds["gradient_clipping"]}
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_no_clipping_reaches_the_optimizer_unclipped(tmp_path):
    proc = subprocess.run([sys.executable, "-c", NO_CLIP_SCRIPT], cwd=tmp_path, env=star_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT", 1)[1])
    free, clipped = result["null"], result["1.0"]
    assert free["ds_clip"] == 0.0 and clipped["ds_clip"] == 1.0
    assert free["ref_norm"] > 5.0  # large enough that clipping at 1 would show
    assert free["used_norm"] == pytest.approx(free["ref_norm"], rel=1e-3)   # the whole gradient
    assert clipped["used_norm"] == pytest.approx(1.0, rel=1e-3)              # the control: clipped to 1


# ------------------------------------------------------------------ min_lr
def test_min_lr_is_an_absolute_floor_at_every_batch_size():
    cfg = load_config("finetune_b")
    assert cfg.optim.min_lr == 1e-6  # ARM main_finetune.py --min_lr default
    for global_images in (256, 1024, 4096):
        peak, floor = lr_bounds(cfg.optim.base_lr, cfg.optim.min_lr, global_images)
        assert peak == pytest.approx(5e-4 * global_images / 256) and floor == 1e-6
        total, warmup = 1000, 50
        assert lr_at(total, peak_lr=peak, warmup_steps=warmup, total_steps=total, min_lr=floor) == 1e-6
        # MAE / ARM lr_sched: min + (peak - min) * 0.5 * (1 + cos(pi * progress)) at the last step
        last = lr_at(total - 1, peak_lr=peak, warmup_steps=warmup, total_steps=total, min_lr=floor)
        progress = (total - 1 - warmup) / (total - warmup)
        assert last == pytest.approx(1e-6 + (peak - 1e-6) * 0.5 * (1 + math.cos(math.pi * progress)))
        assert 1e-6 < last < 1e-6 + peak * 1e-5
    # each group's floor is min_lr x its layer-decay scale, as ARM's param_group["lr_scale"]
    opt = torch.optim.AdamW([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr_scale": 0.65 ** 3},
                             {"params": [torch.nn.Parameter(torch.zeros(1))], "lr_scale": 1.0}], lr=0.0)
    set_lr(opt, lr_at(1000, peak_lr=2e-3, warmup_steps=50, total_steps=1000, min_lr=1e-6))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-6 * 0.65 ** 3, 1e-6])


def test_pretraining_presets_keep_a_zero_floor():
    # ARM main_pretrain.py --min_lr default 0: absolute or scaled, zero means the same
    for name in ("star_b_1600ep", "arm_b_1600ep", "star_l_1600ep", "abl_value_zeros", "smoke"):
        assert load_config(name).optim.min_lr == 0.0, name


# ------------------------------------------------------------------ presets
def test_finetune_presets_carry_the_arm_recipe():
    b = load_config("finetune_b").model.resolved()
    assert (b.cls_position, b.readout, b.drop_path, b.drop_path_schedule, b.head_init_std) == \
        ("tail", "token", 0.1, "arm", 2e-5)
    large = load_config("finetune_l")  # ARM README's arm_large_pz16 command
    assert (large.model.drop_path, large.optim.layer_decay, large.model.depth) == (0.3, 0.75, 24)
    assert large.optim.grad_clip is None and large.optim.min_lr == 1e-6
    arm = load_config("finetune_arm_b")  # ARM README's arm_base_pz16 command: --global_pool True
    assert (arm.model.name, arm.model.cls_position, arm.model.readout) == ("arm_base_pz16_ft", "middle",
                                                                         "mean_patches")
    assert (arm.optim.layer_decay, arm.model.drop_path, arm.batch.global_images) == (0.65, 0.1, 1024)
    middle = load_config("finetune_b_cls_middle").model
    assert (middle.cls_position, middle.readout) == ("middle", "token")
