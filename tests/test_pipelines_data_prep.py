"""The loaders on shards written by the real `star synth` + `star shard` (the contract in
docs/design.md, "Data path"), including the repaired ImageNet quirks (PNG named .JPEG, CMYK, grayscale)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch

from pipelines import build_loader


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from data_prep import shard, synth

    root = tmp_path_factory.mktemp("data_prep")
    assert synth.main(["--out", str(root / "src"), "--classes", "3", "--per-class", "8",
                       "--val-per-class", "3", "--workers", "1", "--quirks"]) == 0
    for split in ("train", "val"):
        assert shard.main(["--src", str(root / "src" / split), "--out", str(root / "shards"),
                           "--split", split, "--workers", "1"]) == 0
    return root / "shards"


def _wnid_labels(shards: Path, split: str) -> dict[str, int]:
    """key -> class index, from each sample's .json wnid and classes.json (not from .cls)."""
    wnids = json.loads((shards / "classes.json").read_text())["wnids"]
    labels = {}
    for tar_path in sorted(shards.glob(f"{split}-*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    labels[member.name.split(".", 1)[0]] = wnids.index(meta["wnid"])
    return labels


@pytest.mark.parametrize("backend", ["dali", "baseline"])
def test_loaders_read_data_prep_shards(shards, backend):
    expected = _wnid_labels(shards, "train")
    loader = build_loader("pretrain", shards, split="train", batch_size=4, image_size=32,
                          backend=backend, num_threads=1)
    assert loader.num_samples == len(expected)
    seen = 0
    for batch in loader.epoch(0):
        assert batch.images.shape == (4, 3, 32, 32) and torch.isfinite(batch.images).all()
        for index, label in zip(batch.indices.tolist(), batch.labels.tolist()):
            _, key = loader.shards.name(index)
            assert label == expected[key]
            seen += 1
    assert seen == loader.steps_per_epoch * 4 == len(expected) // 4 * 4


def test_eval_reads_every_val_sample_once(shards):
    expected = _wnid_labels(shards, "val")
    loader = build_loader("eval", shards, split="val", batch_size=4, image_size=32, num_threads=1)
    got = {}
    for batch in loader.epoch(0):
        for index, label, valid in zip(batch.indices.tolist(), batch.labels.tolist(), batch.valid.tolist()):
            if valid:
                assert index not in got
                got[index] = label
    assert sorted(got) == list(range(len(expected)))
    assert all(expected[loader.shards.name(i)[1]] == label for i, label in got.items())
