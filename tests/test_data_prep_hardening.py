"""Hostile and mistaken input to `star shard` / `star verify` / the loaders (issue 13, data side).

References are independent of the code under test: the files actually on disk (listed with
plain `os.walk` without following links), tar members read with `tarfile`, and what a user
would expect of each mistake (one line naming the file or entry, exit code 2, nothing read).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from data_prep import labels, shard, synth, verify, wds_tar
from data_prep import manifest as manifest_mod
from data_prep.manifest import ManifestError
from pipelines import build_loader
from pipelines import shards as pipeline_shards
from pipelines.shards import ShardSet
from star.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


def run_shard(src: Path, out: Path, *extra: str, split: str = "train") -> int:
    return shard.main(["--src", str(src), "--out", str(out), "--split", split, "--workers", "1", *extra])


def one_line(err: str) -> str:
    """The error output must be exactly one line and no traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def real_files(root: Path) -> list[str]:
    """Regular files under `root` reached without following any link (the reference)."""
    found = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath, name)
            if not path.is_symlink():
                found.append(str(path.relative_to(root)))
    return sorted(found)


def sharded_sources(out: Path, split: str = "train") -> list[str]:
    """'wnid/file' of every sample in the shards (from each sample's .json), asserting each key once."""
    seen, keys = [], set()
    for entry in json.loads((out / f"{split}.json").read_text())["shards"]:
        with tarfile.open(out / entry["name"]) as tar:
            for member in tar:
                key, ext = wds_tar.split_name(member.name)
                if ext == "json":
                    assert key not in keys
                    keys.add(key)
                    meta = json.loads(tar.extractfile(member).read())
                    seen.append(f"{meta['wnid']}/{meta['file']}")
    return sorted(seen)


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    synth.synthesize(root, classes=3, per_class=3, val_per_class=2, seed=5)
    return root


@pytest.fixture(scope="module")
def sharded(tree, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    assert run_shard(tree / "train", out, "--shard-bytes", "100000") == 0
    assert len(json.loads((out / "train.json").read_text())["shards"]) >= 2
    return out


def copy_src(tree: Path, tmp_path: Path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(tree / "train", src)
    return src


# ----------------------------------------------------------------------------- 2. manifest paths


@pytest.mark.parametrize("how", ["dotdot", "absolute", "link", "index"])
def test_manifest_paths_outside_the_data_dir_are_refused_by_loaders_and_verify(sharded, tmp_path, capsys, how):
    data = tmp_path / "data"
    shutil.copytree(sharded, data)
    elsewhere = tmp_path / "x"
    elsewhere.mkdir()
    manifest = json.loads((data / "train.json").read_text())
    entry = manifest["shards"][1]
    # The real shard files, moved outside the data dir: only the paths are wrong, so a reader
    # that does not check paths accepts them (sizes and hashes all match).
    moved = ("index",) if how == "index" else ("name", "index")
    for f in moved:
        shutil.move(data / entry[f], elsewhere / entry[f])
        if how in ("dotdot", "index"):
            entry[f] = f"../x/{entry[f]}"
        elif how == "absolute":
            entry[f] = str(elsewhere / entry[f])
        else:  # a link inside the data dir that resolves outside it
            os.symlink(elsewhere / entry[f], data / entry[f])
    field = moved[0]
    (data / "train.json").write_text(json.dumps(manifest))

    with pytest.raises(ManifestError) as info:
        ShardSet(data, "train")
    message = str(info.value)
    assert f"shards[1].{field}" in message and "outside the data directory" in message and "\n" not in message
    with pytest.raises(ConfigError):  # pretrain / finetune report ConfigErrors in one line, exit 2
        build_loader("eval", data, split="train", batch_size=2, image_size=32, backend="baseline", num_threads=1)

    assert verify.main([str(data), "--workers", "1"]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"shards[1].{field}" in line and str(data / "train.json") in line


def test_shard_file_accepts_plain_names_only(tmp_path):
    assert manifest_mod.shard_file(tmp_path, "train-000000.tar", "e") == tmp_path / "train-000000.tar"
    for bad in ("../a.tar", "sub/../../a.tar", "/etc/passwd", "\\\\server\\share\\a.tar", "", None, 3):
        with pytest.raises(ManifestError, match="e = "):
            manifest_mod.shard_file(tmp_path, bad, "e")


# ----------------------------------------------------------------------------- 3. symlink loops


def test_one_symlink_loop_stores_every_image_once_and_is_reported(tree, tmp_path):
    src = copy_src(tree, tmp_path)
    cls = sorted(p.name for p in src.iterdir())[0]
    os.symlink("..", src / cls / "up")  # SRC/cls/up -> SRC: a loop through the source root
    out = tmp_path / "out"
    assert run_shard(src, out) == 0
    manifest = json.loads((out / "train.json").read_text())
    assert sharded_sources(out) == real_files(src)
    assert manifest["files_in"] == len(real_files(src))
    assert [(s["path"], "loop" in s["reason"]) for s in manifest["skipped_links"]] == [(f"{cls}/up", True)]


def test_two_loops_in_one_class_folder_finish_quickly(tree, tmp_path):
    """Without a memory of visited folders, two loops make the walk exponential (it never ended)."""
    src = copy_src(tree, tmp_path)
    cls = sorted(p.name for p in src.iterdir())[1]
    os.symlink(".", src / cls / "again")
    os.symlink(f"../{cls}", src / cls / "and_again")
    out = tmp_path / "out"
    result = subprocess.run(["timeout", "120", sys.executable, "-m", "data_prep", "shard", "--src", str(src),
                             "--out", str(out), "--split", "train", "--workers", "1"],
                            cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-2000:]
    manifest = json.loads((out / "train.json").read_text())
    assert sharded_sources(out) == real_files(src)
    assert sorted(s["path"] for s in manifest["skipped_links"]) == [f"{cls}/again", f"{cls}/and_again"]
    assert all("loop" in s["reason"] for s in manifest["skipped_links"])
    assert "2 folder link(s) not followed" in result.stdout


def test_link_to_a_folder_inside_src_is_not_read_twice(tree, tmp_path):
    src = copy_src(tree, tmp_path)
    a, b = sorted(p.name for p in src.iterdir())[:2]
    os.symlink(f"../{b}", src / a / "alias")  # b's images must stay b's, once
    out = tmp_path / "out"
    assert run_shard(src, out) == 0
    assert sharded_sources(out) == real_files(src)
    manifest = json.loads((out / "train.json").read_text())
    assert [s["path"] for s in manifest["skipped_links"]] == [f"{a}/alias"]


# ----------------------------------------------------------------------------- 4. links out of SRC


def test_links_out_of_src_are_rejected_by_default_and_followed_on_request(tree, tmp_path):
    src = copy_src(tree, tmp_path)
    wnids = sorted(p.name for p in src.iterdir())
    val = tree / "val" / wnids[0]
    os.symlink(val, src / wnids[0] / "from_val")  # a folder link out of SRC (validation images!)
    outside_file = sorted(val.iterdir())[0]
    os.symlink(outside_file, src / wnids[1] / "linked.JPEG")  # a file link out of SRC
    inside = real_files(src)

    out = tmp_path / "out"
    assert run_shard(src, out) == 0
    manifest = json.loads((out / "train.json").read_text())
    assert sharded_sources(out) == inside  # no validation image in train
    assert [(s["path"], s["target"]) for s in manifest["skipped_links"]] == [(f"{wnids[0]}/from_val", str(val))]
    assert "--follow-external-links" in manifest["skipped_links"][0]["reason"]
    rejected = {r["file"]: r["reason"] for r in manifest["rejected"]}
    assert set(rejected) == {f"{wnids[1]}/linked.JPEG"} and "outside --src" in rejected[f"{wnids[1]}/linked.JPEG"]
    assert manifest["files_in"] == manifest["num_samples"] + len(manifest["rejected"])
    assert verify.main([str(out), "--workers", "1"]) == 0

    out2 = tmp_path / "out2"
    assert run_shard(src, out2, "--follow-external-links") == 0
    expected = inside + [f"{wnids[0]}/{p.name}" for p in sorted(val.iterdir())] + [f"{wnids[1]}/linked.JPEG"]
    assert sharded_sources(out2) == sorted(expected)
    assert json.loads((out2 / "train.json").read_text())["skipped_links"] == []


def test_followed_external_links_are_still_read_once(tree, tmp_path):
    src = copy_src(tree, tmp_path)
    wnids = sorted(p.name for p in src.iterdir())
    ext = tmp_path / "ext"
    shutil.copytree(tree / "val" / wnids[2], ext)
    os.symlink(ext, ext / "self")  # a loop outside SRC
    os.symlink(ext, src / wnids[2] / "more")
    out = tmp_path / "out"
    assert run_shard(src, out, "--follow-external-links") == 0
    expected = real_files(src) + [f"{wnids[2]}/{p.name}" for p in sorted(ext.iterdir()) if not p.is_symlink()]
    assert sharded_sources(out) == sorted(expected)
    links = json.loads((out / "train.json").read_text())["skipped_links"]
    assert [s["path"] for s in links] == [f"{wnids[2]}/more/self"] and "loop" in links[0]["reason"]


# ----------------------------------------------------------------------------- 5. empty classes


def test_empty_class_folder_is_refused_by_name_unless_allowed(tree, tmp_path, capsys):
    src = copy_src(tree, tmp_path)
    (src / "n09999999").mkdir()
    out = tmp_path / "out"
    assert run_shard(src, out) == 2
    line = one_line(capsys.readouterr().err)
    assert "n09999999" in line and "--allow-empty-classes" in line
    assert not (out / "classes.json").exists() and not (out / "train.json").exists()

    assert run_shard(src, out, "--allow-empty-classes") == 0
    err = capsys.readouterr().err
    assert "warning" in err and "n09999999" in err
    manifest = json.loads((out / "train.json").read_text())
    wnids = json.loads((out / "classes.json").read_text())["wnids"]
    assert wnids == sorted(p.name for p in src.iterdir())
    assert manifest["class_counts"][wnids.index("n09999999")] == 0 and manifest["empty_classes"] == ["n09999999"]
    assert verify.main([str(out), "--workers", "1"]) == 0


def test_class_whose_files_are_all_rejected_is_refused(tree, tmp_path, capsys):
    src = copy_src(tree, tmp_path)
    (src / "n08888888").mkdir()
    (src / "n08888888" / "notes.JPEG").write_text("not an image")
    out = tmp_path / "out"
    assert run_shard(src, out) == 2
    line = _last_line(capsys)
    assert "n08888888" in line and "rejected" in line
    assert not (out / "classes.json").exists()


def _last_line(capsys) -> str:
    """Only the error line: the inspection progress (a log line without a terminal) precedes it."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("star shard: error:")][-1]


# ----------------------------------------------------------------------------- 6. bad --out


def test_out_that_is_a_file_or_below_a_file_is_one_line(tree, tmp_path, capsys):
    target = tmp_path / "a_file"
    target.write_text("x")
    assert run_shard(tree / "train", target) == 2
    assert "is a file" in one_line(capsys.readouterr().err)
    assert run_shard(tree / "train", target / "sub") == 2
    assert "cannot create --out" in one_line(capsys.readouterr().err)
    assert target.read_text() == "x"


def _make_read_only(folder: Path, request, monkeypatch) -> str:
    """Make `folder` unwritable for this process. As root, permission bits do not bind, so use
    the immutable attribute (chattr +i); where that is not available, fail the probe's file
    creation itself (the code path is the same: an OSError from creating a file)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        request.addfinalizer(lambda: folder.chmod(0o755))
        return "chmod"
    if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        request.addfinalizer(lambda: subprocess.run(["chattr", "-i", str(folder)], check=True))
        return "chattr"
    real_mkstemp = shard.tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == folder:
            raise PermissionError(13, "Permission denied", str(folder))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(shard.tempfile, "mkstemp", refuse)
    return "mock"


def test_read_only_out_is_one_line(tree, tmp_path, capsys, request, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    how = _make_read_only(out, request, monkeypatch)
    if how != "mock":  # the folder really refuses new files, even to root
        with pytest.raises(OSError):
            (out / "probe").write_text("x")
    assert run_shard(tree / "train", out) == 2
    line = one_line(capsys.readouterr().err)
    assert "not writable" in line and str(out) in line


# ----------------------------------------------------------------------------- 7. damaged manifest


def test_damaged_manifest_names_file_line_and_what_to_do(sharded, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(sharded, data)
    text = (data / "train.json").read_text()
    lines = text.splitlines(keepends=True)
    (data / "train.json").write_text("".join(lines[:5]) + lines[5][:3])  # cut mid-line 6
    with pytest.raises(ManifestError) as info:
        ShardSet(data, "train")
    message = str(info.value)
    assert f"{data / 'train.json'}:6:" in message and "star shard" in message and "star verify" in message
    assert verify.main([str(data), "--workers", "1"]) == 2
    line = one_line(capsys.readouterr().err)
    assert str(data / "train.json") in line and "star shard" in line

    (data / "train.json").write_text(json.dumps({"num_classes": 3, "num_samples": 1, "shards": [{"name": "a"}]}))
    with pytest.raises(ManifestError, match=r"shards\[0\]\.index is missing"):
        ShardSet(data, "train")


def test_finetune_names_a_damaged_manifest_before_start_up(sharded, tmp_path, capsys):
    """`star finetune` reads the class count from the manifest before anything starts."""
    from star.train import finetune

    data = tmp_path / "data"
    shutil.copytree(sharded, data)
    (data / "train.json").write_text((sharded / "train.json").read_text()[:200])
    code = finetune.main(["--config", "smoke_finetune", f"data.dir={data}", "--run-dir", str(tmp_path / "run")])
    assert code == 2
    line = one_line(capsys.readouterr().err)
    assert str(data / "train.json") in line and "star shard" in line


def test_a_folder_that_cannot_be_listed_stops_the_run(tree, tmp_path, capsys, monkeypatch):
    """Unlistable folders used to be skipped silently (their images missing without a trace)."""
    src = copy_src(tree, tmp_path)
    locked = sorted(src.iterdir())[1]
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(labels.os, "scandir", scandir)
    assert run_shard(src, tmp_path / "out") == 2
    line = one_line(capsys.readouterr().err)
    assert str(locked) in line and "Permission denied" in line


# ----------------------------------------------------------------------------- 8. one key rule


def test_every_reader_uses_the_sharders_key_rule():
    assert verify.split_name is wds_tar.split_name and pipeline_shards.split_name is wds_tar.split_name
    assert wds_tar.split_name("./a.b/n01_x.cls") == ("./a.b/n01_x", "cls")
    assert wds_tar.split_name("key.tar.gz") == ("key", "tar.gz")


def test_dotted_folder_names_end_to_end(tree, tmp_path, capsys):
    """synth -> dotted source folders -> shard -> verify -> loader reads every key once, with the
    label of the folder; then the same shards with members under dotted folders ('./v1.0/KEY.jpg',
    as `tar` of a folder writes them), which verify and the loaders must key the same way."""
    src = tmp_path / "src"
    wnids = sorted(p.name for p in (tree / "train").iterdir())
    for i, w in enumerate(wnids):  # class folders with dots, and dotted sub-folders
        shutil.copytree(tree / "train" / w, src / f"{w}.v{i}" / "batch.1")
    out = tmp_path / "out"
    assert run_shard(src, out, "--shard-bytes", "100000") == 0
    assert verify.main([str(out), "--workers", "1"]) == 0
    capsys.readouterr()
    assert _loader_labels_by_source(out) == {rel: rel.split("/")[0] for rel in real_files(src)}

    # Re-pack every shard with its members under dotted folders.
    manifest = json.loads((out / "train.json").read_text())
    for entry in manifest["shards"]:
        buf = io.BytesIO()
        with tarfile.open(out / entry["name"]) as old, tarfile.open(fileobj=buf, mode="w",
                                                                    format=tarfile.USTAR_FORMAT) as new:
            for member in old:
                data = old.extractfile(member).read()
                member.name = f"./v1.0/{member.name}"
                new.addfile(member, io.BytesIO(data))
        (out / entry["name"]).write_bytes(buf.getvalue())
        scan = wds_tar.scan_tar(out / entry["name"])
        (out / entry["index"]).write_text(wds_tar.index_text(scan.samples))
        entry["bytes"], entry["sha256"] = len(buf.getvalue()), hashlib.sha256(buf.getvalue()).hexdigest()
    (out / "train.json").write_text(json.dumps(manifest))
    assert verify.main([str(out), "--workers", "1"]) == 0, capsys.readouterr().err
    keys = [ShardSet(out, "train").name(i)[1] for i in range(manifest["num_samples"])]
    assert len(set(keys)) == len(keys) and all(k.startswith("./v1.0/") and "." not in k[7:] for k in keys)
    assert _loader_labels_by_source(out) == {rel: rel.split("/")[0] for rel in real_files(src)}


def _loader_labels_by_source(out: Path) -> dict[str, str]:
    """Eval loader over train: 'folder/file' of each sample (from its .json, found by the
    loader's key) -> the class folder its label names. Every sample must come exactly once."""
    wnids = json.loads((out / "classes.json").read_text())["wnids"]
    meta_of_key = {}
    for entry in json.loads((out / "train.json").read_text())["shards"]:
        with tarfile.open(out / entry["name"]) as tar:
            for member in tar:
                key, ext = wds_tar.split_name(member.name)
                if ext == "json":
                    meta_of_key[key] = json.loads(tar.extractfile(member).read())
    loader = build_loader("eval", out, split="train", batch_size=4, image_size=32, backend="baseline",
                          num_threads=1)
    got: dict[str, str] = {}
    for batch in loader.epoch(0):
        for index, label, valid in zip(batch.indices.tolist(), batch.labels.tolist(), batch.valid.tolist()):
            if valid:
                meta = meta_of_key[loader.shards.name(index)[1]]
                source = f"{meta['wnid']}/batch.1/{meta['file']}"
                assert source not in got
                got[source] = wnids[label]
    return got
