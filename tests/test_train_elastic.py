"""Elastic resume: a ZeRO-2 checkpoint written by W ranks resumes on W' ranks (CPU, gloo, fp32).

Reference: the uninterrupted run on the original world size. A run stopped after K steps
(schedule.max_steps, which does not change the trajectory) and resumed on the other world size
must train every step exactly once, on exactly the samples of the reference (each step's sample
indices, all ranks together, from ``log.sample_indices``), with the same learning rates, and end
with weights and EMA equal up to the reordering of floating-point sums: a different number of
ranks and micro-batches per rank changes the order in which per-sample gradients are added
(micro-batch means, accumulation, the all-reduce), nothing else. Drop path is off because its
per-rank random streams are the one thing that cannot carry over (re-seeded from (seed, step,
rank), star/train/elastic.py); with it on the runs would differ by design.

Tolerance: the two uninterrupted references (1 rank x 4 micro-batches and 2 ranks x 2) differ
only by that reordering: measured 4e-8 relative on the per-step losses and at most 3.5e-7
relative (L2, per tensor) on the final weights after 12 steps. ``REL_TOL`` = 1e-5 leaves a
factor 30 for another machine's summation order; a resume that loses the AdamW moments misses
by far more (measured: 0.86 relative on the weights, 3e-2 on the losses). One exception, compared separately: the key
half of the decoder's cross-attention ``attn2.kv.bias`` has an analytically zero gradient (a
bias added to every key shifts all logits of a query equally, which softmax ignores), so its
gradient is pure rounding noise and AdamW, which divides by that noise's own RMS, turns it into
full-size steps of random sign; those entries stay at noise level (|b| < 1e-4) in every run but
agree between no two reduction orders.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from star.config import ConfigError
from star.train.elastic import check_world_size, reseed
from tests.test_train_support import TINY_PRETRAIN, metrics, read_log, run_star, shard_dir, weights

STEPS = 12  # 96 images / 16 per step = 6 steps per epoch, 2 epochs
STOP_AT = 5  # mid-epoch and not on a periodic checkpoint: the stop's own checkpoint is resumed
REL_TOL = 1e-5
NOISE_ONLY = "attn2.kv.bias"  # key half: zero gradient analytically (see the module docstring)


def _args(run_dir, *extra):
    return ["pretrain", "--config", "smoke", "--run-dir", str(run_dir), f"data.dir={shard_dir()}",
            *TINY_PRETRAIN, "batch.global_images=16", "batch.micro_images=4", "schedule.epochs=2",
            "schedule.warmup_epochs=1", "model.drop_path=0.0", "ema.enabled=true", "ema.decay=0.9",
            "checkpoint.every_steps=2", "checkpoint.keep_last=2", "ds_config=cpu_zero2_fp32",
            "log.sample_indices=true", *extra]


def _run(tmp, name, world_size, *extra, launcher="torchrun"):
    codes = run_star(_args(tmp / name, *extra), cwd=tmp, world_size=world_size, log_name=f"{name}.{world_size}",
                     launcher=launcher)
    assert codes == [0] * world_size, read_log(tmp, f"{name}.{world_size}")[-3000:]


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("references")
    _run(tmp, "ref1", 1)
    _run(tmp, "ref2", 2)
    return {1: tmp / "ref1", 2: tmp / "ref2"}


def _rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    worst = 0.0
    for key in a:
        x, y = a[key].double(), b[key].double()
        if key.endswith(NOISE_ONLY):
            half = x.shape[0] // 2
            assert x[:half].abs().max() < 1e-4 and y[:half].abs().max() < 1e-4, key
            x, y = x[half:], y[half:]  # the value bias, compared like everything else
        if a[key].is_floating_point():
            worst = max(worst, (x - y).norm().item() / max(y.norm().item(), 1e-12))
        else:
            assert torch.equal(a[key], b[key]), key
    return worst


def _samples(run_dir):
    return [r["samples"] for r in metrics(run_dir)]


@pytest.mark.slow
@pytest.mark.distributed
def test_sample_order_does_not_depend_on_the_world_size(references):
    one, two = _samples(references[1]), _samples(references[2])
    assert len(one) == STEPS and all(len(s) == 16 for s in one)
    assert one == two
    # an epoch is a permutation: each of the 96 images once (6 steps x 16)
    assert sorted(i for step in one[:6] for i in step) == list(range(96))
    floor = _rel_diff(weights(references[1]), weights(references[2]))
    print(f"1-rank vs 2-rank uninterrupted: max relative L2 difference {floor:.3e}")
    assert floor < REL_TOL


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_resume_on_another_world_size(tmp_path, references, before, after):
    _run(tmp_path, "run", before, f"schedule.max_steps={STOP_AT}")
    assert [r["step"] for r in metrics(tmp_path / "run")] == list(range(1, STOP_AT + 1))
    # the growing resume takes its ranks from SLURM's variables only, as a job requeued with
    # more nodes does (slurm/ re-runs the same command; SLURM_NTASKS is the new task count)
    _run(tmp_path, "run", after, launcher="slurm" if after > before else "torchrun")
    log = read_log(tmp_path, f"run.{after}")
    accum = {1: 4, 2: 2}
    assert (f"resumed step {STOP_AT} from a {before}-rank checkpoint on {after} ranks "
            f"(accumulation {accum[before]} -> {accum[after]})") in log

    ours, theirs = metrics(tmp_path / "run"), metrics(references[before])
    assert [r["step"] for r in ours] == list(range(1, STEPS + 1))  # no step twice, none skipped
    assert [r["samples"] for r in ours] == [r["samples"] for r in theirs]
    assert [r["lr"] for r in ours] == [r["lr"] for r in theirs]
    assert not any(r["skipped"] for r in ours)
    # the steps before the stop ran on the same world size as the reference: bit-identical
    assert [r["loss"] for r in ours[:STOP_AT]] == [r["loss"] for r in theirs[:STOP_AT]]

    floor = _rel_diff(weights(references[1]), weights(references[2]))
    final = _rel_diff(weights(tmp_path / "run"), weights(references[before]))
    ema = _rel_diff(weights(tmp_path / "run", ema=True), weights(references[before], ema=True))
    losses = np.array([r["loss"] for r in ours]), np.array([r["loss"] for r in theirs])
    loss_diff = float(np.max(np.abs(losses[0] - losses[1]) / np.abs(losses[1])))
    print(f"{before} -> {after} ranks: weights {final:.3e}, EMA {ema:.3e}, losses {loss_diff:.3e} "
          f"(reordering floor {floor:.3e})")
    assert final < REL_TOL and ema < REL_TOL and loss_diff < REL_TOL


@pytest.mark.slow
@pytest.mark.distributed
def test_a_world_size_that_cannot_keep_the_global_batch_exits_2(tmp_path):
    # 16 images per step cannot be 3 ranks x whole micro-batches of 4
    codes = run_star(_args(tmp_path / "run"), cwd=tmp_path, world_size=3, log_name="three")
    assert codes == [2, 2, 2]
    for rank in range(3):
        log = read_log(tmp_path, "three", rank)
        assert "Traceback" not in log and "DeepSpeed" not in log
        errors = [line for line in log.splitlines() if "error" in line]
        assert len(errors) == 1, log
        assert "run on 1, 2, 4 ranks with batch.micro_images=4" in errors[0]
        assert "no batch.micro_images works on 3 ranks" in errors[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_check_world_size_names_every_valid_choice():
    # against a brute-force enumeration: world sizes w with 16 % (8 w) == 0, micro sizes m
    # (multiples of 2 images per sequence) with 16 % (m 4) == 0
    with pytest.raises(ConfigError) as err:
        check_world_size(16, 8, 2, 4)
    sizes = [w for w in range(1, 17) if 16 % (8 * w) == 0]
    micros = [m for m in range(1, 17) if m % 2 == 0 and 16 % (m * 4) == 0]
    assert sizes == [1, 2] and micros == [2, 4]
    assert f"run on {', '.join(map(str, sizes))} ranks" in str(err.value)
    assert f"set batch.micro_images to one of {', '.join(map(str, micros))}" in str(err.value)
    check_world_size(16, 4, 2, 4)  # 16 = 4 x 1 x 4: fine


def test_reseed_is_a_function_of_seed_step_and_rank():
    def draw(seed, step, rank):
        gen = torch.Generator()
        reseed(seed, step, rank, {"mixup": gen})
        return (torch.rand(3).tolist(), float(np.random.rand()), torch.rand(2, generator=gen).tolist())

    assert draw(0, 10, 1) == draw(0, 10, 1)
    assert draw(0, 10, 1) != draw(0, 10, 0)
    assert draw(0, 10, 1) != draw(0, 11, 1)
    assert draw(0, 10, 1) != draw(1, 10, 1)
