"""timm's RandAugment rand-m9-mstd0.5-inc1, pixel-mode random erasing and ARM's evaluation
resize, against references written from timm's and torchvision's definitions.

The references here are independent of ``pipelines``: timm's level -> argument table written
out by hand, draws from Python's ``random`` module the way timm makes them, PIL calls as timm
issues them, and a PIL resize + centre crop.
"""

from __future__ import annotations

import io
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from pipelines import build_loader, rand_augment
from pipelines.loader import erase_noise
from pipelines.sampling import IMAGENET_MEAN, IMAGENET_STD, AugmentConfig, EpochPlan, eval_resize_crop, sample_params
from pipelines.shards import ShardSet, jpeg_size
from tests.support.pipeline_fixtures import sample_jpeg, synthetic_jpeg, write_split

OPS = rand_augment.TIMM_OPS
N_DRAWS = 20000


def _sigma_ok(observed: float, expected: float, sd: float, k: float = 4.5) -> bool:
    return abs(observed - expected) <= k * sd


# ---------------------------------------------------------------- the op table
def test_op_set_is_timms_increasing_set():
    assert OPS == ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing",
                   "SolarizeIncreasing", "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing",
                   "BrightnessIncreasing", "SharpnessIncreasing", "ShearX", "ShearY",
                   "TranslateXRel", "TranslateYRel")


# timm's level -> argument functions evaluated by hand at magnitudes 0, 5, 9 and 10
# (level = m / 10; rotate 30 level deg, shear 0.3 level, translate 0.45 level, enhance
# 1 +- 0.9 level floored at 0.1, posterize 4 - int(4 level) bits, solarize 256 - int(256 level),
# solarize-add int(110 level)).
HAND = {
    "Rotate": {0: 0.0, 5: 15.0, 9: 27.0, 10: 30.0},
    "ShearX": {0: 0.0, 5: 0.15, 9: 0.27, 10: 0.3},
    "ShearY": {0: 0.0, 5: 0.15, 9: 0.27, 10: 0.3},
    "TranslateXRel": {0: 0.0, 5: 0.225, 9: 0.405, 10: 0.45},
    "TranslateYRel": {0: 0.0, 5: 0.225, 9: 0.405, 10: 0.45},
    "PosterizeIncreasing": {0: 4, 5: 2, 9: 1, 10: 0},
    "SolarizeIncreasing": {0: 256, 5: 128, 9: 26, 10: 0},
    "SolarizeAdd": {0: 0, 5: 55, 9: 99, 10: 110},
}


@pytest.mark.parametrize("name", sorted(HAND))
@pytest.mark.parametrize("m", [0, 5, 9, 10])
def test_op_arguments_at_fixed_magnitudes(name, m):
    op = OPS.index(name)
    expected = HAND[name][m]
    assert rand_augment.op_argument(op, float(m), False) == pytest.approx(expected)
    signed = name in rand_augment.GEOMETRIC
    assert rand_augment.op_argument(op, float(m), True) == pytest.approx(-expected if signed else expected)


@pytest.mark.parametrize("name", ["ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                                  "SharpnessIncreasing"])
def test_enhance_arguments_move_away_from_one(name):
    op = OPS.index(name)
    for m, up, down in ((0, 1.0, 1.0), (5, 1.45, 0.55), (9, 1.81, 0.19), (10, 1.9, 0.1)):
        assert rand_augment.op_argument(op, float(m), False) == pytest.approx(up)
        assert rand_augment.op_argument(op, float(m), True) == pytest.approx(down)


def test_fill_colour_is_timms_img_mean():
    assert rand_augment.fill_colour(IMAGENET_MEAN) == (124, 116, 104)


# ---------------------------------------------------------------- decisions over many draws
def _timm_reference_draws(n: int, seed: int) -> tuple[list, list, list, list]:
    """Per layer, the draws timm's RandAugment / AugmentOp make, with Python's random module:
    op = choice with replacement, skip if random() > 0.5, gauss(9, 0.5) clipped to [0, 10],
    negate if random() > 0.5."""
    r = random.Random(seed)
    ops, applied, mags, negate = [], [], [], []
    for _ in range(n):
        ops.append(r.randrange(len(OPS)))
        applied.append(not r.random() > 0.5)
        mags.append(max(0.0, min(r.gauss(9.0, 0.5), 10.0)))
        negate.append(r.random() > 0.5)
    return ops, applied, mags, negate


def _clipped_normal_moments(mu: float, sd: float, hi: float) -> tuple[float, float, float]:
    """Mean, sd and P(X = hi) of min(N(mu, sd), hi) (the lower clip at 0 is 18 sd away)."""
    a = (hi - mu) / sd
    phi = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + math.erf(a / math.sqrt(2)))
    tail = 1 - cdf
    # E[X; X < hi] and E[X^2; X < hi] for the normal, plus hi and hi^2 times the tail
    e1 = mu * cdf - sd * phi
    e2 = (mu * mu + sd * sd) * cdf - sd * (mu + hi) * phi
    mean = e1 + hi * tail
    second = e2 + hi * hi * tail
    return mean, math.sqrt(second - mean * mean), tail


@pytest.fixture(scope="module")
def draws():
    cfg = AugmentConfig.for_mode("finetune", 224)
    assert cfg.randaug == "timm" and cfg.erase_mode == "pixel"  # the defaults
    out = [sample_params(cfg, 3, 1, pos, 500, 375) for pos in range(N_DRAWS)]
    return cfg, out


def test_each_layer_runs_with_probability_one_half(draws):
    _, params = draws
    sd = math.sqrt(0.25 / N_DRAWS)
    for layer in range(2):
        applied = np.mean([p.ra_applied[layer] for p in params])
        assert _sigma_ok(applied, 0.5, sd), (layer, applied)
    # the two layers are independent: both run a quarter of the time
    both = np.mean([p.ra_applied[0] and p.ra_applied[1] for p in params])
    assert _sigma_ok(both, 0.25, math.sqrt(0.25 * 0.75 / N_DRAWS))


def test_ops_are_uniform_with_replacement(draws):
    _, params = draws
    ops = np.array([p.ra_ops for p in params])  # (N, 2)
    assert ops.shape == (N_DRAWS, 2)
    p_op = 1 / len(OPS)
    sd = math.sqrt(p_op * (1 - p_op) / (2 * N_DRAWS))
    for k in range(len(OPS)):
        assert _sigma_ok(np.mean(ops == k), p_op, sd), OPS[k]
    same = np.mean(ops[:, 0] == ops[:, 1])  # with replacement: the same op twice 1/15 of the time
    assert _sigma_ok(same, p_op, math.sqrt(p_op * (1 - p_op) / N_DRAWS))


def test_magnitudes_follow_the_clipped_normal(draws):
    _, params = draws
    mags = np.array([m for p in params for m in p.ra_mags])
    assert mags.min() >= 0.0 and mags.max() <= 10.0
    mean, sd, tail = _clipped_normal_moments(9.0, 0.5, 10.0)
    n = len(mags)
    assert _sigma_ok(mags.mean(), mean, sd / math.sqrt(n)), (mags.mean(), mean)
    assert abs(mags.std() - sd) < 0.02, (mags.std(), sd)  # sd of the sd estimate ~ 0.003
    assert _sigma_ok(np.mean(mags == 10.0), tail, math.sqrt(tail * (1 - tail) / n))
    # and against timm's own draws (Python's random), by the same statistics
    _, _, ref, _ = _timm_reference_draws(n, seed=11)
    ref = np.array(ref)
    assert abs(ref.mean() - mags.mean()) < 4.5 * sd * math.sqrt(2 / n)
    assert abs(ref.std() - mags.std()) < 0.02
    assert abs(np.mean(ref == 10.0) - np.mean(mags == 10.0)) < 4.5 * math.sqrt(2 * tail / n)


def test_signs_are_fair_and_arguments_follow_the_table(draws):
    _, params = draws
    signs = np.array([s for p in params for s in p.ra_signs])
    assert _sigma_ok(signs.mean(), 0.5, math.sqrt(0.25 / len(signs)))
    ref_ops, ref_applied, _, ref_neg = _timm_reference_draws(2 * N_DRAWS, seed=12)
    assert abs(np.mean(ref_applied) - np.mean([a for p in params for a in p.ra_applied])) < 0.02
    assert abs(np.mean(ref_neg) - signs.mean()) < 0.02
    for p in params[:500]:
        for op, mag, sign, arg in zip(p.ra_ops, p.ra_mags, p.ra_signs, p.ra_args):
            assert arg == rand_augment.op_argument(op, mag, bool(sign))


# ---------------------------------------------------------------- the PIL ops as timm calls them
def _image(seed: int = 0, size: int = 40) -> Image.Image:
    return Image.open(io.BytesIO(synthetic_jpeg(np.random.default_rng(seed), size, size))).convert("RGB")


def _timm_pil(img: Image.Image, name: str, arg: float, fill) -> Image.Image:
    """The PIL call timm's op makes with argument ``arg`` (bicubic, mean-colour fill)."""
    bicubic = Image.Resampling.BICUBIC
    affine = Image.Transform.AFFINE
    if name == "Rotate":
        return img.rotate(arg, resample=bicubic, fillcolor=fill)
    if name == "ShearX":
        return img.transform(img.size, affine, (1, arg, 0, 0, 1, 0), resample=bicubic, fillcolor=fill)
    if name == "ShearY":
        return img.transform(img.size, affine, (1, 0, 0, arg, 1, 0), resample=bicubic, fillcolor=fill)
    if name == "TranslateXRel":
        return img.transform(img.size, affine, (1, 0, arg * img.size[0], 0, 1, 0), resample=bicubic, fillcolor=fill)
    if name == "TranslateYRel":
        return img.transform(img.size, affine, (1, 0, 0, 0, 1, arg * img.size[1]), resample=bicubic, fillcolor=fill)
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Invert":
        return ImageOps.invert(img)
    if name == "PosterizeIncreasing":
        bits = int(arg)
        if bits == 0:  # ImageOps.posterize(img, 0) on older Pillow: every bit masked
            return Image.new("RGB", img.size, (0, 0, 0))
        return ImageOps.posterize(img, bits)
    if name == "SolarizeIncreasing":
        return ImageOps.solarize(img, int(arg))
    if name == "SolarizeAdd":
        arr = np.asarray(img).astype(int)
        return Image.fromarray(np.where(arr < 128, np.minimum(255, arr + int(arg)), arr).astype(np.uint8))
    enhancer = {"ColorIncreasing": ImageEnhance.Color, "ContrastIncreasing": ImageEnhance.Contrast,
                "BrightnessIncreasing": ImageEnhance.Brightness, "SharpnessIncreasing": ImageEnhance.Sharpness}
    return enhancer[name](img).enhance(arg)


@pytest.mark.parametrize("name", OPS)
def test_pil_ops_are_timms_calls(name):
    img = _image()
    fill = rand_augment.fill_colour(IMAGENET_MEAN)
    op = OPS.index(name)
    outputs = set()
    for m in (0.0, 4.3, 9.0, 10.0):
        for negate in (False, True):
            arg = rand_augment.op_argument(op, m, negate)
            ours = np.asarray(rand_augment.apply_pil(img, op, arg, fill))
            ref = np.asarray(_timm_pil(img, name, arg, fill))
            assert np.array_equal(ours, ref), (name, m, negate)
            outputs.add(ours.tobytes())
    if name not in ("AutoContrast", "Equalize", "Invert"):
        assert len(outputs) > 1, name  # the magnitude changes the result


# ---------------------------------------------------------------- random erasing
def _timm_erase_reference(n: int, size: int, seed: int) -> list[tuple[int, int] | None]:
    """timm's RandomErasing._erase with Python's random: (w, h) of the box, None if no box."""
    r = random.Random(seed)
    out = []
    log_ratio = (math.log(0.3), math.log(1 / 0.3))
    for _ in range(n):
        if r.random() > 0.25:
            out.append(None)
            continue
        box = None
        for _ in range(10):
            target = r.uniform(0.02, 1 / 3) * size * size
            aspect = math.exp(r.uniform(*log_ratio))
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if w < size and h < size:
                box = (w, h)
                break
        out.append(box)
    return out


def test_erasing_probability_and_box_distribution(draws):
    cfg, params = draws
    size = cfg.image_size
    ours = [(p.erase[2], p.erase[3]) if p.erase[2] else None for p in params]
    ref = _timm_erase_reference(N_DRAWS, size, seed=13)
    frac = np.mean([b is not None for b in ours])
    assert _sigma_ok(frac, 0.25, math.sqrt(0.25 * 0.75 / N_DRAWS)), frac
    assert abs(frac - np.mean([b is not None for b in ref])) < 4.5 * math.sqrt(2 * 0.25 * 0.75 / N_DRAWS)
    area = np.array([w * h / size**2 for w, h in filter(None, ours)])
    ref_area = np.array([w * h / size**2 for w, h in filter(None, ref)])
    assert abs(area.mean() - ref_area.mean()) < 0.01  # mean ~0.17, sd of the difference ~0.003
    assert abs(area.std() - ref_area.std()) < 0.01
    log_aspect = np.array([math.log(h / w) for w, h in filter(None, ours)])
    assert abs(log_aspect.mean()) < 0.05 and log_aspect.min() >= math.log(0.3) - 0.1
    for p in params[:2000]:
        x, y, w, h = p.erase
        assert 0 <= x and 0 <= y and x + w <= size and y + h <= size


def test_erase_noise_is_standard_normal_and_seeded():
    a = erase_noise(5, 40, 30, torch.device("cpu"))
    assert a.shape == (3, 40, 30) and a.dtype == torch.float32
    assert torch.equal(a, erase_noise(5, 40, 30, torch.device("cpu")))
    assert not torch.equal(a, erase_noise(6, 40, 30, torch.device("cpu")))
    big = erase_noise(7, 200, 200, torch.device("cpu"))
    assert abs(float(big.mean())) < 0.01 and abs(float(big.std()) - 1) < 0.01


# ---------------------------------------------------------------- loaders
NUM = 64


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ra_shards")
    write_split(out, "train", NUM, num_classes=5, per_shard=16, seed=1)
    write_split(out, "val", 12, num_classes=5, per_shard=12, seed=2)
    return out


def _loader(data_dir, mode, backend, **kw):
    split = "val" if mode == "eval" else "train"
    kw.setdefault("batch_size", 8)
    kw.setdefault("image_size", 64)
    return build_loader(mode, data_dir, split=split, backend=backend, num_threads=1, **kw)


def _params_of(data_dir, cfg: AugmentConfig, seed: int, epoch: int, batch_size: int):
    """The decisions of every sample of the epoch, recomputed from the plan (rank 0 of 1)."""
    plan = EpochPlan(NUM, batch_size, 0, 1, seed=seed, epoch=epoch, train=True)
    shards = ShardSet(data_dir, "train")
    out = []
    for step in range(plan.steps):
        pos, idx, _ = plan.samples(step)
        row = []
        for p, i in zip(pos, idx):
            w, h = jpeg_size(shards.read(int(i))[0])
            row.append(sample_params(cfg, seed, epoch, int(p), w, h))
        out.append(row)
    return out


def test_backends_apply_every_timm_op_alike(data_dir):
    """Same decisions in both backends; per sample the pixels differ by the resize and warp
    implementations only (DALI's warps are bilinear, its equalize follows OpenCV). A wrong
    op, argument or matrix in either backend moves the mean by tens of grey levels."""
    dali = list(_loader(data_dir, "finetune", "dali", seed=5, erase_prob=0.0).epoch(0))
    base = list(_loader(data_dir, "finetune", "baseline", seed=5, erase_prob=0.0).epoch(0))
    cfg = AugmentConfig.for_mode("finetune", 64, erase_prob=0.0)
    params = _params_of(data_dir, cfg, seed=5, epoch=0, batch_size=8)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    seen = set()
    for a, b, row in zip(dali, base, params, strict=True):
        assert torch.equal(a.indices, b.indices)
        for slot, p in enumerate(row):
            names = [OPS[o] for o, on in zip(p.ra_ops, p.ra_applied) if on]
            seen.update(names)
            diff = float(((a.images[slot] - b.images[slot]).abs() * std).mean()) * 255
            assert diff < (10.0 if "Equalize" in names else 3.5), (names, diff)
    assert seen == set(OPS)  # this seed exercises every op in both backends


@pytest.mark.parametrize("backend", ["dali", "baseline"])
def test_pixel_erasing_writes_the_seeded_noise(data_dir, backend):
    pixel = next(iter(_loader(data_dir, "finetune", backend, seed=2, erase_prob=1.0).epoch(0)))
    const = next(iter(_loader(data_dir, "finetune", backend, seed=2, erase_prob=1.0, erase_mode="const").epoch(0)))
    cfg = AugmentConfig.for_mode("finetune", 64, erase_prob=1.0)
    row = _params_of(data_dir, cfg, seed=2, epoch=0, batch_size=8)[0]
    noise = []
    assert sum(p.erase[2] > 0 for p in row) >= 6  # erase_prob 1: a box unless 10 tries fail
    for slot, p in enumerate(row):
        x, y, w, h = p.erase
        if not w:
            continue
        inside = torch.zeros(64, 64, dtype=torch.bool)
        inside[y : y + h, x : x + w] = True
        seeded = erase_noise(p.erase_seed, h, w, torch.device("cpu")).flatten(1)
        assert torch.equal(pixel.images[slot][:, inside], seeded)
        assert torch.equal(const.images[slot][:, inside], torch.zeros(3, int(inside.sum())))
        assert torch.equal(pixel.images[slot][:, ~inside], const.images[slot][:, ~inside])
        noise.append(pixel.images[slot][:, inside].flatten())
    noise = torch.cat(noise)
    assert abs(float(noise.mean())) < 0.05 and abs(float(noise.std()) - 1) < 0.05


def test_backends_erase_identically(data_dir):
    dali = next(iter(_loader(data_dir, "finetune", "dali", seed=4, erase_prob=1.0).epoch(0)))
    base = next(iter(_loader(data_dir, "finetune", "baseline", seed=4, erase_prob=1.0).epoch(0)))
    cfg = AugmentConfig.for_mode("finetune", 64, erase_prob=1.0)
    for slot, p in enumerate(_params_of(data_dir, cfg, seed=4, epoch=0, batch_size=8)[0]):
        x, y, w, h = p.erase
        assert torch.equal(dali.images[slot][:, y : y + h, x : x + w], base.images[slot][:, y : y + h, x : x + w])


def test_star_v1_rand_augment_stays_available(data_dir):
    cfg = AugmentConfig.for_mode("finetune", 64, randaug="star_v1")
    p = sample_params(cfg, 0, 0, 3, 100, 80)
    assert len(p.ra_bins) == 2 and not p.ra_applied and not p.ra_args  # both ops always run
    dali = next(iter(_loader(data_dir, "finetune", "dali", seed=5, erase_prob=0.0, randaug="star_v1").epoch(0)))
    base = next(iter(_loader(data_dir, "finetune", "baseline", seed=5, erase_prob=0.0, randaug="star_v1").epoch(0)))
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert float(((dali.images - base.images).abs() * std).mean(dim=(1, 2, 3)).median()) < 4 / 255


# ---------------------------------------------------------------- evaluation resize
def _pil_square_reference(jpeg: bytes, size: int) -> np.ndarray:
    """torchvision's Resize((s, s)) (bicubic) then CenterCrop(size), s = int(size / 0.875)."""
    img = Image.open(io.BytesIO(jpeg)).convert("RGB")
    s = int(size / 0.875)
    img = img.resize((s, s), Image.Resampling.BICUBIC)
    left = top = int(round((s - size) / 2))
    arr = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float32) / 255
    return ((arr - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)


def test_eval_resize_geometry():
    assert eval_resize_crop(500, 375, 224, 0.875) == (341, 256, 58, 16)  # ARM: shorter side
    assert eval_resize_crop(500, 375, 224, 0.875, "square") == (256, 256, 16, 16)
    assert AugmentConfig.for_mode("eval", 224).eval_resize == "shorter"


@pytest.mark.parametrize("backend,extra", [("dali", {"cpu_resize": "dali"}), ("dali", {"cpu_resize": "torch"}),
                                           ("baseline", {})])
def test_square_eval_matches_pil_reference(data_dir, backend, extra):
    size = 48
    batch = next(iter(_loader(data_dir, "eval", backend, image_size=size, batch_size=4, eval_resize="square",
                              **extra).epoch(0)))
    std = np.array(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)
    for slot in range(4):
        index = int(batch.indices[slot])
        ref = _pil_square_reference(sample_jpeg(data_dir, "val", f"val_{index:06d}"), size)
        diff = np.abs(batch.images[slot].numpy() - ref) * std
        assert diff.mean() < 2 / 255, (slot, diff.mean() * 255)
        assert np.percentile(diff, 99) < 12 / 255, (slot, np.percentile(diff, 99) * 255)


def test_bad_recipe_options_are_named(data_dir):
    for key, value in (("randaug", "rand-m9"), ("erase_mode", "rand"), ("eval_resize", "crop")):
        with pytest.raises(ValueError, match=f"{key} '{value}'"):
            build_loader("finetune", data_dir, split="train", batch_size=4, image_size=32, **{key: value})
