"""`star demo`: the quick demo end to end as a user runs it, plus its building blocks.

The end-to-end run is the real CLI in a subprocess (synth, shard, verify, k-NN and linear
probes of the random and the pretrained encoder, DeepSpeed pretraining through the DALI CPU
pipeline, export, two fine-tunes, two evaluations, figures); its summary is checked against
what the stages wrote themselves (the eval and probe JSON files, metrics.jsonl, the images),
not against the demo's own arithmetic only.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from star.demo import plots
from star.demo import run as demo
from star.demo.plots import moving_average, to_display

REPO = Path(__file__).resolve().parents[1]
FIGURES = ("training_curves", "finetune_accuracy", "probe_comparison", "knn_monitor", "predictions")
STAGES = ("synth", "synth_labeled", "shard_train", "shard_val", "shard_labeled", "shard_labeled_val", "verify",
          "verify_labeled", "probe_knn_random_init", "probe_linear_random_init", "pretrain", "export",
          "probe_knn_pretrained", "probe_linear_pretrained", "finetune_pretrained", "finetune_scratch",
          "eval_pretrained", "eval_scratch")


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "star", "demo", "--quick", "--out", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"star demo --quick failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return out, proc.stdout, json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_quick_demo_writes_every_figure(quick_demo):
    out, _, summary = quick_demo
    assert set(summary["figures"]) == set(FIGURES)
    for name in FIGURES:
        path = out / f"{name}.png"
        assert Path(summary["figures"][name]) == path
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.width > 400 and image.height > 300
            pixels = np.asarray(image.convert("L"))
        assert pixels.std() > 5, f"{path} looks blank"


@pytest.mark.slow
def test_quick_demo_summary_matches_what_the_stages_wrote(quick_demo):
    out, stdout, summary = quick_demo
    for key in ("quick", "seed", "dataset", "pretrain", "knn_monitor", "probes", "finetune_pretrained",
                "finetune_scratch", "top1_gain_from_pretraining", "top1_gain_stderr", "winner", "stages",
                "figures", "wall_s", "cpu_s"):
        assert key in summary, key
    assert summary["quick"] is True
    assert [s["key"] for s in summary["stages"]] == list(STAGES)
    for stage in summary["stages"]:
        assert stage["wall_s"] > 0 and Path(stage["log"]).is_file()
        assert stage["command"] in stdout  # printed before it ran
        if stage["key"] != "export":
            assert stage["images_per_s"] > 0, stage
    # piped output (not a terminal): plain progress lines while the stages ran, not silence
    assert re.search(r"^  \[\d+(m\d\ds|s)\] \S", stdout, re.M), stdout[-3000:]
    # every command is also in commands.sh, in order
    script = (out / "commands.sh").read_text()
    positions = [script.index(s["command"]) for s in summary["stages"]]
    assert positions == sorted(positions)

    pre = summary["pretrain"]
    records = [json.loads(line) for line in (out / "runs/pretrain/metrics.jsonl").read_text().splitlines()]
    assert pre["steps"] == len(records) > 0
    assert pre["loss_first"] == records[0]["loss"] and pre["loss_last"] == records[-1]["loss"]
    assert all(math.isfinite(pre[k]) for k in ("loss_start", "loss_end"))

    val_images, labeled = summary["dataset"]["val_images"], summary["dataset"]["labeled_images"]
    assert labeled < summary["dataset"]["train_images"]  # pretraining sees more images than the labeled set
    for mode in ("knn", "linear"):
        facts = summary["probes"][mode]
        for init in ("random_init", "pretrained"):
            written = json.loads((out / "probes" / f"{mode}_{init}.json").read_text())
            assert written["checkpoint_form"] == ("random_init" if init == "random_init" else "run_dir")
            assert facts[init]["top1"] == written["top1"] and facts[init]["top5"] == written["top5"]
            assert 0 <= written["top1"] <= written["top5"] <= 100
            # probes read every training image (with its label) and the validation split, each once
            assert written["train_images"] == summary["dataset"]["train_images"]
            assert written["val_images"] == val_images
        assert facts["top1_gain"] == pytest.approx(facts["pretrained"]["top1"] - facts["random_init"]["top1"])
        assert facts["top1_gain_stderr"] >= 0
    # the in-loop monitor: on exactly when the pretraining run logged knn_top1 (as an evaluation
    # record in eval.jsonl, or in metrics.jsonl)
    evaluations = out / "runs/pretrain/eval.jsonl"
    knn_records = [r for r in records if "knn_top1" in r] or [
        r for r in (json.loads(line) for line in (evaluations.read_text().splitlines()
                                                  if evaluations.is_file() else []) if line.strip())
        if "knn_top1" in r]
    assert summary["knn_monitor"]["enabled"] == bool(knn_records)
    assert summary["knn_monitor"]["knn_top1"] == [r["knn_top1"] for r in knn_records]
    assert ("monitor off" in stdout) == (not knn_records)

    for run in ("finetune_pretrained", "finetune_scratch"):
        facts = summary[run]
        final = json.loads((out / "runs" / run / "final_eval.json").read_text())
        assert facts["top1"] == final["top1"] and facts["top5"] == final["top5"]
        assert 0 <= facts["top1"] <= facts["top5"] <= 100
        assert facts["eval_images"] == val_images  # every validation image counted once
        config = (out / "runs" / run / "config.yaml").read_text()
        assert "labeled_shards" in config  # fine-tuned on the labeled subset only
        evals = [json.loads(line) for line in (out / "runs" / run / "eval.jsonl").read_text().splitlines()]
        assert facts["top1_per_epoch"] == [r["top1"] for r in evals] and len(evals) >= 2
        assert all(0 <= v <= 100 for v in facts["top1_per_epoch"] + facts["ema_top1_per_epoch"])
    # same budget for both fine-tunes
    assert summary["finetune_pretrained"]["steps"] == summary["finetune_scratch"]["steps"]
    gain = summary["finetune_pretrained"]["top1"] - summary["finetune_scratch"]["top1"]
    assert summary["top1_gain_from_pretraining"] == pytest.approx(gain)
    assert summary["winner"] == ("pretrained" if gain > 0 else "scratch" if gain < 0 else "tie")
    assert summary["top1_gain_stderr"] >= 0


def test_gain_stderr_matches_the_binomial_formula():
    # 40% and 50% on 200 images each: sqrt(0.4*0.6/200 + 0.5*0.5/200) = 0.04950
    assert demo.gain_stderr(40.0, 50.0, 200) == pytest.approx(4.950, abs=1e-3)
    assert demo.gain_stderr(100.0, 0.0, 200) == 0.0


@pytest.mark.slow
def test_quick_demo_refuses_to_overwrite_without_force(quick_demo):
    out, _, _ = quick_demo
    code = demo.main(["--quick", "--out", str(out)])
    assert code == 1
    assert (out / "summary.json").is_file()  # nothing was deleted


def test_out_dir_that_is_not_a_demo_is_never_touched(tmp_path, capsys):
    (tmp_path / "precious.txt").write_text("keep me")
    assert demo.main(["--out", str(tmp_path), "--force"]) == 1
    assert "not written by `star demo`" in capsys.readouterr().out
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_force_replaces_only_a_previous_demo(tmp_path):
    out = tmp_path / "d"
    demo.prepare_out(out, force=False)
    (out / "old.txt").write_text("stale")
    with pytest.raises(demo.DemoError, match="--force"):
        demo.prepare_out(out, force=False)
    demo.prepare_out(out, force=True)
    assert not (out / "old.txt").exists() and (out / demo.MARKER).is_file()


def test_failing_stage_names_its_command_and_log(tmp_path):
    from rich.console import Console
    from rich.progress import Progress, TextColumn

    runner = demo.StageRunner(tmp_path, Console(file=io.StringIO()))
    stage = demo.Stage("synth", "a broken stage", ["synth", "--classes", "not-a-number"])
    progress = Progress(TextColumn("{task.description} {task.fields[status]}"), disable=True)
    with pytest.raises(demo.DemoError) as info:
        runner.run(stage, progress)
    message = str(info.value)
    assert "exit code 2" in message and "--classes not-a-number" in message
    log = tmp_path / "logs" / "01_synth.log"
    assert str(log) in message and "invalid int value" in log.read_text()


def test_stage_commands_use_real_presets_and_keys(tmp_path):
    stages = demo.build_stages(tmp_path, demo.QUICK, seed=3)
    assert list(stages) == list(STAGES)
    from star.cli import COMMANDS

    for stage in stages.values():
        assert stage.argv[0] in COMMANDS
    # both fine-tunes share every argument except --init and the run dir
    pre, scratch = stages["finetune_pretrained"].argv, stages["finetune_scratch"].argv
    i = pre.index("--init")
    assert pre[:i] + pre[i + 2:] == [a.replace("finetune_scratch", "finetune_pretrained") for a in scratch]
    # pretraining and the probes read every training image; the fine-tunes the labeled subset only
    shards, labeled = tmp_path / "data" / "shards", tmp_path / "data" / "labeled_shards"
    assert f"data.dir={shards}" in stages["pretrain"].argv and f"data.dir={labeled}" in pre
    for mode in ("knn", "linear"):
        rand, trained = stages[f"probe_{mode}_random_init"].argv, stages[f"probe_{mode}_pretrained"].argv
        assert rand[:2] == trained[:2] == ["probe", mode]
        for argv in (rand, trained):
            assert argv[argv.index("--data") + 1] == str(shards)
        # the same probe apart from the encoder and the JSON it writes
        strip = {"--random-init", "--config", "demo_pretrain", "--ckpt", str(tmp_path / "runs" / "pretrain")}
        assert [a for a in rand if a not in strip and not a.endswith(".json")] == \
               [a for a in trained if a not in strip and not a.endswith(".json")]


def test_full_demo_fine_tunes_on_ten_labels_per_class(tmp_path):
    stages = demo.build_stages(tmp_path, demo.FULL, seed=0)
    assert demo.FULL.labeled_per_class == 10 < demo.FULL.unlabeled_per_class
    argv = stages["synth_labeled"].argv
    assert argv[argv.index("--per-class") + 1] == "10"
    # 100 labeled images / batch 25 = 4 steps per epoch, demo_finetune's 25 epochs
    assert stages["finetune_pretrained"].total_steps == stages["finetune_scratch"].total_steps == 100


@pytest.mark.slow
def test_quick_demo_labeled_set_is_the_first_images_of_the_unlabeled_one(quick_demo):
    out, _, summary = quick_demo
    labeled = sorted((out / "data" / "images_labeled" / "train").rglob("*.JPEG"))
    assert len(labeled) == summary["dataset"]["labeled_images"]
    for path in labeled:  # same seed, same (class, index): byte-identical files
        twin = out / "data" / "images" / "train" / path.relative_to(out / "data" / "images_labeled" / "train")
        assert twin.read_bytes() == path.read_bytes()


def test_training_status_reads_step_loss_speed_and_time_left(tmp_path, monkeypatch):
    metrics = tmp_path / "metrics.jsonl"
    status = demo.TrainingStatus(metrics, total_steps=100)
    assert status() is None  # nothing logged yet
    clock = iter([1000.0, 1030.0])
    monkeypatch.setattr(demo.time, "monotonic", lambda: next(clock))
    metrics.write_text(json.dumps({"step": 10, "loss": 0.5, "images_per_s": 42.4}) + "\n")
    assert status() == (10, "step 10/100  loss 0.5000  42 img/s")
    # 20 steps in 30 s -> 1.5 s a step, 70 steps left -> 105 s; a half-written last line is skipped
    metrics.write_text(metrics.read_text() + json.dumps({"step": 30, "loss": 0.25, "images_per_s": 40.0})
                       + "\n{\"step\": 3")
    assert status() == (30, "step 30/100  loss 0.2500  40 img/s  ~1m45s left")


def _png_std(path: Path) -> float:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return float(np.asarray(image.convert("L")).std())


def test_knn_monitor_plot_with_records_and_when_off(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    training = [{"step": s, "loss": 1.0 / s} for s in range(1, 9)]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in training) + "\n")
    assert plots.monitor_records(run) == ([], None)  # no knn_top1: the monitor was off
    off = plots.plot_knn_monitor([], tmp_path / "off.png")
    assert _png_std(off) > 5
    monitor = [{"step": 4, "epoch": 0, "knn_top1": 20.0, "knn_top5": 60.0, "knn_seconds": 1.5},
               {"step": 8, "epoch": 1, "knn_top1": 31.5, "knn_top5": 70.0, "knn_seconds": 1.4}]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in training[:4] + monitor[:1] + training[4:]
                                                 + monitor[1:]) + "\n")
    records, source = plots.monitor_records(run)
    assert records == monitor and source == run / "metrics.jsonl"
    on = plots.plot_knn_monitor(records, tmp_path / "on.png", num_classes=10,
                                probes={"random_init": 12.0, "pretrained": 30.0})
    assert _png_std(on) > 5 and on.read_bytes() != off.read_bytes()


def test_probe_comparison_plot(tmp_path):
    results = {"knn probe": {"random_init": 28.0, "pretrained": 35.0},
               "fine-tuned": {"random_init": 40.0, "pretrained": 45.0}}
    path = plots.plot_probe_comparison(results, {"knn probe": 3.0, "fine-tuned": 3.5}, 10, tmp_path / "p.png")
    assert _png_std(path) > 5


def test_moving_average_matches_a_loop():
    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0]
    expected = [np.mean(values[max(0, i - 2): i + 1]) for i in range(len(values))]
    np.testing.assert_allclose(moving_average(values, 3), expected)


def test_to_display_undoes_the_loader_normalisation():
    import torch

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    pixels = torch.rand(2, 3, 5, 5)
    normalised = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    np.testing.assert_allclose(to_display(normalised, mean, std), pixels.permute(0, 2, 3, 1).numpy(), atol=1e-6)
