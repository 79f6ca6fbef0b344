"""`star synth`: layout, determinism, ImageNet-like sizes, quirks, and classes that carry signal."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from data_prep import synth


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_sizes_and_determinism(tmp_path):
    assert synth.main(["--out", str(tmp_path / "a"), "--classes", "3", "--per-class", "4", "--val-per-class", "2",
                       "--seed", "1"]) == 0
    files = tree(tmp_path / "a")
    train = [f for f in files if f.startswith("train/")]
    val = [f for f in files if f.startswith("val/")]
    assert len(train) == 12 and len(val) == 6
    assert {f.split("/")[1] for f in train} == {"n00000000", "n00000001", "n00000002"}
    assert all(f.split("/")[2].startswith("ILSVRC2012_val_") for f in val)
    for name in train + val:
        image = Image.open(io.BytesIO(files[name]))
        assert image.format == "JPEG" and image.mode == "RGB"
        assert 150 <= image.width <= 500 and 150 <= image.height <= 500
    assert len({Image.open(io.BytesIO(files[n])).size for n in train}) > 6  # sizes vary

    synth.synthesize(tmp_path / "b", classes=3, per_class=4, val_per_class=2, seed=1, workers=2)
    assert tree(tmp_path / "b") == files
    synth.synthesize(tmp_path / "c", classes=3, per_class=4, val_per_class=2, seed=2)
    assert tree(tmp_path / "c") != files


def test_quirk_files_are_what_quirks_json_says(tmp_path):
    synth.synthesize(tmp_path, classes=3, per_class=2, seed=0, quirks=True)
    expected = json.loads((tmp_path / "quirks.json").read_text())
    formats = {}
    for rel in expected:
        data = (tmp_path / "train" / rel).read_bytes()
        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()
                formats[rel] = (image.format, image.mode)
        except OSError:
            formats[rel] = None
    kinds = {rel.split("/")[1].split("_", 1)[1]: formats[rel] for rel in expected}
    assert kinds["png.JPEG"] == ("PNG", "RGB")
    assert kinds["cmyk.JPEG"] == ("JPEG", "CMYK")
    assert kinds["gray.JPEG"] == ("JPEG", "L")
    assert kinds["empty.JPEG"] is None and kinds["truncated.JPEG"] is None and kinds["readme.JPEG"] is None
    assert (tmp_path / "train" / "n00000000" / "n00000000_empty.JPEG").stat().st_size == 0


def test_flat_val_and_label_files_describe_the_same_images(tmp_path):
    synth.synthesize(tmp_path, classes=4, per_class=1, val_per_class=2, seed=0, flat_val=True)
    folder = {p.name: p.parent.name for p in (tmp_path / "val").rglob("*.JPEG")}
    flat = sorted(p.name for p in (tmp_path / "val_flat").iterdir())
    assert flat == sorted(folder)
    devkit_order = [line.split()[0] for line in (tmp_path / "val_devkit_synsets.txt").read_text().splitlines()]
    ids = [int(x) for x in (tmp_path / "val_ground_truth.txt").read_text().split()]
    assert [devkit_order[i - 1] for i in ids] == [folder[name] for name in flat]
    rows = (tmp_path / "LOC_val_solution.csv").read_text().splitlines()[1:]
    assert {r.split(",")[0] + ".JPEG": r.split(",")[1].split()[0] for r in rows} == folder


def test_classes_are_separable_by_a_nearest_centroid_colour_histogram():
    """A crude classifier far above chance: the classes carry signal a model can learn."""

    def colour_histogram(image: Image.Image) -> np.ndarray:
        bins = np.asarray(image.resize((64, 64)), np.int32) // 64
        counts = np.bincount((bins[..., 0] * 16 + bins[..., 1] * 4 + bins[..., 2]).ravel(), minlength=64)
        return counts / counts.sum()

    classes = 6
    centroids = np.stack([np.mean([colour_histogram(synth.render(k, synth._rng(0, "train", k, i)))
                                   for i in range(16)], axis=0) for k in range(classes)])
    hits = [np.argmin(((centroids - colour_histogram(synth.render(k, synth._rng(0, "val", k, i)))) ** 2).sum(1)) == k
            for k in range(classes) for i in range(8)]
    assert np.mean(hits) > 0.4  # chance is 1/6


def test_bad_arguments_are_refused(tmp_path, capsys):
    assert synth.main(["--out", str(tmp_path), "--classes", "0", "--per-class", "1"]) == 2
    assert "--classes 0" in capsys.readouterr().err
    assert synth.main(["--out", str(tmp_path), "--classes", "2", "--per-class", "1", "--flat-val"]) == 2
    assert "--flat-val needs --val-per-class" in capsys.readouterr().err
