"""`star pretrain`: STAR / ARM autoregressive pretraining with DeepSpeed ZeRO, resumable.

    star pretrain --config star_b_1600ep --run-dir runs/star_b optim.base_lr=2e-4

Starting in a run dir that holds checkpoints resumes from the newest complete one. Launch
one process per GPU (torchrun, the deepspeed launcher, or srun: RANK etc. are derived from
SLURM's variables). Exit codes: 0 finished, 75 stopped on SIGUSR1/SIGTERM (resume me),
76 too many non-finite steps in a row, 2 bad config.
"""

from __future__ import annotations

import argparse

from star.config import ConfigError
from star.train.cli_common import add_run_arguments, cli_error, command_parser
from star.train.runtime import resolve_run_config, run_training


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("star pretrain", __doc__)
    add_run_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg, run_dir = resolve_run_config(args.config, args.overrides, args.run_dir, kind="pretrain")
    except ConfigError as exc:
        return cli_error("star pretrain", exc)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    try:
        return run_training(cfg, run_dir)
    except ConfigError as exc:
        return cli_error("star pretrain", exc)
