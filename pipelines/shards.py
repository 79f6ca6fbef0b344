"""Random access to the samples of a sharded split (manifest + WebDataset tars + DALI indexes).

The DALI index (written by ``wds2idx``, format ``v1.2``) lists, for every sample, the byte
offset and size of each member inside its tar. Reading those offsets directly gives O(1)
access to any sample, which is what lets the loaders build their own global sample order
per epoch and resume at any step (see ``pipelines.sampling``).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.manifest import read_manifest, shard_file
from data_prep.wds_tar import split_name
from star.errors import ConfigError


class CorruptSampleError(ConfigError):
    """A sample that cannot be read or decoded; the message names its shard and key.

    Bad input, not a bug: the commands print it as one line and exit with code 2."""

    def __init__(self, shard: str, key: str, reason: str):
        super().__init__(
            f"corrupt sample {key!r} in shard {shard}: {reason}. Re-shard the source image (and run "
            f"`star verify`), or set data.on_corrupt=skip to skip such samples, name them and count them"
        )
        self.shard, self.key, self.reason = shard, key, reason


@dataclass(frozen=True)
class SampleRef:
    """Where one sample's image and label live."""

    shard: int  # index into ShardSet.shard_paths
    key: str
    jpg_offset: int
    jpg_size: int
    cls_offset: int
    cls_size: int


def parse_dali_index(path: Path) -> list[dict[str, tuple[int, int]]]:
    """Parse a ``wds2idx`` index: one dict per sample, extension -> (offset, size) (+ key)."""
    lines = path.read_text().splitlines()
    if not lines or not lines[0].startswith("v1.2"):
        raise ValueError(f"{path}: not a DALI webdataset index (expected a 'v1.2 N' header); "
                         f"regenerate it with `wds2idx TAR IDX`")
    declared = int(lines[0].split()[1])
    samples = []
    for line_no, line in enumerate(lines[1:], start=2):
        fields = line.split()
        if len(fields) % 4:
            raise ValueError(f"{path}:{line_no}: expected groups of 'ext offset size name'")
        members: dict = {}
        for i in range(0, len(fields), 4):
            ext, offset, size, name = fields[i : i + 4]
            members[ext] = (int(offset), int(size))
            members["__key__"] = split_name(name)[0]  # the sharder's and verify's key rule
        samples.append(members)
    if len(samples) != declared:
        raise ValueError(f"{path}: header declares {declared} samples but lists {len(samples)}")
    return samples


class ShardSet:
    """All samples of one split, in manifest order, readable by position."""

    def __init__(self, data_dir: str | os.PathLike, split: str):
        self.data_dir = Path(data_dir)
        manifest_path = self.data_dir / f"{split}.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(
                f"no manifest {manifest_path}: run `star shard --src SRC --out {self.data_dir} "
                f"--split {split}` first (split must be 'train' or 'val')")
        # Names the file and line of a damaged manifest; refuses shard paths outside data_dir.
        self.manifest = read_manifest(manifest_path)
        self.split = split
        self.num_classes = self.manifest["num_classes"]
        self.shard_paths: list[Path] = []
        refs: list[SampleRef] = []
        for shard_no, shard in enumerate(self.manifest["shards"]):
            where = f"{manifest_path}: shards[{shard_no}]"
            tar_path = shard_file(self.data_dir, shard["name"], f"{where}.name")
            idx_path = shard_file(self.data_dir, shard["index"], f"{where}.index")
            for p in (tar_path, idx_path):
                if not p.is_file():
                    raise FileNotFoundError(f"{p} listed in {manifest_path} is missing")
            index = parse_dali_index(idx_path)
            if len(index) != shard["num_samples"]:
                raise ValueError(f"{idx_path}: {len(index)} samples, manifest says "
                                 f"{shard['num_samples']}; run `star verify`")
            self.shard_paths.append(tar_path)
            for members in index:
                if "jpg" not in members or "cls" not in members:
                    raise ValueError(f"{idx_path}: sample {members.get('__key__')!r} lacks a "
                                     f".jpg or .cls member")
                refs.append(SampleRef(shard_no, members["__key__"], *members["jpg"], *members["cls"]))
        if len(refs) != self.manifest["num_samples"]:
            raise ValueError(f"{manifest_path}: shards hold {len(refs)} samples, manifest says "
                             f"{self.manifest['num_samples']}")
        self.refs = refs
        self._local = threading.local()  # one set of open files per thread / worker process

    def __len__(self) -> int:
        return len(self.refs)

    def __getstate__(self) -> dict:  # for DataLoader workers started by spawn
        state = dict(self.__dict__)
        del state["_local"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._local = threading.local()

    def _fd(self, shard: int) -> int:
        fds = getattr(self._local, "fds", None)
        if fds is None or getattr(self._local, "pid", None) != os.getpid():
            fds = self._local.fds = {}
            self._local.pid = os.getpid()
        if shard not in fds:
            fds[shard] = os.open(self.shard_paths[shard], os.O_RDONLY)
        return fds[shard]

    def name(self, i: int) -> tuple[str, str]:
        ref = self.refs[i]
        return self.shard_paths[ref.shard].name, ref.key

    def read(self, i: int) -> tuple[bytes, int]:
        """JPEG bytes and class index of sample ``i``; CorruptSampleError if unreadable."""
        ref = self.refs[i]
        fd = self._fd(ref.shard)
        if 0 <= ref.cls_offset - (ref.jpg_offset + ref.jpg_size) <= 4096:  # usual: .cls right after .jpg
            span = os.pread(fd, ref.cls_offset + ref.cls_size - ref.jpg_offset, ref.jpg_offset)
            jpg, cls = span[: ref.jpg_size], span[ref.cls_offset - ref.jpg_offset :]
        else:
            jpg = os.pread(fd, ref.jpg_size, ref.jpg_offset)
            cls = os.pread(fd, ref.cls_size, ref.cls_offset)
        if len(jpg) != ref.jpg_size or len(cls) != ref.cls_size:
            raise CorruptSampleError(*self.name(i), "the tar is shorter than its index says")
        try:
            label = int(cls.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            raise CorruptSampleError(*self.name(i), f"class member {cls[:20]!r} is not a decimal") from None
        if not 0 <= label < self.num_classes:
            raise CorruptSampleError(*self.name(i), f"class {label} outside [0, {self.num_classes})")
        return jpg, label


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG's SOF marker, without decoding. ValueError if not a JPEG."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG (missing SOI marker)")
    pos, n = 2, len(data)
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            raise ValueError(f"bad marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        seg_len = int.from_bytes(data[pos + 2 : pos + 4], "big")
        # SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC)
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if pos + 9 > n:
                break
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            if width == 0 or height == 0:
                raise ValueError("zero image size in SOF")
            return width, height
        pos += 2 + seg_len
    raise ValueError("no SOF marker found (truncated or not a JPEG)")


def as_array(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)
