"""The pretraining model's outputs: loss definition, separator-free ARM geometry, and the
pixel-space reconstruction used for visualisation."""

from __future__ import annotations

import torch

from star.models import StarPretrainModel, create_model
from star.models.pretrain import IMAGE, SEPARATOR

SMALL = dict(img_size=24, patch_size=4, cluster_size=2, embed_dim=32, depth=2,
             decoder_dim=32, decoder_heads=4)


def test_loss_is_mse_over_predicted_tokens_and_shapes_follow_the_layout():
    torch.manual_seed(0)
    model = create_model("star_base_pz16", **SMALL, images_per_seq=3, sep_position="SCS",
                         sep_pos_embed="learned")
    assert isinstance(model, StarPretrainModel)
    out = model(torch.randn(6, 3, 24, 24))
    layout = model.layout
    assert out["pred"].shape == out["target"].shape == (2, layout.num_queries, 48)
    torch.testing.assert_close(out["loss"], ((out["pred"] - out["target"]) ** 2).mean())
    assert torch.equal(out["target_kind"], layout.targets.kind)
    out["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.packer.sep_pos_embed.grad.abs().sum() > 0  # separators reach the loss


def test_arm_tiny_predicts_8_of_9_clusters():
    torch.manual_seed(0)
    model = create_model("arm_tiny_pz8", embed_dim=32, depth=2, decoder_dim=32)
    out = model(torch.randn(2, 3, 96, 96))
    assert out["pred"].shape == (2, 8 * 16, 8 * 8 * 3)
    assert torch.all(out["target_kind"] == IMAGE)


def test_reconstruct_with_a_perfect_predictor_returns_the_images():
    torch.manual_seed(0)
    model = create_model("star_base_pz16", **SMALL, images_per_seq=2).eval()
    images = torch.randn(4, 3, 24, 24)
    real_forward = model.forward

    def perfect(x):
        out = real_forward(x)
        out["pred"] = out["target"]
        return out

    model.forward = perfect
    torch.testing.assert_close(model.reconstruct(images), images, rtol=1e-4, atol=1e-4)
    model.forward = real_forward
    recon = model.reconstruct(images)
    assert not torch.allclose(recon, images, atol=1e-2)  # an untrained model does not
    assert torch.any(model.layout.targets.kind == SEPARATOR)


def test_sincos_table_matches_mae_formula():
    from star.models.pos_embed import sincos_2d_table

    table = sincos_2d_table(8, 3)  # 4 channels per axis: 2 frequencies, sin then cos
    freqs = torch.tensor([1.0, 0.01])  # 1 / 10000 ** (i / 2)
    for r in range(3):
        for c in range(3):
            want = torch.cat([torch.sin(c * freqs), torch.cos(c * freqs),   # column first (MAE)
                              torch.sin(r * freqs), torch.cos(r * freqs)])
            torch.testing.assert_close(table[r * 3 + c], want)
