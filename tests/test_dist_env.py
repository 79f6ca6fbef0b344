"""Rank discovery: torchrun's, SLURM's or none, and stale variables from the submitting shell."""

import pytest

from star.config import ConfigError
from star.train.distributed import InconsistentDistEnv, resolve_dist_env

SRUN_TASK = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1",
             "SLURM_JOB_NODELIST": "gpu[003-004]", "SLURM_JOB_ID": "1234"}


def test_slurm_task_without_torchrun_variables():
    env = resolve_dist_env(dict(SRUN_TASK))
    assert (env.rank, env.world_size, env.local_rank, env.source) == (1, 4, 1, "slurm")
    assert (env.master_addr, env.master_port) == ("gpu003", 20000 + 1234)


def test_stale_world_size_from_the_submitting_shell_is_refused_by_name():
    stale = dict(SRUN_TASK, RANK="0", WORLD_SIZE="8")
    with pytest.raises(InconsistentDistEnv) as err:
        resolve_dist_env(stale)
    message = str(err.value)
    assert "RANK=0 (SLURM says 1)" in message and "WORLD_SIZE=8 (SLURM says 4)" in message
    assert "unset RANK WORLD_SIZE LOCAL_RANK" in message
    assert isinstance(err.value, ConfigError)  # the CLIs turn it into one line, exit 2


def test_stale_local_rank_alone_is_refused():
    with pytest.raises(InconsistentDistEnv, match="LOCAL_RANK=3"):
        resolve_dist_env(dict(SRUN_TASK, LOCAL_RANK="3"))


def test_variables_that_agree_with_slurm_are_accepted():
    env = resolve_dist_env(dict(SRUN_TASK, RANK="1", WORLD_SIZE="4", LOCAL_RANK="1"))
    assert (env.rank, env.world_size, env.source) == (1, 4, "torchrun")


@pytest.mark.parametrize("marker", ["TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE", "CROSS_RANK"])
def test_a_launcher_inside_the_job_wins_over_slurm(marker):
    # torchrun (or deepspeed's launcher) under srun: one SLURM task per node, many ranks each.
    env = resolve_dist_env(dict(SRUN_TASK, RANK="5", WORLD_SIZE="16", LOCAL_RANK="1", **{marker: "x"}))
    assert (env.rank, env.world_size, env.source) == (5, 16, "torchrun")


def test_outside_an_srun_step_torchrun_variables_are_used():
    env = resolve_dist_env({"RANK": "2", "WORLD_SIZE": "3", "SLURM_JOB_ID": "9", "SLURM_PROCID": "0",
                            "SLURM_NTASKS": "1"})
    assert (env.rank, env.world_size) == (2, 3)
