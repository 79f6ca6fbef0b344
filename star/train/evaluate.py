"""`star eval`: top-1 / top-5 of a classifier on the validation shards, over any number of ranks.

    star eval --ckpt runs/ft_b --data data/imagenet_shards            # a fine-tuning run dir
    star eval --ckpt model.pth --config finetune_b --data DIR --ema    # a weights file

Every validation image is counted exactly once whatever the world size: each rank sums its
correct predictions over ``batch.valid`` (the loader pads the last batch) and the sums are
all-reduced, so the reported image count equals the manifest's sample count.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from star.config import ConfigError, load_config, read_yaml_file
from star.train.cli_common import add_config_argument, add_overrides_argument, command_parser
from star.train.distributed import destroy, init_inference, resolve_device
from star.train.engine import autocast_dtype, resolve_ds_config_path
from star.train.runtime import build_data_loader, build_model
from star.train.validation import evaluate
from star.train.weights import consolidate_run, read_weights


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser("star eval", __doc__)
    parser.add_argument("--ckpt", required=True, metavar="PATH",
                        help="a `star finetune` run dir (its newest checkpoint and config.yaml), its best.pth, "
                             "or a weights file (exported, or a state dict under 'model')")
    parser.add_argument("--data", required=True, metavar="DIR", help="shard directory holding val.json")
    add_config_argument(parser, when=" naming the model (default: the run dir's config.yaml; needed for a file)")
    parser.add_argument("--ema", action="store_true", help="evaluate the EMA weights (run dir or best.pth)")
    parser.add_argument("--split", default="val", help="split to evaluate (default val)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per rank per batch (default 64)")
    parser.add_argument("--backend", choices=("dali", "baseline"), help="loader backend (default: the config's)")
    parser.add_argument("--num-threads", type=int, help="decoding threads per rank (default: the config's)")
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    add_overrides_argument(parser, "model.num_classes=1000")
    return parser


def _weights(ckpt: Path, ema: bool) -> dict:
    if ckpt.is_dir():
        return consolidate_run(ckpt, ema=ema)
    if ema:
        from star.train.safe_load import safe_load

        state = safe_load(ckpt)
        if not isinstance(state, dict) or not isinstance(state.get("ema"), dict):
            raise ValueError(f"{ckpt} has no 'ema' entry; drop --ema or give a run dir / best.pth")
        return state["ema"]
    return read_weights(ckpt)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ckpt = Path(args.ckpt)
    try:
        run_config = ckpt / "config.yaml" if ckpt.is_dir() else ckpt.parent / "config.yaml"
        if args.config:
            cfg = load_config(args.config, args.overrides)
        elif run_config.is_file():
            cfg = load_config(base=read_yaml_file(run_config), overrides=args.overrides)
        else:
            raise ConfigError(f"{ckpt} is not a run dir with config.yaml: pass --config naming the model "
                              f"(e.g. --config finetune_b)")
        if cfg.kind != "finetune":
            raise ConfigError(f"config {cfg.name!r} describes a {cfg.kind} model; evaluation needs a "
                              f"fine-tuning (classifier) config such as finetune_b")
        if args.backend:
            cfg.data.backend = args.backend
        if args.num_threads:
            cfg.data.num_threads = args.num_threads
        device = resolve_device(cfg.device)
        amp = autocast_dtype(json.loads(resolve_ds_config_path(cfg.ds_config, device).read_text()))
        state = _weights(ckpt, args.ema)  # before any process group: a bad file fails at once
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"star eval: error: {exc}", file=sys.stderr)
        return 2
    dist_env, device = init_inference(device)
    try:
        loader = build_data_loader(cfg, "eval", args.split, args.batch_size, rank=dist_env.rank,
                                   world_size=dist_env.world_size, device=device, data_dir=args.data)
        if cfg.model.num_classes is None:
            cfg.model.num_classes = loader.num_classes
        model = build_model(cfg)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            print(f"star eval: error: {ckpt} does not fit {cfg.model.name}: missing {missing[:5]}, "
                  f"unexpected {unexpected[:5]}", file=sys.stderr)
            return 2
        model.to(device)
        result = evaluate(model, loader, device=device, amp_dtype=amp)
        result.update(ckpt=str(ckpt), ema=args.ema, split=args.split, num_samples=loader.num_samples,
                      world_size=dist_env.world_size)
        if dist_env.is_main:
            skipped = result["skipped_corrupt"]
            for name in result["skipped_samples"]:
                print(f"skipped corrupt sample {name}", file=sys.stderr)
            note = (f"; {skipped} corrupt image(s) skipped (data.on_corrupt=skip), accuracy over the other "
                    f"{result['images']}" if skipped else "")
            print(f"top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}  on {result['images']} images "
                  f"({'EMA, ' if args.ema else ''}{dist_env.world_size} rank(s)){note}")
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        if result["images"] + result["skipped_corrupt"] != loader.num_samples:
            print(f"star eval: error: evaluated {result['images']} images and skipped {result['skipped_corrupt']} "
                  f"but the split has {loader.num_samples}", file=sys.stderr)
            return 1
        return 0
    except ConfigError as exc:  # a corrupt sample or a damaged shard met while reading (bad input)
        print(f"star eval: error: {exc}", file=sys.stderr)
        return 2
    finally:
        destroy()
