"""Loaders (DALI and baseline) against independent references: PIL, tarfile, plain sets."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import CorruptSampleError, build_loader
from pipelines.sampling import IMAGENET_MEAN, IMAGENET_STD, RAND_AUGMENT_OPS
from tests.support.pipeline_fixtures import sample_jpeg, synthetic_jpeg, write_split

BACKENDS = ["dali", "baseline"]
# the DALI graph as on GPU (DALI resizes) and the CPU fast path (torch resizes)
DALI_RESIZE = [("dali", {"cpu_resize": "dali"}), ("dali", {"cpu_resize": "torch"}), ("baseline", {})]
NUM_TRAIN, NUM_VAL, NUM_CLASSES = 40, 23, 5  # 23: does not divide into 2 ranks x 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_split(out, "train", NUM_TRAIN, num_classes=NUM_CLASSES, per_shard=16, seed=1)
    write_split(out, "val", NUM_VAL, num_classes=NUM_CLASSES, per_shard=10, seed=2)
    return out


def _loader(data_dir, mode, backend, **kw):
    split = "val" if mode == "eval" else "train"
    kw.setdefault("batch_size", 4)
    kw.setdefault("image_size", 32)
    return build_loader(mode, data_dir, split=split, backend=backend, num_threads=1, **kw)


def _same(a, b) -> bool:
    return (len(a) == len(b) and all(torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
                                     and torch.equal(x.valid, y.valid) for x, y in zip(a, b)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode,dtype", [("pretrain", torch.bfloat16), ("finetune", torch.float32),
                                        ("eval", torch.float32)])
def test_shapes_dtypes_and_ranges(data_dir, backend, mode, dtype):
    # erased boxes hold unbounded normal noise in the default "pixel" mode (tested below)
    extra = {"erase_mode": "const"} if mode == "finetune" else {}
    loader = _loader(data_dir, mode, backend, dtype=dtype, **extra)
    batches = list(loader.epoch(0))
    expected_steps = NUM_TRAIN // 4 if mode != "eval" else -(-NUM_VAL // 4)
    assert loader.steps_per_epoch == expected_steps == len(batches)
    lo = min((0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)) - 0.02
    hi = max((1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)) + 0.02
    for b in batches:
        assert b.images.shape == (4, 3, 32, 32) and b.images.dtype == dtype
        assert b.labels.dtype == torch.int64 and b.valid.dtype == torch.bool
        assert lo <= float(b.images.min()) and float(b.images.max()) <= hi
        assert float(b.images.float().std()) > 0.1  # real pixels, not a constant
        assert ((b.labels >= 0) & (b.labels < NUM_CLASSES)).all()
        # labels agree with the .cls members (the fixture writes class = sample number % K)
        assert torch.equal(b.labels, b.indices % NUM_CLASSES)
    if mode != "eval":
        assert all(b.valid.all() for b in batches)


def _pil_eval_reference(jpeg: bytes, size: int) -> np.ndarray:
    """torchvision's eval transform by hand: shorter side to size/0.875 (bicubic), centre crop."""
    img = Image.open(io.BytesIO(jpeg)).convert("RGB")
    w, h = img.size
    short = int(size / 0.875)
    new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = int(round((new_w - size) / 2)), int(round((new_h - size) / 2))
    arr = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.float32) / 255
    return ((arr - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)


@pytest.mark.parametrize("backend,extra", DALI_RESIZE)
def test_eval_matches_pil_reference(data_dir, backend, extra):
    """Tolerance: mean |diff| under 2/255 and 99th percentile under 12/255 of the pixel range.
    The loader resizes only the crop window (integer source pixels), the reference the whole
    image and then crops, so edge pixels and sub-pixel alignment differ slightly."""
    size = 48
    batch = next(iter(_loader(data_dir, "eval", backend, image_size=size, **extra).epoch(0)))
    std = np.array(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)
    for slot in range(4):
        index = int(batch.indices[slot])
        ref = _pil_eval_reference(sample_jpeg(data_dir, "val", f"val_{index:06d}"), size)
        diff = np.abs(batch.images[slot].numpy() - ref) * std  # back to [0, 1] pixel units
        assert diff.mean() < 2 / 255, (slot, diff.mean() * 255)
        assert np.percentile(diff, 99) < 12 / 255, (slot, np.percentile(diff, 99) * 255)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_covers_every_sample_exactly_once_on_two_ranks(data_dir, backend):
    seen: list[int] = []
    steps = []
    for rank in range(2):
        loader = _loader(data_dir, "eval", backend, rank=rank, world_size=2)
        batches = list(loader.epoch(0))
        steps.append(len(batches))
        for b in batches:
            seen += b.indices[b.valid].tolist()
    assert steps[0] == steps[1] == loader.steps_per_epoch == 3  # ceil(23 / 8)
    assert sorted(seen) == list(range(NUM_VAL))  # every sample once, padding never valid


def test_training_ranks_are_disjoint_and_epochs_reshuffle(data_dir):
    per_rank = [[i for b in _loader(data_dir, "pretrain", "baseline", rank=r, world_size=2).epoch(3)
                 for i in b.indices.tolist()] for r in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1])
    assert len(per_rank[0]) + len(per_rank[1]) == NUM_TRAIN  # 40 = 5 steps x 2 ranks x 4
    epoch4 = [i for b in _loader(data_dir, "pretrain", "baseline", rank=0, world_size=2).epoch(4)
              for i in b.indices.tolist()]
    assert epoch4 != per_rank[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_fixed_seed_is_deterministic(data_dir, backend):
    first = list(_loader(data_dir, "pretrain", backend, seed=7).epoch(2))
    again = list(_loader(data_dir, "pretrain", backend, seed=7).epoch(2))
    other = list(_loader(data_dir, "pretrain", backend, seed=8).epoch(2))
    assert _same(first, again)
    assert not _same(first, other)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["pretrain", "finetune"])
def test_resume_at_step_k_matches_uninterrupted_run(data_dir, backend, mode):
    loader = _loader(data_dir, mode, backend, seed=3)
    uninterrupted = list(loader.epoch(1))
    for i, _ in enumerate(loader.epoch(1)):  # an interrupted epoch on the same loader
        if i == 1:
            break
    resumed_same = list(loader.epoch(1, start_step=3))
    resumed_fresh = list(_loader(data_dir, mode, backend, seed=3).epoch(1, start_step=3))
    assert len(uninterrupted) == NUM_TRAIN // 4
    assert _same(uninterrupted[3:], resumed_same)
    assert _same(uninterrupted[3:], resumed_fresh)


@pytest.mark.parametrize("cpu_resize", ["dali", "torch"])
@pytest.mark.parametrize("mode", ["pretrain", "eval"])
def test_backends_make_the_same_batches(data_dir, mode, cpu_resize):
    """Same samples, labels and decisions; pixels differ only by the resize implementations."""
    dali = list(_loader(data_dir, mode, "dali", seed=5, cpu_resize=cpu_resize).epoch(0))
    base = list(_loader(data_dir, mode, "baseline", seed=5).epoch(0))
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for a, b in zip(dali, base, strict=True):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.labels, b.labels)
        assert float(((a.images - b.images).abs() * std).mean()) < 1.5 / 255


def test_finetune_backends_agree_on_rand_augment(data_dir):
    """Geometric and colour ops line up; DALI's equalize follows OpenCV, so allow a margin."""
    dali = next(iter(_loader(data_dir, "finetune", "dali", seed=5, erase_prob=0.0).epoch(0)))
    base = next(iter(_loader(data_dir, "finetune", "baseline", seed=5, erase_prob=0.0).epoch(0)))
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    per_sample = ((dali.images - base.images).abs() * std).mean(dim=(1, 2, 3))
    assert float(per_sample.median()) < 4 / 255


def test_rand_augment_table_matches_dalis_suite():
    from nvidia.dali.auto_aug import rand_augment

    suite = rand_augment.get_rand_augment_suite(use_shape=True)
    assert [a.name for a in suite] == [name for name, _, _ in RAND_AUGMENT_OPS]
    for aug, (_, mag_range, negate) in zip(suite, RAND_AUGMENT_OPS):
        if aug.mag_range is not None:
            assert np.allclose(aug.mag_range, mag_range) and bool(aug.randomly_negate) == negate


def test_random_erasing_zeroes_a_box(data_dir):
    loader = _loader(data_dir, "finetune", "baseline", seed=0, erase_prob=1.0, rand_augment_n=0,
                     erase_mode="const")
    batch = next(iter(loader.epoch(0)))
    zero_cols = (batch.images == 0).all(dim=1)  # (B, H, W): erased pixels are exactly 0 in all channels
    assert all(int(z.sum()) >= 0.02 * 32 * 32 * 0.5 for z in zero_cols)


@pytest.fixture(scope="module")
def corrupt_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corrupt")
    good = synthetic_jpeg(np.random.default_rng(0), 90, 70)
    sos = good.index(b"\xff\xda")
    write_split(out, "train", 16, num_classes=NUM_CLASSES, per_shard=8, seed=4,
                corrupt={5: b"this is not a jpeg", 11: good[: sos + 40]})  # garbage; truncated scan
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_sample_is_named(corrupt_dir, backend):
    loader = _loader(corrupt_dir, "pretrain", backend, batch_size=16)
    with pytest.raises(CorruptSampleError) as info:
        list(loader.epoch(0))
    message = str(info.value)
    assert "train-000000.tar" in message and "train_000005" in message
    assert info.value.shard == "train-000000.tar"


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_samples_are_skipped_and_counted(corrupt_dir, backend):
    loader = _loader(corrupt_dir, "pretrain", backend, batch_size=4, on_corrupt="skip")
    batches = list(loader.epoch(0))
    assert len(batches) == 4  # nothing hangs, no step lost
    invalid = sorted(int(i) for b in batches for i in b.indices[~b.valid])
    assert invalid == [5, 11]
    stats = loader.stats()
    assert stats["skipped_corrupt"] == 2
    assert any("train-000000.tar:train_000005" in s for s in stats["corrupt_samples"])
    assert any("train-000001.tar:train_000011" in s for s in stats["corrupt_samples"])


def test_bad_arguments_are_named(data_dir):
    with pytest.raises(ValueError, match="mode 'pretrian'"):
        build_loader("pretrian", data_dir, split="train", batch_size=4, image_size=32)
    with pytest.raises(ValueError, match="backend 'torch'"):
        build_loader("pretrain", data_dir, split="train", batch_size=4, image_size=32, backend="torch")
    with pytest.raises(FileNotFoundError, match="star shard"):
        build_loader("eval", data_dir / "nope", split="val", batch_size=4, image_size=32)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        build_loader("pretrain", data_dir, split="train", batch_size=64, image_size=32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reading_batches_leaves_the_global_random_stream_alone(data_dir, backend):
    # Drop path draws from torch's global generator in the training process; a loader that drew
    # from it (the DataLoader's worker seed) would make a resumed run diverge from an
    # uninterrupted one, whose loader started at another point of that stream.
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    loader = _loader(data_dir, "finetune", backend, batch_size=8)
    for _ in loader.epoch(0):
        pass
    next(iter(loader.epoch(1)))
    assert torch.equal(torch.rand(4), expected)
