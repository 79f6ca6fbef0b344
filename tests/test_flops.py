"""Analytic FLOPs (star/flops.py) against counts by hand and against what PyTorch executes."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import star.ops.dispatch as dispatch
from star.flops import ATTENTION, CONV, LINEAR, SCAN, flops_for_name, model_flops
from star.models import create_model
from star.ops.reference import selective_scan_reference

# A pretraining model small enough to count by hand: 16 px images of 4 px patches (a 4 x 4
# grid of 2 x 2 clusters = 4 clusters of 4 tokens), N = 2 images with a 4-token cluster
# separator before each (SC): 10 clusters, T = 40 tokens; D = 8, 2 layers, d_state 4.
TINY_PRETRAIN = dict(img_size=16, patch_size=4, cluster_size=2, images_per_seq=2, embed_dim=8, depth=2,
                     decoder_dim=8, decoder_heads=2, d_state=4)
# A classifier: 8 px image, 4 px patches (2 x 2 grid) + tail class token = 5 tokens, 1 layer.
TINY_CLASSIFIER = dict(img_size=8, patch_size=4, embed_dim=8, depth=1, num_classes=3, d_state=4)


def test_pretrain_count_by_hand():
    T, Q, D, d_inner, dt_rank, N, hidden = 40, 40, 8, 8, 1, 4, 21  # hidden = int(8 * 8 / 3)
    # queries: clusters 1..9 (9 x 4 tokens) and the trailing separator (4) = 40; all 40 tokens feed the decoder
    patch_embed = 2 * (2 * 16) * (3 * 4 * 4) * D                       # 32 patches, 48 -> 8
    layer = (2 * T * D * 2 * d_inner                                   # in_proj
             + 2 * T * d_inner * 4                                     # conv1d, d_conv 4
             + 2 * T * d_inner * (dt_rank + 2 * N)                     # x_proj
             + 2 * T * dt_rank * d_inner                               # dt_proj
             + 9 * T * d_inner * N                                     # selective scan
             + 2 * T * d_inner * D                                     # out_proj
             + 2 * 2 * T * D * hidden + 2 * T * hidden * D)            # SwiGLU w1, w2, w3
    assert layer == 76160
    enc2dec = 2 * T * (4 * D) * (4 * 8)
    block = (2 * Q * 8 * 8 + 2 * T * 8 * 16                            # q, kv
             + 2 * 2 * Q * T * 8                                       # scores + weighted sum (mask counted)
             + 2 * Q * 8 * 8                                           # proj
             + 2 * Q * 8 * 32 * 2)                                     # fc1, fc2 (ratio 4)
    ar_pred = 2 * Q * 8 * 48
    by_hand = patch_embed + 2 * layer + enc2dec + 4 * block + ar_pred
    assert by_hand == 740096

    count = flops_for_name("star_tiny_pz8", **TINY_PRETRAIN)
    assert count.forward == by_hand
    assert count.by_kind()[SCAN] == 2 * 9 * T * d_inner * N
    assert count.by_kind()[ATTENTION] == 4 * 2 * 2 * Q * T * 8
    assert count.images == 2 and count.tokens == T
    assert count.forward_per_image == by_hand / 2
    assert count.training_per_image == 3 * by_hand / 2


def test_classifier_count_by_hand():
    T, D, N, hidden = 5, 8, 4, 21
    per_direction = 2 * T * D * 4 + 2 * T * D * (1 + 2 * N) + 2 * T * 1 * D + 9 * T * D * N
    by_hand = (2 * 4 * 48 * D                                          # patch embed, 4 patches
               + 2 * T * D * 2 * D + 4 * per_direction + 2 * T * D * D  # Mamba, 4 scans
               + 3 * 2 * T * D * hidden                                # SwiGLU
               + 2 * D * 3)                                            # head, class token only
    assert by_hand == 20320
    count = flops_for_name("star_tiny_pz8_ft", **TINY_CLASSIFIER)
    assert count.forward == by_hand
    assert count.images == 1 and count.tokens == T


@pytest.fixture
def sequential_scan(monkeypatch):
    """The torch scan uses a batched matmul for C . h; the reference is elementwise only, so
    PyTorch's counter then sees exactly the matmuls, convolutions and attention."""
    monkeypatch.setattr(dispatch, "selective_scan_torch", selective_scan_reference)


def _executed(model: nn.Module, images: torch.Tensor) -> dict[str, int]:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(images)
    return {str(op).split(".")[-1]: n for op, n in counter.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize("name, overrides, batch", [
    ("star_tiny_pz8", TINY_PRETRAIN, 2),
    ("arm_tiny_pz8", dict(TINY_PRETRAIN, images_per_seq=1), 1),  # encoder sees 3 of 4 clusters
    ("star_tiny_pz8", dict(TINY_PRETRAIN, sep_type="token", sep_position="SCS"), 2),
    ("star_tiny_pz8_ft", TINY_CLASSIFIER, 1),
    ("star_tiny_pz8_ft", dict(TINY_CLASSIFIER, cls_position="none"), 1),
])
def test_count_matches_executed_operations(sequential_scan, name, overrides, batch):
    torch.manual_seed(0)
    model = create_model(name, **overrides)
    count = model_flops(model)
    assert count.forward == flops_for_name(name, **overrides).forward
    size = overrides["img_size"]
    executed = _executed(model, torch.randn(batch, 3, size, size))
    kinds = count.by_kind()
    # every Linear (nn.Linear modules and the Mamba projections applied through their weights)
    assert executed.get("mm", 0) + executed.get("addmm", 0) == kinds[LINEAR]
    assert executed["convolution"] == kinds[CONV]
    assert executed.get("bmm", 0) == kinds.get(ATTENTION, 0)
    # one model input is one sequence (pretraining) or one image (fine-tuning)
    assert sum(executed.values()) == count.forward - kinds[SCAN]


@pytest.mark.parametrize("name, overrides, batch", [
    ("star_tiny_pz8", TINY_PRETRAIN, 4),
    ("star_tiny_pz8_ft", TINY_CLASSIFIER, 3),
])
def test_linear_part_equals_forward_hooks_on_the_real_modules(name, overrides, batch):
    """Forward hooks see how many tokens each Linear / Conv2d module really processes; the
    Mamba mixer applies its projections through their weights, so its own hook counts them
    (2 x weight entries per token of the mixer's input)."""
    from star.models.mamba import Mamba

    model = create_model(name, **overrides)
    seen = {"linear": 0, "patch_embed": 0}

    def linear_hook(module, inputs, output):
        seen["linear"] += 2 * module.weight.numel() * (inputs[0].numel() // module.in_features)

    def conv_hook(module, inputs, output):
        seen["patch_embed"] += 2 * module.weight.numel() * output[0, 0].numel() * output.shape[0]

    def mamba_hook(module, inputs, output):
        tokens = inputs[0].shape[0] * inputs[0].shape[1]
        seen["linear"] += sum(2 * m.weight.numel() * tokens for m in module.modules() if isinstance(m, nn.Linear))

    for module in model.modules():
        hook = {nn.Linear: linear_hook, nn.Conv2d: conv_hook, Mamba: mamba_hook}.get(type(module))
        if hook is not None:
            module.register_forward_hook(hook)
    size = overrides["img_size"]
    inputs = batch * (overrides.get("images_per_seq", 1) if "_ft" not in name else 1)
    with torch.no_grad():
        model(torch.randn(inputs, 3, size, size))
    count = model_flops(model)
    patch = sum(t.flops for t in count.terms if t.name == "patch_embed")
    assert seen["linear"] == batch * count.by_kind()[LINEAR]
    assert seen["patch_embed"] == batch * patch


def test_base_model_figures_are_consistent():
    star_b, arm_b = flops_for_name("star_base_pz16"), flops_for_name("arm_base_pz16")
    assert star_b.tokens == 1280 and star_b.tokens_per_image == 160
    assert arm_b.tokens == 128  # ARM's last cluster is only a target, never encoded
    # encoder Linears of MambaMLP-B: 2 x (in_proj + x_proj + dt_proj + out_proj + SwiGLU) per token
    d, h, r = 768, 2048, 48
    per_token = 2 * (d * 2 * d + d * (r + 32) + r * d + d * d + 3 * d * h)
    encoder = sum(t.flops for t in star_b.terms if t.name.startswith("layers.") and t.kind == LINEAR)
    assert encoder == 12 * 1280 * per_token
    assert star_b.training_per_image == pytest.approx(3 * star_b.forward / 8)


def test_unknown_model_type_is_refused():
    with pytest.raises(TypeError, match="no FLOP count for Linear"):
        model_flops(nn.Linear(2, 2))


def test_flops_table_command(capsys):
    from star.flops import main

    assert main(["star_base_pz16", "arm_base_pz16"]) == 0
    out = capsys.readouterr().out
    star_b = flops_for_name("star_base_pz16")
    assert f"{star_b.forward_per_image / 1e9:16.2f}" in out and "arm_base_pz16" in out
    with pytest.raises(SystemExit):
        main(["star_base"])
    assert "unknown model(s) star_base" in capsys.readouterr().err
