"""Which files make up a split, and which class each belongs to.

Class index = position of the wnid among the sorted training wnids (torchvision's
ImageFolder convention), stored once in ``OUT/classes.json`` by the train split. Validation
always uses that mapping, whichever of its three label sources is given:
- ImageFolder layout ``SRC/<wnid>/<file>`` (the wnid is the folder);
- a flat folder plus the devkit's ground truth (``ILSVRC2012_validation_ground_truth.txt``:
  line i is the ILSVRC2012_ID of ``ILSVRC2012_val_<i:08d>.JPEG``; IDs are 1-based in the
  devkit's ``meta.mat`` order, which is NOT sorted-wnid order, so ``--devkit-synsets`` must list
  the wnids in that order, one per line, first token of the line);
- a flat folder plus Kaggle's ``LOC_val_solution.csv`` (ImageId, PredictionString whose first
  token is the wnid).

Symbolic links (``_walk``): a link to a folder inside SRC is never followed (that folder is read
through its real path, so loops and duplicates cannot happen); links out of SRC are rejected
unless ``--follow-external-links``, and then each folder is still read once (by device and
inode). Every folder link not followed is reported in the manifest's ``skipped_links``.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path


class LabelError(ValueError):
    """Input that cannot be labelled; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class SourceFile:
    """One file under SRC. `wnid` is None when the file has no class (it will be rejected)."""

    rel: str  # path relative to SRC, '/'-separated
    wnid: str | None
    size: int
    mtime_ns: int
    reject: str = ""  # a reason found while listing (a link out of SRC): rejected without being read


@dataclass
class Listing:
    """What a walk of SRC found: the files, and every folder link it did not follow."""

    files: list[SourceFile]
    skipped_links: list[dict] = field(default_factory=list)  # {"path", "target", "reason"}


@dataclass
class _Walk:
    files: dict[str, str]  # rel -> rejection reason ('' = keep)
    skipped_links: list[dict]


def _stat_file(src: Path, rel: str, wnid: str | None, reject: str = "") -> SourceFile:
    try:
        st = os.stat(src / rel)
    except OSError:  # e.g. a dangling symlink: listed here, rejected as unreadable when inspected
        return SourceFile(rel, wnid, -1, 0, reject)
    return SourceFile(rel, wnid, st.st_size, st.st_mtime_ns, reject)


def _inside(root_real: str, path_real: str) -> bool:
    return os.path.commonpath([root_real, path_real]) == root_real


def _walk(root: Path, follow_external: bool) -> _Walk:
    """Every file under `root`, following links with a memory, in a deterministic order.

    A linked folder is followed at most once, by (device, inode): a link that resolves inside
    `root` is never followed, since os-level real paths already reach that folder (following it
    would store its images twice, or forever in a loop); a link out of `root` is followed only
    with `follow_external` (else external images could leak in, e.g. validation into train),
    and only the first time its target is met. Links to files out of `root` are listed with a
    rejection reason unless `follow_external`. Every link not followed is reported.
    """
    root_real = os.path.realpath(root)
    files: dict[str, str] = {}
    skipped: list[dict] = []
    st = os.stat(root_real)
    visited = {(st.st_dev, st.st_ino): "."}  # folder identity -> the path it was read through
    stack = [("", str(root))]
    while stack:
        rel_dir, path = stack.pop()
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as exc:  # its images would be missing without a trace
            raise LabelError(f"cannot list the folder {path} ({exc.strerror or exc}); fix its permissions, or "
                             f"move it out of --src") from None
        subdirs = []
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            is_link = entry.is_symlink()
            try:
                is_dir = entry.is_dir()  # follows a link
            except OSError:
                is_dir = False
            target = os.path.realpath(entry.path) if is_link else None
            if not is_dir:  # a file, a link to one, or a dangling link (rejected as unreadable later)
                outside = is_link and os.path.exists(target) and not _inside(root_real, target)
                files[rel] = (f"link to {target}, outside --src; pass --follow-external-links to include it"
                              if outside and not follow_external else "")
                continue
            if is_link and _inside(root_real, target):
                real_parent = os.path.realpath(path)
                loop = _inside(target, real_parent)
                where = os.path.relpath(target, root_real).replace(os.sep, "/")
                skipped.append({"path": rel, "target": target,
                                "reason": f"loop: links back to its enclosing folder {where}" if loop else
                                f"links inside --src to {where}, which is read through its real path"})
                continue
            if is_link and not follow_external:
                skipped.append({"path": rel, "target": target,
                                "reason": "links outside --src; pass --follow-external-links to include it"})
                continue
            try:
                st = entry.stat()
            except OSError as exc:
                raise LabelError(f"cannot read the folder {entry.path} ({exc.strerror or exc}); fix its "
                                 f"permissions, or move it out of --src") from None
            identity = (st.st_dev, st.st_ino)
            if identity in visited:
                loop = is_link and _inside(target, os.path.realpath(path))
                skipped.append({"path": rel, "target": target or os.path.realpath(entry.path),
                                "reason": f"loop: links back to its enclosing folder {target}" if loop else
                                f"the same folder as {visited[identity]}, read once only"})
                continue
            visited[identity] = rel
            subdirs.append((rel, entry.path))
        stack.extend(reversed(subdirs))  # pop in sorted order
    return _Walk(dict(sorted(files.items())), skipped)


def class_folders(src: Path) -> list[str]:
    """Sorted names of the sub-folders of `src` (the wnids of an ImageFolder tree); a link to a
    folder counts, whether or not the walk follows it (an unfollowed one is an empty class)."""
    return sorted(e.name for e in os.scandir(src) if e.is_dir())


def list_image_folder(src: Path, follow_external: bool = False) -> Listing:
    """Every file of an ImageFolder tree; files not inside a class folder get wnid None."""
    walk = _walk(src, follow_external)
    files = []
    for rel, reject in walk.files.items():
        wnid = rel.split("/", 1)[0] if "/" in rel else None
        files.append(_stat_file(src, rel, wnid, reject))
    return Listing(files, walk.skipped_links)


def read_classes(path: Path) -> list[str]:
    try:
        wnids = json.loads(path.read_text())["wnids"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LabelError(f"cannot read the class list {path}: {exc}; it must be JSON "
                         f'{{"wnids": [...]}} as written by `star shard --split train`') from exc
    if not wnids or len(set(wnids)) != len(wnids) or wnids != sorted(wnids):
        raise LabelError(f"{path}: 'wnids' must be a non-empty, sorted list without duplicates")
    return list(wnids)


def classes_json_text(wnids: list[str]) -> str:
    return json.dumps({"wnids": wnids}, indent=1) + "\n"


def check_known(files: list[SourceFile], wnids: list[str], where: str) -> None:
    """Refuse validation wnids that the training classes do not contain."""
    known = set(wnids)
    unknown = sorted({f.wnid for f in files if f.wnid is not None and f.wnid not in known})
    if unknown:
        shown = ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        raise LabelError(
            f"{len(unknown)} validation wnid(s) from {where} are not training classes: {shown}. "
            f"Check that the labels belong to this dataset and that classes.json comes from its "
            f"train split.")


def _flat_files(src: Path, follow_external: bool) -> dict[str, str]:
    """rel -> rejection reason of the files of a flat folder (no sub-folders, so no folder links)."""
    subdirs = class_folders(src)
    if subdirs:
        raise LabelError(
            f"--val-labels expects a flat folder of images, but {src} has sub-folders "
            f"({', '.join(subdirs[:5])}); drop --val-labels to read it as an ImageFolder tree")
    return _walk(src, follow_external).files


def _image_id(rel: str) -> int:
    match = re.search(r"(\d+)$", Path(rel).stem)
    if not match:
        raise LabelError(f"cannot find the validation image number in the file name {rel!r} "
                         f"(expected names like ILSVRC2012_val_00000001.JPEG)")
    return int(match.group(1))


def read_devkit_synsets(path: Path) -> list[str]:
    """wnids in devkit ILSVRC2012_ID order: first token of each non-empty line."""
    wnids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not wnids:
        raise LabelError(f"--devkit-synsets {path} lists no wnids")
    return wnids


def list_flat_devkit(src: Path, labels: Path, synsets: Path, follow_external: bool = False) -> Listing:
    """Flat validation folder labelled by the devkit ground-truth list."""
    wnid_of_id = read_devkit_synsets(synsets)
    ids = []
    for line_no, line in enumerate(labels.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            ids.append(int(line))
        except ValueError:
            raise LabelError(f"{labels}:{line_no}: expected one integer ILSVRC2012_ID per line, "
                             f"got {line!r}") from None
    files = []
    for rel, reject in _flat_files(src, follow_external).items():
        number = _image_id(rel)
        if not 1 <= number <= len(ids):
            raise LabelError(f"{rel}: image number {number} has no line in {labels} "
                             f"({len(ids)} lines); is this the ground truth of this folder?")
        devkit_id = ids[number - 1]
        if not 1 <= devkit_id <= len(wnid_of_id):
            raise LabelError(f"{labels}:{number}: ILSVRC2012_ID {devkit_id} is outside "
                             f"1..{len(wnid_of_id)} of --devkit-synsets {synsets}")
        files.append(_stat_file(src, rel, wnid_of_id[devkit_id - 1], reject))
    return Listing(files)


def list_flat_loc_csv(src: Path, labels: Path, follow_external: bool = False) -> Listing:
    """Flat validation folder labelled by LOC_val_solution.csv."""
    wnid_of_image = {}
    with open(labels, newline="") as fh:
        for row in csv.DictReader(fh):
            try:
                wnid_of_image[row["ImageId"]] = row["PredictionString"].split()[0]
            except (KeyError, IndexError, AttributeError):
                raise LabelError(f"{labels}: bad row {row}; expected columns ImageId,"
                                 f"PredictionString with the wnid first") from None
    files = []
    for rel, reject in _flat_files(src, follow_external).items():
        image_id = Path(rel).stem
        if image_id not in wnid_of_image:
            raise LabelError(f"{rel}: ImageId {image_id!r} is missing from {labels}")
        files.append(_stat_file(src, rel, wnid_of_image[image_id], reject))
    return Listing(files)


def is_loc_csv(path: Path) -> bool:
    with open(path) as fh:
        return fh.readline().startswith("ImageId")
