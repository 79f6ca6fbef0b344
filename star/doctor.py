"""`star doctor`: the first minute of every GPU job. Checks, on every rank, that this machine
can run the configured training, and prints one table: a pass / fail / skip line per check,
with the reason for each failure and skip.

    star doctor                                   # this machine, the default config
    star doctor --device cpu --data data/synth_shards --json doctor.json
    srun star doctor --device cuda --config star_b_1600ep --data /data/imagenet-wds model.kernels=fused

Checks (each rank runs them; rank 0 gathers the results and prints the table):

  versions        torch (+CUDA), mamba-ssm, causal-conv1d, DALI (CUDA flavour), DeepSpeed,
                  NCCL against the floors in pyproject.toml; GPU names and memory; the MFU peak
  kernels         the path each Mamba op takes under model.kernels and why
                  (star/ops/dispatch.py); `fused` without usable kernels fails here
  kernels.fp32/   CUDA: the fused kernels against the PyTorch path on one STAR-B mixer
  kernels.bf16    (width 768, L = 1280 tokens, forward + backward) within TOLERANCES
  data.shards     --data: every split's manifest and indexes load, first/last sample readable
  data.verify     --data: `star verify`'s per-shard check (re-hash, member layout, index) on
                  one shard per split per rank (rank r takes shard r, so N ranks check N)
  data.decode     --data: a few images decoded by DALI against an independent decoder:
                  CUDA: nvJPEG (`mixed`) vs DALI's CPU decode; CPU: DALI's CPU decode vs PIL
  allreduce       srun / torchrun: an all-reduce over all ranks, values and bus bandwidth
  train_step      one forward + backward of the configured model (bf16 autocast on CUDA)
                  with a finite loss and finite gradients

Exit codes: 0 every check that ran passed, 1 some check failed (the table says which and
why), 2 bad command line or config. The slurm/ launchers run it before training (DOCTOR=0
skips it) and do not requeue a job whose doctor failed.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from packaging.version import InvalidVersion, Version
from PIL import Image
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from star import ops
from star.config import ConfigError, load_config
from star.models.mamba import Mamba
from star.ops import dispatch
from star.train.distributed import (
    DistEnv,
    all_gather_objects,
    destroy,
    init_distributed,
    resolve_device,
    resolve_dist_env,
)
from star.train.run_info import collect_versions, local_device

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
PASS, FAIL, SKIP = "pass", "fail", "skip"

# Floors from pyproject.toml (dependencies and the `cuda` extra); why each is what it is is
# written there. Kernel packages are checked by the kernels check (star/ops/dispatch.py probes
# what mamba-ssm will actually call, which a version number cannot prove).
FLOORS = {"torch": "2.3", "deepspeed": "0.19.0", "dali": "2.0"}
CUDA_FLOORS = {"torch": "2.4"}

# Relative L2 error ||fused - torch|| / ||torch|| allowed per tensor (the mixer's output and
# every gradient). fp32: both paths compute in fp32 with different summation orders and exp
# implementations (mamba-ssm's own tests allow rtol 6e-4 element-wise for fp32); bf16 under
# autocast: the projections round to bf16 at different points (eps 7.8e-3).
TOLERANCES = {"fp32": 1e-3, "bf16": 5e-2}
# STAR-B's mixer (MambaMLP-B, STAR paper section 4.1): width 768; pretraining sequences of 8
# images of 12 x 12 patches, each with a 4 x 4 separator cluster: 8 * (144 + 16) = 1280 tokens.
MIXER_WIDTH, MIXER_LENGTH, MIXER_BATCH = 768, 1280, 2
# Mean absolute difference (0-255 scale) allowed between two decodes of the same JPEG: nvJPEG,
# libjpeg-turbo (DALI's CPU decoder) and PIL's libjpeg use different IDCT and chroma upsampling.
DECODE_MAD = 3.0
DECODE_IMAGES = 8
ALLREDUCE_BYTES = {"cuda": 64 * 2**20, "cpu": 4 * 2**20}
ALLREDUCE_ITERS = 5


@dataclass
class Check:
    name: str
    status: str          # pass | fail | skip
    detail: str          # what was found (pass) or why it failed / was skipped
    data: dict = field(default_factory=dict)


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


@contextlib.contextmanager
def _guard(results: list[Check], name: str) -> Iterator[None]:
    """A check that raises fails with the exception's text instead of ending the doctor."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - every failure is a reported result
        results.append(Check(name, FAIL, _error(err)))


# ----------------------------------------------------------------------------- versions


def _below(version: str | None, floor: str) -> bool:
    if version is None:
        return True
    try:
        return Version(version.split()[0].split("+")[0]) < Version(floor)
    except InvalidVersion:
        return False  # an unparsable local build: not ours to judge


def _cuda_major(text: str | None) -> str | None:
    if not text:
        return None
    digits = text.split("cuda")[-1] if "cuda" in text else text
    digits = "".join(c for c in digits if c.isdigit() or c == ".")
    return digits.split(".")[0][:2] if "." in digits else digits[:2] or None


def check_versions(device: str) -> Check:
    kind = torch.device(device).type
    versions = collect_versions()
    floors = dict(FLOORS, **(CUDA_FLOORS if kind == "cuda" else {}))
    problems = [f"{name} {versions[name] or 'missing'} (need >= {floor})"
                for name, floor in floors.items() if _below(versions[name], floor)]
    if kind == "cuda":
        dali_cuda = _cuda_major(versions["dali"].split("(")[-1]) if versions["dali"] else None
        torch_cuda = _cuda_major(versions["cuda"])
        if dali_cuda and torch_cuda and dali_cuda != torch_cuda:
            problems.append(f"DALI is built for CUDA {dali_cuda}, torch for CUDA {torch_cuda}: install "
                            f"nvidia-dali-cuda{torch_cuda}0")
        if versions["nccl"] is None:
            problems.append("torch has no NCCL (torch.cuda.nccl.version() failed)")
    from star.profiling.machine import resolve_peak_tflops  # the profiler's peak table

    dev = local_device(device)
    peak, peak_source = resolve_peak_tflops(kind, None)
    data = {"versions": versions, "device": dev, "mfu_peak_tflops": peak, "mfu_peak_source": peak_source}
    shown = ", ".join(f"{k} {v or 'missing'}" for k, v in versions.items() if v or k not in ("cuda", "nccl"))
    where = f"{dev['name']}" + (f" {dev['memory_gib']} GiB" if "memory_gib" in dev else "")
    mfu = f"MFU peak {peak:g} TFLOP/s ({peak_source})" if peak else f"MFU peak: {peak_source}"
    if problems:
        return Check("versions", FAIL, "; ".join(problems) + f" [{shown}]", data)
    return Check("versions", PASS, f"{shown}; {where}; {mfu}", data)


# ----------------------------------------------------------------------------- kernels


def check_kernels(setting: str, device: str) -> Check:
    try:
        plan = ops.require_kernels(setting, device)
    except ops.KernelsUnavailable as err:
        return Check("kernels", FAIL, str(err), {"setting": setting})
    slow = [n for n, p in plan["ops"].items() if p["path"] != "cuda"]
    line = ops.describe_kernel_plan(plan)
    if torch.device(device).type == "cuda" and slow:
        line += " -- the slow PyTorch path on a GPU"
    return Check("kernels", PASS, line, {"plan": plan})


@contextlib.contextmanager
def torch_path() -> Iterator[None]:
    """Run the mixer on the pure-PyTorch ops."""
    saved = dispatch._backend_override
    dispatch.set_kernel_backend("torch")
    try:
        yield
    finally:
        dispatch._backend_override = saved


@contextlib.contextmanager
def fused_path() -> Iterator[None]:
    """Run the mixer on the fused kernels wherever they are available (CUDA tensors)."""
    saved = dispatch._backend_override
    dispatch.set_kernel_backend("auto")
    try:
        yield
    finally:
        dispatch._backend_override = saved


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def compare_mixer_paths(reference: Callable, candidate: Callable, mixer: torch.nn.Module, x: torch.Tensor,
                        *, autocast_dtype: torch.dtype | None = None, tol: float, seed: int = 0) -> dict:
    """Forward + backward of ``mixer`` on ``x`` under two kernel paths (context managers), with the
    same upstream gradient; the relative L2 error of the output and of every gradient (input
    and parameters). ``{"ok", "max_rel_err", "worst", "errors", "tol"}``."""
    gen = torch.Generator(device=x.device).manual_seed(seed)
    cotangent = None

    def run(path: Callable) -> dict[str, torch.Tensor]:
        nonlocal cotangent
        mixer.zero_grad(set_to_none=True)
        xi = x.detach().clone().requires_grad_()
        with path(), torch.autocast(x.device.type, dtype=autocast_dtype or torch.bfloat16,
                                    enabled=autocast_dtype is not None):
            out = mixer(xi)
        if cotangent is None:
            cotangent = torch.randn(out.shape, generator=gen, device=x.device, dtype=torch.float32)
        (out.float() * cotangent).sum().backward()
        tensors = {"output": out.detach().float(), "input.grad": xi.grad.float()}
        tensors.update({f"{name}.grad": p.grad.detach().float() for name, p in mixer.named_parameters()
                        if p.grad is not None})
        return tensors

    ref = run(reference)
    got = run(candidate)
    mixer.zero_grad(set_to_none=True)
    if ref.keys() != got.keys():
        missing = sorted(ref.keys() ^ got.keys())
        return {"ok": False, "max_rel_err": math.inf, "worst": f"gradients missing: {missing}",
                "errors": {}, "tol": tol}
    errors = {name: _rel_l2(got[name], ref[name]) for name in ref}
    worst = max(errors, key=lambda n: errors[n] if math.isfinite(errors[n]) else math.inf)
    max_err = errors[worst]
    return {"ok": bool(math.isfinite(max_err) and max_err <= tol), "max_rel_err": max_err, "worst": worst,
            "errors": errors, "tol": tol}


def check_kernels_match(device: str, kernels_check: Check) -> list[Check]:
    names = ("kernels.fp32", "kernels.bf16")
    if torch.device(device).type != "cuda":
        why = ("no CUDA: the fused kernels run only on CUDA tensors (the comparison itself is tested on CPU "
               "against star/ops/reference.py)")
        return [Check(n, SKIP, why) for n in names]
    plan = kernels_check.data.get("plan")
    if plan is None:
        return [Check(n, SKIP, "the kernels check failed: nothing to compare") for n in names]
    fused = [n for n, p in plan["ops"].items() if p["path"] == "cuda"]
    if not fused:
        return [Check(n, SKIP, "no fused kernel is in use (model.kernels / STAR_KERNELS or none available): "
                               "nothing to compare") for n in names]
    results = []
    torch.manual_seed(0)
    mixer = Mamba(MIXER_WIDTH, num_scans=1).to(device)
    x = torch.randn(MIXER_BATCH, MIXER_LENGTH, MIXER_WIDTH, device=device)
    for name, dtype in (("kernels.fp32", None), ("kernels.bf16", torch.bfloat16)):
        tol = TOLERANCES[name.split(".")[1]]
        with _guard(results, name):
            res = compare_mixer_paths(torch_path, fused_path, mixer, x, autocast_dtype=dtype, tol=tol)
            what = (f"fused ({', '.join(fused)}) vs PyTorch on a {MIXER_WIDTH}-wide mixer, L={MIXER_LENGTH}, "
                    f"batch {MIXER_BATCH}, fwd+bwd: max relative L2 error {res['max_rel_err']:.2e} "
                    f"({res['worst']}), tolerance {tol:g}")
            results.append(Check(name, PASS if res["ok"] else FAIL, what,
                                 {k: v for k, v in res.items() if k != "errors"} | {"errors": res["errors"]}))
    del mixer, x
    torch.cuda.empty_cache()
    return results


# ----------------------------------------------------------------------------- data


def pil_decode(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    return np.asarray(img.convert("RGB"))


def dali_decode(jpegs: list[bytes], device: str, device_id: int | None = None) -> list[np.ndarray]:
    """HWC uint8 RGB decodes of ``jpegs`` by DALI: device "cpu" (libjpeg-turbo) or "mixed" (nvJPEG)."""
    from nvidia.dali import fn, pipeline_def, types  # optional heavy package

    @pipeline_def
    def graph():
        data = fn.external_source(name="jpegs", dtype=types.UINT8)
        return fn.decoders.image(data, device=device, output_type=types.RGB)

    pipe = graph(batch_size=len(jpegs), num_threads=1, device_id=device_id, prefetch_queue_depth=1)
    pipe.build()
    pipe.feed_input("jpegs", [np.frombuffer(j, dtype=np.uint8) for j in jpegs])
    (out,) = pipe.run()
    if device == "mixed":
        out = out.as_cpu()
    return [np.array(out.at(i)) for i in range(len(jpegs))]


def compare_decodes(candidate: list[np.ndarray], reference: list[np.ndarray], tol: float = DECODE_MAD) -> dict:
    """Per image the mean absolute difference on the 0-255 scale; ok when every one is <= tol
    and the shapes agree."""
    mads = []
    for a, b in zip(candidate, reference):
        if a.shape != b.shape:
            return {"ok": False, "max_mad": math.inf, "mads": mads,
                    "problem": f"shape {a.shape} vs {b.shape}"}
        mads.append(float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean()))
    ok = len(candidate) == len(reference) and all(m <= tol for m in mads)
    return {"ok": ok, "max_mad": max(mads, default=0.0), "mads": mads, "tol": tol}


def check_data(data_dir: Path | None, dist_env: DistEnv, device: str) -> list[Check]:
    from data_prep.verify import check_shard
    from pipelines.shards import ShardSet

    names = ("data.shards", "data.verify", "data.decode")
    if data_dir is None:
        return [Check(n, SKIP, "no --data DIR given") for n in names]
    splits = [s for s in ("train", "val") if (data_dir / f"{s}.json").is_file()]
    if not splits:
        return [Check("data.shards", FAIL, f"no train.json or val.json manifest in {data_dir}: run `star shard`"),
                *(Check(n, SKIP, "no readable shards") for n in names[1:])]
    results: list[Check] = []
    sets = {}
    with _guard(results, "data.shards"):
        for split in splits:
            sets[split] = ShardSet(data_dir, split)
            for i in (0, len(sets[split]) - 1):
                sets[split].read(i)
        results.append(Check("data.shards", PASS, "; ".join(
            f"{s}: {len(v)} samples in {len(v.shard_paths)} shards, first and last readable"
            for s, v in sets.items())))
    if len(sets) != len(splits):
        return results + [Check(n, SKIP, "the shards are not readable") for n in names[1:]]

    with _guard(results, "data.verify"):
        checked, problems = [], []
        for shard_set in sets.values():
            entries = shard_set.manifest["shards"]
            entry = entries[dist_env.rank % len(entries)]
            found = check_shard((str(data_dir), entry, shard_set.num_classes))
            checked.append(entry["name"])
            problems += [f"{entry['name']}: {p}" for p in found["problems"]]
        results.append(Check("data.verify", FAIL if problems else PASS,
                             "; ".join(problems) if problems else
                             f"re-hashed and checked against the manifest: {', '.join(checked)}"))

    with _guard(results, "data.decode"):
        shard_set = sets[splits[0]]
        first = (dist_env.rank * DECODE_IMAGES) % max(1, len(shard_set) - DECODE_IMAGES + 1)
        jpegs = [shard_set.read(i)[0] for i in range(first, min(first + DECODE_IMAGES, len(shard_set)))]
        if torch.device(device).type == "cuda":
            index = torch.cuda.current_device()
            got, ref = dali_decode(jpegs, "mixed", index), dali_decode(jpegs, "cpu", index)
            what = "DALI mixed (nvJPEG) vs DALI cpu"
        else:
            got, ref = dali_decode(jpegs, "cpu"), [pil_decode(j) for j in jpegs]
            what = "DALI cpu vs PIL"
        res = compare_decodes(got, ref)
        detail = (f"{what} on {len(jpegs)} {splits[0]} images from #{first}: max mean |diff| "
                  f"{res['max_mad']:.3f} (tolerance {DECODE_MAD:g} on 0-255)" + (
                      f"; {res['problem']}" if "problem" in res else ""))
        results.append(Check("data.decode", PASS if res["ok"] else FAIL, detail, res))
    return results


# ----------------------------------------------------------------------------- communication


def check_allreduce(dist_env: DistEnv, device: str) -> Check:
    import torch.distributed as dist

    if dist_env.world_size == 1:
        return Check("allreduce", SKIP, "single process: nothing to all-reduce (run under srun or torchrun)")
    n, nbytes = dist_env.world_size, ALLREDUCE_BYTES[torch.device(device).type]
    tensor = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    expected = n * (n + 1) / 2  # every rank contributes rank + 1: exact in float32
    wrong = 0
    times = []
    for i in range(2 + ALLREDUCE_ITERS):  # two warm-up rounds (NCCL builds its rings)
        tensor.fill_(dist_env.rank + 1)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        dist.all_reduce(tensor)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
        wrong += int((tensor != expected).sum())
    seconds = sorted(times)[len(times) // 2]
    busbw = 2 * (n - 1) / n * nbytes / seconds / 1e9  # nccl-tests' bus bandwidth
    data = {"bytes": nbytes, "ranks": n, "median_s": seconds, "busbw_gbps": busbw, "wrong_values": wrong}
    detail = (f"{n} ranks, {nbytes / 2**20:.0f} MiB float32 sum: median {seconds * 1e3:.2f} ms, bus bandwidth "
              f"{busbw:.2f} GB/s")
    if wrong:
        return Check("allreduce", FAIL, f"{wrong} wrong values after the sum (expected {expected:g}); " + detail, data)
    return Check("allreduce", PASS, detail, data)


# ----------------------------------------------------------------------------- training step


def check_train_step(cfg, device: str) -> Check:
    from star.models import StarClassifier
    from star.train.runtime import build_model

    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(device)
    finetune = isinstance(model, StarClassifier)
    size = model.patch_embed.img_size
    if device.startswith("cuda"):
        images = cfg.batch.micro_images  # the real micro batch: an out-of-memory shows here
    else:
        images = 2 if finetune else model.packing.images_per_seq  # one sequence: seconds on a CPU
    gen = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(images, 3, size, size, generator=gen).to(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=device.startswith("cuda")):
        if finetune:
            labels = torch.randint(0, model.num_classes, (images,), generator=gen).to(device)
            loss = torch.nn.functional.cross_entropy(model(x), labels)
        else:
            loss = model(x)["loss"]
    loss.backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    missing = sum(g is None for g in grads)
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    nonzero = sum(int(g is not None and bool(g.abs().sum() > 0)) for g in grads)
    memory = (f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.startswith("cuda") else "")
    detail = (f"{cfg.model.name} ({type(model).__name__}), {images} images of {size} px"
              f"{', bf16 autocast' if device.startswith('cuda') else ', fp32'}: loss {loss.item():.4f}, "
              f"fwd+bwd {seconds:.2f} s{memory}")
    data = {"loss": float(loss.item()), "seconds": seconds, "images": images}
    del model
    if not math.isfinite(loss.item()):
        return Check("train_step", FAIL, "non-finite loss; " + detail, data)
    if bad:
        return Check("train_step", FAIL, f"non-finite gradients in {', '.join(bad[:5])}; " + detail, data)
    if missing or nonzero == 0:
        return Check("train_step", FAIL, f"{missing} parameters got no gradient, {nonzero} a non-zero one; "
                     + detail, data)
    return Check("train_step", PASS, detail, data)


# ----------------------------------------------------------------------------- driver


def run_checks(cfg, dist_env: DistEnv, device: str, data_dir: Path | None) -> list[Check]:
    """Every check on this rank, in table order; a check that raises is a failure, not a crash."""
    results: list[Check] = []
    with _guard(results, "versions"):
        results.append(check_versions(device))
    kernels = Check("kernels", FAIL, "not run")
    with _guard(results, "kernels"):
        kernels = check_kernels(cfg.model.kernels, device)
        results.append(kernels)
    results += check_kernels_match(device, kernels)
    results += check_data(data_dir, dist_env, device)
    with _guard(results, "allreduce"):
        results.append(check_allreduce(dist_env, device))
    if kernels.status == FAIL:
        results.append(Check("train_step", SKIP, "the kernels check failed (model.kernels)"))
    else:
        with _guard(results, "train_step"):
            results.append(check_train_step(cfg, device))
    return results


def merge(per_rank: list[list[dict]]) -> list[dict]:
    """One row per check over all ranks: the worst status; the detail of rank 0, or of the
    ranks that fail (each named) when some do."""
    order = [r["name"] for r in per_rank[0]]
    for results in per_rank[1:]:
        order += [r["name"] for r in results if r["name"] not in order]
    rows = []
    for name in order:
        by_rank = {rank: next((r for r in results if r["name"] == name), None)
                   for rank, results in enumerate(per_rank)}
        statuses = [r["status"] for r in by_rank.values() if r is not None]
        status = FAIL if FAIL in statuses else (PASS if PASS in statuses else SKIP)
        failing = [(rank, r) for rank, r in by_rank.items() if r is not None and r["status"] == FAIL]
        if failing:
            detail = "; ".join(f"rank {rank}: {r['detail']}" for rank, r in failing)
        else:
            detail = next(r["detail"] for r in by_rank.values() if r is not None)
        rows.append({"name": name, "status": status, "detail": detail,
                     "failed_ranks": [rank for rank, _ in failing],
                     "ranks": {str(rank): r for rank, r in by_rank.items()}})
    return rows


_STYLE = {PASS: "[green]pass[/green]", FAIL: "[bold red]FAIL[/bold red]", SKIP: "[yellow]skip[/yellow]"}


def print_table(rows: list[dict], world_size: int, device: str, console: Console) -> None:
    table = Table(title=f"star doctor: {world_size} rank(s), device {device}", show_lines=True)
    table.add_column("check", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("details (failures: the reason, per failing rank)")
    for row in rows:
        table.add_row(row["name"], _STYLE[row["status"]], escape(row["detail"]))
    console.print(table)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="star doctor", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where to check (default: cuda when torch sees a GPU, else cpu)")
    parser.add_argument("--config", metavar="NAME|PATH", default=None,
                        help="the config whose model the training step builds and whose model.kernels "
                             "applies (default: smoke on CPU, star_b_1600ep on CUDA)")
    parser.add_argument("--data", type=Path, metavar="DIR",
                        help="a shard directory (`star shard --out`): check shards, verify and decode")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON (rank 0)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="config overrides, as for `star pretrain` (e.g. model.kernels=fused)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device = resolve_device(args.device)
    except RuntimeError as err:
        print(f"star doctor: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        cfg = load_config(args.config or ("star_b_1600ep" if device == "cuda" else "smoke"), args.overrides)
        dist_env = resolve_dist_env()
    except ConfigError as err:
        print(f"star doctor: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.data is not None and not args.data.is_dir():
        print(f"star doctor: error: --data {args.data} is not a directory", file=sys.stderr)
        return EXIT_USAGE
    distributed = dist_env.world_size > 1
    if distributed:
        dist_env = init_distributed(device, use_deepspeed=False)
    elif device == "cuda":
        torch.cuda.set_device(dist_env.local_rank)
    local = f"cuda:{dist_env.local_rank}" if device == "cuda" else device
    console = Console(width=None if sys.stdout.isatty() else 160)  # logs: wide enough for reasons
    try:
        results = run_checks(cfg, dist_env, local, args.data)
        per_rank = all_gather_objects([asdict(r) for r in results])
    finally:
        if distributed:
            destroy()
    rows = merge(per_rank)
    failed = [r["name"] for r in rows if r["status"] == FAIL]
    if dist_env.is_main:
        print_table(rows, dist_env.world_size, device, console)
        skipped = [r["name"] for r in rows if r["status"] == SKIP]
        verdict = (f"[bold red]FAILED[/bold red]: {', '.join(failed)}" if failed
                   else "[green]all checks that ran passed[/green]")
        console.print(f"star doctor: {verdict}" + (f" (skipped: {', '.join(skipped)})" if skipped else ""))
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({
                "ok": not failed, "device": device, "world_size": dist_env.world_size,
                "config": cfg.name, "kernels_setting": cfg.model.kernels, "checks": rows,
            }, indent=2, default=str) + "\n")
    return EXIT_FAILED if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
