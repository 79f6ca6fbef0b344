"""Benchmark of the pure-PyTorch selective scan against the sequential reference (CPU).

Prints forward, backward and total seconds (median of --repeats) of ``selective_scan_torch``
at one STAR-B scan (batch 2, d_inner 768, d_state 16, length 1280, float32; --lengths for a
sweep), the same for the sequential ``selective_scan_reference`` with autograd, the speed-up,
and the largest relative error of the float32 torch path against the float64 reference, for
the output and the gradient of every input. A mambapy-style parallel scan (written here from
the algorithm: materialised decays padded to a power of two, up/down-sweep, reverse sweep for
backward) is timed alongside, in the same run, as the best-known pure-PyTorch alternative.

The reference's backward grows at least quadratically with the length (its Python loop's
slices each write a full-size gradient), so it is timed at doubling lengths and stopped before
one run is predicted to exceed --ref-budget seconds; the speed-up is then taken at the longest
length the reference was measured at, with the torch path measured there too. All figures are
measured, never extrapolated.

The chunked scan runs a few hundred small multi-threaded ops per call. When other processes
hold the cores (the load average is printed), OpenMP's default spin-waiting makes every one of
them slow (see bench/results/README.md on loaded machines); run with
``OMP_WAIT_POLICY=PASSIVE`` (must be set before torch starts) or ``--threads 1`` there, and
compare runs only at similar load and policy. This script therefore defaults the policy to
PASSIVE; set OMP_WAIT_POLICY yourself (e.g. ACTIVE) to measure another one.

    python bench/bench_scan.py [--lengths 1280 640] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning, unless the caller chose otherwise: on a shared
# machine spinning workers steal the cores the working thread needs, and the figures would
# measure the scheduler rather than the scans. Printed in the header and the JSON.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402  (after the OpenMP setting, which is read when torch loads)
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install

from star.ops.reference import selective_scan_reference  # noqa: E402
from star.ops.selective_scan import DEFAULT_CHUNK, selective_scan_torch  # noqa: E402

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


class _BlellochScan(torch.autograd.Function):
    """h_t = a_t h_{t-1} + x_t over dim 1 of (batch, L, dim, N), L a power of two, by an
    in-place up-sweep / down-sweep (work-efficient parallel scan), backward by the same scan
    run in reverse on the adjoint. The mambapy-style baseline: written here from the
    algorithm, not copied."""

    @staticmethod
    def sweep(a: torch.Tensor, x: torch.Tensor) -> None:
        length = x.shape[1]
        levels = length.bit_length() - 1
        assert 1 << levels == length, "length must be a power of two"
        batch, rest = x.shape[0], x.shape[2:]
        for k in range(levels):  # up-sweep: block ends accumulate their block
            s = 1 << k
            av = a.view(batch, length // (2 * s), 2 * s, *rest)
            xv = x.view(batch, length // (2 * s), 2 * s, *rest)
            xv[:, :, 2 * s - 1].addcmul_(av[:, :, 2 * s - 1], xv[:, :, s - 1])
            av[:, :, 2 * s - 1].mul_(av[:, :, s - 1])
        for k in range(levels - 2, -1, -1):  # down-sweep: mid-block ends get their prefix
            s = 1 << k
            av = a.view(batch, length // (2 * s), 2 * s, *rest)
            xv = x.view(batch, length // (2 * s), 2 * s, *rest)
            xv[:, 1:, s - 1].addcmul_(av[:, 1:, s - 1], xv[:, :-1, 2 * s - 1])

    @staticmethod
    def forward(ctx, a, x):
        h = x.clone()
        _BlellochScan.sweep(a.clone(), h)
        ctx.save_for_backward(a, h)
        return h

    @staticmethod
    def backward(ctx, dh):
        a, h = ctx.saved_tensors
        # g_t = dh_t + a_{t+1} g_{t+1}: a forward scan of the time-reversed sequence.
        a_next = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], 1).flip(1)
        g = dh.flip(1).contiguous()
        _BlellochScan.sweep(a_next.contiguous(), g)
        g = g.flip(1)
        da = g * torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], 1)
        return da, g


def pscan_baseline(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True):
    """A mambapy-style selective scan: (batch, L, dim) layout, materialised (batch, L, dim, N)
    decays and inputs padded to a power-of-two length, parallel scan, autograd for the rest.
    Takes the same (batch, dim, L) inputs as the others; they are transposed outside the timer
    by ``timed`` so that the baseline pays no layout tax."""
    length = u.shape[1]
    padded = 1 << max(length - 1, 0).bit_length()
    delta = delta + delta_bias
    delta = F.softplus(delta, threshold=20.0) if delta_softplus else delta
    decay = torch.exp(delta.unsqueeze(-1) * A)  # (batch, L, dim, N)
    inp = (delta * u).unsqueeze(-1) * B.unsqueeze(2)
    if padded != length:
        pad = (0, 0, 0, 0, 0, padded - length)
        decay, inp = F.pad(decay, pad), F.pad(inp, pad)
    h = _BlellochScan.apply(decay, inp)[:, :length]
    y = (h @ C.unsqueeze(-1)).squeeze(-1) + D * u
    return y * F.silu(z)


def make_inputs(batch, dim, nstate, length, dtype, seed=0):
    """Inputs shaped and scaled like a freshly initialised Mamba layer's scan."""
    g = torch.Generator().manual_seed(seed)
    dt_init = torch.exp(torch.rand(dim, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    x = {
        "u": torch.randn(batch, dim, length, generator=g),
        "delta": torch.randn(batch, dim, length, generator=g) * 0.5,
        "A": -torch.arange(1, nstate + 1, dtype=torch.float32).repeat(dim, 1),  # -exp(A_log) at init
        "B": torch.randn(batch, nstate, length, generator=g),
        "C": torch.randn(batch, nstate, length, generator=g),
        "D": torch.ones(dim),
        "z": torch.randn(batch, dim, length, generator=g),
        "delta_bias": dt_init + torch.log(-torch.expm1(-dt_init)),  # inverse softplus
    }
    return {k: v.to(dtype).requires_grad_() for k, v in x.items()}


def to_time_major(inputs):
    """(batch, dim, L) / (batch, N, L) -> (batch, L, dim) / (batch, L, N) leaves, for the baseline."""
    return {k: (v.detach().transpose(1, 2).contiguous() if v.dim() == 3 else v.detach()).requires_grad_()
            for k, v in inputs.items()}


def forward_backward(fn, inputs, cotangent, time_major=False):
    """Seconds of forward and backward, plus the output and gradients in (batch, dim, L) layout."""
    if time_major:
        inputs, cotangent = to_time_major(inputs), cotangent.transpose(1, 2).contiguous()
    t0 = time.perf_counter()
    out = fn(*(inputs[k] for k in NAMES), delta_softplus=True)
    t1 = time.perf_counter()
    grads = torch.autograd.grad(out, [inputs[k] for k in NAMES], cotangent.to(out.dtype))
    t2 = time.perf_counter()
    if time_major:
        out = out.transpose(1, 2)
        grads = [g.transpose(1, 2) if g.dim() == 3 else g for g in grads]
    return t1 - t0, t2 - t1, out.detach(), dict(zip(NAMES, grads))


def timed(fn, batch, dim, nstate, length, repeats, time_major=False):
    inputs = make_inputs(batch, dim, nstate, length, torch.float32)
    cot = torch.randn(batch, dim, length, generator=torch.Generator().manual_seed(1))
    fwd, bwd = [], []
    for _ in range(repeats):
        f, b, _, _ = forward_backward(fn, inputs, cot, time_major)
        fwd.append(f)
        bwd.append(b)
    return {"length": length, "forward_s": statistics.median(fwd), "backward_s": statistics.median(bwd),
            "total_s": statistics.median(f + b for f, b in zip(fwd, bwd)), "repeats": repeats}


def relative_errors(batch, dim, nstate, length, paths):
    """For each (name, fn, time_major) path: max |fp32 path - fp64 reference| / max |fp64
    reference|, for the output and every gradient. The reference runs once."""
    x64 = make_inputs(batch, dim, nstate, length, torch.float64)
    cot = torch.randn(batch, dim, length, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _, _, ref_out, ref_grads = forward_backward(selective_scan_reference, x64, cot)

    def rel(a, r):
        return ((a.double() - r).abs().max() / r.abs().max()).item()

    result = {}
    for name, fn, time_major in paths:
        x32 = {k: v.detach().float().requires_grad_() for k, v in x64.items()}
        _, _, out, grads = forward_backward(fn, x32, cot, time_major)
        errors = {"out": rel(out, ref_out)}
        errors.update({f"grad_{k}": rel(grads[k], ref_grads[k]) for k in NAMES})
        result[name] = errors
    return result


def output_error_full_length(batch, dim, nstate, length):
    """Forward-only error at the full length (the reference forward is affordable there)."""
    x64 = {k: v.detach() for k, v in make_inputs(batch, dim, nstate, length, torch.float64).items()}
    with torch.no_grad():
        ref = selective_scan_reference(*(x64[k] for k in NAMES), delta_softplus=True)
        out = selective_scan_torch(*(x64[k].float() for k in NAMES), delta_softplus=True)
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


def parse_args(argv):
    p = argparse.ArgumentParser(prog="bench_scan.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=2, help="batch size (default 2: one STAR-B micro-batch)")
    p.add_argument("--dim", type=int, default=768, help="d_inner, channels of the scan (default 768)")
    p.add_argument("--nstate", type=int, default=16, help="d_state, N (default 16)")
    p.add_argument("--lengths", type=int, nargs="+", default=[1280],
                   help="sequence lengths to time the torch path at (default 1280 = 8 images x 160)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per figure; the median is shown")
    p.add_argument("--threads", type=int, default=2,
                   help="torch intra-op threads (default 2; try 1 on a loaded machine)")
    p.add_argument("--ref-budget", type=float, default=120.0,
                   help="seconds one reference forward+backward may take before longer lengths are skipped")
    p.add_argument("--ref-start", type=int, default=80,
                   help="first length the reference is timed at; doubled up to max(--lengths)")
    p.add_argument("--no-baseline", action="store_true", help="skip the mambapy-style parallel-scan baseline")
    p.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    args = p.parse_args(argv)
    for name in ("batch", "dim", "nstate", "repeats", "threads", "ref_start"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.lengths) < 1:
        p.error(f"--lengths must be >= 1, got {args.lengths}")
    return args


def fmt_row(name, r):
    return (f"{name:36s} {r['length']:6d} {r['forward_s']:10.3f} {r['backward_s']:11.3f} "
            f"{r['total_s']:9.3f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = (args.batch, args.dim, args.nstate)
    lengths = sorted(set(args.lengths))
    target = lengths[-1]
    print(f"selective scan, batch {args.batch}, d_inner {args.dim}, d_state {args.nstate}, float32, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, chunk {DEFAULT_CHUNK}, "
          f"median of {args.repeats}", flush=True)
    # Parallel regions stall when other processes hold the cores: say how busy the machine is,
    # and whether OpenMP's idle threads spin (default) or sleep (OMP_WAIT_POLICY=PASSIVE).
    print(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}", flush=True)

    timed(selective_scan_torch, *shape, lengths[0], 1)  # warm-up
    rows = {"torch": [], "pscan": [], "reference": []}
    for L in lengths:  # ours and the baseline alternate, so both see the same machine load
        rows["torch"].append(timed(selective_scan_torch, *shape, L, args.repeats))
        if not args.no_baseline:
            rows["pscan"].append(timed(pscan_baseline, *shape, L, args.repeats, time_major=True))
        print(f"  L={L}: torch {rows['torch'][-1]['total_s']:.3f} s"
              + ("" if args.no_baseline else f", pscan baseline {rows['pscan'][-1]['total_s']:.3f} s"), flush=True)

    # The reference at doubling lengths, while one run fits in the budget.
    length = args.ref_start
    while True:
        length = min(length, target)
        rows["reference"].append(timed(selective_scan_reference, *shape, length, 1))
        print(f"  reference at L={length}: {rows['reference'][-1]['total_s']:.2f} s", flush=True)
        # Its backward grows at least quadratically: predict the next run from the growth seen
        # so far (at least 4x per doubling) and stop before one would blow the budget.
        last = rows["reference"][-1]["total_s"]
        growth = max(4.0, last / rows["reference"][-2]["total_s"]) if len(rows["reference"]) > 1 else 4.0
        if length >= target or last * growth > args.ref_budget:
            break
        length *= 2
    ref = rows["reference"][-1]
    ours_at_ref = next((r for r in rows["torch"] if r["length"] == ref["length"]), None)
    if ours_at_ref is None:
        ours_at_ref = timed(selective_scan_torch, *shape, ref["length"], args.repeats)
        rows["torch"].append(ours_at_ref)

    load_end = os.getloadavg()[0]
    paths = [("torch", selective_scan_torch, False)]
    if not args.no_baseline:
        paths.append(("pscan", pscan_baseline, True))
    all_errors = relative_errors(*shape, ref["length"], paths)
    errors, base_errors = all_errors["torch"], all_errors.get("pscan")
    out_err_full = output_error_full_length(*shape, target)

    print(f"load average after timing: {load_end:.2f}")
    print()
    print(f"{'path':36s} {'L':>6s} {'forward s':>10s} {'backward s':>11s} {'total s':>9s}")
    for r in sorted(rows["torch"], key=lambda r: r["length"]):
        print(fmt_row("torch chunked scan (ours)", r))
    for r in rows["pscan"]:
        print(fmt_row("mambapy-style pscan (baseline)", r))
    for r in rows["reference"]:
        print(fmt_row("sequential reference, autograd", r))
    print()
    speedups = {"reference": {"length": ref["length"], "total": ref["total_s"] / ours_at_ref["total_s"]}}
    note = "" if ref["length"] == target else f"  (reference too slow beyond L={ref['length']}; not extrapolated)"
    print(f"speed-up vs sequential reference, fwd+bwd, L={ref['length']}: "
          f"{speedups['reference']['total']:.1f}x{note}")
    for ours, base in zip(rows["torch"], rows["pscan"]):
        x = base["total_s"] / ours["total_s"]
        speedups.setdefault("pscan", []).append({"length": ours["length"], "total": x})
        print(f"speed-up vs mambapy-style pscan, fwd+bwd, L={ours['length']}: {x:.1f}x")
    worst = max((v, k) for k, v in errors.items())
    print(f"max relative error of ours (fp32) vs fp64 reference, L={ref['length']}: {worst[0]:.2e} ({worst[1]}); "
          f"output at L={target}: {out_err_full:.2e}")
    if base_errors:
        print(f"(baseline check: its max relative error vs fp64 reference: {max(base_errors.values()):.2e})")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "benchmark": "selective_scan", "batch": args.batch, "dim": args.dim, "nstate": args.nstate,
            "dtype": "float32", "threads": torch.get_num_threads(), "torch": torch.__version__,
            "chunk": DEFAULT_CHUNK, "load_average_end": load_end,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "seconds": rows, "speedups": speedups,
            "relative_errors": errors, "baseline_relative_errors": base_errors,
            "output_relative_error_full_length": out_err_full,
        }, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
