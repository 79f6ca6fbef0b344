"""Sharding throughput against `tar cf` of the same files, as a ratio measured in one run.

`tar cf` is the floor of any sharder: it only copies bytes. `star shard` also inspects every
image (--check decode entropy-decodes it at 1/8 scale; --check markers only parses headers),
shuffles, and hashes and indexes every shard. Both read from a warm page cache and write to
the same disk; each is timed `--repeats` times and the fastest run counts.

    python bench/bench_shard.py                      # synthesise ~250 MB, then measure
    python bench/bench_shard.py --src DIR/train --json bench_shard.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def timed(cmd: list[str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"command failed ({result.returncode}): {' '.join(cmd)}\n{result.stderr[-2000:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", type=Path, default=None, help="an ImageFolder train tree (default: synthesise one)")
    p.add_argument("--images", type=int, default=6000, help="images to synthesise without --src (default 6000)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="star shard --workers (default: all CPUs)")
    p.add_argument("--shard-bytes", type=int, default=25_000_000,
                   help="star shard --shard-bytes (default 25e6: several shards per worker on a few hundred MB)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs per method; the fastest counts (default 2)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)

    scratch = Path(tempfile.mkdtemp(prefix="bench_shard_"))
    try:
        src = args.src
        if src is None:
            from data_prep import synth

            classes = 20
            synth.synthesize(scratch / "synth", classes=classes, per_class=max(1, args.images // classes), seed=0,
                             workers=args.workers)
            src = scratch / "synth" / "train"
        files = [f for f in src.rglob("*") if f.is_file()]
        total_bytes = sum(f.stat().st_size for f in files)
        for f in files:  # warm the page cache so neither method pays the first read
            f.read_bytes()

        methods = {
            "tar cf": lambda out: ["tar", "cf", str(out / "all.tar"), "-C", str(src), "."],
            "star shard --check decode": lambda out: [
                sys.executable, "-m", "data_prep", "shard", "--src", str(src), "--out", str(out), "--split", "train",
                "--workers", str(args.workers), "--shard-bytes", str(args.shard_bytes), "--check", "decode"],
            "star shard --check markers": lambda out: [
                sys.executable, "-m", "data_prep", "shard", "--src", str(src), "--out", str(out), "--split", "train",
                "--workers", str(args.workers), "--shard-bytes", str(args.shard_bytes), "--check", "markers"],
        }
        best: dict[str, float] = {}
        for repeat in range(args.repeats):  # interleaved, so background load hits every method alike
            for name, command in methods.items():
                out = scratch / f"out_{repeat}_{len(best)}_{abs(hash(name))}"
                out.mkdir()
                seconds = timed(command(out))
                best[name] = min(best.get(name, float("inf")), seconds)
                shutil.rmtree(out)

        rows = []
        for name, seconds in best.items():
            rows.append({"method": name, "seconds": round(seconds, 3), "images_per_s": round(len(files) / seconds, 1),
                         "mb_per_s": round(total_bytes / 1e6 / seconds, 1),
                         "ratio_vs_tar": round(best["tar cf"] / seconds, 3)})
        table = Table(title=f"{len(files)} files, {total_bytes / 1e6:.0f} MB, star shard --workers {args.workers}, "
                            f"best of {args.repeats}")
        for col in ("method", "seconds", "images/s", "MB/s", "x tar cf"):
            table.add_column(col, justify="left" if col == "method" else "right")
        for r in rows:
            table.add_row(r["method"], f"{r['seconds']:.2f}", f"{r['images_per_s']:,.0f}", f"{r['mb_per_s']:,.0f}",
                          f"{r['ratio_vs_tar']:.2f}")
        Console().print(table)
        if args.json:
            args.json.write_text(json.dumps({"files": len(files), "bytes": total_bytes, "workers": args.workers,
                                             "cpus": os.cpu_count(), "results": rows}, indent=1) + "\n")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
