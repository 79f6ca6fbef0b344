"""timm's RandAugment ``rand-m9-mstd0.5-inc1``, the fine-tuning default (docs/fidelity.md).

What ARM's Finetuning/main_finetune.py (``--aa rand-m9-mstd0.5-inc1``) gets from timm's
``rand_augment_transform`` through ``create_transform(..., interpolation='bicubic')``:

* 2 layers; each picks one op uniformly from the 15 "increasing" ops, with replacement;
* each picked op runs with probability 0.5;
* its magnitude is drawn per op from normal(9, 0.5) and clipped to [0, 10];
* the op turns the magnitude m into its argument by the table in ``op_argument`` (the
  geometric ops and the enhance ops negate it with probability 0.5);
* geometric ops resample bicubic and fill with the mean colour round(255 * mean) =
  (124, 116, 104); translations are relative: 0.45 * m / 10 of the image side.

The decisions (op, applied, magnitude, sign) come from ``pipelines.sampling`` like every other
one. This module turns them into op arguments, into the affine matrix of a geometric op
(output -> input pixel mapping, the convention of PIL's ``Image.transform``; rotations use the
matrix PIL's ``Image.rotate`` builds), and applies them with PIL for the baseline backend.
``pipelines.dali_backend`` applies the same arguments and matrices with DALI operators.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

# timm's _RAND_INCREASING_TRANSFORMS, in its order (op indices refer to this tuple).
TIMM_OPS: tuple[str, ...] = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
GEOMETRIC = frozenset({"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"})
ENHANCE = frozenset({"ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"})
SIGNED = GEOMETRIC | ENHANCE  # ops whose argument timm negates with probability 0.5
LEVEL_DENOM = 10.0  # timm's magnitude scale: m in [0, 10]
TRANSLATE_PCT = 0.45  # timm's default for the *Rel translations
SOLARIZE_ADD_THRESHOLD = 128


def fill_colour(mean: tuple[float, float, float]) -> tuple[int, int, int]:
    """timm's img_mean hyper-parameter: the fill of geometric ops."""
    return tuple(min(255, round(255 * m)) for m in mean)  # type: ignore[return-value]


def op_argument(op: int, magnitude: float, negate: bool) -> float:
    """The argument timm's op ``op`` receives for clipped magnitude ``magnitude``.

    Rotate: degrees; Shear*: shear factor; Translate*Rel: fraction of the side; enhance ops:
    blend factor (1 = unchanged); PosterizeIncreasing: bits kept; SolarizeIncreasing:
    threshold; SolarizeAdd: amount added below 128; others: 0 (no argument).
    """
    name = TIMM_OPS[op]
    level = magnitude / LEVEL_DENOM
    sign = -1.0 if negate else 1.0
    if name == "Rotate":
        return sign * level * 30.0
    if name in ("ShearX", "ShearY"):
        return sign * level * 0.3
    if name in ("TranslateXRel", "TranslateYRel"):
        return sign * level * TRANSLATE_PCT
    if name in ENHANCE:
        return max(0.1, 1.0 + sign * level * 0.9)
    if name == "PosterizeIncreasing":
        return float(4 - int(level * 4))
    if name == "SolarizeIncreasing":
        return float(256 - int(level * 256))
    if name == "SolarizeAdd":
        return float(int(level * 110))
    return 0.0


def affine_matrix(op: int, arg: float, width: int, height: int) -> tuple[float, ...]:
    """(a, b, c, d, e, f): output pixel (x, y) reads input (a x + b y + c, d x + e y + f)."""
    name = TIMM_OPS[op]
    if name == "ShearX":
        return (1.0, arg, 0.0, 0.0, 1.0, 0.0)
    if name == "ShearY":
        return (1.0, 0.0, 0.0, arg, 1.0, 0.0)
    if name == "TranslateXRel":
        return (1.0, 0.0, arg * width, 0.0, 1.0, 0.0)
    if name == "TranslateYRel":
        return (1.0, 0.0, 0.0, 0.0, 1.0, arg * height)
    if name == "Rotate":  # PIL's Image.rotate(arg) about the centre, without expanding
        angle = -math.radians(arg)
        a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
        d, e = -b, a
        cx, cy = width / 2.0, height / 2.0
        return (a, b, a * -cx + b * -cy + cx, d, e, d * -cx + e * -cy + cy)
    raise ValueError(f"{name} is not a geometric op")


def posterize_mask(bits: int) -> int:
    """The AND mask that keeps the top ``bits`` bits (0 bits: black, as timm's posterize)."""
    return (0xFF << (8 - bits)) & 0xFF if bits < 8 else 0xFF


def apply_pil(img: Image.Image, op: int, arg: float, fill: tuple[int, int, int]) -> Image.Image:
    """One timm op on a PIL RGB image, with timm's argument ``arg`` (see ``op_argument``)."""
    name = TIMM_OPS[op]
    if name in GEOMETRIC:
        if name == "Rotate" and arg % 360.0 == 0.0:
            return img  # PIL's rotate returns a copy for a zero angle
        matrix = affine_matrix(op, arg, *img.size)
        return img.transform(img.size, Image.Transform.AFFINE, matrix, Image.Resampling.BICUBIC, fillcolor=fill)
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Invert":
        return ImageOps.invert(img)
    if name == "PosterizeIncreasing":
        # ImageOps.posterize's lookup table; recent Pillow refuses bits=0, which timm's
        # magnitude 10 asks for (a black image), so build the table here.
        mask = posterize_mask(int(arg))
        return img.point([i & mask for i in range(256)] * 3)
    if name == "SolarizeIncreasing":
        return ImageOps.solarize(img, int(arg))
    if name == "SolarizeAdd":
        add = int(arg)
        lut = [min(255, i + add) if i < SOLARIZE_ADD_THRESHOLD else i for i in range(256)]
        return img.point(lut * 3)
    enhancer = {"ColorIncreasing": ImageEnhance.Color, "ContrastIncreasing": ImageEnhance.Contrast,
                "BrightnessIncreasing": ImageEnhance.Brightness,
                "SharpnessIncreasing": ImageEnhance.Sharpness}[name]
    return enhancer(img).enhance(arg)


def draw(rng: np.random.Generator, n: int, m: float,
         mstd: float) -> tuple[list[int], list[bool], list[float], list[bool]]:
    """(ops, applied, clipped magnitudes, negate) for n layers, a fixed number of draws."""
    ops = rng.integers(0, len(TIMM_OPS), n)
    applied = rng.random(n) < 0.5
    mags = np.clip(m + mstd * rng.standard_normal(n), 0.0, LEVEL_DENOM)
    negate = rng.random(n) < 0.5
    return ops.tolist(), applied.tolist(), mags.tolist(), negate.tolist()


# The DALI graph groups the ops by the operator that implements them (all geometric ops are
# one warp with a per-sample matrix); 0 is "nothing" (an op drawn but not applied).
DALI_KINDS: tuple[str, ...] = ("identity", "affine", "AutoContrast", "Equalize", "Invert",
                               "PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd",
                               "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                               "SharpnessIncreasing")


def dali_layer(op: int, applied: bool, arg: float, size: int) -> tuple[int, float, tuple[float, ...]]:
    """(kind index, scalar argument, 2x3 matrix) that the DALI graph takes for one layer."""
    identity = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    if not applied:
        return 0, 0.0, identity
    name = TIMM_OPS[op]
    if name in GEOMETRIC:
        return 1, 0.0, affine_matrix(op, arg, size, size)
    if name == "PosterizeIncreasing":
        arg = float(posterize_mask(int(arg)))
    return DALI_KINDS.index(name), float(arg), identity
