"""Model throughput: forward + backward of the configured network on synthetic images.

No data loading, no optimizer: random normalised images of the config's size (and random
labels for a fine-tuning model) go through ``loss.backward()`` ``warmup + batches`` times;
the warm-up iterations (allocator growth, kernel autotuning, lazy imports) are dropped and
the figures are medians over the rest. On CUDA the forward runs under bf16 autocast as in
training (``torch_autocast`` in the DeepSpeed configs); on CPU in float32 unless asked.
"""

from __future__ import annotations

import contextlib
import math
import resource
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from star.flops import model_flops
from star.models import StarClassifier, create_model
from star.ops import kernel_backend_for
from star.profiling.machine import resolve_peak_tflops
from star.profiling.timing import PeakMemory, StageTimer, median_stages

PRECISIONS = {"bf16": torch.bfloat16, "fp32": None}


@dataclass(frozen=True)
class ModelProfileSettings:
    device: str                 # "cuda" | "cpu"
    batch_images: int           # images per forward (pretraining: a multiple of N)
    batches: int = 10           # timed iterations
    warmup: int = 3             # untimed iterations first
    precision: str = "bf16"     # bf16 (autocast) | fp32
    peak_tflops: float | None = None
    seed: int = 0
    trace: str | None = None    # write a torch.profiler trace of one extra iteration here (.json)


def synthetic_batch(model: torch.nn.Module, batch_images: int, device: str, seed: int):
    """(images, labels or None) shaped for the model; labels only for a classifier."""
    generator = torch.Generator().manual_seed(seed)
    size = model.patch_embed.img_size
    images = torch.randn(batch_images, 3, size, size, generator=generator).to(device)
    labels = None
    if isinstance(model, StarClassifier):
        labels = torch.randint(0, max(model.num_classes, 1), (batch_images,), generator=generator).to(device)
    return images, labels


def check_batch(model: torch.nn.Module, batch_images: int) -> None:
    n = getattr(getattr(model, "packing", None), "images_per_seq", 1)
    if batch_images < n or batch_images % n:
        raise ValueError(f"batch size {batch_images} images is not a positive multiple of the model's "
                         f"{n} images per sequence; use --batch-size {max(n, batch_images // n * n)}")


def autocast(device: str, dtype: torch.dtype | None):
    """bf16 autocast as in training, or nothing for float32."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type=device, dtype=dtype)


def model_loss(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    if labels is None:
        return model(images)["loss"]
    return F.cross_entropy(model(images).float(), labels)


def profile_model(model: torch.nn.Module, settings: ModelProfileSettings) -> dict:
    """Time forward and backward of ``model`` (already on the device, in train mode)."""
    s = settings
    if s.precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {s.precision!r}")
    if s.batches < 1 or s.warmup < 0:
        raise ValueError(f"need batches >= 1 and warmup >= 0, got batches={s.batches}, warmup={s.warmup}")
    check_batch(model, s.batch_images)
    images, labels = synthetic_batch(model, s.batch_images, s.device, s.seed)
    amp_dtype = PRECISIONS[s.precision]
    timer, memory = StageTimer(s.device, mode="events"), PeakMemory(s.device)
    samples: list[dict[str, float]] = []
    loss_value = float("nan")
    memory.reset()
    for i in range(s.warmup + s.batches):
        timer.start()
        with autocast(s.device, amp_dtype):
            loss = model_loss(model, images, labels)
        timer.mark("forward")
        loss.backward()
        timer.mark("backward")
        if i == s.warmup + s.batches - 1:  # the last pass: are its gradients finite (untimed)
            grads_finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
        model.zero_grad(set_to_none=True)
        durations = timer.durations()
        if i >= s.warmup:
            samples.append(durations)
        loss_value = float(loss.detach().float())
    peak_bytes = memory.peak_bytes()
    trace = record_trace(model, images, labels, s, amp_dtype) if s.trace else None

    times = median_stages(samples)
    count = model_flops(model)
    images_per_s = s.batch_images / times["total"]
    achieved = count.training_per_image * images_per_s / 1e12
    peak, peak_source = resolve_peak_tflops(s.device, s.peak_tflops)
    return {
        "batch_images": s.batch_images,
        "timed_batches": s.batches,
        "warmup_batches": s.warmup,
        "precision": s.precision,
        "forward_s": times["forward"],
        "backward_s": times["backward"],
        "step_s": times["total"],
        "images_per_s": images_per_s,
        "tokens_per_image": count.tokens_per_image,
        "tokens_per_s": images_per_s * count.tokens_per_image,
        "loss": loss_value,
        "grads_finite": grads_finite,
        "parameters": sum(p.numel() for p in model.parameters()),
        "peak_memory_bytes": peak_bytes,
        "peak_memory_kind": memory.kind,
        "mamba_path": kernel_backend_for(images),
        "flops": count.to_dict(),
        "achieved_tflops": achieved,
        "peak_tflops": peak,
        "peak_tflops_source": peak_source,
        "mfu": achieved / peak if peak else None,
        "trace": trace,
    }


def record_trace(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | None,
                 s: ModelProfileSettings, amp_dtype: torch.dtype | None) -> dict:
    """One more forward + backward under ``torch.profiler`` (after the timed ones, so it does
    not disturb them): a Chrome / Perfetto trace at ``s.trace`` and, beside it (.txt), the
    operators sorted by their own time on the device (CUDA) or the host (CPU)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if s.device == "cuda" else [])
    with profile(activities=activities) as prof:
        with autocast(s.device, amp_dtype):
            loss = model_loss(model, images, labels)
        loss.backward()
        model.zero_grad(set_to_none=True)
        if s.device == "cuda":
            torch.cuda.synchronize()
    path = Path(s.trace)
    path.parent.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(path))
    sort_by = "self_cuda_time_total" if s.device == "cuda" else "self_cpu_time_total"
    table = path.with_suffix(".txt")
    table.write_text(prof.key_averages().table(sort_by=sort_by, row_limit=25) + "\n")
    return {"chrome_trace": str(path), "top_operators": str(table), "sorted_by": sort_by}


def quick_check(name: str, *, batch: int | None, device: str, images_per_seq: int | None = None,
                seed: int = 0, batch_in_sequences: bool = False) -> dict:
    """`star profile model --model NAME` (alias `star smoke`): build a registry model with its
    defaults and run one float32 forward + backward on random images, a check that it builds,
    fits and trains on this machine. ``batch`` counts images, or with ``batch_in_sequences``
    sequences of N images for a pretraining model (a classifier's batch is always images); None
    means one sequence (pretraining) or one image (classifier). Raises ValueError for an unknown
    model, a bad batch or a missing GPU."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA is not available on this machine; use --device cpu")
    torch.manual_seed(seed)
    model = create_model(name, **({} if images_per_seq is None else {"images_per_seq": images_per_seq}))
    model = model.to(dev).train()
    classifier = isinstance(model, StarClassifier)
    n = 1 if classifier else model.packing.images_per_seq
    images = n if batch is None else batch * (n if batch_in_sequences else 1)
    settings = ModelProfileSettings(device=dev.type, batch_images=images, batches=1, warmup=0,
                                    precision="fp32", seed=seed)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)  # "cuda:1": the profile's tensors and memory counters follow
    result = profile_model(model, settings)
    if dev.type == "cuda":
        peak_mib, peak_kind = result["peak_memory_bytes"] / 2**20, "CUDA allocated"
    else:  # the whole process (weights and Python included); ru_maxrss is in KiB on Linux
        peak_mib, peak_kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process RSS"
    size = model.patch_embed.img_size
    out = {"name": name, "class": type(model).__name__, "classifier": classifier, "images": settings.batch_images,
           "img_size": size, "loss": result["loss"], "parameters": result["parameters"],
           "fwd_bwd_s": result["step_s"], "peak_mib": peak_mib, "peak_kind": peak_kind,
           "kernels": result["mamba_path"], "finite": math.isfinite(result["loss"]) and result["grads_finite"]}
    if not classifier:
        out.update(sequences=settings.batch_images // n, seq_len=model.layout.seq_len, layout=model.layout.pattern())
    return out


def format_quick_check(c: dict) -> str:
    """The quick check as aligned ``name  value`` lines."""
    lines = [f"model        {c['name']} ({c['class']})",
             f"input        {c['images']} images of {c['img_size']}x{c['img_size']}"
             + ("" if c["classifier"] else f", {c['sequences']} sequence(s) of {c['seq_len']} tokens")]
    if not c["classifier"]:
        lines.append(f"layout       {c['layout']} (S separator, C image cluster)")
    lines += [f"loss         {c['loss']:.4f}",
              f"parameters   {c['parameters'] / 1e6:.2f} M",
              f"fwd+bwd      {c['fwd_bwd_s']:.2f} s",
              f"peak memory  {c['peak_mib']:.0f} MiB ({c['peak_kind']})",
              f"kernels      {c['kernels']}"]
    return "\n".join(lines)
