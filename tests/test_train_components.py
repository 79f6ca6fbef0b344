"""Pure pieces of the trainer: schedule, parameter groups, batch plan / DeepSpeed JSON,
distributed environment, checkpoint pointer, EMA, metrics truncation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from star.config import ConfigError, load_config
from star.train.distributed import first_host, resolve_dist_env
from star.train.ema import ModelEma
from star.train.engine import DS_CONFIG_DIR, build_ds_config, plan_batches, resolve_ds_config_path
from star.train.metrics import truncate_jsonl
from star.train.param_groups import layer_decay_groups, weight_decay_groups
from star.train.schedule import lr_at, scaled_lr


# ------------------------------------------------------------------ schedule
def test_scaled_lr_matches_the_paper():
    assert scaled_lr(1.5e-4, 2048) == pytest.approx(1.2e-3)
    assert scaled_lr(5e-4, 1024) == pytest.approx(2e-3)


def test_lr_schedule_hand_values():
    kw = dict(peak_lr=1.0, warmup_steps=10, total_steps=110, min_lr=0.0)
    assert lr_at(0, **kw) == 0.0
    assert lr_at(5, **kw) == pytest.approx(0.5)
    assert lr_at(10, **kw) == pytest.approx(1.0)            # end of warmup: the peak
    assert lr_at(60, **kw) == pytest.approx(0.5)            # half-way through the cosine
    assert lr_at(35, **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, **kw) == 0.0 and lr_at(500, **kw) == 0.0
    assert lr_at(60, peak_lr=1.0, warmup_steps=10, total_steps=110, min_lr=0.2) == pytest.approx(0.6)
    assert lr_at(0, peak_lr=2.0, warmup_steps=0, total_steps=100) == pytest.approx(2.0)


# ------------------------------------------------------------------ parameter groups
class _Toy(nn.Module):
    """Names like the real model's: a Mamba mixer with A_log/D, norms, pos embed, tokens, head."""

    def __init__(self):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.embed = nn.Linear(8, 8)
        self.layers = nn.ModuleList(nn.ModuleDict({"norm": nn.LayerNorm(8), "proj": nn.Linear(8, 8)})
                                    for _ in range(2))
        self.mixer = nn.Module()
        self.mixer.A_log = nn.Parameter(torch.zeros(8, 4))
        self.mixer.D = nn.Parameter(torch.ones(8))
        self.head = nn.Linear(8, 3)

    def no_weight_decay(self):
        return {"pos_embed", "cls_token", "mixer.A_log"}

    def layer_id(self, name):
        if name.startswith(("pos_embed", "cls_token", "embed")):
            return 0
        if name.startswith("layers."):
            return int(name.split(".")[1]) + 1
        if name.startswith("mixer"):
            return 1
        return 3


def _names(model, group):
    ids = {id(p) for p in group["params"]}
    return sorted(n for n, p in model.named_parameters() if id(p) in ids)


def test_weight_decay_groups():
    model = _Toy()
    decay, no_decay = weight_decay_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert _names(model, decay) == ["embed.weight", "head.weight", "layers.0.proj.weight", "layers.1.proj.weight"]
    assert set(_names(model, no_decay)) == {
        "pos_embed", "cls_token", "mixer.A_log", "mixer.D", "embed.bias", "head.bias",
        "layers.0.norm.weight", "layers.0.norm.bias", "layers.0.proj.bias",
        "layers.1.norm.weight", "layers.1.norm.bias", "layers.1.proj.bias"}


def test_layer_decay_groups_scales():
    model = _Toy()
    groups = layer_decay_groups(model, 0.05, 0.5)
    scale = {n: g["lr_scale"] for g in groups for n in _names(model, g)}
    wd = {n: g["weight_decay"] for g in groups for n in _names(model, g)}
    assert scale["head.weight"] == 1.0                      # top layer (3)
    assert scale["layers.1.proj.weight"] == 0.5             # layer id 2
    assert scale["layers.0.proj.weight"] == 0.25            # layer id 1
    assert scale["embed.weight"] == scale["pos_embed"] == 0.125
    assert wd["embed.weight"] == 0.05 and wd["pos_embed"] == 0.0 and wd["mixer.A_log"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_real_model_no_decay_names():
    """ARM's rule by default (docs/fidelity.md, "weight-decay rule"): everything with 2 or more
    dimensions decays except position tables and class tokens; optim.ssm_weight_decay=false
    also exempts A_log, D and the learned tokens (our first recipe)."""
    from star.models import create_model

    model = create_model("star_tiny_pz8", depth=1, sep_value="embedding")
    decay, no_decay = weight_decay_groups(model, 0.05)
    decayed, exempt = set(_names(model, decay)), set(_names(model, no_decay))
    assert {"layers.0.mixer.A_log", "decoder.ar_token", "packer.sep_embed.weight"} <= decayed
    assert {"layers.0.mixer.D", "layers.0.mixer.dt_proj.bias", "layers.0.norm1.weight"} <= exempt
    assert exempt == {n for n, p in model.named_parameters() if p.ndim <= 1}
    decay, no_decay = weight_decay_groups(model, 0.05, ssm_weight_decay=False)
    decayed, exempt = set(_names(model, decay)), set(_names(model, no_decay))
    assert {"layers.0.mixer.A_log", "layers.0.mixer.D", "decoder.ar_token", "packer.sep_embed.weight"} <= exempt
    assert all(p.ndim > 1 for p in decay["params"]) and "layers.0.mixer.in_proj.weight" in decayed
    assert not any(n.endswith(("A_log", ".D", "_token")) for n in decayed)
    # the fine-tuning model: every scan direction's A_log decays under ARM's rule, not under ours
    ft = create_model("star_tiny_pz8_ft", depth=1)
    wd = {n: g["weight_decay"] for g in layer_decay_groups(ft, 0.05, 0.65) for n in _names(ft, g)}
    assert all(wd[f"layers.0.mixer.A{s}_log"] == 0.05 for s in ("", "_b", "_c", "_c_b"))
    assert wd["pos_embed"] == wd["cls_token"] == wd["layers.0.mixer.D_b"] == 0.0
    wd = {n: g["weight_decay"] for g in layer_decay_groups(ft, 0.05, 0.65, ssm_weight_decay=False)
          for n in _names(ft, g)}
    assert all(wd[f"layers.0.mixer.A{s}_log"] == 0.0 for s in ("", "_b", "_c", "_c_b"))


# ------------------------------------------------------------------ batch plan and DeepSpeed JSON
def test_batch_plan_accumulation_and_sequences():
    cfg = load_config("star_b_1600ep")
    plan = plan_batches(cfg, world_size=4)                  # 2048 = 256 x 4 ranks x 2
    assert (plan.accum_steps, plan.micro_sequences, plan.global_sequences) == (2, 32, 256)
    assert plan_batches(cfg, world_size=8).accum_steps == 1
    with pytest.raises(ConfigError, match="not a multiple"):
        plan_batches(cfg, world_size=3)


def test_ds_config_is_filled_from_the_typed_config(tmp_path):
    cfg = load_config("star_b_1600ep")
    plan = plan_batches(cfg, world_size=4)
    ds = build_ds_config(resolve_ds_config_path("auto", "cuda"), plan, cfg.optim.grad_clip)
    assert ds["train_micro_batch_size_per_gpu"] == 32 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 256 and ds["gradient_clipping"] == 3.0
    assert ds["torch_autocast"]["enabled"] and ds["zero_optimization"]["stage"] == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}))
    with pytest.raises(ConfigError, match="gradient_clipping=1.0.*3.0"):
        build_ds_config(bad, plan, 3.0)
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}))
    with pytest.raises(ConfigError, match="A_log"):
        build_ds_config(bad, plan, 3.0)
    with pytest.raises(ConfigError, match="available"):
        resolve_ds_config_path("zero9", "cpu")


def test_shipped_ds_configs_pass_the_checks():
    plan = plan_batches(load_config("smoke"), world_size=2)
    names = sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))
    assert {"zero1_bf16", "zero2_bf16", "cpu_zero2_fp32"} <= set(names)
    for name in names:
        build_ds_config(resolve_ds_config_path(name, "cpu"), plan, 3.0)


# ------------------------------------------------------------------ distributed environment
@pytest.mark.parametrize("nodelist,host", [
    ("gpu-a[003-005,9]", "gpu-a003"), ("node7", "node7"), ("n[1,2]", "n1"), ("h[08-10],x1", "h08"),
    ("single,other", "single")])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


def test_dist_env_from_slurm_and_torchrun():
    env = resolve_dist_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                            "SLURM_JOB_NODELIST": "gpu[12-13]", "SLURM_JOB_ID": "123456"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port, env.source) == \
        (5, 8, 1, "gpu12", 20000 + 123456 % 20000, "slurm")
    env = resolve_dist_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h",
                            "MASTER_PORT": "1234", "SLURM_PROCID": "9", "SLURM_NTASKS": "16"})
    assert (env.rank, env.world_size, env.master_addr, env.master_port, env.source) == (1, 2, "h", 1234, "torchrun")
    env = resolve_dist_env({})
    assert (env.rank, env.world_size, env.source) == (0, 1, "single") and env.master_port > 0


# ------------------------------------------------------------------ EMA and metrics
def test_ema_update_matches_the_formula():
    model = nn.Linear(3, 2)
    ema = ModelEma(model, decay=0.9)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    expected = 0.9 * start["weight"] + 0.1 * model.weight
    torch.testing.assert_close(ema.module.weight, expected)
    torch.testing.assert_close(ema.module.bias, start["bias"])
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_truncate_jsonl_keeps_one_trajectory(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s}) for s in (1, 2, 3, 4)] + ['{"step": 5, "lo']
    path.write_text("\n".join(lines))
    truncate_jsonl(path, 2)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]


# ------------------------------------------------------------------ run-dir config on resume
def test_run_dir_config_resolution(tmp_path, capsys):
    from star.train.runtime import resolve_run_config

    cfg, run_dir = resolve_run_config("abl_n4", ["optim.base_lr=2e-4"], None, "pretrain")
    assert str(run_dir) == "runs/abl_n4" and cfg.optim.base_lr == 2e-4
    run = tmp_path / "run"
    run.mkdir()
    cfg.save(run / "config.yaml")
    (run / "checkpoints").mkdir()  # a committed checkpoint binds the run to its recipe
    (run / "checkpoints" / "latest").write_text("step_000000001\n")
    # resume without --config: the saved config, plus operational overrides
    again, _ = resolve_run_config(None, ["log.every_steps=7"], str(run), "pretrain")
    assert again.optim.base_lr == 2e-4 and again.log.every_steps == 7
    # a recipe change on resume is refused and named
    with pytest.raises(ConfigError, match=r"optim\.base_lr: run has 0\.0002, now 0\.00015"):
        resolve_run_config("abl_n4", [], str(run), "pretrain")
    # training longer is a deliberate decision: allowed, with a warning
    longer, _ = resolve_run_config("abl_n4", ["optim.base_lr=2e-4", "schedule.epochs=400"], str(run), "pretrain")
    assert longer.schedule.epochs == 400
    assert "schedule.epochs changes from 200 to 400" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="finetune config"):
        resolve_run_config("finetune_b", [], None, "pretrain")
    with pytest.raises(ConfigError, match="--config"):
        resolve_run_config(None, [], str(tmp_path / "nothing"), "pretrain")


# ------------------------------------------------------------------ checkpoint pointer and pruning
class _FakeEngine:
    """Writes what DeepSpeed would, minus the tensors: one file per checkpoint tag."""

    module = torch.nn.Linear(2, 2)  # sizes the free-space check before a save

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        assert save_latest is False  # the pointer is ours to commit
        (Path(save_dir) / tag).mkdir(parents=True, exist_ok=True)
        (Path(save_dir) / tag / "state.json").write_text(json.dumps(client_state))


def test_checkpointer_commits_the_pointer_and_keeps_the_last_few(tmp_path):
    from star.train.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path, rank=0, keep_last=2)
    assert ckpt.latest_tag() is None
    engine = _FakeEngine()
    for step in range(1, 6):
        ckpt.save(engine, step, {"step": step})
    assert ckpt.latest_tag() == "step_000000005"
    assert sorted(p.name for p in ckpt.dir.glob("step_*")) == ["step_000000004", "step_000000005"]
    assert not (ckpt.dir / "latest.tmp").exists()
    # a half-written checkpoint from a killed attempt (step 9) is removed by the replayed run's next save
    (ckpt.dir / "step_000000009").mkdir()
    ckpt.save(engine, 6, {"step": 6})
    assert sorted(p.name for p in ckpt.dir.glob("step_*")) == ["step_000000005", "step_000000006"]
    assert (ckpt.dir / "step_000000006" / "rng_rank00000.pt").is_file()
    (ckpt.dir / "latest").write_text("step_000000002\n")
    with pytest.raises(FileNotFoundError, match="step_000000002"):
        ckpt.latest_tag()


def test_fp32_sensitive_names_cover_every_scan_direction():
    from star.models import create_model, fp32_parameter_names

    # the engine keeps exactly the parameters the modules flag _keep_fp32 out of bf16 communication
    model = create_model("star_tiny_pz8_ft", embed_dim=32, depth=1, img_size=64, num_classes=4)
    names = fp32_parameter_names(model)
    sensitive = sorted(n.split("mixer.")[1] for n in names)
    assert sensitive == sorted(["A_log", "A_b_log", "A_c_log", "A_c_b_log", "D", "D_b", "D_c", "D_c_b",
                                "dt_proj.bias", "dt_proj_b.bias", "dt_proj_c.bias", "dt_proj_c_b.bias"])
    assert "layers.0.mixer.dt_proj.weight" not in names
    assert "head.bias" not in names
    pretrain = create_model("star_tiny_pz8", embed_dim=32, depth=4, decoder_dim=32)
    assert not any(n.startswith(("decoder.", "packer.")) for n in fp32_parameter_names(pretrain))
