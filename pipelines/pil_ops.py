"""PIL implementation of one sample's pixel work, mirroring the DALI graph step for step.

decode -> crop the source window and resize it to S x S (bicubic) -> RandAugment (timm's
rand-m9-mstd0.5-inc1 in ``pipelines.rand_augment``, or the "star_v1" ops and magnitude ranges
of DALI's suite) -> horizontal flip -> uint8 CHW. The flip comes after RandAugment in both
backends because DALI fuses it into the final layout transpose; every geometric RandAugment op
has a random sign and the colour ops commute with a flip, so the distribution is the same as
timm's order (flip first).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from pipelines import rand_augment
from pipelines.sampling import IMAGENET_MEAN, RAND_AUGMENT_OPS, SampleParams, magnitude

_RESAMPLE = {"cubic": Image.Resampling.BICUBIC, "linear": Image.Resampling.BILINEAR}
_FILL = (128, 128, 128)


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB") if img.mode != "RGB" else img


def render(data: bytes, params: SampleParams, size: int, interpolation: str = "cubic",
           mean: tuple[float, float, float] = IMAGENET_MEAN) -> np.ndarray:
    """uint8 (3, size, size) for one sample; raises whatever PIL raises on a broken JPEG.
    ``mean``: the normalisation mean, whose colour fills timm's geometric ops."""
    img = decode(data)
    x, y, w, h = params.window
    x0, y0, x1, y1 = params.roi or (0, 0, w, h)
    img = img.resize((size, size), _RESAMPLE[interpolation], box=(x + x0, y + y0, x + x1, y + y1))
    if params.ra_args:  # timm
        fill = rand_augment.fill_colour(mean)
        for op, applied, arg in zip(params.ra_ops, params.ra_applied, params.ra_args):
            if applied:
                img = rand_augment.apply_pil(img, op, arg, fill)
    for op, bin_, sign in zip(params.ra_ops, params.ra_bins, params.ra_signs):  # star_v1
        img = rand_augment_op(img, op, magnitude(op, bin_, sign))
    if params.flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(img).transpose(2, 0, 1)


def rand_augment_op(img: Image.Image, op: int, mag: float) -> Image.Image:
    """One op of DALI's RandAugment suite (star_v1) with the parameter DALI derives from ``mag``."""
    name = RAND_AUGMENT_OPS[op][0]
    w, h = img.size
    affine = Image.Transform.AFFINE
    if name == "translate_x":  # DALI moves the content by +offset; PIL maps output -> input
        return img.transform(img.size, affine, (1, 0, -mag * w, 0, 1, 0), Image.Resampling.BILINEAR, fillcolor=_FILL)
    if name == "translate_y":
        return img.transform(img.size, affine, (1, 0, 0, 0, 1, -mag * h), Image.Resampling.BILINEAR, fillcolor=_FILL)
    if name == "shear_x":
        return img.transform(img.size, affine, (1, -mag, 0, 0, 1, 0), Image.Resampling.BILINEAR, fillcolor=_FILL)
    if name == "shear_y":
        return img.transform(img.size, affine, (1, 0, 0, -mag, 1, 0), Image.Resampling.BILINEAR, fillcolor=_FILL)
    if name == "rotate":
        return img.rotate(mag, Image.Resampling.BILINEAR, fillcolor=_FILL)
    if name == "brightness":
        return ImageEnhance.Brightness(img).enhance(1 + mag)
    if name == "contrast":
        return ImageEnhance.Contrast(img).enhance(1 + mag)
    if name == "color":
        return ImageEnhance.Color(img).enhance(1 + mag)
    if name == "sharpness":
        return ImageEnhance.Sharpness(img).enhance(1 + mag)
    if name == "posterize":  # DALI keeps round(mag) bits, at least 1
        return ImageOps.posterize(img, int(min(8, max(1, round(mag)))))
    if name == "solarize":
        return ImageOps.solarize(img, int(round(mag)))
    if name == "equalize":  # DALI follows OpenCV's lookup table: about 9/255 apart on average
        return ImageOps.equalize(img)
    if name == "auto_contrast":
        return ImageOps.autocontrast(img)
    return img  # identity
