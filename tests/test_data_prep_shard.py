"""`star shard` / `star verify`: accounting, determinism, resume, verification.

References are independent of the sharder: the synthetic tree itself (files on disk, and the
expected outcome of every quirk that `star synth --quirks` records in quirks.json), an
uninterrupted run for resumed ones, and PIL for repaired images.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import shard, synth, verify
from data_prep.images import inspect_file, inspect_image

REPO = Path(__file__).resolve().parents[1]
SHARD_BYTES = 300_000  # about 6 samples per shard: many shards from a tiny dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    synth.synthesize(root, classes=4, per_class=10, seed=3, quirks=True)
    return root


def run_shard(src: Path, out: Path, *extra: str, workers: int = 1) -> int:
    return shard.main(["--src", str(src), "--out", str(out), "--split", "train", "--shard-bytes", str(SHARD_BYTES),
                       "--workers", str(workers), "--seed", "7", *extra])


def output_files(out: Path) -> dict[str, bytes]:
    """Everything a user of the shards sees (the hidden work folder is the sharder's cache)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def read_samples(out: Path) -> dict[str, dict[str, bytes]]:
    """All samples of all train shards via tarfile, key -> {ext: bytes}; asserts keys are unique."""
    samples: dict[str, dict[str, bytes]] = {}
    for tar_path in sorted(out.glob("train-*.tar")):
        with tarfile.open(tar_path) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                if ext == "jpg":
                    assert key not in samples, f"key {key} occurs twice"
                    samples[key] = {}
                samples[key][ext] = tar.extractfile(member).read()
    return samples


@pytest.fixture(scope="module")
def sharded(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out")
    assert run_shard(dataset / "train", out, workers=2) == 0
    return out


def test_every_file_accounted_for_with_every_quirk(dataset, sharded):
    expected = json.loads((dataset / "quirks.json").read_text())
    manifest = json.loads((sharded / "train.json").read_text())
    all_files = sorted(str(p.relative_to(dataset / "train")) for p in (dataset / "train").rglob("*") if p.is_file())

    assert manifest["files_in"] == len(all_files) == 4 * 10 + len(expected)
    assert manifest["files_in"] == manifest["num_samples"] + len(manifest["rejected"])
    rejected = {r["file"]: r["reason"] for r in manifest["rejected"]}
    repaired = {r["file"]: r["action"] for r in manifest["repaired"]}
    assert set(rejected) == {f for f, outcome in expected.items() if outcome == "rejected"}
    assert set(repaired) == {f for f, outcome in expected.items() if outcome == "repaired"}
    reasons = " | ".join(rejected.values())
    for word in ("zero-byte", "truncated", "not an image"):
        assert word in reasons
    assert sum(s["num_samples"] for s in manifest["shards"]) == manifest["num_samples"]

    # Every accepted file is in the shards exactly once, identified by (wnid, original name).
    samples = read_samples(sharded)
    seen = {}
    for key, members in samples.items():
        assert "." not in key and set(members) == {"jpg", "cls", "json"}
        meta = json.loads(members["json"])
        seen[f"{meta['wnid']}/{meta['file']}"] = (key, members, meta)
    assert sorted(seen) == sorted(f for f in all_files if f not in rejected)

    wnids = sorted(p.name for p in (dataset / "train").iterdir())
    assert json.loads((sharded / "classes.json").read_text())["wnids"] == wnids
    for rel, (_key, members, meta) in seen.items():
        source = (dataset / "train" / rel).read_bytes()
        assert int(members["cls"]) == wnids.index(meta["wnid"])
        with Image.open(io.BytesIO(source)) as original:
            assert (meta["width"], meta["height"]) == original.size
            if rel in repaired:  # re-encoded: an RGB JPEG with the original's pixels
                with Image.open(io.BytesIO(members["jpg"])) as fixed:
                    assert fixed.format == "JPEG" and fixed.mode == "RGB" and fixed.size == original.size
                    diff = np.abs(np.asarray(fixed, np.float32) - np.asarray(original.convert("RGB"), np.float32))
                    assert diff.mean() < 4.0
            else:
                assert members["jpg"] == source  # original bytes, grayscale included
    gray = [r for r in expected if r.endswith("_gray.JPEG")][0]
    assert Image.open(io.BytesIO(seen[gray][1]["jpg"])).mode == "L"


def test_output_is_identical_for_1_and_2_workers(dataset, sharded, tmp_path):
    assert run_shard(dataset / "train", tmp_path / "one", workers=1) == 0
    assert output_files(tmp_path / "one") == output_files(sharded)
    assert len(list(sharded.glob("train-*.tar"))) >= 5


def test_samples_are_shuffled_across_shards(sharded):
    manifest = json.loads((sharded / "train.json").read_text())
    first = read_samples(sharded)
    first_shard_classes = set()
    with tarfile.open(sharded / manifest["shards"][0]["name"]) as tar:
        for member in tar:
            if member.name.endswith(".cls"):
                first_shard_classes.add(tar.extractfile(member).read())
    assert len(first_shard_classes) > 1  # sorted input would put one class per shard
    assert list(first) != sorted(first)


def test_resume_after_crash_mid_shard_matches_uninterrupted_run(dataset, sharded, tmp_path):
    out = tmp_path / "resumed"
    cmd = [sys.executable, "-m", "data_prep", "shard", "--src", str(dataset / "train"), "--out", str(out),
           "--split", "train", "--shard-bytes", str(SHARD_BYTES), "--workers", "1", "--seed", "7"]
    env = {**os.environ, "STAR_SHARD_TEST_CRASH_AFTER_SAMPLES": "15"}
    crashed = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert crashed.returncode == 137, crashed.stderr
    assert not (out / "train.json").exists()
    assert list(out.glob(".train-*.partial")), "the crash should leave a half-written shard"
    complete_before = sorted(p.name for p in out.glob("train-*.tar"))
    assert 1 <= len(complete_before) < len(list(sharded.glob("train-*.tar")))

    resumed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"({len(complete_before)} kept from an earlier run)" in resumed.stdout
    assert output_files(out) == output_files(sharded)


def test_resume_after_kill_9_of_a_parallel_run(dataset, sharded, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "data_prep", "shard", "--src", str(dataset / "train"), "--out", str(out),
           "--split", "train", "--shard-bytes", str(SHARD_BYTES), "--workers", "2", "--seed", "7"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 60
    while not list(out.glob(".star-shard-work/train-done/*.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole job, workers included, as a scheduler would
    except ProcessLookupError:
        pass  # it finished first; the rerun must then keep everything
    proc.wait()
    # Whenever the kill landed, a rerun must end with exactly the uninterrupted result.
    resumed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert output_files(out) == output_files(sharded)


def test_rerun_rewrites_a_damaged_shard_and_keeps_the_rest(dataset, sharded, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(sharded, out)
    victim = out / "train-000001.tar"
    data = bytearray(victim.read_bytes())
    data[700] ^= 0xFF
    victim.write_bytes(bytes(data))
    (out / "train-000099.tar").write_bytes(b"left over")  # a shard of an older, larger plan
    assert run_shard(dataset / "train", out) == 0
    assert output_files(out) == output_files(sharded)


def test_verify_accepts_good_output_and_names_a_flipped_byte_and_a_truncated_tar(sharded, tmp_path, capsys):
    assert verify.main([str(sharded), "--workers", "1"]) == 0

    out = tmp_path / "bad"
    shutil.copytree(sharded, out)
    flipped, truncated = out / "train-000002.tar", out / "train-000003.tar"
    data = bytearray(flipped.read_bytes())
    data[5000] ^= 0x01  # inside the first image: only the hash can tell
    flipped.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:3000])
    capsys.readouterr()
    assert verify.main([str(out), "--split", "train", "--workers", "2"]) == 1
    bad = [line for line in capsys.readouterr().err.splitlines() if line.startswith("  BAD ")]
    flipped_lines = [line for line in bad if "train-000002.tar" in line]
    truncated_lines = [line for line in bad if "train-000003.tar" in line]
    assert flipped_lines and all("sha256" in line for line in flipped_lines)
    assert any("size" in line for line in truncated_lines)
    assert not any("train-000001.tar" in line for line in bad)


def test_verify_catches_a_wrong_index_and_a_missing_shard(sharded, tmp_path, capsys):
    out = tmp_path / "bad_index"
    shutil.copytree(sharded, out)
    idx = out / "train-000000.idx"
    idx.write_text(idx.read_text().replace(" 512 ", " 1024 ", 1))
    (out / "train-000004.tar").unlink()
    capsys.readouterr()
    assert verify.main([str(out), "--workers", "1"]) == 1
    err = capsys.readouterr().err
    assert "train-000000.tar: index train-000000.idx does not match" in err
    assert "train-000004.tar: tar file is missing" in err


def test_keys_are_unique_and_dot_free_for_colliding_and_dotted_names():
    keys = shard.assign_keys([("a/x.JPEG", "a"), ("a/x.jpeg", "a"), ("b/x.JPEG", "b"), ("b/x.v2.JPEG", "b"),
                              ("c/x_1.JPEG", "c"), ("c/.hidden", "c"), ("c/we ird+name.JPEG", "c")])
    assert len(set(keys)) == len(keys)
    assert all("." not in k and "/" not in k and " " not in k for k in keys)
    assert keys[:4] == ["x", "a_x", "b_x", "x_v2"]


def test_inspection_verdicts_for_each_oddity():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8))

    def encode(img, fmt, **kw):
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        return buf.getvalue()

    jpeg = encode(image, "JPEG", quality=90)
    for check in ("decode", "markers"):
        assert inspect_image(jpeg, check).status == "ok"
        assert inspect_image(jpeg[: len(jpeg) // 2], check).status == "rejected"
        assert inspect_image(encode(image.convert("L"), "JPEG"), check).status == "ok"
        cmyk = inspect_image(encode(image.convert("CMYK"), "JPEG"), check)
        assert cmyk.status == "repaired" and Image.open(io.BytesIO(cmyk.data)).mode == "RGB"
        rgba = inspect_image(encode(image.convert("RGBA"), "PNG"), check)
        assert rgba.status == "repaired" and (rgba.width, rgba.height) == (80, 64)
        assert "zero-byte" in inspect_image(b"", check).reason
        assert "not an image" in inspect_image(b"hello world" * 10, check).reason
    corrupt = jpeg[:200] + bytes(len(jpeg) - 200)  # entropy data zeroed: no end marker either
    assert inspect_image(corrupt, "decode").status == "rejected"


def test_inspect_file_reads_only_head_and_tail_when_it_can_and_agrees_with_a_full_read(tmp_path):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8))
    variants = {}
    for name, kwargs in {"plain": {}, "progressive": {"progressive": True},
                         "big_header": {"icc_profile": bytes(100_000)}}.items():
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=90, **kwargs)
        variants[name] = buf.getvalue()
    variants["trailing_junk"] = variants["plain"] + bytes(20_000)  # end marker far from the end
    variants["truncated"] = variants["plain"][:-5000]
    for name, data in variants.items():
        path = tmp_path / f"{name}.JPEG"
        path.write_bytes(data)
        for check in ("markers", "decode"):
            verdict, size = inspect_file(str(path), check)
            assert size == len(data)
            assert verdict == inspect_image(data, check), (name, check)
            assert verdict.status == ("rejected" if name == "truncated" else "ok"), (name, check)
            if verdict.status == "ok":
                assert (verdict.width, verdict.height) == (400, 300)


def test_bad_arguments_give_clear_errors(dataset, tmp_path, capsys):
    assert shard.main(["--src", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--split", "train"]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert run_shard(dataset / "train", tmp_path / "o", "--val-labels", str(dataset / "quirks.json")) == 2
    assert "only apply to --split val" in capsys.readouterr().err


def test_python_m_data_prep_routes_to_the_commands():
    for command in ("synth", "shard", "verify"):
        result = subprocess.run([sys.executable, "-m", "data_prep", command, "--help"], cwd=REPO,
                                capture_output=True, text=True)
        assert result.returncode == 0 and f"star {command}" in result.stdout


def test_slurm_job_script_shards_train_and_val_then_verifies(tmp_path):
    """The sbatch script runs as a plain bash script too (SLURM only adds the headers)."""
    root = tmp_path / "imagenet"
    synth.synthesize(root, classes=3, per_class=3, val_per_class=2, seed=0)
    env = {**os.environ, "SRC": str(root), "OUT": str(tmp_path / "shards"), "WORKERS": "1",
           "STAR_CMD": f"{sys.executable} -m data_prep", "STAR_ROOT": str(REPO)}
    env.pop("SLURM_JOB_ID", None)
    result = subprocess.run(["bash", str(REPO / "slurm" / "shard_imagenet.sh")], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "all shards, indexes and counts match" in result.stdout
    for split, count in (("train", 9), ("val", 6)):
        assert json.loads((tmp_path / "shards" / f"{split}.json").read_text())["num_samples"] == count

    env["SRC"] = str(tmp_path / "missing")
    result = subprocess.run(["bash", str(REPO / "slurm" / "shard_imagenet.sh")], cwd=tmp_path, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 2 and "no train/ folder" in result.stderr


def test_rerun_after_a_kill_during_inspection_reuses_the_cut_cache(dataset, sharded, tmp_path):
    out = tmp_path / "inspect_killed"
    assert run_shard(dataset / "train", out) == 0
    cache = out / shard.WORK_DIR / "train-inspect.jsonl"
    lines = cache.read_text().splitlines(keepends=True)
    cache.write_text("".join(lines[:10]) + lines[10][:25])  # a kill mid-line, after 10 verdicts
    for p in out.glob("train*"):
        p.unlink()
    shutil.rmtree(out / shard.WORK_DIR / "train-done")
    assert run_shard(dataset / "train", out) == 0
    assert output_files(out) == output_files(sharded)
    verdicts = [json.loads(line) for line in cache.read_text().splitlines()[11:]]
    assert len(verdicts) == len(lines) - 10  # only the files without a complete verdict were inspected again
