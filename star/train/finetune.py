"""`star finetune`: the 4-scan classifier from a pretrained checkpoint, with EMA and evaluation.

    star finetune --config finetune_b --init runs/star_b_1600ep --run-dir runs/ft_b
    star finetune --config finetune_b --init checkpoint-1599.pth     # ARM's official weights

``--init`` takes a pretraining run dir (its newest checkpoint is consolidated), a file from
`star export`, or ARM's checkpoint (a state dict under "model", read with weights_only=True);
the position embedding is interpolated and missing / unexpected keys are reported. Training
uses layer-wise lr decay, drop path, mixup / cutmix / label smoothing and random erasing; after
every epoch the model and its EMA are evaluated on the whole validation split (top-1 / top-5
in RUN_DIR/eval.jsonl) and the best weights are kept in RUN_DIR/best.pth. Resume, graceful
stop and exit codes are those of `star pretrain`.
"""

from __future__ import annotations

import argparse

from star.config import ConfigError
from star.train.cli_common import add_run_arguments, cli_error, command_parser
from star.train.runtime import resolve_run_config, run_training
from star.train.tasks import fill_num_classes


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("star finetune", __doc__)
    add_run_arguments(parser)
    parser.add_argument("--init", metavar="PATH",
                        help="pretrained weights: run dir, exported .pth, or ARM's checkpoint-1599.pth "
                             "(same as init=PATH; omit to train from scratch)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides) + ([f"init={args.init}"] if args.init else [])
    try:
        cfg, run_dir = resolve_run_config(args.config, overrides, args.run_dir, kind="finetune",
                                          complete=fill_num_classes)
        if args.print_config:
            print(cfg.to_yaml(), end="")
            return 0
        return run_training(cfg, run_dir)
    except ConfigError as exc:
        return cli_error("star finetune", exc)
