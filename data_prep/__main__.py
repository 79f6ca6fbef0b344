"""`python -m data_prep {synth,shard,verify} ...`: the same commands as `star synth|shard|verify`."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {"synth": "data_prep.synth", "shard": "data_prep.shard", "verify": "data_prep.verify"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        bad = f"unknown command {argv[0]!r}; " if argv and argv[0] not in ("-h", "--help") else ""
        print(f"usage: python -m data_prep {{{','.join(COMMANDS)}}} [options]\n{bad}"
              f"run `python -m data_prep COMMAND --help` for the options of one command",
              file=sys.stderr if bad else sys.stdout)
        return 2 if bad else 0
    return int(importlib.import_module(COMMANDS[argv[0]]).main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
