"""Deterministic WebDataset tars and their DALI indexes.

A shard's bytes depend only on its ordered list of samples: every tar header carries the same
fixed metadata (mtime 0, uid/gid 0, no user names, mode 0444, ustar format), so two runs, or
two workers, produce byte-identical files; any tar reader (GNU tar, tarfile, webdataset,
DALI) reads them. The DALI index (``wds2idx`` format ``v1.2``) is
computed from the same layout while writing, and can be recomputed from any existing tar by
``scan_tar`` (which ``star verify`` uses to check both).
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

BLOCK = 512
RECORD = 20 * BLOCK  # archives are padded to whole records of 10240 bytes, as GNU tar and tarfile do
INDEX_VERSION = "v1.2"  # the version string DALI's wds2idx writes and fn.readers.webdataset reads
MEMBER_ORDER = ("jpg", "cls", "json")  # member extensions in the order they are written


@dataclass(frozen=True)
class IndexEntry:
    """One tar member as the DALI index lists it: data offset and size inside the tar."""

    ext: str
    offset: int
    size: int
    name: str


def padded(size: int) -> int:
    """Bytes a member's data occupies in the tar (rounded up to whole 512-byte blocks)."""
    return -(-size // BLOCK) * BLOCK


def sample_bytes(member_sizes: Iterable[int]) -> int:
    """Bytes one sample occupies: a header block plus padded data per member."""
    return sum(BLOCK + padded(s) for s in member_sizes)


def tar_bytes(body_bytes: int) -> int:
    """Size of a finished tar whose members occupy `body_bytes`: two zero end blocks, padded
    to a whole record."""
    return -(-(body_bytes + 2 * BLOCK) // RECORD) * RECORD


def ustar_header(name: str, size: int) -> bytes:
    """A regular-file ustar header whose metadata never depends on the machine or the time
    (mode 0444, uid/gid 0, no user names, mtime 0). Built directly rather than with tarfile,
    whose generic header code took a third of the sharder's time."""
    encoded = name.encode("ascii")
    if len(encoded) > 100:
        raise ValueError(f"member name {name!r} is longer than the 100 bytes of a plain ustar header")
    if size >= 8**11:
        raise ValueError(f"member {name!r} of {size} bytes is too large for a ustar header (max 8 GiB)")
    header = bytearray(BLOCK)
    header[0 : len(encoded)] = encoded
    header[100:108] = b"0000444\0"  # mode
    header[108:116] = b"0000000\0"  # uid
    header[116:124] = b"0000000\0"  # gid
    header[124:136] = b"%011o\0" % size
    header[136:148] = b"00000000000\0"  # mtime
    header[148:156] = b"        "  # the checksum field counts as spaces while summing
    header[156:157] = b"0"  # regular file
    header[257:265] = b"ustar\x0000"
    header[329:337] = b"0000000\0"  # devmajor
    header[337:345] = b"0000000\0"  # devminor
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


class ShardWriter:
    """Writes samples to an open binary file as a tar, hashing it and building its index."""

    def __init__(self, fileobj: BinaryIO):
        self._out = fileobj
        self._sha256 = hashlib.sha256()
        self._position = 0
        self.index: list[list[IndexEntry]] = []

    def _write(self, data: bytes) -> None:
        self._out.write(data)
        self._sha256.update(data)
        self._position += len(data)

    def add(self, key: str, members: dict[str, bytes]) -> None:
        """Append one sample; `members` maps extension -> bytes, written in MEMBER_ORDER."""
        if "." in key or "/" in key or not key:
            raise ValueError(f"sample key {key!r} must be non-empty and contain no dots or slashes")
        # Readers (star verify, pipelines.shards, webdataset, DALI) find the key with split_name;
        # a dot- and slash-free key is exactly what makes them agree with the writer.
        entries, parts, position = [], [], self._position
        for ext in MEMBER_ORDER:
            data = members[ext]
            name = f"{key}.{ext}"
            entries.append(IndexEntry(ext, position + BLOCK, len(data), name))
            parts += [ustar_header(name, len(data)), data, bytes(padded(len(data)) - len(data))]
            position += BLOCK + padded(len(data))
        self._write(b"".join(parts))  # one write and one hash update per sample: fewer calls
        self.index.append(entries)

    def close(self) -> tuple[int, str]:
        """Finish the archive (two zero blocks, padded to a whole record as GNU tar and tarfile
        do); returns (bytes written, sha256 hex)."""
        self._write(bytes(tar_bytes(self._position) - self._position))
        return self._position, self._sha256.hexdigest()


def index_text(samples: list[list[IndexEntry]]) -> str:
    """The exact text ``wds2idx`` writes for a tar with these samples."""
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for entries in samples:
        lines.append(" ".join(f"{e.ext} {e.offset} {e.size} {e.name}" for e in entries))
    return "\n".join(lines) + "\n"


def split_name(name: str) -> tuple[str, str]:
    """(sample key, extension) of a tar member name, by WebDataset's rule: the extension is
    everything after the first dot of the file name, the key everything before it, folder
    part included (``./a.b/x.cls`` -> ``("./a.b/x", "cls")``). The one rule every reader of
    shards uses: ``scan_tar``, ``star verify``, ``pipelines.shards``."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


@dataclass
class TarScan:
    """What ``scan_tar`` found in an existing tar."""

    bytes: int
    sha256: str
    samples: list[list[IndexEntry]]
    small_members: dict[str, bytes]  # member name -> data, for members of the requested extensions


class _HashingReader(io.RawIOBase):
    """A read-only sequential file that hashes and counts everything read from it."""

    def __init__(self, raw: BinaryIO):
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.position = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        data = self.raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self.sha256.update(data)
        self.position += n
        return n


def scan_tar(path, keep_exts: tuple[str, ...] = ("cls",)) -> TarScan:
    """Read a tar once from start to end: its sha256, size, index (grouped as ``wds2idx``
    groups it: consecutive regular files sharing a basename) and the bytes of small members.

    Raises ``tarfile.ReadError`` (or EOFError) for a damaged archive.
    """
    with open(path, "rb") as raw:
        reader = _HashingReader(raw)
        buffered = io.BufferedReader(reader, buffer_size=1 << 20)
        samples: list[list[IndexEntry]] = []
        kept: dict[str, bytes] = {}
        last_base = None
        with tarfile.open(fileobj=buffered, mode="r|") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                base, ext = split_name(member.name)
                if not base or base.endswith("/"):
                    continue
                entry = IndexEntry(ext, member.offset_data, member.size, member.name)
                if base != last_base:
                    samples.append([entry])
                    last_base = base
                else:
                    samples[-1].append(entry)
                if ext in keep_exts:
                    kept[member.name] = tar.extractfile(member).read()
        # tarfile stops at the end-of-archive blocks; hash the padding after them too.
        while buffered.read(1 << 20):
            pass
        return TarScan(reader.position, reader.sha256.hexdigest(), samples, kept)
