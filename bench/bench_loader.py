"""Data-loader throughput on this machine: DALI pipeline vs PIL/DataLoader baseline vs decode-only.

All three read the same shards in one run, with the same number of threads:

* decode-only: PIL decodes every JPEG of the split (bytes already in memory), no augmentation,
  in a thread pool (PIL releases the GIL while decoding);
* baseline: ``build_loader(..., backend="baseline")`` (PIL in DataLoader worker processes);
* dali: ``build_loader(..., backend="dali")`` on the CPU.

The loaders produce normalised float NCHW batches; each is timed over whole epochs after one
warm-up epoch, and the three are interleaved over ``--repeats`` rounds (median round reported)
so that load from other processes hits them alike. On a shared machine wall-clock rates swing
with the load; the CPU time per image of decode-only and DALI (threads of this process) does
not, and shows what each pipeline costs. Without ``--data`` a set of ImageNet-like
JPEGs (default 500 x 375, quality 90, photo-like texture) is written to a temporary folder.

    python bench/bench_loader.py                      # pretraining pipeline, 192 px, 2 threads
    python bench/bench_loader.py --mode finetune --image-size 224 --json out.json
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def photo_like_jpeg(rng: np.random.Generator, width: int, height: int, quality: int, grain: float) -> bytes:
    """Smooth colour regions plus fine grain (std ``grain`` grey levels): compresses and decodes
    like a photograph; more grain, more entropy-decoding work per pixel."""
    from PIL import Image

    coarse = rng.integers(0, 256, (height // 24 + 2, width // 24 + 2, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    noise = rng.normal(0, grain, (height, width, 1)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_shards(out: Path, num_images: int, width: int, height: int, quality: int, grain: float = 12.0,
                 per_shard: int = 128, num_classes: int = 10) -> None:
    """A train split in the shard format (tars, ``wds2idx`` indexes, manifest)."""
    rng = np.random.default_rng(0)
    wds2idx = shutil.which("wds2idx") or str(Path(sys.executable).parent / "wds2idx")
    shards = []
    for shard_no, start in enumerate(range(0, num_images, per_shard)):
        name = f"train-{shard_no:06d}"
        with tarfile.open(out / f"{name}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(start, min(start + per_shard, num_images)):
                label = i % num_classes
                for ext, data in (("jpg", photo_like_jpeg(rng, width, height, quality, grain)),
                                  ("cls", str(label).encode()),
                                  ("json", json.dumps({"wnid": f"n{label:08d}", "file": f"{i}.JPEG",
                                                       "width": width, "height": height}).encode())):
                    info = tarfile.TarInfo(f"s{i:07d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        subprocess.run([wds2idx, str(out / f"{name}.tar"), str(out / f"{name}.idx")], check=True,
                       capture_output=True)
        data = (out / f"{name}.tar").read_bytes()
        shards.append({"name": f"{name}.tar", "index": f"{name}.idx", "bytes": len(data),
                       "num_samples": min(per_shard, num_images - start),
                       "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {"split": "train", "num_samples": num_images, "num_classes": num_classes, "seed": 0,
                "files_in": num_images, "shards": shards, "rejected": [], "repaired": []}
    (out / "train.json").write_text(json.dumps(manifest))


def process_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def time_decode_only(jpegs: list[bytes], threads: int) -> tuple[float, float]:
    """(images/s, CPU seconds per image)."""
    from pipelines.pil_ops import decode

    cpu, start = process_cpu_s(), time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(decode, jpegs, chunksize=16):
            pass
    return len(jpegs) / (time.perf_counter() - start), (process_cpu_s() - cpu) / len(jpegs)


def time_loader(loader, epoch: int) -> tuple[float, float]:
    """(images/s, CPU seconds per image in this process: all of it for DALI, not the baseline's workers)."""
    images = 0
    cpu, start = process_cpu_s(), time.perf_counter()
    for batch in loader.epoch(epoch):
        images += batch.images.shape[0]
    return images / (time.perf_counter() - start), (process_cpu_s() - cpu) / images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_loader.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="existing shard folder (default: write a temporary one)")
    parser.add_argument("--split", default="train", help="split of --data to read (default train)")
    parser.add_argument("--images", type=int, default=768, help="images to write without --data (default 768)")
    parser.add_argument("--source-size", default="500x375", help="WxH of the written JPEGs (default 500x375)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of the written images (default 90)")
    parser.add_argument("--grain", type=float, default=12.0,
                        help="texture noise (grey levels) of the written JPEGs; 12 gives about 90 kB "
                             "at 500x375 q90, near ImageNet's average of 110 kB (default 12)")
    parser.add_argument("--mode", default="pretrain", choices=["pretrain", "finetune", "eval"],
                        help="which pipeline to time (default pretrain)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per batch (default 64)")
    parser.add_argument("--image-size", type=int, default=192, help="output side S (default 192)")
    parser.add_argument("--threads", type=int, default=2, help="threads / workers for all three (default 2)")
    parser.add_argument("--interpolation", default="cubic", choices=["cubic", "linear"],
                        help="resize filter of both loaders (default cubic, the recipe's)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds; the median is reported (default 5)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)

    import torch
    from rich.console import Console
    from rich.table import Table

    from pipelines import build_loader
    from pipelines.shards import ShardSet

    torch.set_num_threads(1)  # normalisation in the main process; the pipelines own the cores
    console = Console()
    tmp = None
    data = args.data
    if data is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_loader_")
        data = Path(tmp.name)
        w, h = (int(v) for v in args.source_size.lower().split("x"))
        with console.status(f"writing {args.images} JPEGs of {w}x{h} q{args.quality}"):
            write_shards(data, args.images, w, h, args.quality, args.grain)
    shards = ShardSet(data, args.split)
    jpegs = [shards.read(i)[0] for i in range(len(shards))]
    common = dict(split=args.split, batch_size=args.batch_size, image_size=args.image_size,
                  num_threads=args.threads, interpolation=args.interpolation)
    loaders = {name: build_loader(args.mode, data, backend=name, **common) for name in ("dali", "baseline")}
    for loader in loaders.values():  # warm-up: workers, graph build, page cache
        time_loader(loader, epoch=0)
    rates: dict[str, list[float]] = {"decode-only": [], "dali": [], "baseline": []}
    cpu: dict[str, list[float]] = {"decode-only": [], "dali": [], "baseline": []}
    with console.status("timing"):
        for round_ in range(args.repeats):
            for name in rates:
                rate, cpu_s = (time_decode_only(jpegs, args.threads) if name == "decode-only"
                               else time_loader(loaders[name], epoch=1 + round_))
                rates[name].append(rate)
                cpu[name].append(cpu_s)
    if tmp is not None:
        tmp.cleanup()
    median = {name: statistics.median(r) for name, r in rates.items()}
    cpu_us = {name: 1e6 * statistics.median(c) for name, c in cpu.items()}

    table = Table(title=f"{args.mode} loader, {len(jpegs)} images, batch {args.batch_size}, "
                        f"S={args.image_size}, {args.interpolation}, {args.threads} threads, {os.cpu_count()} CPUs")
    for col in ("pipeline", "images/s", "ms / batch", "x baseline", "x decode-only", "CPU us / image"):
        table.add_column(col, justify="right" if col != "pipeline" else "left")
    for name, rate in median.items():
        table.add_row(name, f"{rate:,.0f}", f"{1e3 * args.batch_size / rate:,.1f}",
                      f"{rate / median['baseline']:.2f}", f"{rate / median['decode-only']:.2f}",
                      "workers not counted" if name == "baseline" else f"{cpu_us[name]:,.0f}")
    console.print(table)
    console.print(f"median of {args.repeats} interleaved rounds; load average {os.getloadavg()[0]:.1f} "
                  f"on {os.cpu_count()} CPUs")
    if args.json:
        args.json.write_text(json.dumps({"mode": args.mode, "images": len(jpegs), "batch_size": args.batch_size,
                                         "image_size": args.image_size, "threads": args.threads,
                                         "interpolation": args.interpolation, "images_per_s": median,
                                         "images_per_s_rounds": rates, "cpu_us_per_image": cpu_us,
                                         "dali_vs_baseline": median["dali"] / median["baseline"],
                                         "dali_vs_decode_only": median["dali"] / median["decode-only"],
                                         "load_average": os.getloadavg()[0]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
