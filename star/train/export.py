"""`star export RUN_DIR --out model.pth`: one plain state dict from a run's ZeRO checkpoint.

The file holds ``{parameter or buffer name: float32 tensor}`` under ARM's names (the
consolidated state dict of :func:`star.train.weights.consolidate_run`, mapped by
:func:`star.models.to_arm_state_dict`), loadable with ``torch.load(..., weights_only=True)``
and ``model.load_state_dict``, or as ``--init`` of `star finetune`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from star.train.cli_common import command_parser
from star.train.weights import consolidate_run


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("star export", __doc__)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory of `star pretrain` or `star finetune`")
    parser.add_argument("--out", required=True, metavar="FILE", help="output .pth file")
    parser.add_argument("--tag", metavar="step_NNNNNNNNN",
                        help="checkpoint to export (default: the newest complete one, checkpoints/latest)")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights instead of the trained ones")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        state = consolidate_run(args.run_dir, tag=args.tag, ema=args.ema)
    except (FileNotFoundError, ValueError) as exc:
        print(f"star export: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(out)
    numel = sum(v.numel() for v in state.values())
    print(f"wrote {out}: {len(state)} tensors, {numel / 1e6:.2f} M values"
          f"{' (EMA)' if args.ema else ''}")
    return 0
