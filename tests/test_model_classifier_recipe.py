"""The fine-tuning model's ARM recipe options (docs/fidelity.md, section 3): global-pool
readout, drop-path schedule, head re-initialisation and the class token's position slot at load,
each against a reference written from ARM's Finetuning/ code, and the official fine-tuning
layout still loading strictly under every option."""

from __future__ import annotations

import pytest
import torch

from star.models import create_model, to_arm_state_dict

TINY = dict(embed_dim=32, depth=2, img_size=64)  # 8 x 8 = 64 patches of 8 px


def _norm_f_output(model, images):
    """The logits and the final norm's output (the whole sequence), captured by a hook."""
    seen = {}
    handle = model.norm_f.register_forward_hook(lambda mod, inp, out: seen.setdefault("x", out.detach()))
    logits = model(images)
    handle.remove()
    return logits, seen["x"]


@pytest.mark.parametrize("cls_position,index", [("middle", 32), ("tail", 64)])
def test_mean_patches_readout_is_the_mean_of_the_patch_tokens(cls_position, index):
    torch.manual_seed(0)
    model = create_model("star_tiny_pz8_ft", num_classes=5, cls_position=cls_position, readout="mean_patches",
                         **TINY).eval()
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        logits, x = _norm_f_output(model, images)
    assert x.shape[1] == 65  # the class token is still in the sequence
    patches = [i for i in range(65) if i != index]
    expected = x[:, patches].sum(dim=1) / 64 @ model.head.weight.T + model.head.bias
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-6)
    if cls_position == "middle":  # ARM's own formula: the mean of the two halves' means
        arm = (x[:, :index].mean(1) + x[:, index + 1:].mean(1)) / 2
        torch.testing.assert_close(logits, model.head(arm), rtol=1e-5, atol=1e-6)
    # the token readout of the same weights reads the class token's output instead
    token = create_model("star_tiny_pz8_ft", num_classes=5, cls_position=cls_position, **TINY).eval()
    token.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        token_logits, token_x = _norm_f_output(token, images)
    torch.testing.assert_close(token_x, x)
    torch.testing.assert_close(token_logits, model.head(x[:, index]), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(token_logits, logits, atol=1e-4)


def test_readout_choice_is_checked():
    with pytest.raises(ValueError, match="readout='global'.*token, mean_patches"):
        create_model("star_tiny_pz8_ft", readout="global")


@pytest.mark.parametrize("depth,rate", [(12, 0.1), (24, 0.3), (2, 0.2)])
def test_drop_path_rates_follow_arm_and_the_linspace_option(depth, rate):
    # ARM Finetuning/models_mamba.py: dpr = linspace(0, rate, depth); inter_dpr = [0.0] + dpr;
    # block i gets inter_dpr[i]
    dpr = [rate * k / (depth - 1) for k in range(depth)]
    arm = ([0.0] + dpr)[:depth]
    model = create_model("star_tiny_pz8_ft", embed_dim=16, depth=depth, img_size=32, drop_path=rate)
    assert [layer.drop_path.p for layer in model.layers] == pytest.approx(arm, abs=1e-7)
    assert model.layers[0].drop_path.p == model.layers[1].drop_path.p == 0.0
    assert model.layers[-1].drop_path.p == pytest.approx(rate * (depth - 2) / (depth - 1))
    ours = create_model("star_tiny_pz8_ft", embed_dim=16, depth=depth, img_size=32, drop_path=rate,
                        drop_path_schedule="linspace")
    assert [layer.drop_path.p for layer in ours.layers] == pytest.approx(dpr, abs=1e-7)


@pytest.mark.parametrize("name,cls_index", [("star_tiny_pz8_ft", 196), ("arm_tiny_pz8_ft", 98)])
def test_load_pretrained_zeroes_the_class_token_slot_and_reinitialises_the_head(name, cls_index):
    torch.manual_seed(0)
    pretrained = to_arm_state_dict(create_model(name.replace("_ft", "")).state_dict())
    model = create_model(name)  # 192 wide x 1000 classes: 192k head weights to measure the std on
    assert model.pos_embed[0, cls_index].abs().max() > 0  # its trunc-normal init before loading
    built_std = model.head.weight.std().item()
    assert built_std == pytest.approx(0.02, rel=0.05)  # ARM's segm_init_weights at construction
    report = model.load_pretrained(pretrained, verbose=False)
    # ARM Finetuning/util/pos_embed.py: torch.zeros inserted at the class token's index
    assert torch.equal(model.pos_embed[0, cls_index], torch.zeros(192))
    assert report.cls_slot_zeroed == cls_index and f"entry {cls_index} (the class token's) set to 0" in str(report)
    # ARM main_finetune.py: trunc_normal_(model.head.weight, std=2e-5) after loading
    assert model.head.weight.std().item() == pytest.approx(2e-5, rel=0.02)
    assert model.head.weight.mean().abs().item() < 1e-6
    assert torch.equal(model.head.bias, torch.zeros(1000))
    assert report.head_reset_std == 2e-5 and "head re-initialised" in str(report)
    # option: our first recipe's head scale
    other = create_model(name, head_init_std=0.02)
    other.load_pretrained(pretrained, verbose=False)
    assert other.head.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_a_checkpoint_with_a_head_keeps_it():
    torch.manual_seed(0)
    finetuned = create_model("star_tiny_pz8_ft", num_classes=7, **TINY)
    torch.manual_seed(1)
    model = create_model("star_tiny_pz8_ft", num_classes=7, **TINY)
    report = model.load_pretrained(finetuned.state_dict(), verbose=False)
    assert report.head_reset_std is None
    assert torch.equal(model.head.weight, finetuned.head.weight)
    assert torch.equal(model.pos_embed, finetuned.pos_embed)  # a full table is taken as it is


@pytest.mark.parametrize("options", [dict(readout="mean_patches"), dict(drop_path_schedule="linspace"),
                                     dict(head_init_std=0.02)])
def test_options_leave_the_official_finetuning_layout_unchanged(options):
    """ARM's fine-tuning state dict (arm_base_pz16 layout, checked key by key in
    test_model_checkpoint.py) loads strictly whatever the recipe options."""
    torch.manual_seed(0)
    reference = create_model("arm_tiny_pz8_ft").state_dict()
    model = create_model("arm_tiny_pz8_ft", **options)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in reference.items()}
    result = model.load_state_dict(reference, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
