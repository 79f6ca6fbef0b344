"""The k-NN monitor (star/train/monitor.py): the figure at the right epochs on the configured
subsets, equal to `star probe`'s k-NN of the final weights; a run with the monitor on has the
weights and losses of the same run with it off, and resumes after SIGKILL bit-identically
(single rank, CPU, fp32); the RNG streams survive a probe whose loader draws from them."""

from __future__ import annotations

import json
import random
import signal

import numpy as np
import pytest
import torch

from star.config import ConfigError, load_config, read_yaml_file
from star.probe import knn_accuracy, probe_loader
from star.train.monitor import KnnMonitor, check_monitor_data, knn_due
from star.train.runtime import build_model, resolve_run_config
from tests.test_train_support import (
    CLASSES,
    TINY_PRETRAIN,
    TRAIN_PER_CLASS,
    VAL_PER_CLASS,
    assert_bit_identical,
    interrupt,
    metrics,
    read_log,
    run_star,
    shard_dir,
    steps_logged,
    weights,
)

EPOCHS, STEPS = 3, 9  # 96 images / 32 per step = 3 steps per epoch
TRAIN_SUBSET, VAL_SUBSET = 40, 12


# ----- cadence, config, start-up checks -----

@pytest.mark.parametrize("every, epochs, due", [
    (0, 4, []),                     # off
    (1, 4, [0, 1, 2, 3]),           # every epoch
    (2, 5, [1, 3, 4]),              # every 2nd, and the last one
    (50, 1600, list(range(49, 1600, 50))),
    (50, 200, [49, 99, 149, 199]),
])
def test_knn_runs_every_nth_epoch_and_at_the_last(every, epochs, due):
    assert [e for e in range(epochs) if knn_due(e, every, epochs)] == due


def test_monitor_presets_and_checks():
    b = load_config("star_b_1600ep").monitor
    assert (b.knn_every_epochs, b.knn_train_images, b.knn_val_images) == (50, 10000, 5000)
    for name in ("arm_b_1600ep", "star_l_1600ep"):
        assert load_config(name).monitor == b
    assert load_config("smoke").monitor.knn_every_epochs == 1
    assert load_config("demo_pretrain").monitor.knn_every_epochs > 0
    assert load_config("finetune_b").monitor.knn_every_epochs == 0
    with pytest.raises(ConfigError, match="monitor.knn_pool"):
        load_config("smoke", ["monitor.knn_pool=max"])
    with pytest.raises(ConfigError, match="monitor.knn_val_images"):
        load_config("smoke", ["monitor.knn_val_images=0"])
    with pytest.raises(ConfigError, match="monitor.knn_every_epochs=5: the k-NN monitor probes a pretraining"):
        load_config("finetune_b", ["monitor.knn_every_epochs=5"])


def test_monitor_settings_may_change_on_resume(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_000000001\n")
    cfg, _ = resolve_run_config("smoke", [], str(run), kind="pretrain")
    cfg.save(run / "config.yaml")
    resumed, _ = resolve_run_config("smoke", ["monitor.knn_every_epochs=0", "monitor.knn_train_images=8"],
                                    str(run), kind="pretrain")
    assert resumed.monitor.knn_every_epochs == 0 and resumed.monitor.knn_train_images == 8


def test_a_missing_val_split_is_named_before_start_up(tmp_path):
    (tmp_path / "train.json").write_text("{}")
    cfg = load_config("smoke", [f"data.dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"monitor.knn_every_epochs=1 needs the val split: no .*val.json.*"
                                          r"or set monitor.knn_every_epochs=0"):
        check_monitor_data(cfg)
    check_monitor_data(load_config("smoke", [f"data.dir={tmp_path}", "monitor.knn_every_epochs=0"]))  # off: no check


def test_the_record_goes_to_eval_jsonl_tensorboard_and_the_console(tmp_path):
    from star.train.metrics import RunLogger

    class Writer:  # stands in for TensorBoard's SummaryWriter (an optional package)
        def __init__(self):
            self.scalars = []

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, value, step))

    logger = RunLogger(tmp_path, enabled=True, every_steps=1, tensorboard=False)
    logger._tb = writer = Writer()
    with logger.console.capture() as out:
        logger.evaluation({"epoch": 49, "step": 31250, "knn_top1": 41.5, "knn_top5": 70.25, "images": 5000,
                           "train_images": 10000, "knn_seconds": 12.5})
    assert "eval epoch 49 knn_top1 41.50 knn_top5 70.25 (5000 images against 10000 train images, 12.5 s)" \
        in out.get()
    assert ("eval/knn_top1", 41.5, 31250) in writer.scalars and ("eval/knn_seconds", 12.5, 31250) in writer.scalars
    assert json.loads((tmp_path / "eval.jsonl").read_text())["knn_top5"] == 70.25
    logger._tb = None
    logger.close()


# ----- in process: the RNG streams of training -----

class _Engine:
    def __init__(self, module):
        self.module = module


class _Logger:
    def __init__(self):
        self.records, self.lines = [], []

    def evaluation(self, record):
        self.records.append(record)

    def info(self, line):
        self.lines.append(line)


def _rng_states():
    return (random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state())


@pytest.mark.slow
def test_a_probe_leaves_the_rng_streams_as_they_were_and_matches_star_probe(monkeypatch):
    # Anything a probe draws from the global generators (a loader's worker seed, a backend's own
    # sampling) would leak into training's drop path; the loaders draw nothing today
    # (tests/test_pipelines_loaders.py), so the hazard is injected here: feature extraction
    # that draws from all three generators, as a DataLoader without its own generator did.
    import star.train.monitor as monitor_module

    real_extract = monitor_module.extract_features

    def drawing_extract(*args, **kwargs):
        random.random(), np.random.rand(), torch.rand(1)
        return real_extract(*args, **kwargs)

    monkeypatch.setattr(monitor_module, "extract_features", drawing_extract)
    overrides = [*TINY_PRETRAIN, f"data.dir={shard_dir()}", "data.backend=baseline", "monitor.knn_every_epochs=1",
                 f"monitor.knn_train_images={TRAIN_SUBSET}", f"monitor.knn_val_images={VAL_SUBSET}"]
    cfg = load_config("smoke", overrides)
    torch.manual_seed(0)
    model = build_model(cfg).train()
    common = dict(image_size=64, batch_size=cfg.batch.micro_images, rank=0, world_size=1, device="cpu",
                  backend="baseline", num_threads=1, seed=cfg.seed)
    train = probe_loader(shard_dir(), "train", max_images=TRAIN_SUBSET, **common)
    val = probe_loader(shard_dir(), "val", max_images=VAL_SUBSET, **common)
    reference = knn_accuracy(model, train, val)

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    states = _rng_states()
    monitor, logger = KnnMonitor(cfg, rank=0, world_size=1, device="cpu"), _Logger()
    record = monitor.end_of_epoch(0, 3, _Engine(model), logger)
    after = _rng_states()
    assert after[0] == states[0] and after[1] == states[1] and torch.equal(after[2], states[2])
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    drawing_extract(model, train)  # the hazard is real: the same draws outside the monitor move the streams
    moved = _rng_states()
    assert moved[0] != states[0] and moved[1] != states[1] and not torch.equal(moved[2], states[2])
    assert model.training
    assert logger.records == [record]
    assert (record["knn_top1"], record["knn_top5"]) == (reference["top1"], reference["top5"])
    assert (record["images"], record["train_images"]) == (VAL_SUBSET, TRAIN_SUBSET)
    assert record["epoch"] == 0 and record["step"] == 3 and record["knn_seconds"] > 0
    # the loaders are built once and reused; not due = nothing
    loaders = monitor.loaders
    assert monitor.end_of_epoch(1, 6, _Engine(model), logger)["knn_top1"] == record["knn_top1"]
    assert monitor.loaders is loaders
    off = KnnMonitor(load_config("smoke", [*overrides, "monitor.knn_every_epochs=0"]), rank=0, world_size=1,
                     device="cpu")
    assert off.end_of_epoch(0, 3, _Engine(model), logger) is None and off.loaders is None


def test_a_corrupt_image_skipped_in_a_subset_skips_the_figure_not_the_run(tmp_path):
    # data.on_corrupt=skip: the probe loader leaves the image out, the exactly-once check of the
    # gathered features would fail on rank 0 alone; every rank agrees to skip the figure instead
    from tests.test_train_corrupt import corrupt_copy

    corrupt_copy(tmp_path / "shards", "val", 3)
    cfg = load_config("smoke", [*TINY_PRETRAIN, f"data.dir={tmp_path / 'shards'}", "data.on_corrupt=skip"])
    torch.manual_seed(0)
    model, logger = build_model(cfg), _Logger()
    monitor = KnnMonitor(cfg, rank=0, world_size=1, device="cpu")
    assert monitor.end_of_epoch(0, 6, _Engine(model), logger) is None
    assert logger.records == [] and len(logger.lines) == 1
    assert "k-NN monitor, epoch 0: skipped, 1 image(s) of its subsets were corrupt" in logger.lines[0]
    # with every image readable the same monitor reports (all 96 / 20 images: the smoke subsets are larger)
    cfg = load_config("smoke", [*TINY_PRETRAIN, f"data.dir={shard_dir()}", "data.on_corrupt=skip"])
    record = KnnMonitor(cfg, rank=0, world_size=1, device="cpu").end_of_epoch(0, 6, _Engine(model), logger)
    assert (record["images"], record["train_images"]) == (CLASSES * VAL_PER_CLASS, CLASSES * TRAIN_PER_CLASS)


# ----- end to end: `star pretrain` with the monitor on and off -----

def _args(run_dir, monitor: bool):
    # drop path on, so a probe that moved the torch RNG would change the weights; 2 micro-batches per step
    return ["pretrain", "--config", "smoke", "--run-dir", str(run_dir), f"data.dir={shard_dir()}", *TINY_PRETRAIN,
            "batch.global_images=32", "batch.micro_images=16", f"schedule.epochs={EPOCHS}",
            "schedule.warmup_epochs=1", "model.drop_path=0.2", "checkpoint.every_steps=2", "checkpoint.keep_last=2",
            "ds_config=cpu_zero2_fp32", f"monitor.knn_every_epochs={2 if monitor else 0}",
            f"monitor.knn_train_images={TRAIN_SUBSET}", f"monitor.knn_val_images={VAL_SUBSET}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("monitor")
    for name, monitor in (("on", True), ("off", False)):
        assert run_star(_args(tmp / name, monitor), cwd=tmp, log_name=name) == [0], read_log(tmp, name)[-3000:]
    return tmp


def _knn_records(run_dir):
    return [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]


def _losses(run_dir):
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in metrics(run_dir)]


@pytest.mark.slow
@pytest.mark.distributed
def test_monitor_on_trains_the_same_weights_and_logs_knn_at_its_epochs(runs):
    on, off = runs / "on", runs / "off"
    assert_bit_identical(weights(on), weights(off))
    assert _losses(on) == _losses(off) and [r[0] for r in _losses(on)] == list(range(1, STEPS + 1))
    assert not (off / "eval.jsonl").exists()
    records = _knn_records(on)
    # every 2nd epoch and the last: after epochs 1 and 2 (0-based), at steps 6 and 9
    assert [(r["epoch"], r["step"]) for r in records] == [(1, 6), (2, 9)]
    for r in records:
        assert (r["images"], r["train_images"]) == (VAL_SUBSET, TRAIN_SUBSET)
        assert 0 <= r["knn_top1"] <= r["knn_top5"] <= 100 and r["knn_seconds"] > 0
    log = read_log(runs, "on")
    assert "eval epoch 2 knn_top1" in log and f"({VAL_SUBSET} images against {TRAIN_SUBSET} train images" in log

    # the last figure is `star probe`'s k-NN of the final weights on the same subsets
    cfg = load_config(base=read_yaml_file(on / "config.yaml"))  # the run's own config
    model = build_model(cfg)
    model.load_state_dict(weights(on))
    common = dict(image_size=64, batch_size=16, rank=0, world_size=1, device="cpu", backend="dali",
                  num_threads=1, seed=cfg.seed)
    ref = knn_accuracy(model, probe_loader(shard_dir(), "train", max_images=TRAIN_SUBSET, **common),
                       probe_loader(shard_dir(), "val", max_images=VAL_SUBSET, **common))
    assert (records[-1]["knn_top1"], records[-1]["knn_top5"]) == (ref["top1"], ref["top5"])
    assert (ref["images"], ref["train_images"]) == (VAL_SUBSET, TRAIN_SUBSET)
    assert TRAIN_SUBSET < CLASSES * TRAIN_PER_CLASS and VAL_SUBSET < CLASSES * VAL_PER_CLASS  # true subsets


@pytest.mark.slow
@pytest.mark.distributed
def test_sigkill_then_resume_with_the_monitor_on_is_bit_identical(tmp_path, runs):
    at_step = random.Random().randint(3, STEPS - 1)  # from step 3 on, the step-2 checkpoint is committed
    print(f"SIGKILL after step {at_step} is logged")
    run_dir = tmp_path / "killed"
    codes = interrupt(_args(run_dir, True), run_dir, cwd=tmp_path, log_name="killed", at_step=at_step,
                      sig=signal.SIGKILL)
    assert codes == [-signal.SIGKILL]
    assert steps_logged(run_dir) < STEPS
    assert run_star(_args(run_dir, True), cwd=tmp_path, log_name="resumed") == [0], \
        read_log(tmp_path, "resumed")[-3000:]
    assert "resumed at step" in read_log(tmp_path, "resumed")
    reference = runs / "on"
    assert_bit_identical(weights(run_dir), weights(reference))
    assert _losses(run_dir) == _losses(reference)  # replayed steps appear once

    def figures(records):
        return [(r["epoch"], r["step"], r["knn_top1"], r["knn_top5"], r["images"], r["train_images"])
                for r in records]

    assert figures(_knn_records(run_dir)) == figures(_knn_records(reference))
