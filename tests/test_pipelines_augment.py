"""Mixup / CutMix / label smoothing (star.train.mixup) and the crop geometry (pipelines.sampling)
against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.sampling import AugmentConfig, EpochPlan, eval_resize_crop, eval_roi, random_resized_crop, sample_params
from star.train.mixup import Mixup


def _batch():
    g = torch.Generator().manual_seed(0)
    return torch.rand(4, 3, 8, 8, generator=g), torch.tensor([0, 2, 1, 2])


def test_label_smoothing_alone_by_hand():
    images, labels = _batch()
    mix = Mixup(mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=3)
    out, targets = mix(images, labels)
    assert torch.equal(out, images)
    off, on = 0.1 / 3, 0.9 + 0.1 / 3
    expected = torch.tensor([[on, off, off], [off, off, on], [off, on, off], [off, off, on]])
    assert torch.allclose(targets, expected)


def test_mixup_by_hand():
    images, labels = _batch()
    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=3)
    out, targets = mix(images, labels, generator=torch.Generator().manual_seed(1))
    lam = mix.last.lam
    assert not mix.last.cutmix and 0 < lam < 1
    for i in range(4):
        j = 3 - i  # partner: the batch flipped
        assert torch.allclose(out[i], lam * images[i] + (1 - lam) * images[j])
        hand = torch.full((3,), 0.1 / 3)
        hand[labels[i]] += lam * 0.9
        hand[labels[j]] += (1 - lam) * 0.9
        assert torch.allclose(targets[i], hand)
    assert torch.allclose(targets.sum(1), torch.ones(4))


def test_cutmix_by_hand():
    images, labels = _batch()
    mix = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0, num_classes=3)
    for seed in range(20):  # until a non-empty box comes up
        out, targets = mix(images, labels, generator=torch.Generator().manual_seed(seed))
        y0, y1, x0, x1 = mix.last.box
        if (y1 - y0) * (x1 - x0) > 0:
            break
    inside = torch.zeros(8, 8, dtype=torch.bool)
    inside[y0:y1, x0:x1] = True
    for i in range(4):
        assert torch.equal(out[i][:, inside], images[3 - i][:, inside])
        assert torch.equal(out[i][:, ~inside], images[i][:, ~inside])
    kept = 1 - inside.float().mean().item()
    assert mix.last.lam == pytest.approx(kept)
    hand = torch.zeros(4, 3)
    for i in range(4):
        hand[i, labels[i]] += kept
        hand[i, labels[3 - i]] += 1 - kept
    assert torch.allclose(targets, hand)


def test_mixup_is_deterministic_and_switches_about_half_the_time():
    images, labels = _batch()
    mix = Mixup(num_classes=3)
    a = mix(images, labels, generator=torch.Generator().manual_seed(5))
    b = mix(images, labels, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    g = torch.Generator().manual_seed(0)
    cut = sum(mix.decide(8, 8, g).cutmix for _ in range(400))
    assert 150 < cut < 250  # switch_prob 0.5, binomial sd 10
    with pytest.raises(ValueError, match="mixup_alpha -1"):
        Mixup(mixup_alpha=-1)


def test_random_resized_crop_windows_respect_scale_and_ratio():
    rng = np.random.default_rng(0)
    for _ in range(200):
        w = int(rng.integers(40, 400))
        h = int(w * rng.uniform(0.6, 1.6))  # photo-like shapes: the ratio clamp rarely bites
        x, y, cw, ch = random_resized_crop(rng, w, h, (0.2, 1.0), (3 / 4, 4 / 3))
        assert 0 <= x and 0 <= y and x + cw <= w and y + ch <= h and cw > 0 and ch > 0
        # rounding of sides allows a little slack; the fallback crops to the ratio range
        assert 0.2 * 0.9 <= cw * ch / (w * h) <= 1.0
        assert 3 / 4 * 0.9 <= cw / ch <= 4 / 3 * 1.1


def test_eval_roi_is_the_centre_crop_of_the_resized_image():
    # 500 x 375 -> 341 x 256 (shorter side 256); the centre 224 starts at (58, 16) there
    assert eval_resize_crop(500, 375, 224, 0.875) == (341, 256, 58, 16)
    x0, y0, x1, y1 = eval_roi(500, 375, 341, 256, 58, 16, 224)
    assert (x0, y0) == pytest.approx((58 * 500 / 341, 16 * 375 / 256))
    assert (x1, y1) == pytest.approx(((58 + 224) * 500 / 341, (16 + 224) * 375 / 256))


def test_augmentation_decisions_depend_on_position_not_rank():
    cfg = AugmentConfig.for_mode("finetune", 224)
    a = sample_params(cfg, 0, 1, 17, 500, 375)
    b = sample_params(cfg, 0, 1, 17, 500, 375)
    c = sample_params(cfg, 0, 2, 17, 500, 375)
    assert a == b and a != c
    plan = EpochPlan(100, 4, 1, 2, seed=0, epoch=0, train=True)
    assert plan.positions(2).tolist() == [20, 21, 22, 23]  # step 2 of rank 1: 2*8 + 4 ..
