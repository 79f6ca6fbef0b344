"""Checkpoint compatibility with the official ARM release, and fine-tuning's load_pretrained."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from star.models import create_model, from_arm_state_dict, to_arm_state_dict

# Official ARM pretraining state dict (github OliverRensu/ARM, models_pretrain.py,
# arm_base_pz16): names and shapes written out from that code. D = 768, d_inner = 768
# (expand 1), dt_rank = 48, d_state = 16, SwiGLU hidden 2048, decoder 512, 16*16*3 pixels.
ARM_B_TOP = {
    "pos_embed": (1, 144, 768), "dec_pos_embed": (1, 144, 512), "ar_token": (1, 1, 512),
    "mask": (128, 128),  # ARM's cached decoder mask buffer (ignored by our model)
    "patch_embed.proj.weight": (768, 3, 16, 16), "patch_embed.proj.bias": (768,),
    "enc2dec.weight": (2048, 3072), "enc2dec.bias": (2048,),
    **{f"norm_{i}.{w}": (768,) for i in range(1, 5) for w in ("weight", "bias")},
    "ar_norm.weight": (512,), "ar_norm.bias": (512,),
    "ar_pred.weight": (768, 512), "ar_pred.bias": (768,),
}
ARM_B_LAYER = {
    "norm1.weight": (768,), "norm1.bias": (768,), "norm2.weight": (768,), "norm2.bias": (768,),
    "mixer.A_log": (768, 16), "mixer.D": (768,), "mixer.in_proj.weight": (1536, 768),
    "mixer.conv1d.weight": (768, 1, 4), "mixer.conv1d.bias": (768,),
    "mixer.x_proj.weight": (80, 768), "mixer.dt_proj.weight": (768, 48), "mixer.dt_proj.bias": (768,),
    "mixer.out_proj.weight": (768, 768),
    "mlp.w1.weight": (2048, 768), "mlp.w1.bias": (2048,), "mlp.w2.weight": (2048, 768),
    "mlp.w2.bias": (2048,), "mlp.w3.weight": (768, 2048), "mlp.w3.bias": (768,),
}
ARM_DEC_BLOCK = {
    "attn2.q.weight": (512, 512), "attn2.q.bias": (512,), "attn2.kv.weight": (1024, 512),
    "attn2.kv.bias": (1024,), "attn2.proj.weight": (512, 512), "attn2.proj.bias": (512,),
    "norm2_1.weight": (512,), "norm2_1.bias": (512,), "norm2_2.weight": (512,), "norm2_2.bias": (512,),
    "norm2.weight": (512,), "norm2.bias": (512,),
    "mlp.fc1.weight": (2048, 512), "mlp.fc1.bias": (2048,), "mlp.fc2.weight": (512, 2048), "mlp.fc2.bias": (512,),
}


def arm_base_state_dict() -> dict[str, torch.Tensor]:
    shapes = dict(ARM_B_TOP)
    shapes.update({f"layers.{i}.{k}": s for i in range(12) for k, s in ARM_B_LAYER.items()})
    shapes.update({f"dec_block.{i}.{k}": s for i in range(4) for k, s in ARM_DEC_BLOCK.items()})
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=gen) for k, s in shapes.items()}


@pytest.fixture(scope="module")
def arm_base():
    torch.manual_seed(0)
    return create_model("arm_base_pz16")


def test_official_arm_checkpoint_loads_without_missing_or_unexpected_keys(arm_base):
    state = arm_base_state_dict()
    # our names are ARM's once mapped at the boundary (the decoder is one submodule in memory)
    assert set(to_arm_state_dict(arm_base.state_dict())) == set(state) - {"mask"}
    with pytest.warns(UserWarning, match="'mask' buffer"):  # ARM's cached mask: reported, ignored
        result = arm_base.load_state_dict(state, strict=True)  # strict: raises on any mismatch
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(arm_base.layers[7].mixer.A_log, state["layers.7.mixer.A_log"])
    torch.testing.assert_close(arm_base.decoder.blocks[2].attn2.kv.weight, state["dec_block.2.attn2.kv.weight"])
    torch.testing.assert_close(arm_base.decoder.feature_norms[3].bias, state["norm_4.bias"])
    torch.testing.assert_close(arm_base.decoder.ar_token, state["ar_token"])
    torch.testing.assert_close(arm_base.pos_embed, state["pos_embed"])
    # the round trip: what `star export` writes is exactly ARM's file (mask aside)
    exported = to_arm_state_dict(arm_base.state_dict())
    assert all(torch.equal(exported[k], state[k]) for k in exported)


def test_arm_name_mapping_is_a_bijection_on_every_pretraining_form():
    for name in ("star_tiny_pz8", "arm_tiny_pz8"):
        ours = create_model(name, embed_dim=32, depth=4, decoder_dim=32, sep_value="embedding").state_dict()
        arm = to_arm_state_dict(ours)
        assert len(arm) == len(ours) and not any(k.startswith("decoder.") for k in arm)
        assert list(from_arm_state_dict(arm)) == list(ours)  # same keys, same order
        assert from_arm_state_dict(ours).keys() == ours.keys()  # our own names pass unchanged


def test_parameter_counts_match_the_paper(arm_base):
    encoder = sum(p.numel() for n, p in arm_base.named_parameters() if n.startswith(("patch_embed", "layers")))
    # 85 M fine-tuning form (STAR paper, Table 7) less 3 extra scan directions and the head
    assert 79.0e6 <= encoder <= 80.5e6  # docs/design.md, "Model": the pretraining encoder, about 80 M
    finetune = create_model("arm_base_pz16_ft")
    total = sum(p.numel() for p in finetune.parameters())
    assert abs(total - 85e6) < 1e6, total  # MambaMLP-B, 85 M (STAR paper, Table 7)
    # ARM's fine-tuning names (models_finetune.py / mamba_simple.py, bimamba "v3"): the
    # pretraining layer keys plus suffixed copies _b, _c, _c_b of the per-direction tensors
    per_direction = ("mixer.conv1d{}.weight", "mixer.conv1d{}.bias", "mixer.x_proj{}.weight",
                     "mixer.dt_proj{}.weight", "mixer.dt_proj{}.bias", "mixer.A{}_log", "mixer.D{}")
    arm_ft = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
              "norm_f.weight", "norm_f.bias", "head.weight", "head.bias"}
    arm_ft |= {f"layers.{i}.{k}" for i in range(12) for k in ARM_B_LAYER}
    arm_ft |= {f"layers.{i}.{k.format(s)}" for i in range(12) for k in per_direction for s in ("_b", "_c", "_c_b")}
    assert set(finetune.state_dict()) == arm_ft
    assert finetune.pos_embed.shape == (1, 197, 768)


@pytest.mark.parametrize("name,cls_index", [("star_tiny_pz8_ft", 196), ("arm_tiny_pz8_ft", 98)])
def test_load_pretrained_interpolates_pos_embed_and_fills_all_four_scans(name, cls_index):
    torch.manual_seed(0)
    pretrained = to_arm_state_dict(create_model(name.replace("_ft", "")).state_dict())  # an exported file
    model = create_model(name)
    cls_slot_before = model.pos_embed[0, cls_index].detach().clone()
    report = model.load_pretrained(pretrained, verbose=False)

    # position table: 12 x 12 (96 px / 8) resized to 14 x 14 (112 px / 8); the class token's
    # slot is the zero vector ARM's Finetuning/util/pos_embed.py inserts at its index
    assert report.pos_embed_resized == (12, 14)
    grid = pretrained["pos_embed"].reshape(1, 12, 12, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(14, 14), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(196, -1)
    pos = model.pos_embed[0].detach()
    torch.testing.assert_close(torch.cat([pos[:cls_index], pos[cls_index + 1:]]), grid)
    assert cls_slot_before.abs().max() > 0 and torch.equal(pos[cls_index], torch.zeros_like(cls_slot_before))

    # every direction starts from the causal scan's weights
    for layer in (0, 5):
        src = f"layers.{layer}.mixer."
        mixer = model.layers[layer].mixer
        for own, theirs in [(mixer.conv1d_c_b.weight, "conv1d.weight"), (mixer.A_b_log, "A_log"),
                            (mixer.dt_proj_c.bias, "dt_proj.bias"), (mixer.D_c_b, "D"),
                            (mixer.x_proj_b.weight, "x_proj.weight"), (mixer.in_proj.weight, "in_proj.weight")]:
            torch.testing.assert_close(own.detach(), pretrained[src + theirs])
    assert len(report.expanded_keys) == 6 * 7 * 3  # 6 layers, 7 tensors, 3 extra directions
    assert sorted(report.missing_keys) == ["cls_token", "head.bias", "head.weight", "norm_f.bias", "norm_f.weight"]
    assert report.unexpected_keys == []
    dropped = {"ar_pred.weight", "dec_block.0.attn2.q.weight", "norm_1.weight", "enc2dec.weight"}
    assert dropped <= set(report.dropped_keys)


def test_load_pretrained_reports_and_rejects_mismatches():
    torch.manual_seed(0)
    model = create_model("star_tiny_pz8_ft", cls_position="none")
    state = create_model("star_tiny_pz8").state_dict()
    state["some.extra.weight"] = torch.zeros(3)
    report = model.load_pretrained({"model": state}, verbose=False)  # wrapped checkpoints unwrap
    assert report.unexpected_keys == ["some.extra.weight"]
    assert "cls_token" not in report.missing_keys
    wide = create_model("star_tiny_pz8", embed_dim=256).state_dict()
    with pytest.raises(ValueError, match=r"pos_embed of shape \(1, 144, 256\)"):
        model.load_pretrained(wide, verbose=False)


def test_weights_leaving_a_run_carry_arm_names_and_load_back(tmp_path):
    """consolidate_run (hence `star export`) maps our in-memory names to ARM's at the boundary;
    read_weights hands such a file back and load_state_dict maps it home, strictly."""
    from star.train.weights import consolidate_run, read_weights

    torch.manual_seed(0)
    # the learned separator positions: the form whose state dict carries dec_sep_pos_embed
    learned = dict(sep_pos_embed="learned", dec_sep_pos_embed="learned")
    model = create_model("star_tiny_pz8", embed_dim=32, depth=4, decoder_dim=32, images_per_seq=2, **learned)
    tag = tmp_path / "checkpoints" / "step_000000003"
    tag.mkdir(parents=True)
    (tmp_path / "checkpoints" / "latest").write_text("step_000000003\n")
    torch.save({"module": model.state_dict(), "ema": model.state_dict()}, tag / "mp_rank_00_model_states.pt")
    state = consolidate_run(tmp_path, ema=True)
    assert list(state) == list(to_arm_state_dict(model.state_dict()))
    assert {"ar_token", "dec_sep_pos_embed", "enc2dec.weight", "dec_block.3.mlp.fc2.bias", "norm_1.weight",
            "ar_pred.weight"} <= set(state)
    torch.save(state, tmp_path / "model.pth")
    torch.manual_seed(1)
    other = create_model("star_tiny_pz8", embed_dim=32, depth=4, decoder_dim=32, images_per_seq=2, **learned)
    other.load_state_dict(read_weights(tmp_path / "model.pth"), strict=True)
    for name, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[name], value), name
