"""Registry names and overrides, weight-decay and layer-decay helpers, and the decoder."""

from __future__ import annotations

import pytest
import torch

from star.models import (
    PackingConfig,
    StarClassifier,
    StarPretrainConfig,
    StarPretrainModel,
    create_model,
    fp32_parameter_names,
    list_models,
    model_config,
)
from star.models.pretrain import Decoder, feature_levels


def test_names_and_defaults():
    names = list_models()
    for method in ("arm", "star"):
        for size in ("tiny_pz8", "base_pz16", "large_pz16", "huge_pz16"):
            assert f"{method}_{size}" in names and f"{method}_{size}_ft" in names
    assert model_config("star_base_pz16").packing.images_per_seq == 8
    assert model_config("star_base_pz16").packing.sep_value == "identity"
    assert model_config("arm_base_pz16").packing.sep_type == "none"
    assert model_config("arm_large_pz16").embed_dim == 1024 and model_config("arm_large_pz16").depth == 24
    assert model_config("star_huge_pz16_ft").embed_dim == 1536
    assert model_config("star_base_pz16_ft").cls_position == "tail"
    assert model_config("arm_base_pz16_ft").cls_position == "middle"
    # the model keeps the configuration it was built from (overrides included)
    model = create_model("star_tiny_pz8", images_per_seq=2, depth=4)
    assert model.config == model_config("star_tiny_pz8", images_per_seq=2, depth=4)
    assert model.config.packing.images_per_seq == 2 and model.config.depth == 4 == len(model.layers)


def test_unknown_names_and_overrides_are_clear_errors():
    with pytest.raises(ValueError, match="Did you mean star_base_pz16"):
        create_model("star_bsae_pz16")
    with pytest.raises(ValueError, match="does not take images_per_sq .did you mean images_per_seq"):
        create_model("star_tiny_pz8", images_per_sq=4)
    with pytest.raises(ValueError, match="does not take cls_position"):  # a fine-tuning setting
        create_model("star_tiny_pz8", cls_position="tail")
    with pytest.raises(ValueError, match="sep_value='two'"):
        create_model("star_tiny_pz8", sep_value="two")
    with pytest.raises(ValueError, match="cls_position='head'"):
        create_model("star_tiny_pz8_ft", cls_position="head")


def test_overrides_reach_the_model():
    model = create_model("star_tiny_pz8", images_per_seq=4, sep_type="token", sep_position="SCS")
    assert isinstance(model, StarPretrainModel)
    assert model.packing.images_per_seq == 4 and model.layout.seq_len == 4 * (144 + 3)
    ft = create_model("star_tiny_pz8_ft", num_classes=10, drop_path=0.2, img_size=96)
    assert isinstance(ft, StarClassifier) and ft.head.out_features == 10
    # ARM's [0] + linspace(0, 0.2, 6) schedule: the last of 6 blocks gets 0.2 x 4 / 5
    assert ft.layers[-1].drop_path.p == pytest.approx(0.2 * 4 / 5) and ft.grid.size == 12


def test_no_weight_decay_and_layer_ids():
    ft = create_model("star_tiny_pz8_ft")
    nwd = ft.no_weight_decay()
    for name in ("pos_embed", "cls_token", "layers.2.mixer.D_b", "layers.1.norm1.weight",
                 "layers.1.mlp.w1.bias", "head.bias", "layers.0.mixer.dt_proj_c.bias"):
        assert name in nwd, name
    # ARM's rule (Finetuning/util/lr_decay.py: p.ndim == 1 or the no_weight_decay() names):
    # every direction's 2-D A_log decays
    for name in ("layers.0.mixer.in_proj.weight", "layers.0.mlp.w3.weight", "head.weight",
                 "patch_embed.proj.weight", "layers.0.mixer.x_proj_c.weight", "layers.0.mixer.A_log",
                 "layers.0.mixer.A_c_b_log"):
        assert name not in nwd, name
    assert ft.layer_id("patch_embed.proj.weight") == 0 and ft.layer_id("pos_embed") == 0
    assert ft.layer_id("cls_token") == 0
    assert ft.layer_id("layers.0.mixer.A_log") == 1 and ft.layer_id("layers.5.mlp.w1.weight") == 6
    assert ft.layer_id("norm_f.weight") == 7 == ft.layer_id("head.weight") == ft.num_layers_for_lr_decay
    pre = create_model("star_tiny_pz8", sep_pos_embed="learned", dec_sep_pos_embed="learned")
    nwd = pre.no_weight_decay()
    assert {"packer.sep_pos_embed", "decoder.sep_pos_embed"} <= nwd  # learned position slots
    assert not {"decoder.ar_token", "layers.0.mixer.A_log", "decoder.enc2dec.weight"} & nwd
    emb = create_model("star_tiny_pz8", sep_value="embedding")
    assert "packer.sep_embed.weight" not in emb.no_weight_decay()  # a learned input vector: decays


def test_feature_levels_and_interleaved_split():
    assert feature_levels(12) == (6, 8, 10, 12)
    assert feature_levels(24) == (12, 16, 20, 24)
    assert feature_levels(6) == (3, 4, 5, 6)
    torch.manual_seed(0)
    config = StarPretrainConfig(PackingConfig(img_size=8, patch_size=2, cluster_size=1, images_per_seq=1),
                                embed_dim=8, decoder_dim=16, decoder_heads=2)
    dec = Decoder(config).eval()
    # make level i == encoder feature i exactly: enc2dec maps feature i channel c to output
    # channel c * 4 + i (ARM's interleaved split); then block i only sees level i
    with torch.no_grad():
        dec.enc2dec.weight.zero_()
        dec.enc2dec.bias.zero_()
        for i in range(4):
            for c in range(8):
                dec.enc2dec.weight[c * 4 + i, i * 8 + c] = 1.0
    feats = [torch.randn(1, 6, 8) for _ in range(4)]
    queries = torch.randn(1, 3, 16)
    mask = torch.ones(3, 6, dtype=torch.bool)
    changed = [f.clone() for f in feats]
    changed[2] = changed[2] + torch.randn(1, 6, 8)
    assert not torch.allclose(dec(changed, queries, mask), dec(feats, queries, mask))
    # feature 2 must reach the output only through block 2: with that block's value
    # projection blanked, the output no longer depends on it
    with torch.no_grad():
        dec.blocks[2].attn2.kv.weight[16:].zero_()
        dec.blocks[2].attn2.kv.bias[16:].zero_()
    torch.testing.assert_close(dec(changed, queries, mask), dec(feats, queries, mask))


def test_fp32_parameter_names_cover_every_scan_direction():
    ft = create_model("star_tiny_pz8_ft", depth=2)
    names = fp32_parameter_names(ft)
    want = {f"layers.{i}.mixer.{p}" for i in range(2)
            for p in ("A_log", "A_b_log", "A_c_log", "A_c_b_log", "D", "D_b", "D_c", "D_c_b",
                      "dt_proj.bias", "dt_proj_b.bias", "dt_proj_c.bias", "dt_proj_c_b.bias")}
    assert names == want
    pre = create_model("star_tiny_pz8", depth=2)
    assert fp32_parameter_names(pre) == {f"layers.{i}.mixer.{p}" for i in range(2)
                                         for p in ("A_log", "D", "dt_proj.bias")}
