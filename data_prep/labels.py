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
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass
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


def _stat_file(src: Path, rel: str, wnid: str | None) -> SourceFile:
    try:
        st = os.stat(src / rel)
    except OSError:  # e.g. a dangling symlink: listed here, rejected as unreadable when inspected
        return SourceFile(rel, wnid, -1, 0)
    return SourceFile(rel, wnid, st.st_size, st.st_mtime_ns)


def _walk_files(root: Path) -> list[str]:
    """All regular files under `root` (following symlinks), as sorted relative paths."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            found.append(name if rel_dir == "." else f"{rel_dir}/{name}".replace(os.sep, "/"))
    return sorted(found)


def class_folders(src: Path) -> list[str]:
    """Sorted names of the sub-folders of `src` (the wnids of an ImageFolder tree)."""
    return sorted(e.name for e in os.scandir(src) if e.is_dir())


def list_image_folder(src: Path) -> list[SourceFile]:
    """Every file of an ImageFolder tree; files not inside a class folder get wnid None."""
    files = []
    for rel in _walk_files(src):
        wnid = rel.split("/", 1)[0] if "/" in rel else None
        files.append(_stat_file(src, rel, wnid))
    return files


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


def _flat_files(src: Path) -> list[str]:
    subdirs = class_folders(src)
    if subdirs:
        raise LabelError(
            f"--val-labels expects a flat folder of images, but {src} has sub-folders "
            f"({', '.join(subdirs[:5])}); drop --val-labels to read it as an ImageFolder tree")
    return _walk_files(src)


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


def list_flat_devkit(src: Path, labels: Path, synsets: Path) -> list[SourceFile]:
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
    for rel in _flat_files(src):
        number = _image_id(rel)
        if not 1 <= number <= len(ids):
            raise LabelError(f"{rel}: image number {number} has no line in {labels} "
                             f"({len(ids)} lines); is this the ground truth of this folder?")
        devkit_id = ids[number - 1]
        if not 1 <= devkit_id <= len(wnid_of_id):
            raise LabelError(f"{labels}:{number}: ILSVRC2012_ID {devkit_id} is outside "
                             f"1..{len(wnid_of_id)} of --devkit-synsets {synsets}")
        files.append(_stat_file(src, rel, wnid_of_id[devkit_id - 1]))
    return files


def list_flat_loc_csv(src: Path, labels: Path) -> list[SourceFile]:
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
    for rel in _flat_files(src):
        image_id = Path(rel).stem
        if image_id not in wnid_of_image:
            raise LabelError(f"{rel}: ImageId {image_id!r} is missing from {labels}")
        files.append(_stat_file(src, rel, wnid_of_image[image_id]))
    return files


def is_loc_csv(path: Path) -> bool:
    with open(path) as fh:
        return fh.readline().startswith("ImageId")
