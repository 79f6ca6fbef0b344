"""Resumable checkpoints of a DeepSpeed engine, with an atomically committed ``latest`` pointer.

Layout of ``RUN_DIR/checkpoints/``::

    step_000001000/         one DeepSpeed checkpoint (model + ZeRO optimizer shards of every rank)
        rng_rank00000.pt    this rank's RNG states (Python, NumPy, torch, CUDA, extra generators)
        ...
    latest                  text: the tag of the newest *complete* checkpoint

Every rank calls ``engine.save_checkpoint`` (ZeRO shards are per rank) with DeepSpeed's own
``latest`` disabled; after a barrier proves that all ranks finished writing, rank 0 commits
the pointer (write ``latest.tmp``, fsync, ``os.replace``) and prunes old checkpoints. A crash
at any moment leaves ``latest`` naming a checkpoint that is complete. The training position
(step, epoch, step within epoch), EMA and counters travel in DeepSpeed's ``client_state``.

A checkpoint written by W ranks resumes on any other number of ranks: the optimizer state is
re-partitioned from the W shards (star/train/elastic.py) and the per-rank random streams, which
cannot be mapped from W ranks onto W', are re-seeded from (seed, step, rank).
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from star.train.distributed import all_reduce_sum, barrier
from star.train.elastic import checkpoint_world_size, reseed, restore_repartitioned
from star.train.safe_load import check_checkpoint_dir, safe_load, use_safe_loading

TAG_RE = re.compile(r"^step_(\d+)$")
# Bytes per parameter of one checkpoint with ZeRO-1/2 and AdamW, all ranks together: the fp32
# module (4) plus the fp32 master copy and two moments, partitioned over ranks (12).
CHECKPOINT_BYTES_PER_PARAM = 16
SPACE_MARGIN = 1.10  # headroom over the estimate (pickle framing, RNG files, client state)


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the message says where and why (exit code 74)."""


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def device_of(path: Path) -> str:
    """The device (file system source) that holds ``path``, from /proc/mounts when readable."""
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            source, mount_point = line.split()[:2]
            if mount_point == str(path):
                return f"{source} ({mount_point})"
    except OSError:
        pass
    return str(path)


def tag_for(step: int) -> str:
    return f"step_{step:09d}"


def capture_rng(extra: dict[str, torch.Generator] | None = None) -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    state["extra"] = {name: gen.get_state() for name, gen in (extra or {}).items()}
    return state


def restore_rng(state: dict, extra: dict[str, torch.Generator] | None = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, gen in (extra or {}).items():
        if name in state["extra"]:
            gen.set_state(state["extra"][name])


class Checkpointer:
    def __init__(self, run_dir: str | Path, *, rank: int, keep_last: int) -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.rank = rank
        self.keep_last = keep_last
        self.loaded_world_size: int | None = None  # ranks that wrote the checkpoint last loaded

    @property
    def pointer(self) -> Path:
        return self.dir / "latest"

    def latest_tag(self) -> str | None:
        """The committed newest checkpoint, or None for a fresh run."""
        if not self.pointer.is_file():
            return None
        tag = self.pointer.read_text().strip()
        if not (self.dir / tag).is_dir():
            raise FileNotFoundError(f"{self.pointer} names {tag!r} but {self.dir / tag} does not exist; "
                                    f"the run directory was edited by hand. Point `latest` at an existing "
                                    f"step_* directory or start a new run directory.")
        return tag

    def bytes_needed(self, engine, client_state: dict) -> int:
        """The size of the next checkpoint: the last committed one's, else an estimate."""
        tag = self.latest_tag() if self.pointer.is_file() else None
        if tag is not None:
            return _dir_bytes(self.dir / tag)
        params = sum(p.numel() for p in engine.module.parameters())
        ema = client_state.get("ema")
        ema_values = sum(v.numel() for v in ema.values() if torch.is_tensor(v)) if isinstance(ema, dict) else 0
        return params * CHECKPOINT_BYTES_PER_PARAM + ema_values * 4

    def _no_space(self, tag: str, needed: int) -> CheckpointWriteError:
        free = shutil.disk_usage(self.dir).free
        return CheckpointWriteError(
            f"no space left on {device_of(self.dir)} for checkpoint {self.dir / tag}: a checkpoint of this "
            f"run needs about {_human(needed)} ({self.keep_last} kept, plus the one being written) and "
            f"{_human(free)} are free; free space or lower checkpoint.keep_last, then run the same "
            f"command again: it resumes from the last committed checkpoint")

    def save(self, engine, step: int, client_state: dict, rng_extra: dict | None = None) -> str:
        tag = tag_for(step)
        self.dir.mkdir(parents=True, exist_ok=True)
        # Every rank agrees before anyone writes: a rank failing half-way through DeepSpeed's save
        # would leave the others waiting in its barrier.
        needed = int(self.bytes_needed(engine, client_state) * SPACE_MARGIN)
        short = float(self.rank == 0 and shutil.disk_usage(self.dir).free < needed)
        if all_reduce_sum([short])[0] > 0:
            raise self._no_space(tag, needed)
        try:
            engine.save_checkpoint(str(self.dir), tag=tag, client_state=client_state, save_latest=False)
            torch.save(capture_rng(rng_extra), self.dir / tag / f"rng_rank{self.rank:05d}.pt")
        except (OSError, RuntimeError) as exc:
            # torch reports a full disk as "basic_ios::clear: iostream error" or "PytorchStreamWriter
            # failed writing file": tell the user what it is.
            if shutil.disk_usage(self.dir).free < needed:
                raise self._no_space(tag, needed) from None
            raise CheckpointWriteError(f"could not write checkpoint {self.dir / tag} on {device_of(self.dir)}: "
                                       f"{exc}") from None
        barrier()  # every rank has finished writing its shards
        if self.rank == 0:
            self._commit(tag)
            self._prune(keep=tag)
        barrier()  # nobody races ahead and reads a half-pruned directory
        return tag

    def _commit(self, tag: str) -> None:
        tmp = self.pointer.with_name("latest.tmp")
        with open(tmp, "w") as fh:
            fh.write(tag + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.pointer)
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def remove_uncommitted(self, committed: str | None) -> list[Path]:
        """Delete step folders newer than the committed one (a save interrupted by a crash or a
        full disk): they hold no complete checkpoint and only take the space a new one needs."""
        if not self.dir.is_dir():
            return []
        current = int(TAG_RE.match(committed).group(1)) if committed else -1
        stale = [p for p in self.dir.iterdir() if p.is_dir() and (m := TAG_RE.match(p.name))
                 and int(m.group(1)) > current]
        for path in stale:
            shutil.rmtree(path, ignore_errors=True)
        return stale

    def _prune(self, keep: str) -> None:
        """Keep the newest ``keep_last`` checkpoints up to ``keep``; drop older ones and any
        newer ones (left half-written by a run that was killed and has now been replayed)."""
        current = int(TAG_RE.match(keep).group(1))
        tags = sorted((int(m.group(1)), p) for p in self.dir.iterdir()
                      if p.is_dir() and (m := TAG_RE.match(p.name)))
        older = [p for step, p in tags if step <= current]
        stale = [p for step, p in tags if step > current]
        for path in older[:-self.keep_last] + stale:
            shutil.rmtree(path, ignore_errors=True)

    def check_latest(self) -> str | None:
        """Refuse (before anything slow starts) a committed checkpoint whose files would need
        code outside the weights-only allow-list to load (star/train/safe_load.py)."""
        tag = self.latest_tag()
        if tag is not None:
            check_checkpoint_dir(self.dir / tag)
        return tag

    def kept_steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, oldest first: committed (not newer than
        ``latest``; newer folders are saves a crash interrupted) and holding the module states,
        every rank's ZeRO optimizer shard and every rank's RNG file."""
        committed = self.latest_tag()
        if committed is None:
            return []
        newest = int(TAG_RE.match(committed).group(1))
        steps = []
        for path in self.dir.iterdir():
            m = TAG_RE.match(path.name)
            if not (m and path.is_dir() and int(m.group(1)) <= newest):
                continue
            try:
                world = checkpoint_world_size(path)
            except FileNotFoundError:
                continue
            if (path / "mp_rank_00_model_states.pt").is_file() and all(
                    (path / f"rng_rank{r:05d}.pt").is_file() for r in range(world)):
                steps.append(int(m.group(1)))
        return sorted(steps)

    def load(self, engine, rng_extra: dict | None = None, *, tag: str | None = None) -> dict | None:
        """Restore the newest complete checkpoint into ``engine``; return its client state.

        ``tag`` (``step_NNNNNNNNN``, one of :meth:`kept_steps`) loads that checkpoint instead and
        leaves the run directory as it is (`star replay`): no uncommitted folder is removed."""
        if tag is None:
            tag = self.check_latest()
            if self.rank == 0:
                self.remove_uncommitted(tag)
            barrier()
        else:
            check_checkpoint_dir(self.dir / tag)
        if tag is None:
            return None
        use_safe_loading(engine)  # DeepSpeed's own loader would unpickle without restriction
        saved_world = checkpoint_world_size(self.dir / tag)
        self.loaded_world_size = saved_world
        if saved_world != engine.dp_world_size:
            return self._load_elastic(engine, tag, saved_world, rng_extra)
        path, client_state = engine.load_checkpoint(str(self.dir), tag=tag, load_optimizer_states=True,
                                                    load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.dir / tag}")
        rng_file = self.dir / tag / f"rng_rank{self.rank:05d}.pt"
        if not rng_file.is_file():
            raise FileNotFoundError(f"{rng_file} is missing: the checkpoint {self.dir / tag} is incomplete")
        restore_rng(safe_load(rng_file), rng_extra)
        return client_state

    def _load_elastic(self, engine, tag: str, saved_world: int, rng_extra: dict | None) -> dict:
        """A checkpoint of ``saved_world`` ranks into an engine of another world size: the module
        through DeepSpeed, master weights and moments re-partitioned by star/train/elastic.py,
        fresh per-rank random streams from (seed, step, rank)."""
        path, client_state = engine.load_checkpoint(str(self.dir), tag=tag, load_optimizer_states=False,
                                                    load_lr_scheduler_states=False, load_module_only=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.dir / tag}")
        restore_repartitioned(engine, self.dir / tag, saved_world, client_state)
        seed = int((client_state.get("config") or {}).get("seed", 0))
        step = int((client_state.get("train_state") or {}).get("step", 0))
        reseed(seed, step, self.rank, rng_extra)
        return client_state
