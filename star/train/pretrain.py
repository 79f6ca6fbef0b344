"""`star pretrain`: STAR / ARM autoregressive pretraining with DeepSpeed ZeRO, resumable.

    star pretrain --config star_b_1600ep --run-dir runs/star_b optim.base_lr=2e-4

Starting in a run dir that holds checkpoints resumes from the newest complete one. Launch
one process per GPU (torchrun, the deepspeed launcher, or srun: RANK etc. are derived from
SLURM's variables). Exit codes: 0 finished, 75 stopped on SIGUSR1/SIGTERM (resume me),
76 too many non-finite steps in a row, 2 bad config.
"""

from __future__ import annotations

import argparse

import torch

from star.config import ConfigError, list_presets
from star.train.runtime import build_data_loader, cli_error, resolve_run_config, run_training


class PretrainTask:
    """Pretraining: images in, the model's own reconstruction loss out."""

    def __init__(self, train_loader) -> None:
        self.train_loader = train_loader
        self.rng_generators: dict[str, torch.Generator] = {}

    def loss(self, engine, batch) -> torch.Tensor:
        return engine(batch.images)["loss"]

    def end_of_epoch(self, epoch, step, engine, ema):
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def make_pretrain_task(cfg, model, dist_env, device, plan, amp_dtype) -> PretrainTask:
    loader = build_data_loader(cfg, "pretrain", cfg.data.train_split, plan.micro_images,
                               rank=dist_env.rank, world_size=dist_env.world_size, device=device)
    return PretrainTask(loader)


def build_parser(prog: str = "star pretrain", description: str | None = __doc__) -> argparse.ArgumentParser:
    """The options `star pretrain` and `star finetune` share."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="NAME|PATH",
                        help=f"preset name or YAML file; may be omitted when --run-dir holds a run to resume. "
                             f"Presets: {', '.join(list_presets())}")
    parser.add_argument("--run-dir", metavar="DIR",
                        help="where checkpoints, metrics.jsonl and config.yaml go (default runs/<preset>); "
                             "an existing run there is resumed")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (preset + overrides) as YAML and exit")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides parsed as YAML scalars, e.g. optim.base_lr=2e-4 schedule.epochs=300")
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
        return run_training(cfg, run_dir, make_pretrain_task)
    except ConfigError as exc:
        return cli_error("star pretrain", exc)
