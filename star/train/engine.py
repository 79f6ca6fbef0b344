"""DeepSpeed engine construction: batch plan, JSON config filling, precision, optimizer.

Precision. DeepSpeed's ``bf16`` mode casts the whole module to bf16, which would also round
the Mamba parameters A_log, D and dt_proj.bias (numerically sensitive: A = -exp(A_log) and the
softplus of dt set the decay of every state). We use DeepSpeed's ``torch_autocast`` mode
instead: parameters, gradients and AdamW states stay float32 (ZeRO shards the states), the
forward runs under ``torch.autocast(bfloat16)`` so matmuls and convolutions run in bf16, and
gradients of Linear / Conv weights are all-reduced in bf16. The sensitive parameters are
taken out of the bf16 gradient communication (``keep_fp32_communication``) so that they are
float32 end to end; they are the parameters the Mamba mixer flags ``_keep_fp32`` in every scan
direction (:func:`star.models.fp32_parameter_names`). A JSON that enables ``bf16`` / ``fp16``
is refused with this explanation.
The price is float32 weights on every rank (4 bytes a parameter instead of 2: 0.3 GB for B,
1.2 GB for L) and a bf16 cast of each weight per forward, both small next to the activations
of 1280-token sequences.

Batch sizes. The typed config states images; the model consumes sequences of N images, so
DeepSpeed's counters (``train_micro_batch_size_per_gpu`` etc.) are filled in sequences. The
trainer writes them and ``gradient_clipping`` into the JSON; a JSON that sets any of them
to a different value is refused, so the two can never disagree.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from star.config import Config, ConfigError
from star.models import fp32_parameter_names
from star.train.elastic import check_world_size

# Shipped inside the package (package data), so an installed wheel resolves ds_config=auto too.
DS_CONFIG_DIR = Path(__file__).resolve().parents[1] / "ds_configs"
DEFAULT_DS_CONFIG = {"cuda": "zero2_bf16", "cpu": "cpu_zero2_fp32"}

@dataclass(frozen=True)
class BatchPlan:
    images_per_seq: int
    micro_images: int          # per rank per forward/backward
    accum_steps: int           # micro-steps per optimizer step
    world_size: int

    @property
    def global_images(self) -> int:
        return self.micro_images * self.accum_steps * self.world_size

    @property
    def micro_sequences(self) -> int:
        return self.micro_images // self.images_per_seq

    @property
    def global_sequences(self) -> int:
        return self.global_images // self.images_per_seq


def plan_batches(cfg: Config, world_size: int) -> BatchPlan:
    """Gradient accumulation from global = micro x accumulation x world size (exactly)."""
    n = cfg.model.images_per_seq if cfg.kind == "pretrain" else 1
    per_step = cfg.batch.micro_images * world_size
    check_world_size(cfg.batch.global_images, cfg.batch.micro_images, n, world_size)
    return BatchPlan(n, cfg.batch.micro_images, cfg.batch.global_images // per_step, world_size)


def resolve_ds_config_path(name: str, device: str) -> Path:
    if name == "auto":
        name = DEFAULT_DS_CONFIG[device]
    path = Path(name)
    if path.suffix == ".json" and path.is_file():
        return path
    candidate = DS_CONFIG_DIR / f"{name}.json"
    if candidate.is_file():
        return candidate
    available = sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))
    raise ConfigError(f"ds_config={name!r}: no such file and no {candidate}; available: {', '.join(available)}")


def build_ds_config(path: Path, plan: BatchPlan, grad_clip: float | None) -> dict:
    """Load the JSON and fill (or check) the values the typed config owns.

    ``grad_clip`` None (``optim.grad_clip: null``) or 0 is written as ``gradient_clipping: 0.0``,
    which DeepSpeed reads as no clipping; left out, DeepSpeed would clip at its default 1.0."""
    ds = json.loads(Path(path).read_text())
    owned = {
        "train_micro_batch_size_per_gpu": plan.micro_sequences,
        "gradient_accumulation_steps": plan.accum_steps,
        "train_batch_size": plan.global_sequences,
        "gradient_clipping": float(grad_clip or 0.0),
    }
    for key, value in owned.items():
        if key in ds and ds[key] != "auto" and ds[key] != value:
            raise ConfigError(f"{path} sets {key}={ds[key]!r} but the config implies {value!r}; remove it "
                              f"from the JSON (the trainer fills it from batch.* and optim.grad_clip)")
        ds[key] = value
    for mode in ("bf16", "fp16"):
        if ds.get(mode, {}).get("enabled"):
            raise ConfigError(f"{path} enables DeepSpeed `{mode}`, which casts the whole model including "
                              f"the Mamba A_log / D / dt bias; use `torch_autocast` "
                              f"({{\"enabled\": true, \"dtype\": \"bfloat16\"}}) as in star/ds_configs/zero2_bf16.json")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2):
        raise ConfigError(f"{path}: zero_optimization.stage={stage}; use 1 or 2. The trainer relies on "
                          f"ZeRO-1/2's skip of non-finite steps and on full weights on every rank (EMA)")
    ds.setdefault("zero_allow_untested_optimizer", True)  # a plain torch AdamW
    ds.setdefault("steps_per_print", 2**31 - 1)  # our logger reports; keep DeepSpeed quiet
    return ds


def autocast_dtype(ds: dict) -> torch.dtype | None:
    section = ds.get("torch_autocast", {})
    if not section.get("enabled"):
        return None
    return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
            "fp16": torch.float16}[section.get("dtype", "bfloat16")]


def keep_fp32_communication(model: torch.nn.Module) -> list[str]:
    """Drop DeepSpeed's bf16 communication tag from the Mamba-sensitive parameters."""
    from deepspeed.runtime.torch_autocast import PARAM_COMM_DTYPE_ATTR_NAME

    kept = []
    sensitive = fp32_parameter_names(model)
    for name, param in model.named_parameters():
        if name in sensitive and hasattr(param, PARAM_COMM_DTYPE_ATTR_NAME):
            delattr(param, PARAM_COMM_DTYPE_ATTR_NAME)
            kept.append(name)
    return kept


def build_engine(model: torch.nn.Module, groups: list[dict], cfg: Config, ds: dict):
    """``deepspeed.initialize`` with a torch AdamW over ``groups`` (lr is set every step)."""
    import logging

    import deepspeed

    # DeepSpeed logs every step at INFO; our logger reports what matters.
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                                  weight_decay=cfg.optim.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    if autocast_dtype(ds) is not None:
        keep_fp32_communication(engine.module)
    return engine


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def grad_norm(engine) -> float:
    value = engine.get_global_grad_norm()
    if value is None:
        return float("nan")
    return float(value.item() if torch.is_tensor(value) else value)
