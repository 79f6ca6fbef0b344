"""Where a non-finite step came from, and which steps spiked: diagnosis, reports, loss spikes.

When the all-ranks vote of ``star.train.loop`` marks a step non-finite (a NaN/inf loss or
global grad norm; DeepSpeed skips the update), every rank re-runs the offending micro-batch
once through :func:`diagnose_micro_batch`, with a :class:`NonfiniteProbe` installed: it checks
every module's forward output and every gradient for NaN/inf and records the *first* module,
in execution order, whose forward output and whose gradient went non-finite, with the max
abs value of its input. Inside the Mamba mixer (``star.models.mamba.STAGE_PROBE``) the
forward is split into the stages in_proj, conv, x_proj/dt, scan, out_proj, so an overflow
of the selective scan is told apart from one of an MLP. (With mamba-ssm's fused
``mamba_inner_fn`` the conv, scan and out_proj are one kernel: that path reports the coarse
stage ``mamba_inner(fused)``.)

The re-run does not change training (the continuation is bit-identical to a run without
diagnosis, tests/test_train_nonfinite.py):

* it calls the model itself, not the DeepSpeed engine: no engine counters move, no ZeRO
  gradient hooks or collectives fire (they hang on ``.grad`` accumulation and
  ``torch.autograd.grad`` accumulates nothing), and parameters' ``.grad`` are never touched;
  running in place rather than on a copy costs no second set of weights on a full GPU;
* RNG states (python, numpy, torch CPU and CUDA, the task's generators such as mixup's) are
  snapshot before each micro-batch, so the re-run sees the same drop-path and mixup draws,
  and are put back afterwards; module buffers are snapshot and restored too;
* it re-uses the micro-batch the step already read: the loader's position is untouched.

The first step of a streak of non-finite steps writes ``RUN_DIR/nonfinite/step_S/report.json``
(rank 0, with every rank's findings and sample keys gathered) and prints a summary; each
following step of the streak appends one line to that directory's ``streak.jsonl``.

Loss spikes: a finite step whose loss lies more than ``log.spike_k`` standard deviations
above the mean of the previous ``log.spike_window`` finite losses (once
``log.spike_min_samples`` are there) is a warning with the step's sample keys
(``RUN_DIR/loss_spikes.jsonl``) and is counted in metrics.jsonl (``loss_spikes``). It
changes no training decision.

For ``star replay``: the report holds what it needs to find the step (``step``, ``epoch``,
``step_in_epoch`` as in metrics.jsonl, ``micro_batch``); once the replay has the model at the
step's start and the micro-batch in hand, it takes ``state = rng_snapshot(task.rng_generators)``
before each micro-batch's real forward and calls ``diagnose_micro_batch(engine.module, task.loss,
batch, amp_dtype=engine_amp_dtype(engine), loss_scale=1 / accum_steps, rng_state=state,
generators=task.rng_generators)`` for the origin; ``batch_keys(loader, batch)`` names the samples.
"""

from __future__ import annotations

import json
import math
import random
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import numpy as np
import torch
from torch import nn

from star import ops
from star.models import mamba as mamba_module
from star.ops import dispatch
from star.train.distributed import DistEnv, all_gather_objects
from star.train.metrics import truncate_jsonl

GRAD_HISTORY = 50  # steps of (loss, grad norm) kept for the report

# After a stage's output, whose backward produces the gradient w.r.t. it (the consumers).
STAGE_CONSUMERS = {"in_proj": "conv / scan gate", "conv": "x_proj/dt / scan", "x_proj/dt": "scan",
                   "scan": "out_proj", "out_proj": "after the mixer", "mamba_inner(fused)": "after the mixer"}


# ----------------------------------------------------------------------------- small helpers
def _json_float(value: float | None):
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else str(value)


def _tensors(obj) -> list[torch.Tensor]:
    """The floating-point tensors in a module's input / output (tensor, tuple, list, dict)."""
    if torch.is_tensor(obj):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in _tensors(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _tensors(item)]
    return []


def _finite(tensors: list[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _max_abs(tensors: list[torch.Tensor]) -> float | None:
    """Max |x| over the tensors (inf when any is inf, nan when one is nan; None when empty)."""
    values = [t.detach().abs().max().float().item() for t in tensors if t.numel()]
    if not values:
        return None
    if any(math.isnan(v) for v in values):
        return float("nan")
    return max(values)


def _dtype(tensors: list[torch.Tensor]) -> str | None:
    return str(tensors[0].dtype).replace("torch.", "") if tensors else None


def batch_keys(loader, batch) -> list[list[str]]:
    """[shard, key] of every image of ``batch``, from the manifest positions the batch carries
    (``pipelines.loader.Batch.indices``)."""
    shards = getattr(loader, "shards", None)
    indices = [int(i) for i in batch.indices]
    if shards is None:  # a loader without shards (tests): the manifest positions
        return [["", str(i)] for i in indices]
    return [list(shards.name(i)) for i in indices]


# ----------------------------------------------------------------------------- RNG
def rng_snapshot(generators: dict[str, torch.Generator] | None = None) -> dict:
    """Every random stream a training step draws from (drop path, mixup, augment fall-backs)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "generators": {k: g.get_state() for k, g in (generators or {}).items()}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device: the only one it draws on
    return state


def rng_restore(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    for key, gen in (generators or {}).items():
        gen.set_state(state["generators"][key])


# ----------------------------------------------------------------------------- the hook set
@dataclass
class _Origin:
    """Where something first went non-finite."""

    module: str                      # qualified module name ("" = the model itself)
    kind: str                        # forward: module | stage; backward: module | parameter | stage
    order: int                       # event number in execution order
    stage: str | None = None         # Mamba stage ("row_backward:scan") when kind == stage
    parameter: str | None = None     # kind == parameter
    input_finite: bool | None = None
    input_max_abs: float | None = None   # forward input of the module / stage
    output_dtype: str | None = None
    grad_output_finite: bool | None = None  # backward: the gradient that came in
    grad_output_max_abs: float | None = None
    produced_by: str | None = None   # backward of a stage: whose backward made the gradient

    def to_json(self) -> dict:
        out = {k: v for k, v in self.__dict__.items() if v is not None}
        for key in ("input_max_abs", "grad_output_max_abs"):
            if key in out:
                out[key] = _json_float(out[key])
        return out

    def describe(self) -> str:
        where = self.module or "<model>"
        if self.stage:
            where += f"[{self.stage}]"
        if self.parameter:
            where = f"{self.parameter} (in {where})"
        parts = [where]
        if self.input_max_abs is not None:
            parts.append(f"input max|x| {self.input_max_abs:.3g}")
        if self.grad_output_finite is False:
            parts.append("incoming gradient already non-finite")
        if self.produced_by:
            parts.append(f"made by the backward of {self.produced_by}")
        return ", ".join(parts)


class NonfiniteProbe:
    """Hooks that find the first non-finite forward output and gradient of one forward+backward.

    Use as a context manager around the forward and backward of one micro-batch; the hooks
    (and ``star.models.mamba.STAGE_PROBE``) are removed on exit. Events are numbered in the
    order they happen: forward hooks fire when a module's forward returns (innermost first),
    full backward hooks when its input gradients are ready, tensor hooks when a parameter's
    or Mamba stage output's gradient is ready.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.names = {id(m): name for name, m in model.named_modules()}
        self.mixers = {name: m for name, m in model.named_modules() if isinstance(m, mamba_module.Mamba)}
        self.param_owner = {}
        for mod_name, module in model.named_modules():
            for p_name, p in module.named_parameters(recurse=False):
                self.param_owner[id(p)] = (mod_name, f"{mod_name}.{p_name}" if mod_name else p_name)
        self.first_forward: _Origin | None = None
        self.first_backward: _Origin | None = None
        self._order = 0
        self._stack: list[str] = []
        self._input_max: dict[str, float | None] = {}
        self._scan_calls: dict[str, int] = {}
        self._handles: list = []

    # ----- install / remove
    def __enter__(self) -> Self:
        for module in self.model.modules():
            self._handles.append(module.register_forward_pre_hook(self._pre_hook))
            self._handles.append(module.register_forward_hook(self._forward_hook))
            self._handles.append(module.register_full_backward_hook(self._backward_hook))
        for p in self.model.parameters():
            if p.requires_grad:
                self._handles.append(p.register_hook(self._param_hook(id(p))))
        self._previous_probe = mamba_module.STAGE_PROBE
        mamba_module.STAGE_PROBE = self
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        mamba_module.STAGE_PROBE = self._previous_probe

    def _next(self) -> int:
        self._order += 1
        return self._order

    # ----- module hooks
    def _pre_hook(self, module, args):
        name = self.names.get(id(module), "?")
        self._stack.append(name)
        if isinstance(module, mamba_module.Mamba):
            self._scan_calls[name] = 0

    def _forward_hook(self, module, args, output):
        name = self._stack.pop() if self._stack else self.names.get(id(module), "?")
        inputs, outputs = _tensors(args), _tensors(output)
        self._input_max[name] = _max_abs(inputs)
        order = self._next()
        if self.first_forward is None and not _finite(outputs):
            stage = "out_proj" if isinstance(module, mamba_module.Mamba) and module.num_scans == 4 else None
            self.first_forward = _Origin(name, "stage" if stage else "module", order, stage=stage,
                                         input_finite=_finite(inputs), input_max_abs=self._input_max[name],
                                         output_dtype=_dtype(outputs))

    def _backward_hook(self, module, grad_input, grad_output):
        order = self._next()
        if self.first_backward is not None:
            return
        produced = _tensors(list(grad_input))
        if produced and not _finite(produced):
            name = self.names.get(id(module), "?")
            incoming = _tensors(list(grad_output))
            self.first_backward = _Origin(name, "module", order, input_max_abs=self._input_max.get(name),
                                          grad_output_finite=_finite(incoming),
                                          grad_output_max_abs=_max_abs(incoming))
        return

    def _param_hook(self, key: int):
        def hook(grad):
            order = self._next()
            if self.first_backward is None and not bool(torch.isfinite(grad).all()):
                module, param = self.param_owner.get(key, ("?", "?"))
                self.first_backward = _Origin(module, "parameter", order, parameter=param,
                                              input_max_abs=self._input_max.get(module))
        return hook

    # ----- Mamba stages (star.models.mamba calls these while STAGE_PROBE is this probe)
    def _current_stage_name(self, stage: str) -> tuple[str, str]:
        mixer = self._stack[-1] if self._stack else "?"
        calls = self._scan_calls.get(mixer, 0)
        module = self.mixers.get(mixer)
        if stage != "in_proj" and module is not None and module.num_scans == 4:
            direction = list(mamba_module.SCAN_DIRECTIONS)[min(calls, 3)]
            stage = f"{direction}:{stage}"
        return mixer, stage

    def stage(self, stage: str, outputs: torch.Tensor | list[torch.Tensor], inputs: list[torch.Tensor]) -> None:
        """One stage of the current mixer produced ``outputs`` from ``inputs``: check them, and
        watch the gradients that come back to the outputs."""
        outputs = [outputs] if torch.is_tensor(outputs) else list(outputs)
        mixer, label = self._current_stage_name(stage)
        order = self._next()
        input_max = _max_abs(inputs)
        if self.first_forward is None and not _finite(outputs):
            self.first_forward = _Origin(mixer, "stage", order, stage=label, input_finite=_finite(inputs),
                                         input_max_abs=input_max, output_dtype=_dtype(outputs))
        base = label.rpartition(":")[2]

        def hook(grad):
            o = self._next()
            if self.first_backward is None and not bool(torch.isfinite(grad).all()):
                self.first_backward = _Origin(mixer, "stage", o, stage=label, input_max_abs=input_max,
                                              produced_by=STAGE_CONSUMERS.get(base))
        for out in outputs:
            if out.requires_grad:
                out.register_hook(hook)

    def mamba_inner(self, xz, conv1d_weight, conv1d_bias, x_proj_weight, delta_proj_weight,
                    out_proj_weight, out_proj_bias, A, D, delta_bias, dt_rank, d_state, delta_softplus=True):
        """``star.ops.mamba_inner`` with a probe after each stage: the same kernels the dispatch
        picks (``dispatch._compose_inner`` with probing wrappers), so the numbers are the
        training run's; the fused mamba_inner_fn is called as is (coarse stage)."""
        mixer = self._stack[-1] if self._stack else "?"
        kwargs = {"conv1d_weight": conv1d_weight, "conv1d_bias": conv1d_bias, "x_proj_weight": x_proj_weight,
                  "delta_proj_weight": delta_proj_weight, "out_proj_weight": out_proj_weight,
                  "out_proj_bias": out_proj_bias, "A": A, "D": D, "delta_bias": delta_bias, "dt_rank": dt_rank,
                  "d_state": d_state, "delta_softplus": delta_softplus}
        fused = ops.kernel_backend_for(xz, "mamba_inner") == "cuda"
        if fused and out_proj_weight is not None:
            out = ops.mamba_inner(xz, **kwargs)
            self.stage("mamba_inner(fused)", out, [xz])
        else:  # conv and scan each take their own path, as in star.ops.mamba_inner
            conv_fn, scan_fn = ops.causal_conv1d, ops.selective_scan

            def conv(x, weight, bias=None, activation=None):
                out = conv_fn(x, weight, bias, activation)
                self.stage("conv", out, [x])
                return out

            scanned: list[torch.Tensor] = []

            def scan(u, delta, A_, B, C, D_=None, z=None, delta_bias=None, delta_softplus=False):
                # x_proj/dt: delta (before its bias and softplus, added in the scan), B and C
                self.stage("x_proj/dt", [delta, B, C], [u])
                y = scan_fn(u, delta, A_, B, C, D_, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus)
                self.stage("scan", y, [u, delta, B, C] + ([z] if z is not None else []))
                scanned.append(y)
                return y

            out = dispatch._compose_inner(xz, conv_fn=conv, scan_fn=scan, **kwargs)
            if out_proj_weight is not None:
                self.stage("out_proj", out, scanned)
        self._scan_calls[mixer] = self._scan_calls.get(mixer, 0) + 1
        return out

    def result(self) -> dict:
        return {"first_forward": self.first_forward.to_json() if self.first_forward else None,
                "first_backward": self.first_backward.to_json() if self.first_backward else None}


# ----------------------------------------------------------------------------- one re-run
class _ModuleCaller:
    """Stands in for the DeepSpeed engine in ``task.loss(engine, batch)``: calls the module
    under the engine's autocast, without the engine's counters and gradient hooks."""

    def __init__(self, module: nn.Module, device_type: str, amp_dtype: torch.dtype | None) -> None:
        self.module, self.device_type, self.amp_dtype = module, device_type, amp_dtype

    def __call__(self, *args, **kwargs):
        if self.amp_dtype is None:
            return self.module(*args, **kwargs)
        with torch.autocast(device_type=self.device_type, dtype=self.amp_dtype):
            return self.module(*args, **kwargs)


def engine_amp_dtype(engine) -> torch.dtype | None:
    """The autocast dtype of DeepSpeed's ``torch_autocast`` mode (None when off)."""
    enabled = getattr(engine, "torch_autocast_enabled", None)
    if enabled is None or not enabled():
        return None
    return engine.torch_autocast_dtype()


@contextmanager
def _buffers_kept(module: nn.Module) -> Iterator[None]:
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


def diagnose_micro_batch(module: nn.Module, loss_fn: Callable, batch, *, amp_dtype: torch.dtype | None,
                         loss_scale: float = 1.0, rng_state: dict | None = None,
                         generators: dict[str, torch.Generator] | None = None) -> dict:
    """Forward + backward of one micro-batch with a :class:`NonfiniteProbe`; training state
    is left exactly as it was (RNG, buffers, ``.grad``, the engine).

    ``loss_fn(engine_like, batch)`` is the task's loss (``Task.loss``); ``rng_state`` (from
    :func:`rng_snapshot` taken before the micro-batch's real forward) replays its random draws;
    ``loss_scale`` is the engine's 1/accumulation so gradients are those of the real step.
    Returns the probe's findings, the loss, the gradient norm and the non-finite parameters.
    """
    generators = generators or {}
    after = rng_snapshot(generators)
    images = getattr(batch, "images", None)
    device_type = images.device.type if torch.is_tensor(images) else "cpu"
    params = [p for p in module.parameters() if p.requires_grad]
    names = {id(p): n for n, p in module.named_parameters()}
    try:
        if rng_state is not None:
            rng_restore(rng_state, generators)
        with _buffers_kept(module), NonfiniteProbe(module) as probe, warnings.catch_warnings():
            # expected here: the first module's images need no gradient, the model returns a dict
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            warnings.filterwarnings("ignore", message="For backward hooks to be called")
            loss = loss_fn(_ModuleCaller(module, device_type, amp_dtype), batch)
            grads = torch.autograd.grad(loss * loss_scale, params, allow_unused=True)
    finally:
        rng_restore(after, generators)
    bad = [names[id(p)] for p, g in zip(params, grads) if g is not None and not bool(torch.isfinite(g).all())]
    norms = [g.detach().float().norm() for g in grads if g is not None]
    norm = float(torch.stack(norms).norm()) if norms else 0.0
    return {**probe.result(), "loss": float(loss.detach().float()), "grad_norm": norm,
            "nonfinite_params": bad[:20], "num_nonfinite_params": len(bad),
            "nonfinite": not math.isfinite(float(loss.detach().float())) or bool(bad)}


# ----------------------------------------------------------------------------- loss spikes
class SpikeDetector:
    """loss > mean + k * std of the previous ``window`` finite losses (population std), once
    ``min_samples`` are there. Flagged losses stay in the window: a lasting level shift stops
    being flagged after a while instead of forever."""

    def __init__(self, k: float, window: int, min_samples: int) -> None:
        self.k, self.min_samples = k, min_samples
        self.values: deque[float] = deque(maxlen=window)

    def update(self, loss: float) -> tuple[bool, float, float]:
        """(is_spike, mean, std) of ``loss`` against the window before it; then add it."""
        spike, mean, std = False, float("nan"), float("nan")
        if len(self.values) >= self.min_samples:
            arr = np.asarray(self.values, dtype=np.float64)
            mean, std = float(arr.mean()), float(arr.std())
            spike = loss > mean + self.k * std
        self.values.append(loss)
        return spike, mean, std


# ----------------------------------------------------------------------------- the loop's side
@dataclass
class _Micro:
    batch: object
    keys: list
    rng: dict | None


@dataclass
class StepWatch:
    """What ``star.train.loop.Trainer`` calls: ``start_step`` / ``micro_batch`` before each
    forward, ``after_step`` once the all-ranks vote is known. Holds the step's micro-batches
    only while ``log.diagnose_nonfinite`` is on (their images stay alive until the step ends)."""

    run_dir: Path
    dist_env: DistEnv
    loader: object
    diagnose: bool
    spike_k: float
    spike_window: int
    spike_min_samples: int
    generators: dict = field(default_factory=dict)
    info: Callable[[str], None] = print
    history: deque = field(default_factory=lambda: deque(maxlen=GRAD_HISTORY))
    _micros: list = field(default_factory=list)

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.spikes = SpikeDetector(self.spike_k, self.spike_window, self.spike_min_samples)

    @classmethod
    def from_config(cls, cfg, run_dir, dist_env, loader, generators, info,
                    resume_step: int | None = None) -> StepWatch:
        """The loop's watch; a resumed run (``resume_step``) first cuts the spike and streak logs
        back to that step, as RunLogger does with metrics.jsonl, so each step appears once. The
        spike window starts empty again (``spike_min_samples`` steps before the first check)."""
        if resume_step is not None and dist_env.is_main:
            run_dir = Path(run_dir)
            for path in [run_dir / "loss_spikes.jsonl", *run_dir.glob("nonfinite/step_*/streak.jsonl")]:
                truncate_jsonl(path, resume_step)
        return cls(run_dir, dist_env, loader, cfg.log.diagnose_nonfinite, cfg.log.spike_k,
                   cfg.log.spike_window, cfg.log.spike_min_samples, generators=generators, info=info)

    def start_step(self) -> None:
        self._micros = []

    def micro_batch(self, batch) -> None:
        """Before the micro-batch's forward: its keys and (diagnosis on) the RNG it will draw from."""
        self._micros.append(_Micro(batch if self.diagnose else None, batch_keys(self.loader, batch),
                                   rng_snapshot(self.generators) if self.diagnose else None))

    def after_step(self, *, step: int, epoch: int, step_in_epoch: int, skipped: bool, nonfinite_in_row: int,
                   losses: list[float], loss: float, lr: float, norm: float, engine, task) -> dict:
        """Diagnose / report a non-finite step, or check a finite one for a loss spike.
        Every rank calls this (it gathers). Returns {"loss_spike": bool} for the metrics."""
        self.history.append({"step": step, "loss": _json_float(loss), "grad_norm": _json_float(norm)})
        spike = False
        if skipped:
            self._nonfinite(step, epoch, step_in_epoch, nonfinite_in_row, losses, loss, lr, norm, engine, task)
        elif math.isfinite(loss):
            spike, mean, std = self.spikes.update(loss)
            if spike:
                self._spike(step, loss, mean, std, losses)
        self._micros = []
        return {"loss_spike": spike}

    # ----- loss spikes
    def _spike(self, step: int, loss: float, mean: float, std: float, losses: list[float]) -> None:
        gathered = all_gather_objects({"keys": [m.keys for m in self._micros], "micro_losses": losses})
        if not self.dist_env.is_main:
            return
        keys = [k for g in gathered for micro in g["keys"] for k in micro]
        record = {"step": step, "loss": loss, "window_mean": mean, "window_std": std, "k": self.spike_k,
                  "micro_losses": [g["micro_losses"] for g in gathered],
                  "keys": [g["keys"] for g in gathered]}  # [rank][micro-batch][image] = [shard, key]
        with open(self.run_dir / "loss_spikes.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        shown = ", ".join(f"{s}:{k}" for s, k in keys[:4])
        self.info(f"[yellow]warning: loss spike at step {step}: {loss:.4f} > mean {mean:.4f} + "
                  f"{self.spike_k:g} x std {std:.4f} (last {len(self.spikes.values) - 1} steps); samples "
                  f"{shown}{' ...' if len(keys) > 4 else ''} ({len(keys)} in all, {self.run_dir / 'loss_spikes.jsonl'})"
                  f"[/yellow]")

    # ----- non-finite steps
    def _nonfinite(self, step, epoch, step_in_epoch, nonfinite_in_row, losses, loss, lr, norm, engine, task):
        local_bad = [i for i, v in enumerate(losses) if not math.isfinite(v)]
        first_of_streak = nonfinite_in_row == 1
        if not self.diagnose:
            return
        streak_dir = self.run_dir / "nonfinite" / f"step_{step - nonfinite_in_row + 1}"
        if not first_of_streak:  # one line per following step of the streak
            # keys of the micro-batches with a non-finite loss (all of them when only gradients were)
            shown = local_bad or list(range(len(self._micros)))
            gathered = all_gather_objects({"rank": self.dist_env.rank, "micro_losses": losses,
                                           "micro_batches": shown, "keys": [self._micros[i].keys for i in shown]})
            if self.dist_env.is_main:
                streak_dir.mkdir(parents=True, exist_ok=True)
                line = {"step": step, "loss": _json_float(loss), "grad_norm": _json_float(norm), "lr": lr,
                        "ranks": [{**g, "micro_losses": [_json_float(v) for v in g["micro_losses"]]}
                                  for g in gathered]}
                with open(streak_dir / "streak.jsonl", "a") as fh:
                    fh.write(json.dumps(line) + "\n")
                self.info(f"[red]non-finite step {step}[/red] ({nonfinite_in_row} in a row; see {streak_dir})")
            return
        try:
            local = self._diagnose_local(losses, engine, task)
        except RuntimeError as exc:  # a failed diagnosis (out of memory, ...) must not end the run
            local = {"rank": self.dist_env.rank, "micro_batch": None, "error": f"{type(exc).__name__}: {exc}",
                     "micro_losses": [_json_float(v) for v in losses], "keys": [m.keys for m in self._micros],
                     "rerun": None, "reruns": 0}
        gathered = all_gather_objects(local)
        if not self.dist_env.is_main:
            return
        self._write_report(streak_dir, gathered, step=step, epoch=epoch, step_in_epoch=step_in_epoch,
                           loss=loss, lr=lr, norm=norm, engine=engine)

    def _diagnose_local(self, losses: list[float], engine, task) -> dict:
        """This rank's findings: re-run the first micro-batch with a non-finite loss, or else
        each micro-batch until one has non-finite gradients."""
        module = engine.module
        amp = engine_amp_dtype(engine)
        gas = engine.gradient_accumulation_steps() if hasattr(engine, "gradient_accumulation_steps") else 1
        bad = [i for i, v in enumerate(losses) if not math.isfinite(v)]
        order = bad[:1] or list(range(len(self._micros)))
        found, results = None, {}
        for i in order:
            micro = self._micros[i]
            result = diagnose_micro_batch(module, task.loss, micro.batch, amp_dtype=amp, loss_scale=1.0 / gas,
                                          rng_state=micro.rng, generators=self.generators)
            result["loss_matches_step"] = (result["loss"] == losses[i]) or (
                math.isnan(result["loss"]) and math.isnan(losses[i]))
            result["loss"] = _json_float(result["loss"])
            result["grad_norm"] = _json_float(result["grad_norm"])
            results[i] = result
            if result["nonfinite"]:
                found = i
                break
        return {"rank": self.dist_env.rank, "micro_batch": found, "micro_losses": [_json_float(v) for v in losses],
                "keys": [m.keys for m in self._micros], "rerun": results.get(found) if found is not None else
                (results.get(order[0]) if order else None), "reruns": len(results)}

    def _write_report(self, out_dir: Path, gathered: list[dict], *, step, epoch, step_in_epoch, loss, lr, norm,
                      engine) -> None:
        found = [g for g in gathered if g["micro_batch"] is not None]
        micro = min((g["micro_batch"] for g in found), default=0)
        origin = next((g for g in found if g["micro_batch"] == micro), None)
        sample = next(iter(engine.module.parameters()), None)
        amp = engine_amp_dtype(engine)
        report = {
            "step": step, "epoch": epoch, "step_in_epoch": step_in_epoch,
            "rank": origin["rank"] if origin else None,
            "micro_batch": micro,
            "keys": {str(g["rank"]): g["keys"][micro] if micro < len(g["keys"]) else [] for g in gathered},
            "first_nonfinite_forward": origin["rerun"]["first_forward"] if origin else None,
            "first_nonfinite_backward": origin["rerun"]["first_backward"] if origin else None,
            "note": _note(origin),
            "loss": _json_float(loss), "lr": lr, "grad_norm": _json_float(norm),
            "grad_norm_history": list(self.history),
            "dtype_path": {
                "autocast": str(amp).replace("torch.", "") if amp is not None else None,
                "param_dtype": str(sample.dtype).replace("torch.", "") if sample is not None else None,
                "kernel_path": ops.kernel_backend_for(sample) if sample is not None else None,
                "kernels": ops.describe_kernels(),
            },
            "ranks": [{k: v for k, v in g.items() if k != "keys"} for g in gathered],
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "report.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        tmp.replace(path)
        self.info(summary(report, path))


def _note(origin: dict | None) -> str:
    if origin is None:
        return ("no rank reproduced a non-finite value in a re-run: a non-deterministic kernel, "
                "or the gradient all-reduce; replay the step with `star replay`")
    rerun = origin["rerun"]
    if rerun["first_forward"]:
        return ("the forward went non-finite first: the backward's non-finite values follow from it; "
                "look at first_nonfinite_forward")
    return "the forward stayed finite: the backward is where it went non-finite"


def summary(report: dict, path: Path | str) -> str:
    """A few lines for the console from a report."""

    def origin(entry: dict | None) -> str:
        if not entry:
            return "none (finite in the re-run)"
        return _Origin(**{**entry, "input_max_abs": _float(entry.get("input_max_abs")),
                          "grad_output_max_abs": _float(entry.get("grad_output_max_abs"))}).describe()

    keys = report["keys"].get(str(report["rank"]), []) if report["rank"] is not None else []
    shown = ", ".join(f"{s}:{k}" for s, k in keys[:4]) + (" ..." if len(keys) > 4 else "")
    dtype = report["dtype_path"]
    return (f"[red]non-finite step {report['step']}[/red] (loss {report['loss']}, grad norm {report['grad_norm']}, "
            f"lr {report['lr']:.3e}; autocast {dtype['autocast'] or 'off'}, kernels {dtype['kernel_path']})\n"
            f"  first non-finite forward : {origin(report['first_nonfinite_forward'])}\n"
            f"  first non-finite backward: {origin(report['first_nonfinite_backward'])}\n"
            f"  {report['note']}\n"
            f"  rank {report['rank']} micro-batch {report['micro_batch']}: {shown}\n"
            f"  report: {path}")


def _float(value) -> float | None:
    return None if value is None else float(value)


# ----------------------------------------------------------------------------- tests only
def inject_nonfinite(model: nn.Module, module_name: str, micro_batches: set[int], *, phase: str = "forward",
                     value: float = float("inf")):
    """FOR TESTS: make ``module_name`` emit ``value`` at the chosen micro-batches (0-based count
    of distinct training inputs to ``model``; a re-run of one of the last 64 input tensors
    keeps its number, so a diagnosis re-run sees the fault again). ``phase="forward"`` puts it in the
    module's output, ``"backward"`` in the gradient of the module's first parameter. Returns
    the hook handles (``.remove()`` them to undo)."""
    target = dict(model.named_modules())[module_name]
    state = {"count": -1, "next": 0}
    seen: deque = deque(maxlen=64)  # (input, its number) of recent calls, kept alive for `is`

    def count(_module, args):
        first = args[0] if args else None
        number = next((n for t, n in seen if t is first), None)
        if number is None:
            number = state["next"]
            state["next"] += 1
            seen.append((first, number))
        state["count"] = number

    def bump(t: torch.Tensor) -> torch.Tensor:
        extra = torch.zeros_like(t)
        extra.view(-1)[0] = value
        return t + extra

    handles = [model.register_forward_pre_hook(count)]
    if phase == "forward":
        handles.append(target.register_forward_hook(
            lambda _m, _a, out: bump(out) if state["count"] in micro_batches else None))
    elif phase == "backward":
        param = next(target.parameters())
        armed = {"on": False}
        handles.append(target.register_forward_pre_hook(
            lambda _m, _a: armed.__setitem__("on", state["count"] in micro_batches)))
        handles.append(param.register_hook(lambda g: bump(g) if armed["on"] else None))
    else:
        raise ValueError(f"phase {phase!r}: 'forward' or 'backward'")
    return handles
