"""Packing: layout vs an independent construction from the paper's description, targets,
separator patterns, the decoder mask, and the embedded sequence."""

from __future__ import annotations

import itertools

import pytest
import torch

from star.models.pretrain import (
    IMAGE,
    SEP_POSITIONS,
    SEPARATOR,
    PackingConfig,
    SequencePacker,
    build_layout,
    cluster_priority_order,
)

# Per-image pattern of clusters, written as in the paper's Fig. 4 for a 3 x 3 cluster grid:
# S = separator, C = next image cluster in cluster-priority order.
PATTERNS = {"SC": "SCCCCCCCCC", "CS": "CCCCCCCCCS", "SCS": "SCCCSCCCSCCC", "CSC": "CCCSCCCSCCCS"}


def expected_clusters(cfg: PackingConfig):
    """Independent construction: list of clusters, each a list of token tuples
    ("img", n, row, col) or ("sep", n, slot_row, slot_col); plus the trailing-target flag."""
    g, k = cfg.grid, cfg.cluster_size
    assert g // k == 3, "patterns above are written for 3 x 3 clusters"
    pattern = PATTERNS[cfg.sep_position]
    if cfg.sep_type == "none":
        pattern = pattern.replace("S", "")
    # patches sorted by (cluster row, cluster col, row in cluster, col in cluster)
    patches = sorted(((r, c) for r in range(g) for c in range(g)),
                     key=lambda rc: (rc[0] // k, rc[1] // k, rc[0] % k, rc[1] % k))
    image_clusters = [patches[i * k * k:(i + 1) * k * k] for i in range(9)]
    slots = [(0, 0)] if cfg.sep_type == "token" else [(r, c) for r in range(k) for c in range(k)]
    clusters = []
    for n in range(cfg.images_per_seq):
        next_cluster = iter(image_clusters)
        for ch in pattern:
            if ch == "S":
                clusters.append([("sep", n, r, c) for r, c in slots])
            else:
                clusters.append([("img", n, r, c) for r, c in next(next_cluster)])
    trailing = [("sep", cfg.images_per_seq, r, c) for r, c in slots] if pattern[0] == "S" else None
    return clusters, trailing


CONFIGS = [
    PackingConfig(img_size=48, patch_size=4, cluster_size=4, images_per_seq=n,
                  sep_type=t, sep_value="identity", sep_position=pos)
    for t, pos, n in itertools.product(("none", "token", "cluster"), SEP_POSITIONS, (1, 2, 3))
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.sep_type}-{c.sep_position}-N{c.images_per_seq}")
def test_layout_matches_independent_construction(cfg):
    layout = build_layout(cfg)
    clusters, trailing = expected_clusters(cfg)
    tokens = [(cid, tok) for cid, cl in enumerate(clusters) for tok in cl]
    assert layout.seq_len == len(tokens)
    assert layout.num_clusters == len(clusters)
    for t, (cid, (kind, n, r, c)) in enumerate(tokens):
        assert int(layout.tokens.cluster[t]) == cid
        assert int(layout.tokens.kind[t]) == (IMAGE if kind == "img" else SEPARATOR)
        assert (int(layout.tokens.image[t]), int(layout.tokens.row[t]), int(layout.tokens.col[t])) == (n, r, c)

    # every cluster i predicts cluster i + 1; if the per-image pattern starts with a separator,
    # the last cluster predicts one more separator (the paper's c_{L*N+1} := c_sp)
    got = list(zip(layout.targets.cluster.tolist(), layout.targets.kind.tolist(), layout.targets.image.tolist(),
                   layout.targets.row.tolist(), layout.targets.col.tolist(), layout.target_token.tolist()))
    want = []
    offset = {cid: sum(len(x) for x in clusters[:cid]) for cid in range(len(clusters))}
    for cid in range(1, len(clusters)):
        for j, (kind, n, r, c) in enumerate(clusters[cid]):
            want.append((cid, IMAGE if kind == "img" else SEPARATOR, n, r, c, offset[cid] + j))
    if trailing is not None:
        want += [(len(clusters), SEPARATOR, n, r, c, -1) for _, n, r, c in trailing]
    assert got == want
    # the target token of each query is exactly a token of the next cluster
    inside = layout.target_token >= 0
    assert torch.equal(layout.tokens.cluster[layout.target_token[inside]], layout.targets.cluster[inside])


def test_star_default_sc_n8_has_1280_tokens_and_80_predicted_clusters():
    layout = build_layout(PackingConfig())  # 192 px, p 16, k 4, N 8, identity cluster, SC
    assert layout.seq_len == 1280
    assert layout.num_predicted_clusters == 80
    kinds = {}
    for cid in torch.unique(layout.targets.cluster).tolist():
        sel = layout.targets.cluster == cid
        kinds.setdefault(int(layout.targets.kind[sel][0]), []).append(int(layout.targets.image[sel][0]))
    assert sorted(kinds[IMAGE]) == sorted(list(range(8)) * 9)  # all 9 clusters of all 8 images
    assert kinds[SEPARATOR] == [1, 2, 3, 4, 5, 6, 7, 8]  # separators of images 2..8 + trailing
    assert layout.num_queries == 80 * 16


def test_arm_layout_first_cluster_is_context_only():
    layout = build_layout(PackingConfig(images_per_seq=1, sep_type="none"))
    assert layout.seq_len == 144 and layout.num_predicted_clusters == 8
    assert torch.equal(torch.unique(layout.targets.cluster), torch.arange(1, 9))
    assert layout.encoder_length == 128  # the last cluster predicts nothing, so ARM drops it
    # no separator, 4 images: image n+1's first cluster is predicted from image n's last
    layout4 = build_layout(PackingConfig(images_per_seq=4, sep_type="none"))
    assert layout4.num_predicted_clusters == 35
    first_of_image2 = (layout4.targets.image == 1) & (layout4.targets.row < 4) & (layout4.targets.col < 4)
    assert torch.all(layout4.targets.cluster[first_of_image2] == 9)


def test_cluster_priority_order():
    order = cluster_priority_order(4, 2).tolist()
    assert order == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]


@pytest.mark.parametrize("cfg", [CONFIGS[i] for i in (5, 14, 20, 35)],
                         ids=lambda c: f"{c.sep_type}-{c.sep_position}-N{c.images_per_seq}")
def test_mask_matches_brute_force_definition(cfg):
    layout = build_layout(cfg)
    clusters, trailing = expected_clusters(cfg)
    token_cluster = [cid for cid, cl in enumerate(clusters) for _ in cl]
    query_cluster = [cid for cid in range(1, len(clusters)) for _ in clusters[cid]]
    query_cluster += [len(clusters)] * (len(trailing) if trailing else 0)
    mask = layout.attention_mask()
    assert mask.shape == (len(query_cluster), layout.encoder_length)
    for q, j in enumerate(query_cluster):
        for t in range(layout.encoder_length):
            # a query predicting a token of cluster j sees exactly the tokens of clusters 0..j-1
            assert bool(mask[q, t]) == (token_cluster[t] <= j - 1)
    # keys beyond encoder_length are seen by no query
    assert all(token_cluster[t] >= max(query_cluster) for t in range(layout.encoder_length, layout.seq_len))


def _manual_norm_pix(image: torch.Tensor, r: int, c: int, p: int) -> torch.Tensor:
    patch = image[:, r * p:(r + 1) * p, c * p:(c + 1) * p]  # (3, p, p)
    values = patch.permute(1, 2, 0).reshape(-1)  # (py, px, channel), as MAE's patchify
    mean = values.mean()
    var = ((values - mean) ** 2).sum() / (values.numel() - 1)
    return (values - mean) / torch.sqrt(var + 1e-6)


@pytest.mark.parametrize("sep_type,sep_value", [("cluster", "identity"), ("cluster", "zeros"),
                                                ("cluster", "ones"), ("cluster", "embedding"),
                                                ("token", "identity"), ("token", "ones"), ("none", "zeros")])
def test_targets_and_embedded_sequence(sep_type, sep_value):
    cfg = PackingConfig(img_size=24, patch_size=4, cluster_size=2, images_per_seq=2,
                        sep_type=sep_type, sep_value=sep_value, sep_position="SC")
    dim, b, g, p, k = 8, 2, cfg.grid, cfg.patch_size, cfg.cluster_size
    torch.manual_seed(0)
    packer = SequencePacker(cfg, dim)
    layout = packer.layout
    images = torch.randn(b * cfg.images_per_seq, 3, cfg.img_size, cfg.img_size)
    tokens = torch.randn(b * cfg.images_per_seq, g * g, dim)
    seq = packer(tokens)
    targets = packer.targets(images)
    assert seq.shape == (b, layout.seq_len, dim)
    assert targets.shape == (b, layout.num_queries, 3 * p * p)
    for s in range(b):
        for t in range(layout.seq_len):
            n, r, c = int(layout.tokens.image[t]), int(layout.tokens.row[t]), int(layout.tokens.col[t])
            if layout.tokens.kind[t] == IMAGE:
                torch.testing.assert_close(seq[s, t], tokens[s * cfg.images_per_seq + n, r * g + c])
            else:
                if sep_value == "identity":
                    value = torch.full((dim,), 1.0 if r == c else 0.0)
                elif sep_value == "ones":
                    value = torch.ones(dim)
                elif sep_value == "zeros":
                    value = torch.zeros(dim)
                else:
                    value = packer.sep_embed.weight[0]
                # every separator token carries the one shared separator position embedding
                torch.testing.assert_close(seq[s, t], value + packer.sep_pos_embed[0, 0])
        for q in range(layout.num_queries):
            n, r, c = int(layout.targets.image[q]), int(layout.targets.row[q]), int(layout.targets.col[q])
            if layout.targets.kind[q] == IMAGE:
                want = _manual_norm_pix(images[s * cfg.images_per_seq + n], r, c, p)
            elif sep_value in ("identity",):
                want = torch.full((3 * p * p,), 1.0 if r == c else 0.0)
            elif sep_value == "ones":
                want = torch.ones(3 * p * p)
            else:  # zeros, and the learned embedding has no pixel meaning: zeros pattern
                want = torch.zeros(3 * p * p)
            torch.testing.assert_close(targets[s, q], want, rtol=1e-4, atol=1e-5)
    if sep_type == "cluster" and sep_value == "identity":
        sep_tokens = layout.tokens.kind == SEPARATOR
        diag = (layout.tokens.row == layout.tokens.col) & sep_tokens
        assert int(diag.sum()) == k * cfg.images_per_seq  # k diagonal slots per separator


def test_bad_configuration_errors_name_the_value():
    with pytest.raises(ValueError, match="sep_position='XS'"):
        PackingConfig(sep_position="XS")
    with pytest.raises(ValueError, match="cluster_size=5"):
        PackingConfig(cluster_size=5)
    packer = SequencePacker(PackingConfig(img_size=24, patch_size=4, cluster_size=2, images_per_seq=3), 8)
    with pytest.raises(ValueError, match="images_per_seq=3"):
        packer(torch.zeros(4, 36, 8))


def test_pattern_strings_read_like_the_paper():
    def pattern(pos, t="cluster", n=2):
        return build_layout(PackingConfig(sep_position=pos, sep_type=t, images_per_seq=n)).pattern()

    assert pattern("SC") == "SCCCCCCCCC SCCCCCCCCC"
    assert pattern("CS") == "CCCCCCCCCS CCCCCCCCCS"
    assert pattern("SCS") == "SCCCSCCCSCCC SCCCSCCCSCCC"
    assert pattern("CSC") == "CCCSCCCSCCCS CCCSCCCSCCCS"
    assert pattern("SC", "none") == "CCCCCCCCC CCCCCCCCC"
