"""Validation labels: folder layout, devkit ground truth + synset order, LOC csv.

The reference is the synthetic tree's val/<wnid>/ folder (where `star synth` put each image)
and the sorted training wnids, independent of the label files being tested."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import pytest

from data_prep import shard, synth


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("synth")
    synth.synthesize(root, classes=5, per_class=2, val_per_class=3, seed=11, flat_val=True)
    out = tmp_path_factory.mktemp("out")
    assert shard.main(["--src", str(root / "train"), "--out", str(out), "--split", "train", "--workers", "1"]) == 0
    return root, out


def truth(root: Path) -> dict[str, int]:
    """Val image stem -> class index, from the folder each image was written to."""
    wnids = sorted(p.name for p in (root / "train").iterdir())
    return {p.stem: wnids.index(p.parent.name) for p in (root / "val").rglob("*.JPEG")}


def sharded_labels(out: Path) -> dict[str, int]:
    labels = {}
    manifest = json.loads((out / "val.json").read_text())
    for entry in manifest["shards"]:
        with tarfile.open(out / entry["name"]) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                if ext == "cls":
                    labels[key] = int(tar.extractfile(member).read())
    assert len(labels) == manifest["num_samples"] == manifest["files_in"]
    return labels


def shard_val(src: Path, out: Path, *extra: str) -> int:
    return shard.main(["--src", str(src), "--out", str(out), "--split", "val", "--workers", "1", *extra])


def test_folder_layout_uses_the_training_class_index(data, tmp_path):
    root, out = data
    target = tmp_path / "o"
    shutil.copy(out / "classes.json", tmp_path / "classes.json")
    assert shard_val(root / "val", target, "--classes", str(tmp_path / "classes.json")) == 0
    assert sharded_labels(target) == truth(root)
    assert (target / "classes.json").read_bytes() == (out / "classes.json").read_bytes()


def test_devkit_ground_truth_maps_ids_through_the_devkit_synset_order(data, tmp_path):
    root, out = data
    synsets = (root / "val_devkit_synsets.txt").read_text().split()
    assert synsets[::4] != sorted(synsets[::4]), "the fixture's devkit order must not be sorted order"
    target = tmp_path / "o"
    shutil.copytree(out, target)
    assert shard_val(root / "val_flat", target, "--val-labels", str(root / "val_ground_truth.txt"),
                     "--devkit-synsets", str(root / "val_devkit_synsets.txt")) == 0
    assert sharded_labels(target) == truth(root)


def test_loc_csv_labels(data, tmp_path):
    root, out = data
    target = tmp_path / "o"
    shutil.copytree(out, target)
    assert shard_val(root / "val_flat", target, "--val-labels", str(root / "LOC_val_solution.csv")) == 0
    assert sharded_labels(target) == truth(root)


def test_devkit_list_without_synset_order_is_refused(data, tmp_path, capsys):
    root, out = data
    target = tmp_path / "o"
    shutil.copytree(out, target)
    assert shard_val(root / "val_flat", target, "--val-labels", str(root / "val_ground_truth.txt")) == 2
    assert "--devkit-synsets" in capsys.readouterr().err


def test_unknown_validation_wnid_is_refused(data, tmp_path, capsys):
    root, out = data
    val = tmp_path / "val"
    shutil.copytree(root / "val", val)
    stray = val / "n09999999"
    stray.mkdir()
    shutil.copy(next((val / "n00000000").iterdir()), stray / "x.JPEG")
    target = tmp_path / "o"
    shutil.copytree(out, target)
    assert shard_val(val, target) == 2
    err = capsys.readouterr().err
    assert "n09999999" in err and "not training classes" in err
    assert not (target / "val.json").exists()

    csv = tmp_path / "loc.csv"
    csv.write_text((root / "LOC_val_solution.csv").read_text().replace("n00000002", "n07777777"))
    assert shard_val(root / "val_flat", target, "--val-labels", str(csv)) == 2
    assert "n07777777" in capsys.readouterr().err


def test_val_without_classes_json_is_refused(data, tmp_path, capsys):
    root, _ = data
    assert shard_val(root / "val", tmp_path / "fresh") == 2
    assert "shard the train split" in capsys.readouterr().err
