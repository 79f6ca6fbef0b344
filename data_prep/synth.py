"""`star synth`: a small synthetic ImageNet-like ImageFolder tree that a model can learn.

Each class has its own shape, colour and stripe texture; every image draws the object at a
random position, scale and rotation over a random noisy gradient background, at ImageNet-like
sizes (sides 150-500 px, varied aspect ratio) as quality-90 JPEGs. Every image comes from its
own seeded generator, so the tree depends only on the arguments.

Layout: DIR/train/<wnid>/<wnid>_<i>.JPEG and, with --val-per-class, DIR/val/<wnid>/
ILSVRC2012_val_<id>.JPEG (ids shuffled across classes, as in ImageNet). --flat-val adds the
same validation images flat in DIR/val_flat/ with the three label files `star shard` accepts:
DIR/val_ground_truth.txt + DIR/val_devkit_synsets.txt (devkit style: IDs in a shuffled,
non-sorted synset order) and DIR/LOC_val_solution.csv. --quirks adds ImageNet's oddities to
train and lists them, with the expected outcome, in DIR/quirks.json.
"""

from __future__ import annotations

import argparse
import colorsys
import io
import json
import multiprocessing
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageChops, ImageDraw

from data_prep.progress import make_progress, usable_cpus

SHAPES = ("disc", "square", "triangle", "ring", "cross", "diamond")
JPEG_QUALITY = 90
_SPLIT_IDS = {"train": 0, "val": 1, "quirk": 2}


def wnid_of(k: int) -> str:
    return f"n{k:08d}"


# Shape outlines in object coordinates (unit radius), before rotation, scaling and translation.
_POLYGONS = {
    "square": [(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)],
    "triangle": [(0.0, -0.8), (0.96, 0.8), (-0.96, 0.8)],
    "diamond": [(1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0)],
    "cross": [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1),
              (-0.3, 0.3), (-1, 0.3), (-1, -0.3), (-0.3, -0.3)],
}


def render(k: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of class k. Drawn with PIL's C primitives: numpy per-pixel arithmetic was
    10x slower."""
    width = int(rng.integers(150, 501))
    height = int(np.clip(round(width / np.exp(rng.uniform(-0.45, 0.45))), 150, 500))
    # Background: a smooth gradient between four random corner colours.
    corners = rng.integers(0, 256, (2, 2, 3), dtype=np.uint8)
    background = Image.fromarray(corners).resize((width, height), Image.Resampling.BILINEAR)

    # The object: the class's shape, hue and stripe frequency at a random place, size and angle.
    shape = SHAPES[k % len(SHAPES)]
    stripes = 2.0 + 1.5 * ((k // len(SHAPES)) % 4)  # stripes per unit radius
    rgb = colorsys.hsv_to_rgb((k * 0.618034) % 1.0, rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.0))
    colour = tuple(int(c * 255) for c in rgb)
    radius = rng.uniform(0.2, 0.4) * min(width, height)
    cx, cy = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
    theta = rng.uniform(0, 2 * np.pi)
    cos, sin = float(np.cos(theta)), float(np.sin(theta))

    def to_pixels(points):
        return [(cx + radius * (u * cos - v * sin), cy + radius * (u * sin + v * cos)) for u, v in points]

    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    box = [cx - radius, cy - radius, cx + radius, cy + radius]
    if shape == "disc":
        draw.ellipse(box, fill=255)
    elif shape == "ring":
        draw.ellipse(box, outline=255, width=max(1, int(radius * 0.45)))
    else:
        draw.polygon(to_pixels(_POLYGONS[shape]), fill=255)
    foreground = Image.new("RGB", (width, height), colour)
    paint = ImageDraw.Draw(foreground)
    dark = tuple(int(c * 0.7) for c in colour)
    period = 2.0 / stripes
    for i in range(int(2.0 / period) + 2):
        u = -1.0 + i * period
        paint.line(to_pixels([(u, -1.5), (u, 1.5)]), fill=dark, width=max(1, int(radius * period / 2)))
    image = Image.composite(foreground, background, mask)

    # Per-pixel noise (uniform +-16) gives the JPEGs ImageNet-like sizes.
    noise = np.frombuffer(rng.bytes(width * height * 3), np.uint8).reshape(height, width, 3) & 31
    return ImageChops.add(image, Image.fromarray(noise), scale=1.0, offset=-16)


def _rng(seed: int, split: str, k: int, i: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLIT_IDS[split], k, i])


def _jpeg(image: Image.Image, mode: str | None = None) -> bytes:
    if mode:
        image = image.convert(mode)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def _write_quirks(train: Path, classes: int, seed: int) -> dict:
    """ImageNet's oddities, one or more of each; returns {rel path: expected outcome}."""
    w = [wnid_of(k % classes) for k in range(3)]
    art = [render(k % classes, _rng(seed, "quirk", k % classes, n)) for n, k in enumerate(range(3))]
    png = io.BytesIO()
    art[0].save(png, "PNG")
    good = _jpeg(art[1])
    files = {
        f"{w[0]}/{w[0]}_png.JPEG": (png.getvalue(), "repaired"),  # a PNG named .JPEG
        f"{w[1]}/{w[1]}_cmyk.JPEG": (_jpeg(art[1], "CMYK"), "repaired"),
        f"{w[2]}/{w[2]}_gray.JPEG": (_jpeg(art[2], "L"), "ok"),  # grayscale is kept as it is
        f"{w[0]}/{w[0]}_empty.JPEG": (b"", "rejected"),
        f"{w[1]}/{w[1]}_truncated.JPEG": (good[: len(good) * 3 // 5], "rejected"),
        f"{w[2]}/{w[2]}_readme.JPEG": (b"This is a text file, not an image.\n" * 20, "rejected"),
        # Names that need care to get unique, dot-free keys: dots, and a stem already used.
        f"{w[0]}/{w[0]}_dotted.name.v2.JPEG": (_jpeg(art[2]), "ok"),
        f"{w[1]}/{w[0]}_0.JPEG": (_jpeg(art[0]), "ok"),
        f"{w[0]}/{w[0]}_0.jpeg": (_jpeg(art[0]), "ok"),
    }
    for rel, (data, _) in files.items():
        (train / rel).write_bytes(data)
    return {rel: outcome for rel, (_, outcome) in files.items()}


def _render_job(job: tuple[int, str, int, int]) -> bytes:
    seed, split, k, i = job
    return _jpeg(render(k, _rng(seed, split, k, i)))


def synthesize(out: Path, classes: int, per_class: int, seed: int = 0, quirks: bool = False,
               val_per_class: int = 0, flat_val: bool = False, workers: int = 1) -> dict:
    """Write the tree; returns a summary (counts and paths)."""
    wnids = [wnid_of(k) for k in range(classes)]
    jobs = [("train", k, i) for k in range(classes) for i in range(per_class)]
    val_ids = np.random.default_rng([seed, 99]).permutation(classes * val_per_class) + 1
    jobs += [("val", k, i) for k in range(classes) for i in range(val_per_class)]
    for split in ("train", "val") if val_per_class else ("train",):
        for w in wnids:
            (out / split / w).mkdir(parents=True, exist_ok=True)
    val_labels: dict[int, int] = {}  # val image id -> class
    pool = multiprocessing.Pool(workers) if workers > 1 else None
    try:
        images = pool.imap(_render_job, [(seed, *job) for job in jobs], chunksize=8) if pool else map(
            _render_job, [(seed, *job) for job in jobs])
        with make_progress("img") as progress:
            task = progress.add_task("synth", total=len(jobs))
            for (split, k, i), data in zip(jobs, images):
                if split == "train":
                    name = f"{wnids[k]}_{i}.JPEG"
                else:
                    image_id = int(val_ids[k * val_per_class + i])
                    val_labels[image_id] = k
                    name = f"ILSVRC2012_val_{image_id:08d}.JPEG"
                (out / split / wnids[k] / name).write_bytes(data)
                progress.advance(task)
    finally:
        if pool:
            pool.terminate()
    summary = {"train": str(out / "train"), "classes": classes, "train_images": classes * per_class,
               "val_images": classes * val_per_class}
    if quirks:
        expected = _write_quirks(out / "train", classes, seed)
        (out / "quirks.json").write_text(json.dumps(expected, indent=1) + "\n")
        summary["quirk_files"] = len(expected)
    if val_per_class:
        summary["val"] = str(out / "val")
    if flat_val:
        summary.update(_write_flat_val(out, wnids, val_labels, seed))
    return summary


def _write_flat_val(out: Path, wnids: list[str], val_labels: dict[int, int], seed: int) -> dict:
    flat = out / "val_flat"
    flat.mkdir(exist_ok=True)
    for image_id, k in sorted(val_labels.items()):
        name = f"ILSVRC2012_val_{image_id:08d}.JPEG"
        (flat / name).write_bytes((out / "val" / wnids[k] / name).read_bytes())
    # The devkit numbers synsets in its own (meta.mat) order, not sorted-wnid order: mimic that
    # with a seeded permutation, so a mapping that assumed sorted order would fail the tests.
    devkit_order = [wnids[k] for k in np.random.default_rng([seed, 7]).permutation(len(wnids))]
    devkit_id = {w: n + 1 for n, w in enumerate(devkit_order)}
    (out / "val_devkit_synsets.txt").write_text("".join(f"{w} synthetic class {w}\n" for w in devkit_order))
    (out / "val_ground_truth.txt").write_text(
        "".join(f"{devkit_id[wnids[val_labels[i]]]}\n" for i in sorted(val_labels)))
    rows = [f"ILSVRC2012_val_{i:08d},{wnids[k]} 1 2 30 40" for i, k in sorted(val_labels.items())]
    (out / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    return {"val_flat": str(flat), "val_ground_truth": str(out / "val_ground_truth.txt"),
            "val_devkit_synsets": str(out / "val_devkit_synsets.txt"),
            "loc_csv": str(out / "LOC_val_solution.csv")}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="star synth",
        description="Write a synthetic ImageNet-like ImageFolder tree (DIR/train/<wnid>/*.JPEG, optionally "
                    "DIR/val/...) of learnable classes, for tests and the demo.")
    p.add_argument("--out", type=Path, required=True, help="output folder (must not already hold train/ or val/)")
    p.add_argument("--classes", type=int, required=True, help="number of classes K (wnids n00000000 ...)")
    p.add_argument("--per-class", type=int, required=True, help="training images per class M")
    p.add_argument("--val-per-class", type=int, default=0, help="validation images per class (default 0: no val)")
    p.add_argument("--seed", type=int, default=0, help="seed; the same arguments give the same files (default 0)")
    p.add_argument("--quirks", action="store_true",
                   help="add ImageNet's oddities to train (PNG named .JPEG, CMYK, grayscale, zero-byte, truncated, "
                        "non-image, dotted and colliding names), listed in DIR/quirks.json")
    p.add_argument("--workers", type=int, default=usable_cpus(),
                   help="processes rendering images in parallel (default: all CPUs); never changes the output")
    p.add_argument("--flat-val", action="store_true",
                   help="also write the val images flat in DIR/val_flat/ with devkit-style and LOC csv label files")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problems = []
    if args.classes < 1:
        problems.append(f"--classes {args.classes} must be at least 1")
    if args.per_class < 1:
        problems.append(f"--per-class {args.per_class} must be at least 1")
    if args.val_per_class < 0:
        problems.append(f"--val-per-class {args.val_per_class} must not be negative")
    if args.workers < 1:
        problems.append(f"--workers {args.workers} must be at least 1")
    if args.quirks and args.classes < 2:
        problems.append("--quirks needs --classes of at least 2 (one quirk is a file name shared across classes)")
    if args.flat_val and args.val_per_class < 1:
        problems.append("--flat-val needs --val-per-class of at least 1")
    taken = [d for d in ("train", "val", "val_flat") if (args.out / d).exists()]
    if taken:
        problems.append(f"{args.out} already holds {', '.join(taken)}; choose an empty --out folder")
    if problems:
        print("star synth: error: " + "; ".join(problems), file=sys.stderr)
        return 2
    started = time.perf_counter()
    summary = synthesize(args.out, args.classes, args.per_class, args.seed, args.quirks, args.val_per_class,
                         args.flat_val, args.workers)
    print(f"wrote {summary['train_images']} train + {summary['val_images']} val images of {args.classes} classes"
          f"{' + ' + str(summary['quirk_files']) + ' quirk files' if args.quirks else ''} to {args.out} "
          f"in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
