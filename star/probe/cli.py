"""`star probe knn|linear`: how good are a pretrained encoder's frozen features?

    star probe knn --ckpt runs/star_b --data data/imagenet_shards          # a pretraining run dir
    star probe knn --ckpt model.pth --model star_base_pz16 --data DIR      # `star export` file
    star probe linear --ckpt checkpoint-1599.pth --model arm_base_pz16 --data DIR   # ARM's release
    star probe knn --random-init --config smoke --data DIR                # the baseline

Features: the pretraining encoder as it is (1 causal scan), one image per sequence, the mean
of the image's output tokens (``--pool last``: its last token), eval transform (resize,
centre crop). ``knn``: DINO's weighted k-NN (cosine, k = 20, T = 0.07) of val against train.
``linear``: MAE's linear probe (BatchNorm without affine + linear layer on the frozen
features), scaled down by options. Every rank extracts its part of each split (every image
exactly once, as `star eval`); rank 0 classifies, prints a table and writes ``--json``.
The model comes from ``--config`` (a pretraining preset or YAML), else the run dir's
config.yaml (or the one next to a weights file), else ``--model NAME`` (registry defaults).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.table import Table

from star.config import ConfigError, load_config
from star.models import create_model
from star.probe.extract import POOLS, features_of_split, probe_loader
from star.probe.knn import K_DEFAULT, TEMPERATURE_DEFAULT, knn_classify
from star.probe.linear import LinearProbeConfig, linear_probe
from star.train.distributed import destroy, init_inference, resolve_device
from star.train.runtime import build_model
from star.train.weights import read_weights

PROG = "star probe"
EXIT_USAGE = 2
ENCODER_PREFIXES = ("patch_embed.", "pos_embed", "packer.", "layers.")


class UsageError(Exception):
    """A mistake on the command line: one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("knn", "linear"), help="knn: weighted k-NN; linear: linear probe")
    parser.add_argument("--ckpt", metavar="RUN_DIR|FILE",
                        help="a `star pretrain` run dir (newest checkpoint), a `star export` file or ARM's "
                             "checkpoint (state dict under 'model'); with --random-init only its config is used")
    parser.add_argument("--random-init", action="store_true",
                        help="probe the randomly initialised model (seeded by --seed): the baseline")
    parser.add_argument("--data", required=True, metavar="DIR", help="shard directory holding train.json and val.json")
    parser.add_argument("--config", metavar="NAME|PATH", help="pretraining config naming the model (e.g. smoke)")
    parser.add_argument("--model", metavar="NAME", help="registry model name (e.g. star_base_pz16, arm_base_pz16); "
                                                        "with --config it replaces model.name")
    parser.add_argument("--pool", choices=POOLS, default="mean",
                        help="mean of the image's output tokens (default) or its last token")
    parser.add_argument("--train-images", type=int, metavar="N",
                        help="use a subset of N train images (fixed by --seed)")
    parser.add_argument("--val-images", type=int, metavar="N", help="use a subset of N val images (fixed by --seed)")
    parser.add_argument("--seed", type=int, default=0,
                        help="subsets, random init and the probe's own stream (default 0)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per rank per extraction batch (default 64)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="extraction autocast: auto = bf16 on GPU, fp32 on CPU")
    parser.add_argument("--backend", choices=("dali", "baseline"),
                        help="loader backend (default: the config's, else dali)")
    parser.add_argument("--num-threads", type=int, help="decoding threads per rank (default: the config's, else 2)")
    knn = parser.add_argument_group("knn")
    knn.add_argument("--k", type=int, default=K_DEFAULT, help=f"neighbours (default {K_DEFAULT}, DINO)")
    knn.add_argument("--temperature", type=float, default=TEMPERATURE_DEFAULT,
                     help=f"vote weight exp(sim / T) (default {TEMPERATURE_DEFAULT}, DINO)")
    lin = parser.add_argument_group("linear (MAE's recipe; see star/probe/linear.py)")
    d = LinearProbeConfig()
    lin.add_argument("--epochs", type=int, default=d.epochs, help=f"default {d.epochs}")
    lin.add_argument("--probe-batch", type=int, default=d.batch_size,
                     help=f"probe batch (default {d.batch_size}, capped to train_images / {d.min_steps_per_epoch})")
    lin.add_argument("--lr", type=float, default=d.base_lr, help=f"base lr, x batch / 256 (default {d.base_lr})")
    lin.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs, help=f"default {d.warmup_epochs}")
    lin.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"default {d.weight_decay}")
    lin.add_argument("--optimizer", choices=("sgd", "lars"), default=d.optimizer,
                     help="sgd (default: momentum 0.9, right for small splits) or lars (MAE at scale)")
    parser.add_argument("--save-features", metavar="FILE", help="also save the gathered features (torch.save)")
    parser.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides (model.*)")
    return parser


def _check_args(args) -> tuple[Path | None, str]:
    """Fail fast on the user's mistakes; return (ckpt path, checkpoint form)."""
    if args.ckpt is None and not args.random_init:
        raise UsageError("give --ckpt RUN_DIR|FILE, or --random-init for the untrained baseline")
    ckpt = Path(args.ckpt) if args.ckpt else None
    if ckpt is not None and not ckpt.exists():
        raise UsageError(f"--ckpt {ckpt}: no such run directory or file")
    if ckpt is not None and ckpt.is_dir() and not args.random_init and not (ckpt / "checkpoints" / "latest").is_file():
        raise UsageError(f"--ckpt {ckpt}: a directory without checkpoints/latest; give a `star pretrain` "
                         f"run dir or a weights file")
    for split in ("train", "val"):
        if not (Path(args.data) / f"{split}.json").is_file():
            raise UsageError(f"--data {args.data}: no {split}.json; give a shard directory written by "
                             f"`star shard --out {args.data} --split {split}`")
    for name in ("train_images", "val_images"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} {value}: must be at least 1")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size}: must be at least 1")
    form = "random_init" if args.random_init else ("run_dir" if ckpt.is_dir() else "weights_file")
    return ckpt, form


def _model_source(args, ckpt: Path | None):
    """(config or None, model name): --config, else a config.yaml beside the ckpt (as `star eval`),
    else --model with the registry's defaults. --model with a config replaces model.name."""
    overrides = list(args.overrides) + ([f"model.name={args.model}"] if args.model else [])
    saved = None
    if ckpt is not None:
        saved = ckpt / "config.yaml" if ckpt.is_dir() else ckpt.parent / "config.yaml"
    if args.config:
        cfg = load_config(args.config, overrides)
    elif saved is not None and saved.is_file():
        cfg = load_config(base=yaml.safe_load(saved.read_text()), overrides=overrides)
    elif args.model:
        if args.overrides:
            raise UsageError("config overrides need --config NAME|PATH (or a run dir); with --model alone "
                             "the registry's defaults are used")
        return None, args.model
    else:
        where = f"{ckpt} has no config.yaml beside it" if ckpt is not None else "no --ckpt run dir"
        raise UsageError(f"{where}: pass --model NAME (e.g. star_base_pz16) or --config NAME|PATH")
    if cfg.kind != "pretrain":
        raise UsageError(f"config {cfg.name!r} is a {cfg.kind} config; probing needs the pretraining model "
                         f"(a pretraining preset such as star_b_1600ep or smoke)")
    return cfg, cfg.model.name


def _build_model(cfg, name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)  # the same random init on every rank
    try:
        model = build_model(cfg) if cfg is not None else create_model(name)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not hasattr(model, "packing"):
        raise UsageError(f"{name} is not a pretraining model (StarPretrainModel); probe the pretraining "
                         f"checkpoint, not a fine-tuned classifier")
    return model


def _load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    try:
        state = read_weights(ckpt)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches: PyTorch lists every one, keep the first
        lines = [line.strip() for line in str(exc).splitlines() if "size mismatch" in line]
        raise UsageError(f"{ckpt} does not fit the model ({len(lines)} shape mismatches, e.g. "
                         f"{lines[0] if lines else exc}); pass the right --model / --config") from None
    missing_encoder = [k for k in missing if k.startswith(ENCODER_PREFIXES)]
    if missing_encoder or unexpected:
        raise UsageError(f"{ckpt} does not fit the model: missing {missing_encoder[:4]}, unexpected "
                         f"{unexpected[:4]}; pass the right --model / --config")


def result_table(result: dict) -> Table:
    table = Table(title=f"star probe {result['mode']}")
    table.add_column("")
    table.add_column("value", justify="right")
    rows = [("top-1 %", f"{result['top1']:.2f}"), ("top-5 %", f"{result['top5']:.2f}"),
            ("train images", str(result["train_images"])), ("val images", str(result["val_images"])),
            ("classes", str(result["num_classes"])), ("feature dim", str(result["feature_dim"])),
            ("pool", result["pool"]), ("model", result["model"]),
            ("checkpoint", f"{result['checkpoint_form']}: {result['checkpoint'] or '-'}"),
            ("extraction", f"{result['extract_seconds']:.1f} s, {result['images_per_second']:.0f} img/s")]
    if result["mode"] == "knn":
        rows.append(("k, T", f"{result['k']}, {result['temperature']}"))
    else:
        rows.append(("train top-1 %", f"{result['train_top1']:.2f}"))
        rows.append(("optimizer, steps", f"{result['config']['optimizer']}, {result['steps']}"))
    for row in rows:
        table.add_row(*row)
    return table


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)
    try:
        ckpt, form = _check_args(args)
        cfg, model_name = _model_source(args, ckpt)
        probe_cfg = LinearProbeConfig(epochs=args.epochs, batch_size=args.probe_batch, base_lr=args.lr,
                                      warmup_epochs=args.warmup_epochs, weight_decay=args.weight_decay,
                                      optimizer=args.optimizer, seed=args.seed)
        device = resolve_device(args.device)
    except (UsageError, ConfigError, ValueError, RuntimeError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    backend = args.backend or (cfg.data.backend if cfg is not None else "dali")
    num_threads = args.num_threads or (cfg.data.num_threads if cfg is not None else 2)
    precision = args.precision if args.precision != "auto" else ("bf16" if device == "cuda" else "fp32")
    amp = torch.bfloat16 if precision == "bf16" else None

    dist_env, device = init_inference(device)
    try:
        try:
            model = _build_model(cfg, model_name, args.seed)
            if not args.random_init:
                _load_weights(model, ckpt)
            loaders = {split: probe_loader(args.data, split, image_size=model.packing.img_size,
                                           batch_size=args.batch_size, rank=dist_env.rank,
                                           world_size=dist_env.world_size, device=device, backend=backend,
                                           num_threads=num_threads, seed=args.seed, max_images=limit)
                       for split, limit in (("train", args.train_images), ("val", args.val_images))}
        except (UsageError, ImportError, FileNotFoundError, ValueError) as exc:  # model name, shards, DALI
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return EXIT_USAGE
        model.to(device)
        start = time.perf_counter()
        sets = {split: features_of_split(model, loader, pool=args.pool, amp_dtype=amp,
                                         show_progress=dist_env.is_main, description=f"{split} features")
                for split, loader in loaders.items()}
        seconds = time.perf_counter() - start
        if not dist_env.is_main:
            return 0
        train, val = sets["train"], sets["val"]
        result = {"mode": args.mode, "checkpoint": str(ckpt) if ckpt else None, "checkpoint_form": form,
                  "model": model_name, "pool": args.pool, "train_images": len(train), "val_images": len(val),
                  "num_classes": train.num_classes, "feature_dim": train.dim, "seed": args.seed,
                  "world_size": dist_env.world_size, "precision": precision, "extract_seconds": seconds,
                  "images_per_second": (len(train) + len(val)) / max(seconds, 1e-9)}
        if args.mode == "knn":
            result.update(knn_classify(train.features, train.labels, val.features, val.labels,
                                       num_classes=train.num_classes, k=args.k, temperature=args.temperature),
                          k=args.k, temperature=args.temperature)
        else:
            result.update(linear_probe(train.features, train.labels, val.features, val.labels,
                                       num_classes=train.num_classes, config=probe_cfg))
        del result["images"]
        Console().print(result_table(result))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        if args.save_features:
            torch.save({f"{s}_{k}": getattr(sets[s], k).cpu() for s in sets for k in ("features", "labels")},
                       args.save_features)
        return 0
    finally:
        destroy()


if __name__ == "__main__":
    sys.exit(main())
