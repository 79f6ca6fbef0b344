"""The torch selective scan against the sequential reference (star/ops/reference.py)."""

from __future__ import annotations

import pytest
import torch

from star.ops.reference import selective_scan_reference
from star.ops.selective_scan import selective_scan_torch

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def make_inputs(batch=2, dim=4, nstate=3, length=37, b_layout="bnl", c_layout="bnl", groups=2,
                dtype=torch.float64, seed=0, large_delta=False):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    def bc(layout):
        return {"dn": (dim, nstate), "bnl": (batch, nstate, length),
                "bgnl": (batch, groups, nstate, length)}[layout]

    delta = rand(batch, dim, length, scale=0.5)
    if large_delta:  # exercise softplus' identity branch (> 20) and strong decays
        delta[:, :, ::3] += 25.0
    inputs = {
        "u": rand(batch, dim, length),
        "delta": delta,
        "A": -torch.rand(dim, nstate, generator=g, dtype=torch.float64).add(0.1).mul(2).to(dtype),
        "B": rand(*bc(b_layout)),
        "C": rand(*bc(c_layout)),
        "D": rand(dim),
        "z": rand(batch, dim, length),
        "delta_bias": rand(dim, scale=0.5),
    }
    return {k: v.requires_grad_() for k, v in inputs.items()}


def run(fn, inputs, use, softplus, last_state, seed=1, cotangent_dtype=torch.float64, **kw):
    """Output, last state and gradients of every used input for a random cotangent (rounded
    to ``cotangent_dtype``, so that runs in different dtypes can get the very same one)."""
    args = {k: (v if k in use else None) for k, v in inputs.items()}
    res = fn(args["u"], args["delta"], args["A"], args["B"], args["C"], D=args["D"], z=args["z"],
             delta_bias=args["delta_bias"], delta_softplus=softplus, return_last_state=last_state, **kw)
    out, last = res if last_state else (res, None)
    g = torch.Generator().manual_seed(seed)

    def cotangent(shape):
        return torch.randn(shape, generator=g, dtype=torch.float64).to(cotangent_dtype).double()

    loss = (out.double() * cotangent(out.shape)).sum()
    if last is not None:
        loss = loss + (last.double() * cotangent(last.shape)).sum()
    used = [k for k in NAMES if k in use]
    grads = torch.autograd.grad(loss, [inputs[k] for k in used])
    return out, last, dict(zip(used, grads))


def assert_close_all(ref, got, rtol):
    """Compare output, last state and every gradient; error relative to the reference's scale."""
    (ro, rl, rg), (go, gl, gg) = ref, got

    def check(name, r, x):
        assert x.shape == r.shape, f"{name}: shape {tuple(x.shape)} != {tuple(r.shape)}"
        err = (x.double() - r.double()).abs().max().item()
        scale = r.double().abs().max().item() or 1.0
        assert err <= rtol * scale, f"{name}: max error {err:.3g} > {rtol} x {scale:.3g}"

    check("out", ro, go)
    if rl is not None:
        check("last_state", rl, gl)
    assert rg.keys() == gg.keys()
    for k in rg:
        check(f"grad {k}", rg[k], gg[k])


ALL = set(NAMES)
BASE = {"u", "delta", "A", "B", "C"}


@pytest.mark.parametrize("b_layout,c_layout", [
    ("bnl", "bnl"), ("bgnl", "bgnl"), ("dn", "dn"), ("bgnl", "bnl"), ("dn", "bgnl"), ("bnl", "dn"),
])
def test_layouts_all_options_float64(b_layout, c_layout):
    inputs = make_inputs(b_layout=b_layout, c_layout=c_layout, large_delta=True)
    ref = run(selective_scan_reference, inputs, ALL, True, True)
    got = run(selective_scan_torch, inputs, ALL, True, True)
    assert_close_all(ref, got, rtol=1e-10)


@pytest.mark.parametrize("use,softplus,last_state", [
    (BASE, False, False),
    (BASE, True, False),
    (BASE, False, True),
    (BASE | {"D"}, False, False),
    (BASE | {"z"}, False, False),
    (BASE | {"delta_bias"}, False, False),
    (BASE | {"delta_bias"}, True, True),
    (ALL - {"z"}, True, True),
    (ALL - {"D"}, True, False),
])
def test_option_subsets_float64(use, softplus, last_state):
    inputs = make_inputs()
    ref = run(selective_scan_reference, inputs, use, softplus, last_state)
    got = run(selective_scan_torch, inputs, use, softplus, last_state)
    assert_close_all(ref, got, rtol=1e-10)


@pytest.mark.parametrize("length,chunk", [(1, 16), (2, 16), (16, 16), (17, 16), (37, 5), (23, 1), (9, 64)])
def test_lengths_and_chunk_boundaries(length, chunk):
    inputs = make_inputs(length=length, b_layout="bgnl")
    ref = run(selective_scan_reference, inputs, ALL, True, True)
    got = run(selective_scan_torch, inputs, ALL, True, True, chunk=chunk)
    assert_close_all(ref, got, rtol=1e-10)


def test_gradcheck_tiny():
    inputs = make_inputs(batch=1, dim=2, nstate=2, length=5, b_layout="bgnl", groups=2)

    def f(u, delta, A, B, C, D, z, delta_bias):
        out, last = selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus=True,
                                         return_last_state=True, chunk=2)
        return out, last

    assert torch.autograd.gradcheck(f, tuple(inputs[k] for k in NAMES), eps=1e-6, atol=1e-7)


def test_float32_against_float64_reference():
    inputs64 = make_inputs(batch=2, dim=16, nstate=8, length=200, b_layout="bnl", c_layout="bnl", seed=3)
    inputs32 = {k: v.detach().float().requires_grad_() for k, v in inputs64.items()}
    ref = run(selective_scan_reference, inputs64, ALL, True, True)
    got = run(selective_scan_torch, inputs32, ALL, True, True)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in got[2].values())
    assert_close_all(ref, got, rtol=1e-5)


def test_bfloat16_inputs_accumulate_in_float32():
    inputs = make_inputs(dim=8, nstate=4, length=50, dtype=torch.bfloat16, seed=4)
    up = {k: v.detach().float().requires_grad_() for k, v in inputs.items()}
    out, last, grads = run(selective_scan_torch, inputs, ALL, True, True, cotangent_dtype=torch.bfloat16)
    out32, last32, grads32 = run(selective_scan_torch, up, ALL, True, True, cotangent_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and last.dtype == torch.float32
    # Float32 inside: the bf16 output is the float32 result rounded once, and the float32 state
    # is identical; a scan carried in bf16 would drift far beyond one rounding.
    assert torch.equal(out, out32.to(torch.bfloat16))
    assert torch.equal(last, last32)
    for k, g in grads.items():
        assert g.dtype == torch.bfloat16, k
        assert torch.equal(g, grads32[k].to(torch.bfloat16)), k
    ref_out = selective_scan_reference(*(up[k].detach().double() for k in ("u", "delta", "A", "B", "C")),
                                       D=up["D"].double(), z=up["z"].double(),
                                       delta_bias=up["delta_bias"].double(), delta_softplus=True)
    assert (out.double() - ref_out).abs().max() <= 1e-2 * ref_out.abs().max()


@pytest.mark.parametrize("layout", ["bnl", "bgnl", "dn"])
def test_autocast_leaves_the_scan_in_float32(layout):
    """Under CPU bf16 autocast the scan must still compute in fp32: its output and gradients
    equal the fp32 run without autocast (1e-5 relative) and stay as close to the float64
    reference (measured before the fix: 4.8e-3 relative, out off by 5.9e-2)."""
    inputs64 = make_inputs(batch=2, dim=16, nstate=8, length=70, b_layout=layout, c_layout=layout,
                           seed=11)
    inputs32 = {k: v.detach().float().requires_grad_() for k, v in inputs64.items()}
    plain = run(selective_scan_torch, inputs32, ALL, True, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = run(selective_scan_torch, inputs32, ALL, True, True)
    assert autocast[0].dtype == torch.float32
    assert_close_all(plain, autocast, rtol=1e-5)
    assert_close_all(run(selective_scan_reference, inputs64, ALL, True, True), autocast, rtol=1e-5)


def test_partial_requires_grad_and_no_grad_forward():
    inputs = make_inputs(seed=5)
    detached = {k: v.detach() for k, v in inputs.items()}
    with torch.no_grad():
        out_ng, last_ng = selective_scan_torch(**{k: detached[k] for k in NAMES}, delta_softplus=True,
                                               return_last_state=True)
    ref, ref_last = selective_scan_reference(**{k: detached[k] for k in NAMES}, delta_softplus=True,
                                             return_last_state=True)
    torch.testing.assert_close(out_ng, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last_ng, ref_last, rtol=1e-10, atol=1e-10)
    # Only A needs a gradient: the others come back None and A's matches the reference.
    A = inputs["A"].detach().requires_grad_()
    args = dict(detached, A=A)
    (g,) = torch.autograd.grad(selective_scan_torch(**args, delta_softplus=True).sum(), [A])
    A_ref = inputs["A"].detach().requires_grad_()
    ref_out = selective_scan_reference(**dict(detached, A=A_ref), delta_softplus=True)
    (g_ref,) = torch.autograd.grad(ref_out.sum(), [A_ref])
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_bad_inputs_raise_clear_errors():
    x = make_inputs()
    d = {k: v.detach() for k, v in x.items()}
    with pytest.raises(TypeError, match="complex A"):
        selective_scan_torch(d["u"], d["delta"], d["A"].to(torch.complex128), d["B"], d["C"])
    with pytest.raises(ValueError, match="delta shape"):
        selective_scan_torch(d["u"], d["delta"][..., :-1], d["A"], d["B"], d["C"])
    with pytest.raises(ValueError, match="A must be"):
        selective_scan_torch(d["u"], d["delta"], d["A"][:-1], d["B"], d["C"])
    with pytest.raises(ValueError, match="B must be"):
        selective_scan_torch(d["u"], d["delta"], d["A"], d["B"][..., :-1], d["C"])
    with pytest.raises(ValueError, match="groups"):
        three_groups = torch.zeros(2, 3, 3, 37, dtype=torch.float64)  # 3 does not divide dim 4
        selective_scan_torch(d["u"], d["delta"], d["A"], three_groups, d["C"])
    with pytest.raises(ValueError, match="chunk"):
        selective_scan_torch(d["u"], d["delta"], d["A"], d["B"], d["C"], chunk=0)
