"""Reading a split's manifest (``DIR/SPLIT.json``, written last by `star shard`) safely.

Every reader of shards (``star verify``, ``pipelines.shards.ShardSet`` and through it both
loaders) goes through ``read_manifest``: a damaged file is named with its line and column and
what to do, and every shard path the manifest lists must stay inside the data directory. Data
directories live on shared file systems; a manifest naming ``../x/evil.tar`` or ``/etc/x`` is
refused by entry instead of being read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from star.errors import ConfigError

SHARD_FIELDS = {"name": str, "index": str, "num_samples": int}  # what every reader needs of a shard entry


class ManifestError(ConfigError):
    """A manifest that cannot be used; the message names the file (and entry) and what to do.

    A ``ConfigError``: bad input to a command, reported in one line with exit code 2."""


def _redo(path: Path) -> str:
    split = path.stem
    return (f"rerun `star shard --src SRC --out {path.parent} --split {split}` to rewrite it (complete shards are "
            f"verified and kept), then `star verify {path.parent}`")


def shard_file(data_dir: Path, value: object, where: str) -> Path:
    """``data_dir / value`` for a shard or index name from a manifest, refusing any name that
    is not a plain relative path, climbs out with ``..``, or resolves (through links) outside
    ``data_dir``. ``where`` names the entry in messages, e.g. ``train.json: shards[3].name``."""
    if not isinstance(value, str) or not value or "\0" in value:
        raise ManifestError(f"{where} = {value!r} is not a file name; re-create the manifest with "
                            f"`star shard --out {data_dir}`")
    why = None
    if PurePosixPath(value).is_absolute() or PureWindowsPath(value).is_absolute() or value.startswith("\\"):
        why = "an absolute path"
    elif ".." in PurePosixPath(value.replace("\\", "/")).parts:
        why = "it climbs out with '..'"
    else:
        root = os.path.realpath(data_dir)
        target = os.path.realpath(os.path.join(root, value))
        if os.path.commonpath([root, target]) != root:
            why = f"it resolves to {target} through a link"
    if why:
        raise ManifestError(f"{where} = {value!r} points outside the data directory {data_dir} ({why}); "
                            f"shard paths must be files inside it. Refusing to read it: re-create the "
                            f"manifest with `star shard --out {data_dir}`")
    return data_dir / value


def read_manifest(path: Path, required: dict[str, type] | None = None) -> dict:
    """The parsed manifest at ``path``, with its top-level fields and every shard entry checked
    for type (``required`` adds shard-entry fields, e.g. ``bytes``/``sha256`` for verify) and
    every shard and index path checked by ``shard_file``. Raises ``FileNotFoundError`` when
    it is missing, ``ManifestError`` for anything else."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"cannot read the manifest {path}: {exc}") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path}:{exc.lineno}:{exc.colno}: the manifest is not valid JSON ({exc.msg}); "
                            f"it was damaged after `star shard` wrote it: {_redo(path)}") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path}: the manifest must be a JSON object, got {type(manifest).__name__}; "
                            f"{_redo(path)}")
    for key, kind in (("num_classes", int), ("num_samples", int), ("shards", list)):
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise ManifestError(f"{path}: field {key!r} is missing or not a {kind.__name__}; {_redo(path)}")
    if manifest["num_classes"] < 1:
        raise ManifestError(f"{path}: num_classes = {manifest['num_classes']} must be at least 1; {_redo(path)}")
    fields = {**SHARD_FIELDS, **(required or {})}
    for i, entry in enumerate(manifest["shards"]):
        where = f"{path}: shards[{i}]"
        if not isinstance(entry, dict):
            raise ManifestError(f"{where} is not an object; {_redo(path)}")
        for key, kind in fields.items():
            if not isinstance(entry.get(key), kind) or isinstance(entry.get(key), bool):
                raise ManifestError(f"{where}.{key} is missing or not a {kind.__name__}; {_redo(path)}")
        for key in ("name", "index"):
            shard_file(path.parent, entry[key], f"{where}.{key}")
    return manifest
