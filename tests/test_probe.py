"""`star probe`: DINO's weighted k-NN against a loop written from its definition, MAE's linear
probe on separable features, the 1-image encoder features against the packed pretraining
sequence, exactly-once extraction over ranks, and the command from every checkpoint form."""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from star.config import load_config
from star.models.pretrain import IMAGE
from star.probe import (
    FeatureSet,
    LinearProbeConfig,
    encoder_features,
    extract_features,
    gather_features,
    knn_accuracy,
    knn_classify,
    knn_predict,
    linear_probe,
    probe_loader,
    subset_indices,
)
from star.probe.cli import main as probe_main
from star.probe.linear import LARS
from star.train.runtime import build_model
from tests.test_train_support import (
    TINY_PRETRAIN,
    read_log,
    run_star,
    shard_dir,
    star_env,
)

TINY = ["model.embed_dim=32", "model.depth=2", "model.img_size=64", "data.num_threads=1"]


# ----- k-NN -----

def knn_reference(train: np.ndarray, train_labels: np.ndarray, val: np.ndarray, *, num_classes: int,
                  k: int, temperature: float) -> tuple[list[list[int]], list[int]]:
    """DINO's rule one val image at a time: cosine similarity to every train image, the k most
    similar vote exp(s / T) for their label; the classes that received a vote ranked by summed
    vote, -1 for the remaining places of the top 5. Also returns how many classes got a vote."""
    ranked, voted = [], []
    for v in val:
        sims = []
        for j, t in enumerate(train):
            sims.append((float(np.dot(v, t) / (np.linalg.norm(v) * np.linalg.norm(t))), j))
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for s, j in sims[:k]:
            votes[int(train_labels[j])] += math.exp(s / temperature)
        order = [c for c in sorted(range(num_classes), key=lambda c: -votes[c]) if votes[c] > 0]
        ranked.append((order + [-1] * 5)[:5])
        voted.append(sum(1 for x in votes if x > 0))
    return ranked, voted


def test_knn_matches_brute_force_reference():
    rng = np.random.default_rng(0)
    classes, dim = 10, 16
    centres = rng.normal(size=(classes, dim))
    train_labels = rng.integers(0, classes, 300)
    val_labels = rng.integers(0, classes, 90)
    train = centres[train_labels] + 1.5 * rng.normal(size=(300, dim))
    val = centres[val_labels] + 1.5 * rng.normal(size=(90, dim))
    ranked, voted = knn_reference(train, train_labels, val, num_classes=classes, k=20, temperature=0.07)
    assert min(voted) < 5 < max(voted)  # both cases occur: full top-5 lists and -1 padding
    args = (torch.from_numpy(train), torch.from_numpy(train_labels), torch.from_numpy(val))
    for chunk in (7, 1000):  # chunking over val changes nothing
        pred = knn_predict(*args, num_classes=classes, k=20, temperature=0.07, chunk_size=chunk)
        assert pred.tolist() == ranked
    result = knn_classify(*args, torch.from_numpy(val_labels), num_classes=classes)
    top1 = 100 * np.mean([r[0] == y for r, y in zip(ranked, val_labels)])
    top5 = 100 * np.mean([y in r for r, y in zip(ranked, val_labels)])
    assert (result["top1"], result["top5"], result["images"]) == (top1, top5, 90)
    assert 30 < top1 < 100  # the data are neither trivial nor noise


# ----- linear probe -----

def separable(rng: torch.Generator, n: int, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.randint(0, centres.shape[0], (n,), generator=rng)
    x = centres[labels] + 0.5 * torch.randn(n, centres.shape[1], generator=rng)
    return 40.0 * x + 7.0, labels  # a scale and offset the affine-free BatchNorm must absorb


def test_linear_probe_separates_separable_features():
    rng = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 64, generator=rng)
    train, train_y = separable(rng, 1000, centres)
    val, val_y = separable(rng, 400, centres)
    before = torch.get_rng_state()
    result = linear_probe(train, train_y, val, val_y, num_classes=10,
                          config=LinearProbeConfig(epochs=30, warmup_epochs=3))
    assert torch.equal(torch.get_rng_state(), before)  # its own stream: training's stays untouched
    assert result["top1"] > 95 and result["top5"] == 100.0 and result["images"] == 400
    assert result["used_batch_size"] == 1000 // 8 and result["steps"] == 30 * 8


def test_lars_step_from_its_definition():
    torch.manual_seed(0)
    w, b = torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(3))
    w.grad, b.grad = torch.randn(3, 4), torch.randn(3)
    w0, b0, gw, gb = w.detach().clone(), b.detach().clone(), w.grad.clone(), b.grad.clone()
    LARS([w, b], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.001).step()
    update = gw + 0.1 * w0
    update = update * (0.001 * w0.norm() / update.norm())  # trust ratio for matrices only
    assert torch.allclose(w.detach(), w0 - 0.5 * update)
    assert torch.allclose(b.detach(), b0 - 0.5 * gb)


# ----- features -----

@pytest.mark.parametrize("preset_overrides", [[], ["model.name=arm_tiny_pz8", "model.images_per_seq=1",
                                                    "model.sep_type=none"]], ids=["star", "arm"])
def test_encoder_features_equal_the_first_image_of_a_packed_sequence(preset_overrides):
    """Independent reference: the model's own packer and encoder on a full N-image sequence.
    The scan is causal, so the outputs at the first image's tokens are those of that image alone
    (with its leading separator for STAR's SC)."""
    torch.manual_seed(0)
    model = build_model(load_config("smoke", TINY + preset_overrides)).eval()
    n = model.packing.images_per_seq
    images = torch.randn(3 * n, 3, 64, 64)
    with torch.no_grad():
        hidden = model.packer(model.patch_embed(images) + model.pos_embed)
        for layer in model.layers:
            hidden = layer(hidden)
        layout = model.layout
        first = torch.nonzero((layout.tokens.image == 0) & (layout.tokens.kind == IMAGE)).flatten()
        mean_ref, last_ref = hidden[:, first].mean(1), hidden[:, first[-1]]
        firsts = images[::n]
        assert torch.allclose(encoder_features(model, firsts, "mean"), mean_ref, atol=1e-5)
        assert torch.allclose(encoder_features(model, firsts, "last"), last_ref, atol=1e-5)
        assert encoder_features(model, firsts).shape == (3, 32)


def test_subsets_are_fixed_by_the_seed():
    a = subset_indices(1000, 100, seed=3, split="train")
    assert len(a) == len(np.unique(a)) == 100 and np.all(np.diff(a) > 0) and a.max() < 1000
    assert np.array_equal(a, subset_indices(1000, 100, seed=3, split="train"))
    assert not np.array_equal(a, subset_indices(1000, 100, seed=4, split="train"))
    assert not np.array_equal(a, subset_indices(1000, 100, seed=3, split="val"))
    assert subset_indices(1000, None, 0, "train") is None and subset_indices(10, 10, 0, "train") is None


def test_rank_shards_cover_every_image_exactly_once():
    """The eval plan's sharding called as ranks 0 and 1 of 2 (20 val images, 2 x 7 per step:
    padding in the last step): together they hold each position once; the gather check
    rejects a duplicate and a gap."""
    torch.manual_seed(0)
    model = build_model(load_config("smoke", TINY))
    parts = []
    for rank in range(2):
        loader = probe_loader(shard_dir(), "val", image_size=64, batch_size=7, rank=rank, world_size=2,
                              device="cpu", num_threads=1)
        parts.append(extract_features(model, loader))
    assert [len(p) for p in parts] == [7 + 6, 7 + 0]  # step 1: rank 0 holds 14..19, rank 1 only padding
    merged = FeatureSet(torch.cat([p.features for p in parts]), torch.cat([p.labels for p in parts]),
                        torch.cat([p.positions for p in parts]), parts[0].num_classes)
    whole = gather_features(merged, 20)
    assert whole.positions.tolist() == list(range(20))
    single_loader = probe_loader(shard_dir(), "val", image_size=64, batch_size=5, rank=0, world_size=1,
                                 device="cpu", num_threads=1)
    single = extract_features(model, single_loader)
    assert torch.equal(whole.labels, single.labels)
    assert torch.allclose(whole.features, single.features, atol=1e-5)
    again = extract_features(model, loader)  # a loader is reusable (the in-loop monitor keeps its own)
    assert torch.equal(again.features, parts[1].features) and torch.equal(again.positions, parts[1].positions)
    # the in-loop monitor's entry point: no random stream used, training mode restored
    model.train()
    before = torch.get_rng_state()
    result = knn_accuracy(model, single_loader, single_loader, k=5)
    assert torch.get_rng_state().equal(before) and model.training
    expected = knn_classify(single.features, single.labels, single.features, single.labels, num_classes=4, k=5)
    assert {key: result[key] for key in expected} == expected and result["train_images"] == 20
    dup = FeatureSet(merged.features, merged.labels, merged.positions.clone(), 4)
    dup.positions[3] = dup.positions[4]
    with pytest.raises(RuntimeError, match="exactly once"):
        gather_features(dup, 20)


# ----- the command -----

def probe(args: list[str], capsys) -> tuple[int, str]:
    code = probe_main(args)
    return code, capsys.readouterr().err


def saved(path) -> dict:
    return torch.load(path, weights_only=True)


def test_probe_from_weights_files_and_random_init(tmp_path, capsys):
    data = str(shard_dir())
    common = ["--data", data, "--batch-size", "16", *TINY]
    torch.manual_seed(123)
    model = build_model(load_config("smoke", TINY))
    torch.save(model.state_dict(), tmp_path / "export.pth")
    # ARM's release layout: a MAE-style dict with the weights under "model" and the run's args
    torch.save({"model": model.state_dict(), "epoch": 1599, "args": argparse.Namespace(lr=1e-3)},
               tmp_path / "arm.pth")
    runs = {"export": ["--ckpt", str(tmp_path / "export.pth")], "arm": ["--ckpt", str(tmp_path / "arm.pth")],
            "random123": ["--random-init", "--seed", "123"], "random0": ["--random-init"]}
    out = {}
    for name, extra in runs.items():
        code, err = probe(["knn", "--config", "smoke", *extra, *common, "--json", str(tmp_path / f"{name}.json"),
                           "--save-features", str(tmp_path / f"{name}.pt")], capsys)
        assert code == 0, err
        out[name] = (json.loads((tmp_path / f"{name}.json").read_text()), saved(tmp_path / f"{name}.pt"))
    result = out["export"][0]
    sizes = (result["train_images"], result["val_images"], result["feature_dim"], result["num_classes"])
    assert sizes == (96, 20, 32, 4)
    assert result["checkpoint_form"] == "weights_file" and out["random0"][0]["checkpoint_form"] == "random_init"
    assert result["pool"] == "mean" and 0 <= result["top1"] <= result["top5"] <= 100
    # the file's weights are used: its features are those of the same init drawn directly
    for key in ("train_features", "val_features"):
        assert torch.equal(out["export"][1][key], out["random123"][1][key])
        assert torch.equal(out["arm"][1][key], out["random123"][1][key])
        assert not torch.allclose(out["export"][1][key], out["random0"][1][key])
    assert torch.equal(out["export"][1]["val_labels"], out["random0"][1]["val_labels"])
    assert out["export"][0]["top1"] == out["arm"][0]["top1"] == out["random123"][0]["top1"]


def test_probe_linear_subsets_and_last_token(tmp_path, capsys):
    code, err = probe(["linear", "--random-init", "--config", "smoke", "--data", str(shard_dir()), *TINY,
                       "--pool", "last", "--train-images", "40", "--val-images", "11", "--epochs", "5",
                       "--warmup-epochs", "1", "--json", str(tmp_path / "r.json")], capsys)
    assert code == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    assert (result["mode"], result["pool"], result["train_images"], result["val_images"]) == ("linear", "last", 40, 11)
    assert result["steps"] == 5 * 8 and 0 <= result["top1"] <= result["top5"] <= 100


@pytest.mark.parametrize("args,needle", [
    (["--ckpt", "missing.pth", "--config", "smoke"], "missing.pth: no such run directory or file"),
    (["--config", "smoke"], "--random-init"),
    (["--random-init", "--config", "smoke", "--data", "nowhere"], "nowhere: no train.json"),
    (["--random-init"], "--model NAME"),
    (["--random-init", "--config", "smoke_finetune"], "pretraining model"),
    (["--random-init", "--model", "no_such_model"], "unknown model"),
])
def test_user_errors_are_one_line_exit_2(args, needle, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if "--data" not in args:
        args = args + ["--data", str(shard_dir())]
    code, err = probe(["knn", *args], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("star probe: error:") and needle in err, err


def test_weights_of_another_model_are_a_user_error(tmp_path, capsys):
    torch.save(build_model(load_config("smoke", TINY)).state_dict(), tmp_path / "tiny.pth")
    code, err = probe(["knn", "--ckpt", str(tmp_path / "tiny.pth"), "--config", "smoke", "--data",
                       str(shard_dir()), "model.embed_dim=48", "model.depth=2", "model.img_size=64"], capsys)
    assert code == 2 and "does not fit" in err and err.count("\n") == 1, err


@pytest.mark.slow
@pytest.mark.distributed
def test_two_ranks_extract_every_image_once_like_one(tmp_path):
    """A real 2-process gloo run: 96 train / 20 val with 2 x 7 images per step (neither divides)."""
    torch.manual_seed(5)
    torch.save(build_model(load_config("smoke", TINY)).state_dict(), tmp_path / "w.pth")
    base = ["probe", "knn", "--ckpt", str(tmp_path / "w.pth"), "--config", "smoke", "--data", str(shard_dir()),
            "--batch-size", "7", "--device", "cpu", *TINY]
    for world in (1, 2):
        args = base + ["--json", f"r{world}.json", "--save-features", f"f{world}.pt"]
        codes = run_star(args, cwd=tmp_path, world_size=world, log_name=f"w{world}", timeout=120)
        assert codes == [0] * world, read_log(tmp_path, f"w{world}")[-3000:]
    one, two = saved(tmp_path / "f1.pt"), saved(tmp_path / "f2.pt")
    r1, r2 = (json.loads((tmp_path / f"r{w}.json").read_text()) for w in (1, 2))
    assert (r2["world_size"], r2["train_images"], r2["val_images"]) == (2, 96, 20)
    for split in ("train", "val"):
        assert torch.equal(one[f"{split}_labels"], two[f"{split}_labels"])
        assert torch.allclose(one[f"{split}_features"], two[f"{split}_features"], atol=1e-5)
    assert (r1["top1"], r1["top5"]) == (r2["top1"], r2["top5"])


@pytest.mark.slow
@pytest.mark.distributed
def test_probe_from_a_pretraining_run_dir(tmp_path):
    """A 2-step `star pretrain --config smoke` run dir; the same weights via `star export`."""
    run_dir = tmp_path / "run"
    args = ["pretrain", "--config", "smoke", "--run-dir", str(run_dir), f"data.dir={shard_dir()}",
            *TINY_PRETRAIN, "batch.global_images=16", "batch.micro_images=8", "schedule.max_steps=2",
            "ds_config=cpu_zero2_fp32"]
    assert run_star(args, cwd=tmp_path, log_name="pre") == [0], read_log(tmp_path, "pre")[-3000:]
    proc = subprocess.run([sys.executable, "-m", "star", "export", str(run_dir), "--out", str(tmp_path / "m.pth")],
                          check=False, cwd=tmp_path, env=star_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    common = ["--data", str(shard_dir()), "--val-images", "12", "--train-images", "30", "--device", "cpu"]
    runs = {"run": ["--ckpt", str(run_dir)],
            "file": ["--ckpt", str(tmp_path / "m.pth"), "--config", "smoke", *TINY_PRETRAIN]}
    for name, extra in runs.items():
        cmd = ["probe", "knn", *extra, *common, "--json", f"{name}.json", "--save-features", f"{name}.pt"]
        assert run_star(cmd, cwd=tmp_path, log_name=name) == [0], read_log(tmp_path, name)[-3000:]
    result = json.loads((tmp_path / "run.json").read_text())
    assert result["checkpoint_form"] == "run_dir" and result["feature_dim"] == 32
    assert (result["train_images"], result["val_images"]) == (30, 12)
    a, b = saved(tmp_path / "run.pt"), saved(tmp_path / "file.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # the registry's full tiny model (192 x 6 at 96 px): about 12 s on 2 cores
@pytest.mark.filterwarnings("ignore:ignoring the checkpoint's cached decoder 'mask'")
def test_probe_arm_release_layout_with_registry_model(tmp_path, capsys):
    """ARM's released file as it is: registry model (no config), weights under "model", the run's
    args, and ARM's cached decoder ``mask`` buffer (ignored by the model)."""
    from star.models import create_model

    torch.manual_seed(7)
    state = create_model("arm_tiny_pz8").state_dict()
    state["mask"] = torch.zeros(8, 8)
    torch.save({"model": state, "args": argparse.Namespace(model="arm_tiny_pz8")}, tmp_path / "checkpoint-1599.pth")
    common = ["--model", "arm_tiny_pz8", "--data", str(shard_dir()), "--train-images", "16", "--val-images", "6"]
    for name, extra in {"arm": ["--ckpt", str(tmp_path / "checkpoint-1599.pth")],
                        "init": ["--random-init", "--seed", "7"]}.items():
        code, err = probe(["knn", *extra, *common, "--seed", "7", "--json", str(tmp_path / f"{name}.json"),
                           "--save-features", str(tmp_path / f"{name}.pt")], capsys)
        assert code == 0, err
    result = json.loads((tmp_path / "arm.json").read_text())
    assert (result["model"], result["feature_dim"], result["train_images"]) == ("arm_tiny_pz8", 192, 16)
    a, b = saved(tmp_path / "arm.pt"), saved(tmp_path / "init.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
