"""Command-line options the training commands share (`star pretrain / finetune / eval / export`,
and `star profile`, which reads the same configs), and their one-line error report."""

from __future__ import annotations

import argparse
import sys

from star.config import list_presets
from star.train import EXIT_USAGE


def command_parser(prog: str, description: str | None) -> argparse.ArgumentParser:
    """A parser whose --help shows the module docstring as written (examples keep their layout)."""
    return argparse.ArgumentParser(prog=prog, description=description,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_config_argument(parser: argparse.ArgumentParser, *, required: bool = False, when: str = "") -> None:
    """``--config NAME|PATH``; ``when`` says when it may be omitted."""
    parser.add_argument("--config", metavar="NAME|PATH", required=required,
                        help=f"preset name or YAML file{when}. Presets: {', '.join(list_presets())}")


def add_overrides_argument(parser: argparse.ArgumentParser, example: str = "optim.base_lr=2e-4") -> None:
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help=f"config overrides parsed as YAML scalars, e.g. {example}")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a training run (`star pretrain`, `star finetune`)."""
    add_config_argument(parser, when="; may be omitted when --run-dir holds a run to resume")
    parser.add_argument("--run-dir", metavar="DIR",
                        help="where checkpoints, metrics.jsonl and config.yaml go (default runs/<preset>); "
                             "an existing run there is resumed")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (preset + overrides) as YAML and exit")
    add_overrides_argument(parser, "optim.base_lr=2e-4 schedule.epochs=300")


def cli_error(prog: str, exc: Exception) -> int:
    """A user's mistake: one line on stderr, exit code 2."""
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return EXIT_USAGE
