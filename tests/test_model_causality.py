"""End-to-end causality of the pretraining model: encoder (token level) and decoder (cluster
level), for every separator type and position and several images per sequence."""

from __future__ import annotations

import itertools

import pytest
import torch

from star.models import StarPretrainModel, create_model
from star.models.pretrain import IMAGE

SMALL = dict(img_size=24, patch_size=4, cluster_size=2, embed_dim=32, depth=2,
             decoder_dim=32, decoder_heads=4)  # 6 x 6 patches, 3 x 3 clusters of 2 x 2


def small_model(**packing) -> StarPretrainModel:
    torch.manual_seed(0)
    return create_model("star_base_pz16", **SMALL, **packing).eval()


CASES = [dict(sep_type=t, sep_position=p, images_per_seq=2)
         for t, p in itertools.product(("cluster", "token", "none"), ("SC", "CS", "SCS", "CSC"))]
CASES += [dict(sep_type="cluster", sep_position="SC", images_per_seq=n) for n in (1, 3)]
CASES += [dict(sep_type="none", sep_position="SC", images_per_seq=n) for n in (1, 3)]
ids = [f"{c['sep_type']}-{c['sep_position']}-N{c['images_per_seq']}" for c in CASES]


@pytest.mark.parametrize("packing", CASES, ids=ids)
def test_encoder_output_before_t_ignores_tokens_from_t_on(packing):
    model = small_model(**packing)
    n = packing["images_per_seq"]
    images = torch.randn(2 * n, 3, 24, 24)
    seq = model.packer(model.patch_embed(images) + model.pos_embed)

    def encode(x):
        for layer in model.layers:
            x = layer(x)
        return x

    with torch.no_grad():
        base = encode(seq)
        length = seq.shape[1]
        for t in (1, length // 3, length - 5):
            perturbed = seq.clone()
            perturbed[:, t:] += torch.randn_like(perturbed[:, t:])
            out = encode(perturbed)
            torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-5)
            assert (out[:, t] - base[:, t]).abs().max() > 1e-3  # the probe can see a change


def _perturb_clusters_from(model: StarPretrainModel, images: torch.Tensor, first: int) -> torch.Tensor:
    """Add noise to the pixels of every image patch whose cluster id is >= ``first``."""
    layout, p, n = model.layout, model.packing.patch_size, model.packing.images_per_seq
    out = images.clone()
    for seq in range(images.shape[0] // n):
        for t in torch.nonzero((layout.tokens.kind == IMAGE) & (layout.tokens.cluster >= first)).flatten().tolist():
            img = seq * n + int(layout.tokens.image[t])
            r, c = int(layout.tokens.row[t]), int(layout.tokens.col[t])
            out[img, :, r * p:(r + 1) * p, c * p:(c + 1) * p] += torch.randn(3, p, p)
    return out


@pytest.mark.parametrize("packing", CASES, ids=ids)
def test_prediction_of_cluster_up_to_j_ignores_image_clusters_from_j_on(packing):
    model = small_model(**packing)
    layout = model.layout
    n = packing["images_per_seq"]
    images = torch.randn(2 * n, 3, 24, 24)
    with torch.no_grad():
        base = model(images)["pred"]
        image_clusters = torch.unique(layout.tokens.cluster[layout.tokens.kind == IMAGE]).tolist()
        for j in (image_clusters[1], image_clusters[len(image_clusters) // 2], image_clusters[-1]):
            pred = model(_perturb_clusters_from(model, images, j))["pred"]
            unchanged = layout.targets.cluster <= j
            torch.testing.assert_close(pred[:, unchanged], base[:, unchanged], rtol=0, atol=1e-5)
            # a query for cluster j + 1 sees cluster j, so it must change (the test can fail)
            sees_j = layout.targets.cluster == j + 1
            if sees_j.any():
                assert (pred[:, sees_j] - base[:, sees_j]).abs().max() > 1e-4
