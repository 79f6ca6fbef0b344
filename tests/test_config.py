"""Typed configs: every preset loads, overrides parse as YAML, typos are named with a fix."""

from __future__ import annotations

import re

import pytest
import torch
import yaml

from star.config import PRESET_DIR, Config, ConfigError, diff_configs, list_presets, load_config, valid_keys
from star.models import create_model, model_config
from star.models.classifier import CLS_POSITIONS
from star.models.pretrain import SEP_POSITIONS, SEP_TYPES
from star.train.runtime import build_model

REQUIRED_PRESETS = [
    "star_b_1600ep", "star_b_300ep", "star_b_200ep", "arm_b_1600ep", "arm_b_300ep", "star_l_1600ep",
    "finetune_b", "finetune_l", "abl_sep_none_n4", "abl_sep_token_n4", "abl_sep_cluster_n4",
    "abl_value_zeros", "abl_value_ones", "abl_value_embedding", "abl_value_identity",
    "abl_value_zeros_300ep", "abl_value_identity_300ep", "abl_pos_sc", "abl_pos_cs", "abl_pos_scs", "abl_pos_csc",
    "abl_n1", "abl_n2", "abl_n4", "abl_n8", "abl_n16",
    "finetune_b_cls_middle", "finetune_b_cls_tail", "finetune_b_cls_mean", "smoke", "smoke_finetune",
]


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_loads_and_validates(name):
    cfg = load_config(name)
    assert cfg.name == name
    assert cfg.kind in ("pretrain", "finetune")
    assert cfg.batch.micro_images % cfg.model.images_per_seq == 0
    from star.models import list_models

    assert cfg.model.name in list_models()


def test_required_presets_exist():
    missing = sorted(set(REQUIRED_PRESETS) - set(list_presets()))
    assert not missing, f"missing presets: {missing}"


def test_paper_recipe_values():
    """The recipes of the STAR paper, section 4.1 (and ARM's fine-tuning recipe for the rest; see
    docs/design.md, "Paper facts the code depends on"), checked by hand."""
    cfg = load_config("star_b_1600ep")
    assert (cfg.model.sep_type, cfg.model.sep_value, cfg.model.sep_position) == ("cluster", "identity", "SC")
    assert cfg.model.images_per_seq == 8 and cfg.model.img_size == 192
    assert cfg.batch.global_images == 2048 and cfg.optim.base_lr == 1.5e-4
    assert cfg.optim.betas == [0.9, 0.95] and cfg.optim.weight_decay == 0.05 and cfg.optim.grad_clip == 3.0
    assert (cfg.schedule.epochs, cfg.schedule.warmup_epochs) == (1600, 40)
    ft = load_config("finetune_b")
    assert (ft.batch.global_images, ft.optim.base_lr, ft.optim.layer_decay) == (1024, 5e-4, 0.65)
    assert (ft.schedule.epochs, ft.schedule.warmup_epochs, ft.model.drop_path) == (100, 5, 0.1)
    assert (ft.mixup.mixup_alpha, ft.mixup.cutmix_alpha, ft.mixup.label_smoothing) == (0.8, 1.0, 0.1)
    assert ft.ema.enabled and ft.ema.decay == 0.99992 and ft.model.cls_position == "tail"
    assert load_config("finetune_l").optim.layer_decay == 0.75


# Each row of the STAR paper's Tables 1-4 and 6 -> (preset, overrides, expected model fields, epochs).
PAPER_ROWS = [
    ("arm_b_200ep", [], dict(name="arm_base_pz16", images_per_seq=1), 200),
    ("abl_sep_none_n4", [], dict(sep_type="none", images_per_seq=4), 200),
    ("abl_sep_token_n4", [], dict(sep_type="token", sep_value="zeros", images_per_seq=4), 200),
    ("abl_sep_cluster_n4", [], dict(sep_type="cluster", sep_value="zeros", images_per_seq=4), 200),
    ("abl_value_zeros", [], dict(sep_value="zeros", images_per_seq=8), 200),
    ("abl_value_ones", [], dict(sep_value="ones"), 200),
    ("abl_value_embedding", [], dict(sep_value="embedding"), 200),
    ("abl_value_identity", [], dict(sep_value="identity"), 200),
    ("abl_pos_sc", [], dict(sep_position="SC", sep_value="zeros"), 200),
    ("abl_pos_cs", [], dict(sep_position="CS"), 200),
    ("abl_pos_scs", [], dict(sep_position="SCS"), 200),
    ("abl_pos_csc", [], dict(sep_position="CSC"), 200),
    ("abl_n1", [], dict(images_per_seq=1, sep_type="cluster"), 200),
    ("abl_n16", [], dict(images_per_seq=16), 200),
    ("star_b_300ep", [], dict(sep_value="identity", images_per_seq=8), 300),
    ("star_b_300ep", ["model.sep_value=zeros"], dict(sep_value="zeros"), 300),  # table 2, 300 ep
    ("abl_value_zeros_300ep", [], dict(sep_value="zeros", sep_type="cluster", images_per_seq=8), 300),
    ("abl_value_identity_300ep", [], dict(sep_value="identity", sep_position="SC", images_per_seq=8), 300),
    ("star_b_1600ep", [], dict(name="star_base_pz16"), 1600),
    ("arm_b_300ep", [], dict(name="arm_base_pz16"), 300),
    ("arm_b_1600ep", [], dict(name="arm_base_pz16"), 1600),
]


@pytest.mark.parametrize("preset,overrides,model,epochs", PAPER_ROWS)
def test_paper_table_rows_are_expressible(preset, overrides, model, epochs):
    cfg = load_config(preset, overrides)
    for key, value in model.items():
        assert getattr(cfg.model, key) == value, (preset, key)
    assert cfg.schedule.epochs == epochs


def test_cls_position_presets():
    assert [load_config(f"finetune_b_cls_{p}").model.cls_position for p in ("middle", "tail", "mean")] == \
        ["middle", "tail", "none"]


def test_overrides_parse_as_yaml_scalars():
    cfg = load_config("star_b_1600ep", ["optim.base_lr=2e-4", "schedule.epochs=300", "ema.enabled=true",
                                        "model.sep_type=token", "schedule.max_steps=null",
                                        "optim.betas=[0.9, 0.99]", "data.dir=/data/on"])
    assert cfg.optim.base_lr == 2e-4 and isinstance(cfg.optim.base_lr, float)
    assert cfg.schedule.epochs == 300 and cfg.ema.enabled is True
    assert cfg.model.sep_type == "token" and cfg.schedule.max_steps is None
    assert cfg.optim.betas == [0.9, 0.99]
    assert cfg.data.dir == "/data/on"  # a string field keeps the text (YAML would say True for `on`)


def test_unknown_key_names_it_and_the_closest():
    with pytest.raises(ConfigError, match=r"`optim\.base_lrr`.*did you mean `optim\.base_lr`"):
        load_config("star_b_1600ep", ["optim.base_lrr=1e-3"])
    with pytest.raises(ConfigError, match=r"`optim\.weight_dcay`.*did you mean `optim\.weight_decay`"):
        load_config("star_b_1600ep", ["optim.weight_dcay=0.1"])
    with pytest.raises(ConfigError, match=r"`modle\.name`.*did you mean `model\.name`\?"):
        load_config("star_b_1600ep", ["modle.name=x"])
    with pytest.raises(ConfigError, match=r"`train\.epochs`.*did you mean `schedule\.epochs`\?"):
        load_config("star_b_1600ep", ["train.epochs=300"])  # the right leaf in another section
    with pytest.raises(ConfigError, match=r"`optim\.lr`.*`optim\.min_lr` or `optim\.base_lr`"):
        load_config("star_b_1600ep", ["optim.lr=1e-3"])  # two equally close keys: both offered


def test_unknown_key_in_a_preset_file_names_the_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: star_b_200ep\nschedule:\n  warmup_epoch: 5\n")
    with pytest.raises(ConfigError, match=r"schedule\.warmup_epoch.*mine\.yaml.*schedule\.warmup_epochs"):
        load_config(str(path))


def test_base_chain_from_a_user_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: abl_value_zeros\nmodel:\n  images_per_seq: 4\n")
    cfg = load_config(str(path))
    assert cfg.model.images_per_seq == 4 and cfg.model.sep_value == "zeros"  # from abl_value_zeros
    assert cfg.schedule.epochs == 200 and cfg.optim.base_lr == 1.5e-4  # from star_b_200ep <- star_b_1600ep


@pytest.mark.parametrize("override,match", [
    ("schedule.epochs=ten", r"schedule\.epochs.*expected int"),
    ("model.sep_type=cluter", r"model\.sep_type.*not one of"),
    ("batch.micro_images=100", r"not a multiple of model\.images_per_seq"),
    ("optim.layer_decay=1.5", r"layer_decay"),
    ("model=3", r"`model`.*is a section"),
    ("noequals", r"key\.sub=value"),
])
def test_bad_values_are_rejected(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("star_b_1600ep", [override])


def test_missing_preset_suggests_close_names():
    with pytest.raises(ConfigError, match="star_b_300ep"):
        load_config("star_b_30ep")


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config("abl_pos_scs", ["optim.base_lr=3e-4"])
    cfg.save(tmp_path / "config.yaml")
    again = load_config(base=yaml.safe_load((tmp_path / "config.yaml").read_text()))
    assert again == cfg and not diff_configs(cfg, again)
    assert diff_configs(cfg, load_config("abl_pos_scs")) == {"optim.base_lr": (3e-4, 1.5e-4)}


def test_valid_keys_cover_sections():
    keys = valid_keys()
    assert "optim.base_lr" in keys and "model.images_per_seq" in keys and "checkpoint.every_steps" in keys
    assert len(keys) == len(set(keys))
    assert isinstance(Config().model.images_per_seq, int)


# ----------------------------------------------------------------------------- numeric ranges


def _numeric_keys() -> list[str]:
    import dataclasses as dc
    import typing as tp

    from star.config import Config

    out = []

    def walk(cls, prefix):
        hints = tp.get_type_hints(cls)
        for f in dc.fields(cls):
            t = hints[f.name]
            if dc.is_dataclass(t):
                walk(t, prefix + f.name + ".")
            elif {int, float} & ({t} | set(tp.get_args(t))):
                out.append(prefix + f.name)

    walk(Config, "")
    return out


def test_every_numeric_setting_has_a_range():
    from star.config import RANGES

    missing = [k for k in _numeric_keys() if not k.startswith("model.") and k not in RANGES]
    assert not missing, f"numeric config keys without a valid range in star.config.RANGES: {missing}"


@pytest.mark.parametrize("override, key", [
    ("optim.base_lr=-1e-4", "optim.base_lr"),
    ("data.num_threads=-1", "data.num_threads"),
    ("schedule.max_steps=-5", "schedule.max_steps"),
    ("schedule.max_steps=0", "schedule.max_steps"),
    ("mixup.prob=1.5", "mixup.prob"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("seed=-3", "seed"),
])
def test_out_of_range_values_are_one_clear_error(override, key):
    from star.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=rf"`{key}` = .* outside its valid range"):
        load_config("smoke", [override])


def test_out_of_range_on_the_command_line_exits_2_before_start(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "star", "pretrain", "--config", "smoke",
                           "--run-dir", str(tmp_path / "r"), "optim.base_lr=-1"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "optim.base_lr" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "r").exists()


def test_every_preset_is_within_range():
    from star.config import list_presets, load_config

    for name in list_presets():
        load_config(name)


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    from star.config import ConfigError, load_config

    bad = tmp_path / "mine.yaml"
    bad.write_text("base: smoke\noptim:\n  base_lr: [1e-4\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(bad))
    assert f"{bad}:4:1: YAML syntax error" in str(err.value)
    assert "unicode string" not in str(err.value)


def test_a_run_without_a_committed_checkpoint_does_not_bind_its_recipe(tmp_path):
    from star.train.runtime import resolve_run_config

    run = tmp_path / "run"
    run.mkdir()
    first, _ = resolve_run_config("smoke", ["optim.base_lr=1e-3"], str(run), kind="pretrain")
    first.save(run / "config.yaml")  # what a start-up that failed before its first checkpoint leaves
    fixed, _ = resolve_run_config("smoke", ["optim.base_lr=2e-3"], str(run), kind="pretrain")
    assert fixed.optim.base_lr == 2e-3
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "latest").write_text("step_000000001\n")
    with pytest.raises(ConfigError, match="different config"):
        resolve_run_config("smoke", ["optim.base_lr=3e-3"], str(run), kind="pretrain")


def test_on_corrupt_may_change_on_resume(tmp_path):
    from star.train.runtime import resolve_run_config

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_000000001\n")
    cfg, _ = resolve_run_config("smoke", [], str(run), kind="pretrain")
    cfg.save(run / "config.yaml")
    resumed, _ = resolve_run_config("smoke", ["data.on_corrupt=skip"], str(run), kind="pretrain")
    assert resumed.data.on_corrupt == "skip"


def test_model_section_is_a_name_plus_overrides_of_its_config_dataclass():
    cfg = load_config("abl_sep_token_n4")
    assert cfg.model.resolved() == model_config("star_base_pz16", img_size=192, images_per_seq=4,
                                                sep_type="token", sep_value="zeros", sep_position="SC")
    torch.manual_seed(0)
    built = build_model(cfg)
    assert built.config == cfg.model.resolved()
    # a setting left out (or null) is the named model's own default, not a copy kept in the config
    tiny = load_config("star_b_1600ep", ["model.name=star_tiny_pz8", "model.img_size=null"])
    assert tiny.model.img_size == 96 and tiny.model.embed_dim == 192
    assert tiny.model.resolved() == model_config("star_tiny_pz8", images_per_seq=8, sep_type="cluster",
                                                 sep_value="identity", sep_position="SC")
    # the saved layout is the YAML one: name and overrides side by side
    assert cfg.to_dict()["model"] == {"name": "star_base_pz16", "img_size": 192, "images_per_seq": 4,
                                      "sep_type": "token", "sep_value": "zeros", "sep_position": "SC",
                                      "kernels": "auto"}  # the kernel path: a run setting beside them
    assert load_config("finetune_b").model.images_per_seq == 1  # one image per fine-tuning input
    # a null is "the model's value", so a null setting of the other family changes nothing
    assert load_config("star_b_1600ep", ["model.cls_position=null"]).model.resolved() == \
        load_config("star_b_1600ep").model.resolved()


@pytest.mark.parametrize("preset,override,match", [
    ("finetune_b", "model.sep_type=token", r"`model\.sep_type` is not a setting of star_base_pz16_ft"),
    ("star_b_1600ep", "model.cls_position=tail", r"`model\.cls_position` is not a setting of star_base_pz16"),
    ("star_b_1600ep", "model.images_per_sq=4", r"`model\.images_per_sq`.*did you mean `model\.images_per_seq`"),
    ("star_b_1600ep", "model.name=star_bsae_pz16", r"`model\.name`.*did you mean star_base_pz16"),
    ("star_b_1600ep", "model.cluster_size=5", r"model section \(star_base_pz16\).*cluster_size=5"),
    ("star_b_1600ep", "model.depth=two", r"model\.depth.*expected int"),
])
def test_model_settings_are_checked_against_the_named_model(preset, override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(preset, [override])


def test_model_value_choices_come_from_the_model_modules():
    with pytest.raises(ConfigError) as err:
        load_config("star_b_1600ep", ["model.sep_position=XS"])
    assert str(err.value).endswith("not one of: " + ", ".join(SEP_POSITIONS))
    with pytest.raises(ConfigError) as err:
        load_config("star_b_1600ep", ["model.sep_type=cluter"])
    assert str(err.value).endswith("not one of: " + ", ".join(SEP_TYPES))
    with pytest.raises(ConfigError) as err:
        load_config("finetune_b", ["model.cls_position=head"])
    assert str(err.value).endswith("not one of: " + ", ".join(CLS_POSITIONS))
    for value in CLS_POSITIONS:  # every value the model accepts, the config accepts
        assert load_config("finetune_b", [f"model.cls_position={value}"]).model.cls_position == value
        create_model("star_tiny_pz8_ft", cls_position=value, depth=1, embed_dim=16)


def test_num_classes_null_is_filled_later_and_reaches_the_model():
    cfg = load_config("smoke_finetune")
    assert cfg.model.num_classes is None  # the training manifest's class count, filled at start-up
    cfg.model.num_classes = 7
    assert cfg.model.overrides["num_classes"] == 7 and cfg.model.resolved().num_classes == 7
    assert build_model(cfg).head.out_features == 7


# ----------------------------------------------------------------------------- preset headers
# (issue 15; docs/fidelity.md, section 4)


def _header(name: str) -> str:
    lines = (PRESET_DIR / f"{name}.yaml").read_text().splitlines()
    end = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    return "\n".join(lines[:end])


PRETRAIN_PRESETS = [n for n in list_presets() if load_config(n).kind == "pretrain"]
# the separator ablations and the 200-epoch baselines: Tables 1-4 were fine-tuned with the middle class token
ABLATION_PRESETS = [n for n in PRETRAIN_PRESETS if n.startswith("abl_")] + ["arm_b_200ep", "star_b_200ep"]


@pytest.mark.parametrize("name", PRETRAIN_PRESETS)
def test_pretraining_preset_headers_name_a_table_row_and_an_existing_fine_tune_preset(name):
    header = _header(name)
    assert re.search(r"Tables? \d|[Nn]o (paper )?table row", header), f"{name}: header names no table row"
    named = re.findall(r"fine-tune with: (\S+)", header)
    assert len(named) == 1, f"{name}: header needs one 'fine-tune with: PRESET' line"
    assert named[0] in list_presets(), f"{name} names {named[0]}, which is not a preset"
    assert load_config(named[0]).kind == "finetune"


@pytest.mark.parametrize("name", ABLATION_PRESETS)
def test_ablation_presets_name_the_middle_class_token_fine_tune(name):
    assert re.findall(r"fine-tune with: (\S+)", _header(name)) == ["finetune_b_cls_middle"]
    assert load_config("finetune_b_cls_middle").model.cls_position == "middle"


def test_300_epoch_value_presets_differ_from_their_200_epoch_rows_only_in_length():
    for value in ("zeros", "identity"):
        assert diff_configs(load_config(f"abl_value_{value}"), load_config(f"abl_value_{value}_300ep")) == {
            "name": (f"abl_value_{value}", f"abl_value_{value}_300ep"), "schedule.epochs": (200, 300)}


def test_star_l_uses_arm_l_batch_and_scaled_lr():
    from star.train.schedule import scaled_lr

    cfg = load_config("star_l_1600ep")
    assert (cfg.batch.global_images, cfg.batch.micro_images, cfg.optim.base_lr) == (1024, 128, 1.5e-4)
    assert scaled_lr(cfg.optim.base_lr, cfg.batch.global_images) == pytest.approx(6e-4)
    assert cfg.model.name == "star_large_pz16" and cfg.schedule.epochs == 1600


def test_separator_position_and_weight_decay_keys():
    cfg = load_config("abl_value_zeros")
    settings = (cfg.model.sep_pos_embed, cfg.model.dec_sep_pos_embed, cfg.optim.ssm_weight_decay)
    assert settings == ("fixed", "fixed", True)
    cfg = load_config("abl_value_zeros", ["model.sep_pos_embed=none", "model.dec_sep_pos_embed=learned",
                                          "optim.ssm_weight_decay=false"])
    model = build_model(cfg)
    assert model.config.packing.sep_pos_embed == "none" and model.config.dec_sep_pos_embed == "learned"
    assert cfg.optim.ssm_weight_decay is False
    with pytest.raises(ConfigError, match="model.sep_pos_embed` = 'trained' is not one of: none, fixed, learned"):
        load_config("abl_value_zeros", ["model.sep_pos_embed=trained"])
    with pytest.raises(ConfigError, match="optim.ssm_weight_decay.*expected bool"):
        load_config("abl_value_zeros", ["optim.ssm_weight_decay=maybe"])


def test_a_run_saved_before_the_fidelity_options_resumes_with_its_own_recipe(tmp_path):
    """A config.yaml without optim.ssm_weight_decay predates the separator-position and
    weight-decay options: that run used learned separator positions and exempted A_log."""
    from star.train.runtime import resolve_run_config

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_000000010\n")  # a committed checkpoint
    old = load_config("abl_value_zeros").to_dict()
    del old["optim"]["ssm_weight_decay"]
    (run / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    cfg, _ = resolve_run_config(None, [], str(run), "pretrain")
    assert (cfg.model.sep_pos_embed, cfg.model.dec_sep_pos_embed, cfg.optim.ssm_weight_decay) == (
        "learned", "learned", False)
    with pytest.raises(ConfigError, match=r"optim\.ssm_weight_decay: run has False, now True"):
        resolve_run_config("abl_value_zeros", [], str(run), "pretrain")
    same, _ = resolve_run_config("abl_value_zeros", ["optim.ssm_weight_decay=false", "model.sep_pos_embed=learned",
                                                     "model.dec_sep_pos_embed=learned"], str(run), "pretrain")
    assert same.model.sep_pos_embed == "learned"
    # a config written today carries the key and is read as written
    new = load_config("abl_value_zeros")
    (run / "config.yaml").write_text(new.to_yaml())
    cfg, _ = resolve_run_config(None, [], str(run), "pretrain")
    assert (cfg.model.sep_pos_embed, cfg.optim.ssm_weight_decay) == ("fixed", True)
