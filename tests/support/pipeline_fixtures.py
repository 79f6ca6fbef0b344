"""Small shard sets in the data_prep format (docs/design.md, "Data path"), written directly for tests.

Independent of data_prep on purpose: tars via ``tarfile``, indexes via DALI's own ``wds2idx``,
JPEGs via PIL, so the loaders are checked against the format, not against our writer.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def wds2idx() -> str:
    found = shutil.which("wds2idx") or str(Path(sys.executable).parent / "wds2idx")
    if not Path(found).exists():
        raise FileNotFoundError("wds2idx (ships with nvidia-dali) not found on PATH")
    return found


def synthetic_jpeg(rng: np.random.Generator, width: int, height: int, quality: int = 90) -> bytes:
    """A smooth random colour field with some edges: realistic enough for resize checks."""
    coarse = rng.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    img = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    arr = np.asarray(img).copy()
    arr[height // 3 : height // 3 + 2, :] = 255  # a sharp line: flips and crops are visible
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_split(out: Path, split: str, num_samples: int, *, num_classes: int = 5,
                per_shard: int = 16, seed: int = 0, size_range: tuple[int, int] = (48, 128),
                corrupt: dict[int, bytes] | None = None) -> dict:
    """Write ``{split}-NNNNNN.tar/.idx`` and ``{split}.json`` under ``out``; returns the manifest.

    ``corrupt`` maps sample numbers to bytes that replace their JPEG (to test bad data).
    """
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    corrupt = corrupt or {}
    shards = []
    for shard_no, start in enumerate(range(0, num_samples, per_shard)):
        name = f"{split}-{shard_no:06d}"
        tar_path = out / f"{name}.tar"
        with tarfile.open(tar_path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(start, min(start + per_shard, num_samples)):
                w, h = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, 2))
                jpg = corrupt.get(i) or synthetic_jpeg(rng, w, h)
                label = i % num_classes
                meta = {"wnid": f"n{label:08d}", "file": f"img_{i}.JPEG", "width": w, "height": h}
                key = f"{split}_{i:06d}"
                for ext, data in (("jpg", jpg), ("cls", str(label).encode()),
                                  ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        subprocess.run([wds2idx(), str(tar_path), str(out / f"{name}.idx")], check=True,
                       capture_output=True)
        data = tar_path.read_bytes()
        shards.append({"name": tar_path.name, "index": f"{name}.idx",
                       "num_samples": min(per_shard, num_samples - start), "bytes": len(data),
                       "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {"split": split, "num_samples": num_samples, "num_classes": num_classes,
                "seed": seed, "files_in": num_samples, "shards": shards, "rejected": [], "repaired": []}
    (out / f"{split}.json").write_text(json.dumps(manifest, indent=1))
    if not (out / "classes.json").exists():
        (out / "classes.json").write_text(json.dumps({"wnids": [f"n{c:08d}" for c in range(num_classes)]}))
    return manifest


def sample_jpeg(data_dir: Path, split: str, key: str) -> bytes:
    """The JPEG bytes of ``key``, read back with tarfile (a reference independent of the index)."""
    for tar_path in sorted(Path(data_dir).glob(f"{split}-*.tar")):
        with tarfile.open(tar_path) as tar:
            try:
                member = tar.getmember(f"{key}.jpg")
            except KeyError:
                continue
            return tar.extractfile(member).read()
    raise KeyError(key)
