"""`star profile data`: throughput of the data pipeline.

Times ``pipelines.build_loader`` as training builds it and reports images/s per rank and over
all ranks (run one process per GPU with srun / torchrun to time a whole node: each rank reads
its own part, the table sums them). `star profile all` calls :func:`data_profile` first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from rich.console import Console
from rich.table import Table

from pipelines import build_loader
from star.config import load_config
from star.train.cli_common import add_overrides_argument
from star.train.distributed import all_gather_objects, destroy, init_distributed, resolve_dist_env


def build_data_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="star profile data",
        description="Time the data loader: images/s per rank and overall, time per batch. Settings come "
                    "from --config (the data section, model.img_size, batch.micro_images, seed) or from "
                    "--data/--mode/--batch-size/--image-size; explicit options override the config.")
    parser.add_argument("--config", metavar="NAME|PATH", help="preset name or YAML file (see `star pretrain --help`)")
    add_overrides_argument(parser, "data.num_threads=4 (with --config)")
    parser.add_argument("--data", metavar="DIR", help="shard directory (default: the config's data.dir)")
    parser.add_argument("--mode", choices=("pretrain", "finetune", "eval"),
                        help="pipeline to time (default: the config's kind, else pretrain)")
    parser.add_argument("--split", choices=("train", "val"),
                        help="split to read (default: val for eval, else train)")
    parser.add_argument("--batch-size", type=int, metavar="IMAGES",
                        help="images per rank per batch (default: batch.micro_images, else 64)")
    parser.add_argument("--image-size", type=int, metavar="S",
                        help="output side in pixels (default: model.img_size, else 192)")
    parser.add_argument("--loader", choices=("dali", "baseline"), help="backend (default: data.backend, else dali)")
    parser.add_argument("--threads", type=int,
                        help="DALI threads / DataLoader workers (default: data.num_threads, else 2)")
    parser.add_argument("--device", default=None,
                        help="where batches land: cpu, cuda or cuda:N (default: cuda:LOCAL_RANK when a GPU "
                             "is visible, else cpu); on cuda DALI decodes with nvJPEG")
    parser.add_argument("--batches", type=int, default=20, metavar="N", help="timed batches (default 20)")
    parser.add_argument("--warmup", type=int, default=3, metavar="N",
                        help="untimed batches first: worker start, graph build, page cache (default 3)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to this JSON file")
    return parser


def _settings(args) -> dict:
    """Loader settings from the config (if any) overridden by explicit options."""
    s = {"data_dir": None, "mode": "pretrain", "batch_size": 64, "image_size": 192, "backend": "dali",
         "num_threads": 2, "seed": 0, "on_corrupt": "error", "loader_kwargs": {}, "config": None}
    if args.config:
        cfg = load_config(args.config, list(args.overrides))
        s.update(data_dir=cfg.data.dir, mode=cfg.kind, batch_size=cfg.batch.micro_images,
                 image_size=cfg.model.img_size, backend=cfg.data.backend, num_threads=cfg.data.num_threads,
                 seed=cfg.seed, on_corrupt=cfg.data.on_corrupt, loader_kwargs=dict(cfg.data.loader_kwargs),
                 config=cfg.name or args.config)
    elif args.overrides:
        raise ValueError(f"overrides {args.overrides} need --config")
    for key, value in (("data_dir", args.data), ("mode", args.mode), ("batch_size", args.batch_size),
                       ("image_size", args.image_size), ("backend", args.loader), ("num_threads", args.threads)):
        if value is not None:
            s[key] = value
    if s["data_dir"] is None:
        raise ValueError("no shard directory: give --data DIR or --config NAME")
    s["split"] = args.split or ("val" if s["mode"] == "eval" else "train")
    return s


def time_loader(loader, batches: int, warmup: int, device: str) -> dict:
    """Per-batch wall times of ``batches`` batches after ``warmup``, cycling epochs as needed."""
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    times: list[float] = []
    images = 0
    epoch = 0
    while len(times) < batches:
        it = iter(loader.epoch(epoch))
        epoch += 1
        start = time.perf_counter()
        for batch in it:
            sync()
            now = time.perf_counter()
            if warmup > 0:
                warmup -= 1
            else:
                times.append(now - start)
                images += batch.images.shape[0]
                if len(times) == batches:
                    break
            start = time.perf_counter()
    total = sum(times)
    return {"images_per_s": images / total, "batch_s": total / len(times),
            "batch_s_median": statistics.median(times), "batches": len(times), "images": images}


def _default_device(local_rank: int) -> str:
    return f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"


def data_profile(cfg, args, device: str, dist_env) -> dict:
    """For `star profile all` (star.profiling.cli): this loader's images/s summed over ranks."""
    batch = getattr(args, "batch_size", None) or cfg.batch.micro_images
    dev = f"cuda:{dist_env.local_rank}" if device == "cuda" else device
    loader = build_loader(cfg.kind, cfg.data.dir, split=cfg.data.train_split, batch_size=batch,
                          image_size=cfg.model.img_size, rank=dist_env.rank, world_size=dist_env.world_size,
                          seed=cfg.seed, backend=cfg.data.backend, num_threads=cfg.data.num_threads,
                          device=dev, on_corrupt=cfg.data.on_corrupt, **cfg.data.loader_kwargs)
    mine = time_loader(loader, max(1, args.batches), args.warmup if args.warmup is not None else 2, dev)
    per_rank = all_gather_objects(mine)
    return {"images_per_s": sum(r["images_per_s"] for r in per_rank), "batch_s": mine["batch_s"],
            "per_rank": per_rank,
            "details": f"{cfg.data.backend} loader, {cfg.kind}, batch {batch}/rank, {cfg.data.num_threads} threads, "
                       f"{len(per_rank)} rank(s)"}


def run_data(argv: list[str] | None) -> int:
    parser = build_data_parser()
    args = parser.parse_args(argv)
    if args.batches < 1 or args.warmup < 0:
        parser.error(f"--batches {args.batches} must be >= 1 and --warmup {args.warmup} >= 0")
    try:
        s = _settings(args)
    except ValueError as exc:
        parser.error(str(exc))
    dist_env = resolve_dist_env()
    device = args.device or _default_device(dist_env.local_rank)
    distributed = dist_env.world_size > 1
    if distributed:
        init_distributed("cuda" if device.startswith("cuda") else "cpu", use_deepspeed=False)
    try:
        loader = build_loader(s["mode"], s["data_dir"], split=s["split"], batch_size=s["batch_size"],
                              image_size=s["image_size"], rank=dist_env.rank, world_size=dist_env.world_size,
                              seed=s["seed"], backend=s["backend"], num_threads=s["num_threads"], device=device,
                              on_corrupt=s["on_corrupt"], **s["loader_kwargs"])
        mine = time_loader(loader, args.batches, args.warmup, device)
        mine.update(rank=dist_env.rank, skipped_corrupt=loader.stats()["skipped_corrupt"])
        per_rank = all_gather_objects(mine)
    except (ValueError, FileNotFoundError) as exc:
        print(f"star profile data: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if distributed:
            destroy()
    if dist_env.rank != 0:
        return 0
    overall = sum(r["images_per_s"] for r in per_rank)
    title = (f"star profile data - {s['backend']} {s['mode']} loader, {s['split']} of {s['data_dir']}, "
             f"batch {s['batch_size']}/rank, S={s['image_size']}, {s['num_threads']} threads, on {device}")
    table = Table(title=title)
    for col in ("rank", "images/s", "mean ms / batch", "median ms / batch", "batches"):
        table.add_column(col, justify="right")
    for r in per_rank:
        table.add_row(str(r["rank"]), f"{r['images_per_s']:,.0f}", f"{1e3 * r['batch_s']:,.1f}",
                      f"{1e3 * r['batch_s_median']:,.1f}", str(r["batches"]))
    table.add_row("all", f"{overall:,.0f}", "-", "-", str(sum(r["batches"] for r in per_rank)), style="bold")
    Console().print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"what": "data", "config": s["config"], "settings": {k: v for k, v in s.items()},
                       "device": device, "world_size": dist_env.world_size, "per_rank": per_rank,
                       "images_per_s": overall}, f, indent=1, default=str)
        print(f"wrote {args.json}")
    return 0
