"""The `star` command: one entry point, one subcommand per job.

Each subcommand lives in its own module that exposes ``main(argv) -> int`` (or the function
named after a colon) and builds its own argparse parser (``prog="star NAME"``). This file only
routes, so ``star --help`` is instant and a broken optional dependency of one subcommand never
breaks the others.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys

from star import __version__

# name -> ("module" or "module:function" taking argv, one-line help). Order is a user's day.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("data_prep.synth", "write a synthetic ImageNet-like ImageFolder tree (tests, demo)"),
    "shard": ("data_prep.shard", "shard an ImageFolder into globally shuffled WebDataset tars + DALI indexes"),
    "verify": ("data_prep.verify", "re-hash shards and check indexes and counts against the manifest"),
    "pretrain": ("star.train.pretrain", "STAR / ARM autoregressive pretraining (DeepSpeed ZeRO, resumable)"),
    "finetune": ("star.train.finetune", "fine-tune the 4-scan classifier from a pretrained checkpoint"),
    "eval": ("star.train.evaluate", "top-1 / top-5 of a checkpoint on the validation shards"),
    "probe": ("star.probe.cli", "k-NN / linear-probe accuracy of a pretrained encoder's frozen features"),
    "replay": ("star.train.replay", "run one step of a run again, exactly: loss, grad norm, where a NaN came from"),
    "export": ("star.train.export", "consolidate a run's ZeRO checkpoint into a plain state dict"),
    "profile": ("star.profiling.cli", "throughput of the data pipeline, the model and the training step; FLOPs"),
    "demo": ("star.demo.run", "the whole pipeline end to end on CPU, with plots"),
    "smoke": ("star.profiling.cli:smoke_main",
              "one forward/backward of a model by name on random images (= star profile model --model NAME)"),
    "doctor": ("star.doctor", "check every rank of a job before training: versions, kernels, data, NCCL, a step"),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [
        "usage: star <command> [options]",
        "",
        "STAR: separator-based autoregressive pretraining of Vision Mamba.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `star <command> --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" (did you mean `star {close[0]}`?)" if close else ""
        print(f"star: unknown command {name!r}{hint}\n\n{_usage()}", file=sys.stderr)
        return 2
    # Idle OpenMP threads sleep instead of spinning: the pure-PyTorch scan runs hundreds of
    # small ops per call, and spinning workers starve each other whenever cores are shared
    # (several ranks per CPU node, data workers). No effect on GPU kernels.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    module_name, _, function = COMMANDS[name][0].partition(":")
    entry = getattr(importlib.import_module(module_name), function or "main")
    return int(entry(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
