"""The shards as their consumers read them: the webdataset library, DALI's webdataset reader
(CPU pipeline) with our index files, and DALI's own `wds2idx` tool as the reference index."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import shard, synth


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("synth")
    synth.synthesize(root, classes=3, per_class=8, seed=5, quirks=True)
    out = tmp_path_factory.mktemp("out")
    assert shard.main(["--src", str(root / "train"), "--out", str(out), "--split", "train",
                       "--shard-bytes", "250000", "--workers", "1"]) == 0
    return root, out


def expected_samples(root: Path, out: Path) -> dict[tuple[str, str], tuple[bytes | None, int]]:
    """(wnid, file name) -> (source bytes, or None if repaired; class index), from the tree on disk."""
    manifest = json.loads((out / "train.json").read_text())
    rejected = {r["file"] for r in manifest["rejected"]}
    repaired = {r["file"] for r in manifest["repaired"]}
    wnids = sorted(p.name for p in (root / "train").iterdir())
    expected = {}
    for path in sorted((root / "train").rglob("*")):
        rel = str(path.relative_to(root / "train"))
        if path.is_file() and rel not in rejected:
            data = None if rel in repaired else path.read_bytes()
            expected[(path.parent.name, path.name)] = (data, wnids.index(path.parent.name))
    return expected


def check_against_source(root: Path, got: dict[str, tuple[bytes, bytes, bytes]], expected) -> None:
    """`got`: key -> (jpg, cls, json) as a reader returned them."""
    by_source = {}
    for key, (jpg, cls, meta_bytes) in got.items():
        meta = json.loads(meta_bytes)
        by_source[(meta["wnid"], meta["file"])] = (key, jpg, int(cls))
    assert set(by_source) == set(expected)
    for source, (data, cls) in expected.items():
        key, jpg, got_cls = by_source[source]
        assert got_cls == cls
        if data is not None:
            assert jpg == data, f"{key}: bytes differ from {source}"
        else:
            original = Image.open(root / "train" / source[0] / source[1]).convert("RGB")
            fixed = Image.open(io.BytesIO(jpg))
            assert fixed.format == "JPEG" and fixed.size == original.size
            assert np.abs(np.asarray(fixed, np.float32) - np.asarray(original, np.float32)).mean() < 4.0


def test_webdataset_library_reads_every_sample_once_with_source_bytes(sharded):
    import webdataset as wds

    root, out = sharded
    urls = [str(p) for p in sorted(out.glob("train-*.tar"))]
    got = {}
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        assert sample["__key__"] not in got, f"key {sample['__key__']} read twice"
        got[sample["__key__"]] = (sample["jpg"], sample["cls"], sample["json"])
    check_against_source(root, got, expected_samples(root, out))


def test_dali_webdataset_reader_with_our_indexes_reads_every_sample_once(sharded):
    from nvidia.dali import fn, pipeline_def

    root, out = sharded
    manifest = json.loads((out / "train.json").read_text())
    tars = [str(out / s["name"]) for s in manifest["shards"]]
    idxs = [str(out / s["index"]) for s in manifest["shards"]]
    batch = 8

    @pipeline_def(batch_size=batch, num_threads=1, device_id=None)
    def pipeline():
        return tuple(fn.readers.webdataset(paths=tars, index_paths=idxs, ext=["jpg", "cls", "json"],
                                     missing_component_behavior="error", name="reader", pad_last_batch=False))

    pipe = pipeline()
    pipe.build()
    total = pipe.epoch_size("reader")
    assert total == manifest["num_samples"]
    got = {}
    for _ in range(-(-total // batch)):
        jpgs, clss, metas = pipe.run()
        for i in range(len(jpgs)):
            if len(got) == total:
                break  # the last batch wraps around to the start
            key = jpgs[i].source_info().rsplit(":", 1)[-1].split(".", 1)[0]
            assert key not in got, f"key {key} read twice"
            got[key] = tuple(np.array(t[i]).tobytes() for t in (jpgs, clss, metas))
    check_against_source(root, got, expected_samples(root, out))


def test_our_index_equals_wds2idx_output(sharded, tmp_path):
    from wds2idx import IndexCreator  # ships with nvidia-dali

    _, out = sharded
    tars = sorted(out.glob("train-*.tar"))
    assert len(tars) >= 3
    for tar in tars:
        reference = tmp_path / (tar.stem + ".idx")
        with IndexCreator(str(tar), str(reference), verbose=False) as creator:
            creator.create_index()
        assert (out / (tar.stem + ".idx")).read_text() == reference.read_text(), tar.name
    # And the command-line tool itself (installed next to the Python running the tests), on one shard.
    cli = Path(sys.executable).with_name("wds2idx")
    subprocess.run([str(cli), str(tars[0]), str(tmp_path / "cli.idx")], check=True, capture_output=True)
    assert (tmp_path / "cli.idx").read_text() == (out / (tars[0].stem + ".idx")).read_text()
