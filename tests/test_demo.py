"""`star demo`: the quick demo end to end as a user runs it, plus its building blocks.

The end-to-end run is the real CLI in a subprocess (synth, shard, verify, DeepSpeed
pretraining through the DALI CPU pipeline, export, two fine-tunes, two evaluations,
figures); its summary is checked against what the stages wrote themselves (the eval
JSON files, metrics.jsonl), not against the demo's own arithmetic only.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from star.demo import run as demo
from star.demo.plots import moving_average, to_display

REPO = Path(__file__).resolve().parents[1]
FIGURES = ("training_curves", "finetune_accuracy", "predictions")
STAGES = ("synth", "shard_train", "shard_val", "verify", "pretrain", "export", "finetune_pretrained",
          "finetune_scratch", "eval_pretrained", "eval_scratch")


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
    for key in ("quick", "seed", "dataset", "pretrain", "finetune_pretrained", "finetune_scratch",
                "top1_gain_from_pretraining", "top1_gain_stderr", "winner", "stages", "figures", "wall_s", "cpu_s"):
        assert key in summary, key
    assert summary["quick"] is True
    assert [s["key"] for s in summary["stages"]] == list(STAGES)
    for stage in summary["stages"]:
        assert stage["wall_s"] > 0 and Path(stage["log"]).is_file()
        assert stage["command"] in stdout  # printed before it ran
        if stage["key"] != "export":
            assert stage["images_per_s"] > 0, stage
    # every command is also in commands.sh, in order
    script = (out / "commands.sh").read_text()
    positions = [script.index(s["command"]) for s in summary["stages"]]
    assert positions == sorted(positions)

    pre = summary["pretrain"]
    records = [json.loads(line) for line in (out / "runs/pretrain/metrics.jsonl").read_text().splitlines()]
    assert pre["steps"] == len(records) > 0
    assert pre["loss_first"] == records[0]["loss"] and pre["loss_last"] == records[-1]["loss"]
    assert all(math.isfinite(pre[k]) for k in ("loss_start", "loss_end"))

    val_images = summary["dataset"]["val_images"]
    for run in ("finetune_pretrained", "finetune_scratch"):
        facts = summary[run]
        final = json.loads((out / "runs" / run / "final_eval.json").read_text())
        assert facts["top1"] == final["top1"] and facts["top5"] == final["top5"]
        assert 0 <= facts["top1"] <= facts["top5"] <= 100
        assert facts["eval_images"] == val_images  # every validation image counted once
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
