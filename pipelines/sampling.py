"""Which samples each rank sees at each step, and every random augmentation decision.

Why the loaders compute this in Python instead of using DALI's webdataset reader:
DALI's reader splits the concatenated sample list into one contiguous range per rank and
only shuffles inside a buffer, and its random operators keep internal RNG state. That makes
(a) the order depend on the shard layout, (b) resuming at step k of epoch e need a saved
pipeline checkpoint, and (c) the baseline impossible to match. Here instead

* the epoch order is a full permutation drawn from (seed, epoch): a true global shuffle;
* global step s covers positions [s*W*B, (s+1)*W*B) of that order, rank r the r-th slice of B;
* every random decision for the sample at position p (crop window, flip, RandAugment ops
  and magnitudes, erasing box) comes from a generator seeded by (seed, epoch, p).

So a batch is a pure function of (seed, epoch, step, rank): ``loader.epoch(e, start_step=k)``
yields exactly what an uninterrupted iterator yields from step k on, without saved state, and
the DALI and baseline backends make identical decisions. The DALI graph receives the JPEG
bytes and these parameters through ``external_source`` and does the decoding and pixel work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from pipelines import rand_augment

# The "star_v1" RandAugment (``randaug: star_v1``): DALI's RandAugment suite
# (nvidia.dali.auto_aug.rand_augment.get_rand_augment_suite with image shapes), in its order:
# name, magnitude range, whether the sign is random.
RAND_AUGMENT_OPS: tuple[tuple[str, tuple[float, float], bool], ...] = (
    ("translate_x", (0.0, 100 / 224), True),
    ("translate_y", (0.0, 100 / 224), True),
    ("shear_x", (0.0, 0.3), True),
    ("shear_y", (0.0, 0.3), True),
    ("rotate", (0.0, 30.0), True),
    ("brightness", (0.0, 0.9), True),
    ("contrast", (0.0, 0.9), True),
    ("color", (0.0, 0.9), True),
    ("sharpness", (0.0, 0.9), True),
    ("posterize", (8.0, 4.0), False),  # bits kept: 8 (none removed) down to 4
    ("solarize", (256.0, 0.0), False),
    ("equalize", (0.0, 0.0), False),
    ("auto_contrast", (0.0, 0.0), False),
    ("identity", (0.0, 0.0), False),
)
# timm's magnitude scale is 0..10 ("m9"); bins of 0.1 on that scale keep the Gaussian noise
# (mstd) meaningful while DALI's augmentations take integer bins.
MAGNITUDE_BINS = 101
MAGNITUDE_MAX = 10.0

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class AugmentConfig:
    """Per-mode augmentation settings; defaults follow ARM's fine-tuning recipe (docs/fidelity.md).

    ``randaug``: "timm" (timm's rand-m9-mstd0.5-inc1, ``pipelines.rand_augment``) or "star_v1"
    (DALI's suite, both ops always applied; our first recipe). ``erase_mode``: "pixel" (timm's
    per-pixel normal noise in normalised space, ARM's ``--remode pixel``) or "const" (zeros).
    ``eval_resize``: "shorter" (shorter side to size / crop_pct keeping the aspect ratio, as
    ARM's ``transforms.Resize(int)``) or "square" (both sides to size / crop_pct).
    """

    mode: str  # "pretrain" | "finetune" | "eval"
    image_size: int
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    rand_augment_n: int = 2
    rand_augment_m: float = 9.0
    rand_augment_mstd: float = 0.5
    erase_prob: float = 0.25
    erase_area: tuple[float, float] = (0.02, 1 / 3)
    erase_ratio: tuple[float, float] = (0.3, 1 / 0.3)
    eval_crop_pct: float = 0.875
    interpolation: str = "cubic"  # "cubic" | "linear"
    randaug: str = "timm"  # "timm" | "star_v1"
    erase_mode: str = "pixel"  # "pixel" | "const"
    eval_resize: str = "shorter"  # "shorter" | "square"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @staticmethod
    def for_mode(mode: str, image_size: int, **overrides) -> AugmentConfig:
        if mode not in ("pretrain", "finetune", "eval"):
            raise ValueError(f"mode {mode!r}: expected 'pretrain', 'finetune' or 'eval'")
        if image_size <= 0:
            raise ValueError(f"image_size {image_size}: must be a positive number of pixels")
        defaults: dict = {"pretrain": {"scale": (0.2, 1.0)}, "finetune": {"scale": (0.08, 1.0)},
                          "eval": {}}[mode]
        defaults.update({k: v for k, v in overrides.items() if v is not None})
        for key, allowed in (("interpolation", ("cubic", "linear")), ("randaug", ("timm", "star_v1")),
                             ("erase_mode", ("pixel", "const")), ("eval_resize", ("shorter", "square"))):
            if key in defaults and defaults[key] not in allowed:
                raise ValueError(f"{key} {defaults[key]!r}: use " + " or ".join(repr(a) for a in allowed))
        return AugmentConfig(mode=mode, image_size=image_size, **defaults)

    @property
    def train(self) -> bool:
        return self.mode != "eval"

    @property
    def rand_augment(self) -> bool:
        return self.mode == "finetune" and self.rand_augment_n > 0

    @property
    def random_erasing(self) -> bool:
        return self.mode == "finetune" and self.erase_prob > 0


@dataclass
class SampleParams:
    """Every decision for one sample: source window (x, y, w, h), flip, RandAugment, erasing."""

    window: tuple[int, int, int, int]  # decoded region, integer source pixels
    roi: tuple[float, float, float, float] | None = None  # (x0, y0, x1, y1) resized, in the window; None: all
    # the same box as "resize the window to (w, h), crop S x S at (left, top)"; None: resize to S x S
    resize_crop: tuple[int, int, int, int] | None = None
    flip: bool = False
    # RandAugment, one entry per layer. ra_ops index rand_augment.TIMM_OPS ("timm") or
    # RAND_AUGMENT_OPS ("star_v1"); "timm" also fills ra_applied, ra_mags and ra_args,
    # "star_v1" fills ra_bins (it always applies every layer).
    ra_ops: list[int] = field(default_factory=list)
    ra_bins: list[int] = field(default_factory=list)  # magnitude bins in [0, MAGNITUDE_BINS)
    ra_signs: list[int] = field(default_factory=list)  # 1 = negate the magnitude
    ra_applied: list[bool] = field(default_factory=list)  # timm: the op ran (probability 0.5)
    ra_mags: list[float] = field(default_factory=list)  # timm: magnitude, normal(m, mstd) clipped to [0, 10]
    ra_args: list[float] = field(default_factory=list)  # timm: the op's argument (rand_augment.op_argument)
    erase: tuple[int, int, int, int] = (0, 0, 0, 0)  # (x, y, w, h) in output pixels; w=0: none
    erase_seed: int = 0  # seeds the per-pixel noise of erase_mode "pixel"


class EpochPlan:
    """Sample order and batch layout of one epoch for one rank."""

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int,
                 seed: int, epoch: int, train: bool):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} / world_size {world_size}: need 0 <= rank < world_size")
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size}: must be at least 1")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size, self.seed, self.epoch, self.train = rank, world_size, seed, epoch, train
        global_batch = batch_size * world_size
        if train:
            # Drop the incomplete last global batch (a different remainder each epoch).
            self.steps = num_samples // global_batch
            if self.steps == 0:
                raise ValueError(f"{num_samples} samples are fewer than one global batch "
                                 f"({batch_size} x {world_size} ranks): lower batch_size")
            self.order = np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_samples)
        else:
            # Every sample exactly once: pad the last global batch, mark padding invalid.
            self.steps = math.ceil(num_samples / global_batch)
            self.order = np.arange(num_samples)

    def positions(self, step: int) -> np.ndarray:
        start = step * self.batch_size * self.world_size + self.rank * self.batch_size
        return np.arange(start, start + self.batch_size)

    def samples(self, step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(positions, sample indices, valid mask); padding repeats the last sample."""
        if not 0 <= step < self.steps:
            raise IndexError(f"step {step} outside [0, {self.steps}) of epoch {self.epoch}")
        pos = self.positions(step)
        valid = pos < self.num_samples
        return pos, self.order[np.minimum(pos, self.num_samples - 1)], valid


def sample_params(cfg: AugmentConfig, seed: int, epoch: int, position: int,
                  width: int, height: int) -> SampleParams:
    """All augmentation decisions for the sample at ``position`` of epoch ``epoch``."""
    if not cfg.train:
        resize_crop = eval_resize_crop(width, height, cfg.image_size, cfg.eval_crop_pct, cfg.eval_resize)
        return SampleParams(window=(0, 0, width, height), roi=eval_roi(width, height, *resize_crop, cfg.image_size),
                            resize_crop=resize_crop)
    rng = np.random.default_rng([seed, epoch, position])
    params = SampleParams(window=random_resized_crop(rng, width, height, cfg.scale, cfg.ratio))
    params.flip = bool(rng.random() < cfg.hflip)
    if cfg.rand_augment and cfg.randaug == "timm":
        ops, applied, mags, negate = rand_augment.draw(rng, cfg.rand_augment_n, cfg.rand_augment_m,
                                                       cfg.rand_augment_mstd)
        params.ra_ops, params.ra_applied, params.ra_mags = ops, applied, mags
        params.ra_signs = [int(x) for x in negate]
        params.ra_args = [rand_augment.op_argument(o, m, s) for o, m, s in zip(ops, mags, negate)]
    elif cfg.rand_augment:
        n = cfg.rand_augment_n
        params.ra_ops = rng.integers(0, len(RAND_AUGMENT_OPS), n).tolist()
        mags = cfg.rand_augment_m + cfg.rand_augment_mstd * rng.standard_normal(n)
        mags = np.clip(mags, 0.0, MAGNITUDE_MAX)
        params.ra_bins = np.rint(mags / MAGNITUDE_MAX * (MAGNITUDE_BINS - 1)).astype(int).tolist()
        params.ra_signs = (rng.random(n) < 0.5).astype(int).tolist()
    if cfg.random_erasing and rng.random() < cfg.erase_prob:
        params.erase = erase_box(rng, cfg.image_size, cfg.erase_area, cfg.erase_ratio)
        params.erase_seed = int(rng.integers(0, 2**63 - 1))
    return params


def random_resized_crop(rng: np.random.Generator, width: int, height: int,
                        scale: tuple[float, float], ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params: (x, y, w, h) in source pixels."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            x = int(rng.integers(0, width - w + 1))
            y = int(rng.integers(0, height - h + 1))
            return x, y, w, h
    # Fallback: the whole image, cropped to the nearest allowed aspect ratio, centred.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def eval_resize_crop(width: int, height: int, size: int, crop_pct: float,
                     resize: str = "shorter") -> tuple[int, int, int, int]:
    """torchvision's "Resize(int(size / crop_pct)), CenterCrop(size)": (new_w, new_h, left, top).

    ``resize="shorter"``: ``Resize`` given an int (the shorter side, aspect kept), as ARM's
    utils/datasets.py build_transform; "square": ``Resize((s, s))``, aspect not kept.
    """
    resize_to = int(size / crop_pct)  # 256 for 224
    if resize == "square":
        new_w = new_h = resize_to
    elif width <= height:
        new_w, new_h = resize_to, int(resize_to * height / width)
    else:
        new_w, new_h = int(resize_to * width / height), resize_to
    return new_w, new_h, int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))


def eval_roi(width: int, height: int, new_w: int, new_h: int, left: int, top: int,
             size: int) -> tuple[float, float, float, float]:
    """The source box (x0, y0, x1, y1) that ends up in the centre crop.

    Resizing this box to size x size with the resampling filter reading the whole image gives
    the same pixels as resizing the image and then cropping, without the full-size resize.
    """
    sx, sy = width / new_w, height / new_h
    return left * sx, top * sy, (left + size) * sx, (top + size) * sy


def erase_box(rng: np.random.Generator, size: int, area: tuple[float, float],
              ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """timm's RandomErasing box (one box, up to 10 attempts) in output pixels; w=0: none."""
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = size * size * rng.uniform(*area)
        aspect = math.exp(rng.uniform(*log_ratio))
        h = int(round(math.sqrt(target * aspect)))
        w = int(round(math.sqrt(target / aspect)))
        if w < size and h < size:
            y = int(rng.integers(0, size - h + 1))
            x = int(rng.integers(0, size - w + 1))
            return x, y, w, h
    return 0, 0, 0, 0


def magnitude(op: int, bin_: int, sign: int) -> float:
    """The signed magnitude DALI's augmentation ``op`` uses for ``bin_`` (linspace of its range)."""
    _, (lo, hi), negate = RAND_AUGMENT_OPS[op]
    value = lo + (hi - lo) * bin_ / (MAGNITUDE_BINS - 1)
    return -value if (negate and sign) else value
