"""`star verify DIR`: check sharded splits against their manifests, reading every byte once.

Per shard: the tar exists, has the manifest's size and sha256, parses to the manifest's sample
count, every sample has exactly jpg/cls/json and a class index in range,
and the .idx file equals the index recomputed from the tar (what ``wds2idx`` would write).
Per split: counts add up (files in = samples + rejected), keys are unique across shards, class
counts match, no unlisted shard lies in the folder, and classes.json has num_classes wnids.
Exits 1 naming each bad shard and what is wrong; exits 2 with one line, before reading any
shard, for a manifest that is missing, damaged, or lists a path outside DIR
(``data_prep.manifest``). Sample keys follow ``wds_tar.split_name``, as everywhere.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import sys
import tarfile
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.table import Table

from data_prep.manifest import ManifestError, read_manifest
from data_prep.progress import make_progress, usable_cpus
from data_prep.wds_tar import MEMBER_ORDER, index_text, scan_tar, split_name

SPLITS = ("train", "val")


def check_shard(job: tuple[str, dict, int]) -> dict:
    """Problems of one shard, plus its keys and class counts for the split-wide checks."""
    folder, entry, num_classes = job
    # verify_split checked both paths with shard_file: they lie inside `folder`
    tar_path, idx_path = Path(folder, entry["name"]), Path(folder, entry["index"])
    problems: list[str] = []
    keys: list[str] = []
    counts: Counter = Counter()
    if not tar_path.is_file():
        return {"name": entry["name"], "problems": ["tar file is missing"], "keys": keys, "counts": counts}
    size = tar_path.stat().st_size
    if size != entry["bytes"]:
        problems.append(f"size {size} bytes, manifest says {entry['bytes']} (truncated or rewritten)")
    try:
        scan = scan_tar(tar_path, keep_exts=("cls",))
    except (tarfile.TarError, EOFError, OSError) as exc:
        problems.append(f"tar cannot be read to the end ({type(exc).__name__}: {exc})")
        return {"name": entry["name"], "problems": problems, "keys": keys, "counts": counts}
    if scan.sha256 != entry["sha256"]:
        problems.append(f"sha256 {scan.sha256[:16]}... differs from the manifest's {entry['sha256'][:16]}...")
    if len(scan.samples) != entry["num_samples"]:
        problems.append(f"{len(scan.samples)} samples, manifest says {entry['num_samples']}")
    for sample in scan.samples:
        key = split_name(sample[0].name)[0]  # the rule scan_tar grouped the samples by
        keys.append(key)
        exts = tuple(e.ext for e in sample)
        if exts != MEMBER_ORDER:
            problems.append(f"sample {key!r} has members {exts}, expected {MEMBER_ORDER}")
            continue
        raw = scan.small_members[sample[MEMBER_ORDER.index("cls")].name]
        if not re.fullmatch(rb"\d+", raw) or int(raw) >= num_classes:
            problems.append(f"sample {key!r} has class {raw!r}, expected an integer in 0..{num_classes - 1}")
        else:
            counts[int(raw)] += 1
    if not idx_path.is_file():
        problems.append(f"index {entry['index']} is missing")
    elif idx_path.read_text() != index_text(scan.samples):
        problems.append(f"index {entry['index']} does not match the tar (regenerate the shard, or wds2idx it)")
    return {"name": entry["name"], "problems": problems[:20], "keys": keys, "counts": counts}


def load_manifest(folder: Path, split: str) -> dict:
    """The split's manifest with every field verify needs; ManifestError (one line, exit 2)
    for a damaged one or one whose shard paths leave `folder`."""
    manifest_path = folder / f"{split}.json"
    try:
        return read_manifest(manifest_path, required={"bytes": int, "sha256": str})
    except FileNotFoundError:
        raise ManifestError(f"no manifest {manifest_path}: run `star shard --split {split}` first (an interrupted "
                            f"run writes its manifest only at the end)") from None


def verify_split(folder: Path, split: str, workers: int, console: Console, manifest: dict | None = None) -> list[str]:
    """All problems of one split, each prefixed with the shard (or file) it concerns."""
    manifest = load_manifest(folder, split) if manifest is None else manifest
    shards, num_classes = manifest["shards"], manifest["num_classes"]
    problems = []
    try:
        wnids = json.loads((folder / "classes.json").read_text())["wnids"]
        if len(wnids) != num_classes:
            problems.append(f"classes.json: {len(wnids)} wnids, {split}.json says num_classes={num_classes}")
    except (OSError, ValueError, KeyError) as exc:
        problems.append(f"classes.json: missing or unreadable ({exc})")
    listed = {s["name"] for s in shards} | {s["index"] for s in shards}
    for path in sorted(folder.glob(f"{split}-*")):
        if re.fullmatch(rf"{split}-\d{{6}}\.(tar|idx)", path.name) and path.name not in listed:
            problems.append(f"{path.name}: not listed in {split}.json (left over from another run?)")

    jobs = [(str(folder), s, num_classes) for s in shards]
    table = Table(title=f"{split}: {len(shards)} shards in {folder}")
    for col in ("shard", "samples", "bytes", "status"):
        table.add_column(col, justify="right" if col in ("samples", "bytes") else "left")
    keys: Counter = Counter()
    counts: Counter = Counter()
    with make_progress("shard", console) as progress:
        task = progress.add_task(f"verify {split}", total=len(jobs))
        pool = multiprocessing.Pool(min(workers, len(jobs))) if workers > 1 and len(jobs) > 1 else None
        try:
            for entry, result in zip(shards, pool.imap(check_shard, jobs) if pool else map(check_shard, jobs)):
                keys.update(result["keys"])
                counts.update(result["counts"])
                problems += [f"{result['name']}: {p}" for p in result["problems"]]
                table.add_row(entry["name"], str(entry["num_samples"]), f"{entry['bytes']:,}",
                              "[red]BAD[/red]" if result["problems"] else "[green]ok[/green]")
                progress.advance(task)
        finally:
            if pool:
                pool.terminate()
    console.print(table)

    n_listed = sum(s["num_samples"] for s in shards)
    if n_listed != manifest["num_samples"]:
        problems.append(f"{split}.json: shards list {n_listed} samples, num_samples says {manifest['num_samples']}")
    if manifest.get("files_in") != manifest["num_samples"] + len(manifest.get("rejected", [])):
        problems.append(f"{split}.json: files_in {manifest.get('files_in')} != num_samples {manifest['num_samples']} "
                        f"+ rejected {len(manifest.get('rejected', []))}")
    duplicates = [k for k, n in keys.items() if n > 1]
    if duplicates:
        problems.append(f"{split}: {len(duplicates)} keys occur more than once, e.g. {duplicates[:3]}")
    if "class_counts" in manifest and [counts.get(i, 0) for i in range(num_classes)] != manifest["class_counts"]:
        problems.append(f"{split}.json: class_counts differ from the classes found in the shards")
    return problems


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="star verify",
        description="Re-hash every shard of a sharded dataset and check indexes, keys and counts against the "
                    "manifests written by `star shard`. Exits 1 naming each bad shard; exits 2 "
                    "(one line, nothing read) when a manifest is missing, damaged or names a path outside DIR.")
    p.add_argument("dir", type=Path, help="the --out folder of `star shard`")
    p.add_argument("--split", choices=SPLITS, default=None,
                   help="check only this split (default: every split that has a manifest)")
    p.add_argument("--workers", type=int, default=usable_cpus(),
                   help="shards checked in parallel (default: all CPUs)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=True)
    if not args.dir.is_dir():
        print(f"star verify: error: {args.dir} is not a directory", file=sys.stderr)
        return 2
    splits = [args.split] if args.split else [s for s in SPLITS if (args.dir / f"{s}.json").exists()]
    if not splits:
        print(f"star verify: error: no train.json or val.json manifest in {args.dir}; run `star shard` first "
              f"(an interrupted run writes its manifest only at the end)", file=sys.stderr)
        return 2
    try:  # every manifest is checked before any shard is read
        manifests = {split: load_manifest(args.dir, split) for split in splits}
    except ManifestError as exc:
        print(f"star verify: error: {exc}", file=sys.stderr)
        return 2
    problems = []
    for split in splits:
        problems += verify_split(args.dir, split, max(1, args.workers), console, manifests[split])
    if problems:
        print(f"star verify: {len(problems)} problem(s) in {args.dir}:", file=sys.stderr)
        for p in problems:
            print(f"  BAD {p}", file=sys.stderr)
        return 1
    print(f"star verify: {', '.join(splits)} in {args.dir}: all shards, indexes and counts match their manifests")
    return 0


if __name__ == "__main__":
    sys.exit(main())
