"""The Mamba mixer (mamba-ssm's ``Mamba``) with 1 causal scan or 4 scans over an image grid.

Parameter names and initialisation follow mamba-ssm so official kernels and checkpoints fit:
``in_proj`` (no bias), per-direction ``conv1d`` (depthwise, bias), ``x_proj`` (no bias),
``dt_proj`` (bias = inverse softplus of dt ~ log-uniform[1e-3, 1e-1], floored at 1e-4;
weight uniform +-dt_rank**-0.5), ``A_log`` (S4D-real: log(1..d_state) per channel), ``D``
(ones), and ``out_proj`` (no bias). ``A_log`` and ``D`` carry ``_no_weight_decay = True``
(honoured only under ``optim.ssm_weight_decay: false``; ARM's default rule decays ``A_log``);
``A_log``, ``D`` and ``dt_proj.bias`` of every direction carry ``_keep_fp32 = True``
(see :func:`fp32_parameter_names`).

Four scans (fine-tuning, STAR Sec. 3.1). The directions share in_proj and out_proj; each has
its own conv1d, x_proj, dt_proj, A_log and D, named with the suffixes of the official ARM /
Vim release so its fine-tuned checkpoints load unchanged:

    direction        order of the scan                            parameter suffix
    row_forward      row-major, first token to last                (none): conv1d, A_log, D
    row_backward     row-major, last token to first                _b:   conv1d_b, A_b_log, D_b
    col_forward      column-major, first to last                   _c:   conv1d_c, A_c_log, D_c
    col_backward     column-major, last to first                   _c_b: conv1d_c_b, A_c_b_log, D_c_b

The class token is not part of the grid: it keeps its index in the sequence in every order
(the column-major order permutes only the grid tokens around it), and the backward scans
reverse the whole sequence, class token included. So a ``tail`` class token is read last by
both forward scans (it sees the whole image twice) and first by both backward scans; a
``middle`` one sits mid-sequence in all four, exactly as in ARM. The four outputs are mapped
back to sequence order, summed, divided by 4 and projected by out_proj.

The scan itself is :func:`star.ops.mamba_inner` (mamba-ssm's fused ``mamba_inner_fn`` on CUDA,
the project's pure-PyTorch path elsewhere). Like mamba-ssm, the mixer reads its sub-modules'
weights directly instead of calling them, which ZeRO-1/2 handle as usual; ZeRO-3 would need
those weights registered with ``deepspeed.zero.register_external_parameter``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from star import ops

# direction name -> parameter suffix (see the module docstring)
SCAN_DIRECTIONS: dict[str, str] = {
    "row_forward": "",
    "row_backward": "_b",
    "col_forward": "_c",
    "col_backward": "_c_b",
}

# Non-finite diagnosis (star/train/nonfinite.py) sets this to its probe while it re-runs one
# micro-batch; it is None otherwise, so training pays one `is None` test per mixer call.
STAGE_PROBE = None
PER_DIRECTION_PARAMS = ("conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
                        "dt_proj.bias", "A_log", "D")


def direction_param_name(name: str, suffix: str) -> str:
    """Name of a per-direction parameter: ("conv1d.weight", "_c") -> "conv1d_c.weight",
    ("A_log", "_c_b") -> "A_c_b_log", ("D", "_b") -> "D_b"."""
    if name == "A_log":
        return f"A{suffix}_log"
    if name == "D":
        return f"D{suffix}"
    module, attr = name.split(".")
    return f"{module}{suffix}.{attr}"


def fp32_parameter_names(model: nn.Module) -> set[str]:
    """Names of the numerically sensitive Mamba parameters of every scan direction (A_log,
    D and dt_proj bias, flagged ``_keep_fp32``): keep them, their gradients and their
    communication in float32 under bf16 training. Matching by suffix is not enough: the
    extra directions are named A_b_log, D_c, dt_proj_c_b.bias, ..."""
    return {name for name, p in model.named_parameters() if getattr(p, "_keep_fp32", False)}


@dataclass(frozen=True)
class ScanGrid:
    """Where the tokens of a sequence sit: a ``size`` x ``size`` patch grid in row-major order,
    plus an optional class token at sequence index ``cls_index`` (not part of the grid)."""

    size: int
    cls_index: int | None = None

    @property
    def seq_len(self) -> int:
        return self.size * self.size + (self.cls_index is not None)

    def column_major_order(self) -> torch.Tensor:
        """Sequence indices in the order the column-major scan reads them (cls stays put)."""
        length = self.seq_len
        grid_slots = torch.tensor([i for i in range(length) if i != self.cls_index], dtype=torch.long)
        col_major = torch.arange(self.size * self.size).reshape(self.size, self.size).t().reshape(-1)
        order = torch.arange(length)
        order[grid_slots] = grid_slots[col_major]
        return order


class Mamba(nn.Module):
    """Selective SSM mixer: (B, L, D) -> (B, L, D). ``num_scans`` is 1 (causal) or 4."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 1,
                 dt_rank: int | str = "auto", dt_min: float = 1e-3, dt_max: float = 1e-1,
                 dt_init_floor: float = 1e-4, num_scans: int = 1) -> None:
        super().__init__()
        if num_scans not in (1, 4):
            raise ValueError(f"num_scans must be 1 (causal) or 4 (row/column, both ways), got {num_scans}")
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.num_scans = num_scans
        self.directions = list(SCAN_DIRECTIONS.items())[:num_scans]

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        for _, suffix in self.directions:
            self._add_direction(suffix, dt_min, dt_max, dt_init_floor)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self._orders: dict[tuple[ScanGrid, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def _add_direction(self, suffix: str, dt_min: float, dt_max: float, floor: float) -> None:
        d_inner, dt_rank, d_state = self.d_inner, self.dt_rank, self.d_state
        conv = nn.Conv1d(d_inner, d_inner, kernel_size=self.d_conv, groups=d_inner,
                         padding=self.d_conv - 1, bias=True)
        x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        std = dt_rank**-0.5
        nn.init.uniform_(dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=floor)
        with torch.no_grad():  # inverse softplus, so softplus(bias) == dt
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        dt_proj.bias._no_reinit = True  # the model-wide "zero every bias" init skips it
        dt_proj.bias._keep_fp32 = True
        A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        A_log._no_weight_decay = A_log._keep_fp32 = True
        D = nn.Parameter(torch.ones(d_inner))
        D._no_weight_decay = D._keep_fp32 = True
        setattr(self, f"conv1d{suffix}", conv)
        setattr(self, f"x_proj{suffix}", x_proj)
        setattr(self, f"dt_proj{suffix}", dt_proj)
        setattr(self, f"A{suffix}_log", A_log)
        setattr(self, f"D{suffix}", D)

    def _scan(self, xz: torch.Tensor, suffix: str, with_out_proj: bool) -> torch.Tensor:
        """One direction over xz (B, 2*d_inner, L) already in scan order."""
        conv = getattr(self, f"conv1d{suffix}")
        dt_proj = getattr(self, f"dt_proj{suffix}")
        inner = ops.mamba_inner if STAGE_PROBE is None else STAGE_PROBE.mamba_inner  # diagnosis only
        return inner(
            xz,
            conv1d_weight=conv.weight,
            conv1d_bias=conv.bias,
            x_proj_weight=getattr(self, f"x_proj{suffix}").weight,
            delta_proj_weight=dt_proj.weight,
            out_proj_weight=self.out_proj.weight if with_out_proj else None,
            out_proj_bias=self.out_proj.bias if with_out_proj else None,
            A=-torch.exp(getattr(self, f"A{suffix}_log").float()),
            D=getattr(self, f"D{suffix}").float(),
            delta_bias=dt_proj.bias.float(),
            dt_rank=self.dt_rank,
            d_state=self.d_state,
            delta_softplus=True,
        )

    def _column_order(self, grid: ScanGrid, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(order, inverse): column-major reading order of ``grid`` and its inverse (cached)."""
        key = (grid, device)
        if key not in self._orders:
            order = grid.column_major_order().to(device)
            self._orders[key] = (order, torch.argsort(order))
        return self._orders[key]

    def forward(self, x: torch.Tensor, grid: ScanGrid | None = None) -> torch.Tensor:
        batch, length, _ = x.shape
        # (B, L, D) -> (B, 2*d_inner, L) with L contiguous, as mamba-ssm lays it out
        xz = (self.in_proj.weight @ x.reshape(batch * length, -1).t()).reshape(-1, batch, length)
        xz = xz.transpose(0, 1)
        if STAGE_PROBE is not None:  # diagnosis only (star/train/nonfinite.py)
            STAGE_PROBE.stage("in_proj", xz, [x])
        if self.num_scans == 1:
            return self._scan(xz, "", with_out_proj=True)

        if grid is None or grid.seq_len != length:
            raise ValueError(
                f"a 4-scan Mamba needs the token grid of its {length}-token input, got {grid}")
        order, inverse = self._column_order(grid, x.device)
        if self.FOUR_SCAN_OUT_PROJ_PER_DIRECTION:
            return self._four_scans_each_projected(xz, order, inverse)
        xz_col = xz.index_select(-1, order)
        out = self._scan(xz, "", False)
        out = out + self._scan(xz.flip(-1), "_b", False).flip(-1)
        out_col = self._scan(xz_col, "_c", False)
        out_col = out_col + self._scan(xz_col.flip(-1), "_c_b", False).flip(-1)
        out = out + out_col.index_select(-1, inverse)
        return F.linear((out / 4).transpose(1, 2), self.out_proj.weight, self.out_proj.bias)

    # How the 4-scan mixer maps onto the fused kernels. out_proj is linear, so
    # out_proj(mean_k y_k) == mean_k out_proj(y_k) (the mean of four equal biases is the bias):
    # the mixer is either (False, the default) four fused conv + scan calls
    # (causal_conv1d_fn, selective_scan_fn) summed in sequence order and projected once, or
    # (True) four whole mamba_inner_fn calls, each with out_proj, averaged. Per mixer, with
    # T tokens, d = d_model = d_inner (expand 1) and 2*T*d^2 FLOPs as one unit, STAR-B
    # fine-tuning (d 768, L 197):
    # * time: True runs out_proj four times: 12 GEMM units forward + backward instead of 3,
    #   +9 units on a block of 35 (in_proj 6, out_proj 3, x/dt_proj of 4 scans 2, SwiGLU 24),
    #   i.e. +26 % GEMM FLOPs per block (about 5 ms per step at batch 128 per GPU on an H100).
    # * memory: mamba_inner_fn saves xz, x_dbl and the pre-gate scan output per direction
    #   and recomputes conv and delta in backward; the separate kernels also save each
    #   direction's conv output and delta, and out_proj its input. True keeps about 8.6
    #   fewer T x d tensors per mixer: about 0.33 GB per layer in bf16 at batch 128 per GPU,
    #   4 GB for 12 layers.
    # Fine-tuning at 224 px fits comfortably in 80 GB, so time decides: False. Both are kept,
    # numerically equal (tests/test_model_mamba.py), in case a larger resolution makes
    # memory the limit.
    FOUR_SCAN_OUT_PROJ_PER_DIRECTION = False

    def _four_scans_each_projected(self, xz: torch.Tensor, order: torch.Tensor,
                                   inverse: torch.Tensor) -> torch.Tensor:
        """The 4-scan mixer as four whole inner paths, each with out_proj, averaged."""
        xz_col = xz.index_select(-1, order)
        out = self._scan(xz, "", True)  # (B, L, d_model), sequence along dim 1
        out = out + self._scan(xz.flip(-1), "_b", True).flip(1)
        out_col = self._scan(xz_col, "_c", True)
        out_col = out_col + self._scan(xz_col.flip(-1), "_c_b", True).flip(1)
        return (out + out_col.index_select(1, inverse)) / 4
