"""`star shard`: an ImageFolder split -> globally shuffled WebDataset tars + DALI indexes.

Three deterministic steps, so that the output depends only on the input files, the seed and
--shard-bytes (never on --workers, timing or interruptions):

0. list: SRC is walked once (``data_prep.labels``: symbolic-link loops and links out of SRC are
   not followed, empty class folders refused, see ``--help``);
1. inspect: every file is read and checked in parallel (``data_prep.images``); verdicts are
   appended to a cache (``OUT/.star-shard-work/{split}-inspect.jsonl``) so that a rerun only
   re-inspects files that are new or changed; repaired JPEGs are cached next to it;
2. plan: accepted samples, sorted by path, get unique dot-free keys, are shuffled with the seed
   and cut greedily into shards of at most --shard-bytes (exact tar sizes are known from the
   file sizes), so every shard's bytes are fixed before anything is written;
3. write: workers write whole shards under a temporary name and rename them when complete, then
   drop a "done" record (size, sha256, plan id). A rerun keeps each shard whose record matches
   the plan and whose bytes still hash to it, and writes the rest. The manifest comes last.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import random
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from data_prep import labels
from data_prep.images import CHECKS, inspect_file
from data_prep.progress import make_progress, usable_cpus, write_atomic
from data_prep.wds_tar import BLOCK, IndexEntry, ShardWriter, index_text, padded, sample_bytes, tar_bytes

WORK_DIR = ".star-shard-work"
DEFAULT_SHARD_BYTES = 1_000_000_000
KEY_MAX_CHARS = 64  # with a 24-char wnid prefix and a counter, KEY.json stays within a ustar header's 100 bytes
_CRASH_ENV = "STAR_SHARD_TEST_CRASH_AFTER_SAMPLES"  # test hook: simulate kill -9 mid-shard
_samples_written_in_process = 0


class ShardError(RuntimeError):
    """A problem that stops the run; the message says what to do."""


# ----------------------------------------------------------------------------- inspect


@dataclass(frozen=True)
class Verdict:
    """The cached outcome of inspecting one source file."""

    rel: str
    size: int
    mtime_ns: int
    check: str
    status: str  # ok / repaired / rejected
    width: int = 0
    height: int = 0
    reason: str = ""
    action: str = ""
    out_size: int = 0  # bytes of the JPEG that goes into the shard


def _inspect_worker(job: tuple[str, labels.SourceFile, str]) -> tuple[Verdict, bytes | None]:
    src, f, check = job
    try:
        result, size = inspect_file(os.path.join(src, f.rel), check)
    except OSError as exc:
        return Verdict(f.rel, f.size, f.mtime_ns, check, "rejected", reason=f"unreadable ({exc})"), None
    # A file that changed between listing and reading is recorded as read, so the size check
    # in the write step reports it instead of silently mixing two versions.
    out_size = len(result.data) if result.data is not None else (size if result.status == "ok" else 0)
    verdict = Verdict(f.rel, size, f.mtime_ns, check, result.status, result.width, result.height,
                      result.reason, result.action, out_size)
    return verdict, result.data


def _repaired_path(work: Path, split: str, rel: str) -> Path:
    return work / f"{split}-repaired" / (hashlib.sha1(rel.encode()).hexdigest() + ".jpg")


def _load_cache(path: Path) -> dict[str, Verdict]:
    cached: dict[str, Verdict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                v = Verdict(**json.loads(line))
            except (ValueError, TypeError):
                continue  # the last line of a killed run may be cut short
            cached[v.rel] = v
    return cached


def inspect_files(files: list[labels.SourceFile], src: Path, work: Path, split: str, check: str,
                  workers: int) -> dict[str, Verdict]:
    """Verdicts for all files, reusing cached ones whose size, mtime and check still match."""
    cache_path = work / f"{split}-inspect.jsonl"
    cached = _load_cache(cache_path)
    verdicts: dict[str, Verdict] = {}
    todo = []
    for f in files:
        v = cached.get(f.rel)
        usable = (v is not None and v.size == f.size and v.mtime_ns == f.mtime_ns and v.check == check
                  and (v.status != "repaired" or _repaired_path(work, split, f.rel).is_file()))
        if usable:
            verdicts[f.rel] = v
        else:
            todo.append((str(src), f, check))
    (work / f"{split}-repaired").mkdir(parents=True, exist_ok=True)
    with open(cache_path, "a") as cache, make_progress("img") as progress:
        if cache.tell():
            with open(cache_path, "rb") as tail:
                tail.seek(-1, os.SEEK_END)
                if tail.read(1) != b"\n":
                    cache.write("\n")  # end the line a killed run left unfinished
        task = progress.add_task(f"inspect {split}", total=len(todo))
        pool = multiprocessing.Pool(workers) if workers > 1 and len(todo) > 1 else None
        try:
            results = pool.imap(_inspect_worker, todo, chunksize=16) if pool else map(_inspect_worker, todo)
            for verdict, repaired in results:
                if repaired is not None:
                    write_atomic(_repaired_path(work, split, verdict.rel), repaired)
                cache.write(json.dumps(vars(verdict)) + "\n")
                verdicts[verdict.rel] = verdict
                progress.advance(task)
        finally:
            if pool:
                pool.terminate()
    return verdicts


# ----------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class PlannedSample:
    key: str
    rel: str
    repaired: bool
    jpg_size: int
    cls: int
    meta: str  # the .json member


@dataclass(frozen=True)
class PlannedShard:
    name: str
    index_name: str
    samples: tuple[PlannedSample, ...]
    bytes: int
    plan_id: str  # hash of everything that determines the shard's bytes


def _key_base(rel: str) -> str:
    stem = rel.rsplit("/", 1)[-1]
    stem = stem.rsplit(".", 1)[0] if "." in stem.lstrip(".") else stem
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem)[:KEY_MAX_CHARS] or "sample"


def assign_keys(rels_and_wnids: list[tuple[str, str]]) -> list[str]:
    """Unique keys without dots, from file stems; collisions get the wnid, then a counter."""
    taken: set[str] = set()
    keys = []
    for rel, wnid in rels_and_wnids:
        base = _key_base(rel)
        candidates = [base, f"{re.sub(r'[^A-Za-z0-9_-]', '_', wnid)[:24]}_{base}"]
        key = next((c for c in candidates if c not in taken), None)
        n = 1
        while key is None:
            key = f"{base}_{n}" if f"{base}_{n}" not in taken else None
            n += 1
        taken.add(key)
        keys.append(key)
    return keys


def _member_sizes(s: PlannedSample) -> tuple[int, int, int]:
    return s.jpg_size, len(str(s.cls)), len(s.meta.encode())


def planned_index(samples: tuple[PlannedSample, ...]) -> list[list[IndexEntry]]:
    """The DALI index a shard of these samples will have (offsets follow from sizes alone)."""
    pos, index = 0, []
    for s in samples:
        entries = []
        for ext, size in zip(("jpg", "cls", "json"), _member_sizes(s)):
            entries.append(IndexEntry(ext, pos + BLOCK, size, f"{s.key}.{ext}"))
            pos += BLOCK + padded(size)
        index.append(entries)
    return index


def make_plan(files: list[labels.SourceFile], verdicts: dict[str, Verdict], wnids: list[str], split: str,
              seed: int, shard_bytes: int) -> list[PlannedShard]:
    class_of = {w: i for i, w in enumerate(wnids)}
    accepted = [(f, verdicts[f.rel]) for f in files if f.wnid is not None and verdicts[f.rel].status != "rejected"]
    accepted.sort(key=lambda fv: fv[0].rel)
    keys = assign_keys([(f.rel, f.wnid) for f, _ in accepted])
    samples = []
    for key, (f, v) in zip(keys, accepted):
        meta = json.dumps({"wnid": f.wnid, "file": f.rel.rsplit("/", 1)[-1], "width": v.width, "height": v.height},
                          separators=(",", ":"))
        samples.append(PlannedSample(key, f.rel, v.status == "repaired", v.out_size, class_of[f.wnid], meta))
    random.Random(seed).shuffle(samples)

    groups: list[list[PlannedSample]] = [[]]
    body = 0
    for s in samples:
        size = sample_bytes(_member_sizes(s))
        if groups[-1] and tar_bytes(body + size) > shard_bytes:
            groups.append([])
            body = 0
        groups[-1].append(s)
        body += size
    stamp = {f.rel: (f.size, f.mtime_ns) for f in files}
    shards = []
    for i, group in enumerate(g for g in groups if g):
        plan_id = hashlib.sha256(json.dumps([(s.key, s.rel, s.repaired, s.jpg_size, s.cls, s.meta, stamp[s.rel])
                                             for s in group]).encode()).hexdigest()
        body = sum(sample_bytes(_member_sizes(s)) for s in group)
        shards.append(PlannedShard(f"{split}-{i:06d}.tar", f"{split}-{i:06d}.idx", tuple(group), tar_bytes(body),
                                   plan_id))
    return shards


# ----------------------------------------------------------------------------- write


@dataclass(frozen=True)
class ShardJob:
    shard: PlannedShard
    src: str
    out: str
    work: str
    split: str


def _done_path(job: ShardJob) -> Path:
    return Path(job.work, f"{job.split}-done", job.shard.name + ".json")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _already_done(job: ShardJob) -> dict | None:
    """The done record of a shard that is complete, matches the plan and hashes right."""
    shard, out = job.shard, Path(job.out)
    try:
        record = json.loads(_done_path(job).read_text())
        if (record["plan_id"] != shard.plan_id or record["bytes"] != shard.bytes
                or (out / shard.name).stat().st_size != shard.bytes
                or (out / shard.index_name).read_text() != index_text(planned_index(shard.samples))):
            return None
    except (OSError, ValueError, KeyError):
        return None
    return record if _sha256_file(out / shard.name) == record["sha256"] else None


def _crash_hook() -> None:
    global _samples_written_in_process
    limit = os.environ.get(_CRASH_ENV)
    _samples_written_in_process += 1
    if limit and _samples_written_in_process >= int(limit):
        os._exit(137)  # no cleanup, like kill -9


def ensure_shard(job: ShardJob) -> dict:
    """Keep a verified complete shard, or write it. Returns its manifest entry (+ 'kept')."""
    shard, out = job.shard, Path(job.out)
    record = _already_done(job)
    if record is not None:
        return {**record, "kept": True}
    tmp_tar = out / f".{shard.name}.{os.getpid()}.partial"
    with open(tmp_tar, "wb") as fh:
        writer = ShardWriter(fh)
        for s in shard.samples:
            path = _repaired_path(Path(job.work), job.split, s.rel) if s.repaired else os.path.join(job.src, s.rel)
            with open(path, "rb") as source:
                data = source.read()
            if len(data) != s.jpg_size:
                tmp_tar.unlink()
                raise ShardError(f"{path} is {len(data)} bytes but was {s.jpg_size} when inspected: the source "
                                 f"changed during the run; rerun `star shard` to re-inspect it")
            writer.add(s.key, {"jpg": data, "cls": str(s.cls).encode(), "json": s.meta.encode()})
            _crash_hook()
        size, sha = writer.close()
    if size != shard.bytes or writer.index != planned_index(shard.samples):
        raise ShardError(f"internal error: {shard.name} came out {size} bytes, planned {shard.bytes}")
    write_atomic(out / shard.index_name, index_text(writer.index))
    os.replace(tmp_tar, out / shard.name)
    record = {"name": shard.name, "index": shard.index_name, "num_samples": len(shard.samples), "bytes": size,
              "sha256": sha, "plan_id": shard.plan_id}
    write_atomic(_done_path(job), json.dumps(record))
    return {**record, "kept": False}


def _remove_stale(out: Path, work: Path, split: str, shards: list[PlannedShard]) -> None:
    """Drop partial files of killed runs and shards of an older, different plan."""
    planned = {s.name for s in shards} | {s.index_name for s in shards}
    pattern = re.compile(rf"{re.escape(split)}-\d{{6}}\.(tar|idx)")
    for p in out.iterdir():
        if (p.name.startswith(f".{split}-") and p.name.endswith(".partial")) or (
                pattern.fullmatch(p.name) and p.name not in planned):
            p.unlink()
    for p in (work / f"{split}-done").iterdir():
        if p.name.removesuffix(".json") not in planned:
            p.unlink()


def write_shards(shards: list[PlannedShard], src: Path, out: Path, work: Path, split: str,
                 workers: int) -> list[dict]:
    (work / f"{split}-done").mkdir(parents=True, exist_ok=True)
    _remove_stale(out, work, split, shards)
    jobs = [ShardJob(s, str(src), str(out), str(work), split) for s in shards]
    results: dict[str, dict] = {}
    with make_progress("img") as progress:
        task = progress.add_task(f"write {split}", total=sum(len(s.samples) for s in shards))
        pool = multiprocessing.Pool(min(workers, len(jobs))) if workers > 1 and len(jobs) > 1 else None
        try:
            for result in (pool.imap_unordered(ensure_shard, jobs) if pool else map(ensure_shard, jobs)):
                results[result["name"]] = result
                progress.advance(task, result["num_samples"])
        finally:
            if pool:
                pool.terminate()
    return [results[s.name] for s in shards]


# ----------------------------------------------------------------------------- the command


def _class_list(args: argparse.Namespace, out: Path) -> list[str]:
    """Train: sorted class folders. Val: the training classes. Nothing is written yet: a run
    refused later (e.g. for an empty class) must leave no classes.json that a corrected rerun
    would then disagree with; ``_write_class_list`` writes it once the plan stands."""
    target = out / "classes.json"
    if args.split == "train":
        wnids = labels.class_folders(args.src)
        if not wnids:
            raise ShardError(f"{args.src} has no class folders; --split train expects SRC/<wnid>/<image files>")
        if target.exists() and labels.read_classes(target) != wnids:
            raise ShardError(f"{target} lists other classes than the folders of {args.src}; shard into a fresh "
                             f"--out directory (validation shards there use the old class list)")
        return wnids
    if args.classes is not None:
        wnids = labels.read_classes(args.classes)
        if target.exists() and labels.read_classes(target) != wnids:
            raise ShardError(f"--classes {args.classes} differs from {target}; drop --classes to use the latter")
        return wnids
    if not target.exists():
        raise ShardError(f"{target} is missing: shard the train split into {out} first, or pass --classes FILE "
                         f"(a classes.json from the train split)")
    return labels.read_classes(target)


def _write_class_list(out: Path, wnids: list[str]) -> None:
    target = out / "classes.json"
    if not target.exists() or labels.read_classes(target) != wnids:
        write_atomic(target, labels.classes_json_text(wnids))


def _list_files(args: argparse.Namespace, wnids: list[str]) -> labels.Listing:
    follow = args.follow_external_links
    if args.split == "train" or args.val_labels is None:
        if args.devkit_synsets is not None:
            raise ShardError("--devkit-synsets only applies together with --val-labels")
        listing = labels.list_image_folder(args.src, follow)
        if args.split == "val":
            labels.check_known(listing.files, wnids, f"the folders of {args.src}")
        return listing
    if labels.is_loc_csv(args.val_labels):
        listing = labels.list_flat_loc_csv(args.src, args.val_labels, follow)
    elif args.devkit_synsets is None:
        raise ShardError(
            f"{args.val_labels} looks like the devkit ground-truth list; its ILSVRC2012_IDs follow the devkit's "
            f"meta.mat order, so also pass --devkit-synsets FILE listing the wnids in that order (one per line)")
    else:
        listing = labels.list_flat_devkit(args.src, args.val_labels, args.devkit_synsets, follow)
    labels.check_known(listing.files, wnids, str(args.val_labels))
    return listing


def _empty_classes(args: argparse.Namespace, listing: labels.Listing) -> dict[str, str]:
    """Class folders of an ImageFolder SRC holding no file at all -> why (e.g. an unfollowed link)."""
    if args.split == "val" and args.val_labels is not None:
        return {}
    used = {f.wnid for f in listing.files}
    skipped = {link["path"]: link["reason"] for link in listing.skipped_links}
    return {w: (f"a link not followed: {skipped[w]}" if w in skipped else "no files")
            for w in labels.class_folders(args.src) if w not in used}


def _refuse_or_warn_empty(args: argparse.Namespace, empty: dict[str, str], what: str) -> None:
    """Empty classes would make classes.json disagree with the dataset (ImageNet has 1000 classes
    with images): refuse by default, keep them (with a warning by name) on --allow-empty-classes."""
    if not empty:
        return
    named = "; ".join(f"{w} ({why})" for w, why in list(empty.items())[:10]) + (" ..." if len(empty) > 10 else "")
    if not args.allow_empty_classes:
        raise ShardError(f"{len(empty)} class folder(s) of {args.src} {what}: {named}. Fill or remove them, or pass "
                         f"--allow-empty-classes to keep them as classes with 0 samples")
    print(f"star shard: warning: keeping {len(empty)} class(es) that {what} (--allow-empty-classes): {named}",
          file=sys.stderr)


def _probe_writable(folder: Path) -> None:
    """Create and delete a file in `folder`: the only test that also holds for root (who passes
    permission bits but not a read-only mount or an immutable folder)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".star-shard-probe-", dir=folder)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise ShardError(f"--out {folder} is not writable ({exc.strerror or exc}); choose a folder you can "
                         f"write to") from None


def _check_out(args: argparse.Namespace) -> None:
    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise ShardError(f"--out {out} is a file, not a folder; give the folder the shards go to")
    if not out.exists():
        if args.split == "val" and args.classes is None:
            return  # _class_list explains that val needs the train split's classes.json there
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ShardError(f"cannot create --out {out} ({exc.strerror or exc}); give a folder path whose "
                             f"parents are folders you can write to") from None
    _probe_writable(out)


def _check_args(args: argparse.Namespace) -> None:
    if not args.src.is_dir():
        raise ShardError(f"--src {args.src} is not a directory")
    if args.shard_bytes < 64 * 1024:
        raise ShardError(f"--shard-bytes {args.shard_bytes} is too small; use at least 65536 (default 1e9)")
    if args.workers < 1:
        raise ShardError(f"--workers {args.workers} must be at least 1")
    if args.split == "train" and (args.val_labels or args.classes):
        raise ShardError("--val-labels and --classes only apply to --split val")
    for opt in ("val_labels", "devkit_synsets", "classes"):
        path = getattr(args, opt)
        if path is not None and not path.is_file():
            raise ShardError(f"--{opt.replace('_', '-')} {path} is not a file")
    _check_out(args)


def shard_split(args: argparse.Namespace) -> dict:
    """Run the three steps for one split; returns the manifest."""
    _check_args(args)
    out: Path = args.out
    wnids = _class_list(args, out)
    listing = _list_files(args, wnids)
    files = listing.files
    if not files:
        raise ShardError(f"no files found under {args.src}")
    _refuse_or_warn_empty(args, _empty_classes(args, listing), "hold no files")
    work = out / WORK_DIR
    work.mkdir(exist_ok=True)
    manifest_path = out / f"{args.split}.json"
    manifest_path.unlink(missing_ok=True)  # no manifest = not complete, until the end of this run
    verdicts = {f.rel: Verdict(f.rel, f.size, f.mtime_ns, args.check, "rejected",
                               reason="not inside a class folder") for f in files if f.wnid is None}
    verdicts.update({f.rel: Verdict(f.rel, f.size, f.mtime_ns, args.check, "rejected", reason=f.reject)
                     for f in files if f.wnid is not None and f.reject})
    verdicts.update(inspect_files([f for f in files if f.wnid is not None and not f.reject], args.src, work,
                                  args.split, args.check, args.workers))
    shards = make_plan(files, verdicts, wnids, args.split, args.seed, args.shard_bytes)
    if not shards:
        raise ShardError(f"all {len(files)} files under {args.src} were rejected; see the reasons above")
    class_counts = [0] * len(wnids)
    for shard in shards:
        for s in shard.samples:
            class_counts[s.cls] += 1
    if args.split == "train":  # folders with files that were all rejected are empty classes too
        n_files = {w: 0 for w in wnids}
        for f in files:
            if f.wnid is not None:
                n_files[f.wnid] += 1
        _refuse_or_warn_empty(args, {w: f"all {n_files[w]} file(s) rejected" for w, n in zip(wnids, class_counts)
                                     if n == 0 and n_files[w]}, "have no usable image")
    _write_class_list(out, wnids)
    written = write_shards(shards, args.src, out, work, args.split, args.workers)

    ordered = sorted(verdicts.values(), key=lambda v: v.rel)
    n_rejected = sum(v.status == "rejected" for v in ordered)
    if sum(class_counts) + n_rejected != len(files):  # nothing may be lost silently
        raise ShardError(f"internal error: {len(files)} files in, "
                         f"but {sum(class_counts)} written + {n_rejected} rejected")
    manifest = {
        "split": args.split,
        "num_samples": sum(len(s.samples) for s in shards),
        "num_classes": len(wnids),
        "seed": args.seed,
        "files_in": len(files),
        "shard_bytes": args.shard_bytes,
        "check": args.check,
        "class_counts": class_counts,
        "shards": [{k: w[k] for k in ("name", "index", "num_samples", "bytes", "sha256")} for w in written],
        "rejected": [{"file": v.rel, "reason": v.reason} for v in ordered if v.status == "rejected"],
        "repaired": [{"file": v.rel, "action": v.action} for v in ordered if v.status == "repaired"],
        # folder links the walk did not follow (loops, duplicates, links out of --src): not in files_in
        "skipped_links": listing.skipped_links,
        "follow_external_links": args.follow_external_links,
        "empty_classes": [wnids[i] for i, n in enumerate(class_counts) if n == 0],
    }
    write_atomic(manifest_path, json.dumps(manifest, indent=1) + "\n")
    manifest["_kept_shards"] = sum(w["kept"] for w in written)
    return manifest


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="star shard",
        description="Shard an ImageFolder split into globally shuffled WebDataset tars with DALI index files "
                    "and a manifest (see the shard format in the README). Safe to rerun after an interruption: "
                    "complete shards are verified and kept, only the rest is written.")
    p.add_argument("--src", type=Path, required=True,
                   help="input: SRC/<wnid>/<image> (ImageFolder), or a flat folder of validation images when "
                        "--val-labels is given")
    p.add_argument("--out", type=Path, required=True,
                   help="output folder for SPLIT-NNNNNN.tar/.idx, SPLIT.json and classes.json (shared by splits)")
    p.add_argument("--split", choices=("train", "val"), required=True,
                   help="train writes classes.json (sorted wnids); val needs it (shard train first, or --classes)")
    p.add_argument("--val-labels", type=Path, default=None,
                   help="labels of a flat validation folder: LOC_val_solution.csv (ImageId,PredictionString) or the "
                        "devkit's ILSVRC2012_validation_ground_truth.txt (needs --devkit-synsets)")
    p.add_argument("--devkit-synsets", type=Path, default=None,
                   help="wnids in devkit ILSVRC2012_ID order (meta.mat order, one per line, first token), to map "
                        "the devkit ground-truth IDs; NOT the sorted wnid list")
    p.add_argument("--classes", type=Path, default=None,
                   help="classes.json of the train split, for sharding val into a folder that lacks it")
    p.add_argument("--shard-bytes", type=int, default=DEFAULT_SHARD_BYTES,
                   help="upper bound of one tar's size in bytes (default 1e9, about 8,600 ImageNet images); a "
                        "single larger sample still gets its own shard")
    p.add_argument("--workers", type=int, default=usable_cpus(),
                   help="parallel processes for inspecting and writing (default: all CPUs); never changes the output")
    p.add_argument("--seed", type=int, default=0, help="seed of the global shuffle (default 0)")
    p.add_argument("--check", choices=CHECKS, default="decode",
                   help="decode (default): entropy-decode every kept JPEG at 1/8 scale to reject truncated and "
                        "corrupt ones; markers: header and end-marker check only, much faster, misses damaged "
                        "entropy data")
    p.add_argument("--follow-external-links", action="store_true",
                   help="also read files and folders reached through symbolic links that resolve outside --src "
                        "(default: reject them, listed in SPLIT.json, so that e.g. validation images linked into "
                        "train never leak in). Links to folders inside --src are never followed: those folders are "
                        "read through their real paths, so loops and duplicates cannot occur; each linked folder "
                        "not followed is listed under 'skipped_links' in SPLIT.json")
    p.add_argument("--allow-empty-classes", action="store_true",
                   help="keep class folders that hold no file (or only rejected ones) as classes with 0 samples, "
                        "with a warning naming them (default: refuse, since classes.json would then list classes "
                        "that the data lacks)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    try:
        manifest = shard_split(args)
    except (ShardError, labels.LabelError) as exc:
        print(f"star shard: error: {exc}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - started
    n_rej, n_rep = len(manifest["rejected"]), len(manifest["repaired"])
    n_links = len(manifest["skipped_links"])
    print(f"{args.split}: {manifest['files_in']} files in = {manifest['num_samples']} samples written + {n_rej} "
          f"rejected ({n_rep} of the written repaired), {manifest['num_classes']} classes, "
          f"{len(manifest['shards'])} shards ({manifest['_kept_shards']} kept from an earlier run) in {args.out}, "
          f"{n_links} folder link(s) not followed, {seconds:.1f} s")
    for r in manifest["rejected"]:
        print(f"  rejected {r['file']}: {r['reason']}")
    for r in manifest["repaired"]:
        print(f"  repaired {r['file']}: {r['action']}")
    for r in manifest["skipped_links"]:
        print(f"  link not followed {r['path']} -> {r['target']}: {r['reason']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
