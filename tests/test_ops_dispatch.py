"""Causal conv1d and mamba_inner on the torch path, and the one CUDA/torch switch."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

import star.ops as ops
from star.ops import dispatch
from star.ops.causal_conv1d import causal_conv1d_torch
from star.ops.reference import causal_conv1d_reference, selective_scan_reference


def rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).requires_grad_()


# --- causal conv1d -------------------------------------------------------------------------

@pytest.mark.parametrize("activation", [None, "silu", "swish"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("width", [1, 4])
def test_causal_conv1d_matches_reference(activation, with_bias, width):
    x, w = rand(2, 5, 13, seed=1), rand(5, width, seed=2)
    b = rand(5, seed=3) if with_bias else None
    ref = causal_conv1d_reference(x, w, b, activation)
    got = causal_conv1d_torch(x, w, b, activation)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    cot = torch.randn(ref.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    inputs = [t for t in (x, w, b) if t is not None]
    g_ref = torch.autograd.grad((ref * cot).sum(), inputs)
    g_got = torch.autograd.grad((got * cot).sum(), inputs)
    for a, e in zip(g_got, g_ref):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_causal_conv1d_is_causal_and_accepts_conv_weight_layout():
    x, w, b = rand(1, 3, 20, seed=5).detach(), rand(3, 4, seed=6).detach(), rand(3, seed=7).detach()
    out = causal_conv1d_torch(x, w, b, "silu")
    x2 = x.clone()
    x2[..., 12] += 10.0
    out2 = causal_conv1d_torch(x2, w, b, "silu")
    torch.testing.assert_close(out2[..., :12], out[..., :12], rtol=0, atol=0)  # the past is untouched
    assert (out2[..., 12:16] - out[..., 12:16]).abs().min() > 0  # the next width steps see it
    torch.testing.assert_close(out2[..., 16:], out[..., 16:], rtol=0, atol=0)
    torch.testing.assert_close(causal_conv1d_torch(x, w.unsqueeze(1), b, "silu"), out)
    # The public switch on CPU tensors runs the same torch function.
    torch.testing.assert_close(ops.causal_conv1d(x, w, b, "silu"), out)


def test_causal_conv1d_bad_input():
    x, w = torch.zeros(1, 3, 5), torch.zeros(3, 4)
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d_torch(x, w, activation="relu")
    with pytest.raises(ValueError, match="same dim"):
        causal_conv1d_torch(x, torch.zeros(2, 4))


# --- mamba_inner ---------------------------------------------------------------------------

def inner_params(d_model=6, d_inner=8, d_state=4, dt_rank=2, width=4, length=11, batch=2, seed=10):
    p = {
        "xz": rand(batch, 2 * d_inner, length, seed=seed),
        "conv1d_weight": rand(d_inner, 1, width, seed=seed + 1, scale=0.5),
        "conv1d_bias": rand(d_inner, seed=seed + 2, scale=0.1),
        "x_proj_weight": rand(dt_rank + 2 * d_state, d_inner, seed=seed + 3, scale=0.3),
        "delta_proj_weight": rand(d_inner, dt_rank, seed=seed + 4, scale=0.5),
        "out_proj_weight": rand(d_model, d_inner, seed=seed + 5, scale=0.3),
        "out_proj_bias": rand(d_model, seed=seed + 6, scale=0.1),
        "A": (-torch.arange(1, d_state + 1, dtype=torch.float64).repeat(d_inner, 1)).requires_grad_(),
        "D": rand(d_inner, seed=seed + 7),
        "delta_bias": rand(d_inner, seed=seed + 8, scale=0.5),
    }
    return p, dt_rank, d_state


def inner_by_hand(p, dt_rank, d_state, with_out_proj):
    """Mamba's inner path spelled out step by step with the sequential references."""
    d_inner = p["xz"].shape[1] // 2
    x, z = p["xz"][:, :d_inner], p["xz"][:, d_inner:]
    x = causal_conv1d_reference(x, p["conv1d_weight"][:, 0], p["conv1d_bias"], "silu")
    x_dbl = torch.einsum("rd,bdl->brl", p["x_proj_weight"], x)  # (batch, dt_rank + 2n, L)
    dt = x_dbl[:, :dt_rank]
    B = x_dbl[:, dt_rank:dt_rank + d_state]
    C = x_dbl[:, dt_rank + d_state:]
    delta = torch.einsum("dr,brl->bdl", p["delta_proj_weight"], dt)
    y = selective_scan_reference(x, delta, p["A"], B, C, D=p["D"], z=z, delta_bias=p["delta_bias"],
                                 delta_softplus=True)
    if not with_out_proj:
        return y
    return torch.einsum("md,bdl->blm", p["out_proj_weight"], y) + p["out_proj_bias"]


@pytest.mark.parametrize("with_out_proj", [True, False])
def test_mamba_inner_torch_matches_step_by_step_reference(with_out_proj):
    p, dt_rank, d_state = inner_params()
    if not with_out_proj:
        p["out_proj_weight"] = p["out_proj_bias"] = None
    got = ops.mamba_inner(p["xz"], p["conv1d_weight"], p["conv1d_bias"], p["x_proj_weight"],
                          p["delta_proj_weight"], p["out_proj_weight"], p["out_proj_bias"], p["A"],
                          p["D"], p["delta_bias"], dt_rank, d_state)
    ref = inner_by_hand(p, dt_rank, d_state, with_out_proj)
    assert got.shape == ref.shape == ((2, 11, 6) if with_out_proj else (2, 8, 11))
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    leaves = [v for v in p.values() if v is not None]
    cot = torch.randn(ref.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for a, e in zip(torch.autograd.grad((got * cot).sum(), leaves),
                    torch.autograd.grad((ref * cot).sum(), leaves)):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-11)


def test_mamba_inner_rejects_mismatched_projections():
    p, dt_rank, d_state = inner_params()
    with pytest.raises(ValueError, match="x_proj_weight"):
        ops.mamba_inner(p["xz"], p["conv1d_weight"], p["conv1d_bias"], p["x_proj_weight"],
                        p["delta_proj_weight"], None, None, p["A"], p["D"], p["delta_bias"],
                        dt_rank + 1, d_state)


# --- the switch ----------------------------------------------------------------------------

class Recorder:
    """Fake fused kernels: record each call and return a marker tensor."""

    def __init__(self):
        self.calls = []

    def fake(self, name):
        def fn(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            if name == "mamba_inner":
                return torch.full((1,), 7.0)
            return args[0].detach().clone()  # conv / scan: shape-preserving stand-in
        return fn


@pytest.fixture
def switch(monkeypatch):
    """Fake kernels installed, a settable "is on CUDA" predicate, clean setting and env."""
    rec = Recorder()
    monkeypatch.setattr(dispatch, "_KERNELS", {n: rec.fake(n) for n in dispatch.KERNEL_NAMES})
    state = {"cuda": True}
    monkeypatch.setattr(dispatch, "_is_cuda", lambda t: state["cuda"])
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    dispatch.set_kernel_backend(None)
    yield rec, state, monkeypatch
    dispatch.set_kernel_backend(None)


def scan_args():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(1, 2, 5, generator=g)
    return (u, torch.rand(1, 2, 5, generator=g), -torch.ones(2, 3), torch.randn(1, 3, 5, generator=g),
            torch.randn(1, 3, 5, generator=g))


def call_all(p, dt_rank, d_state):
    u, delta, A, B, C = scan_args()
    ops.selective_scan(u, delta, A, B, C, delta_softplus=True)
    ops.causal_conv1d(u, torch.ones(2, 4), activation="silu")
    ops.mamba_inner(*(p[k] for k in ("xz", "conv1d_weight", "conv1d_bias", "x_proj_weight",
                                     "delta_proj_weight", "out_proj_weight", "out_proj_bias", "A",
                                     "D", "delta_bias")), dt_rank, d_state)


def test_cuda_and_kernels_present_uses_fused_kernels(switch):
    rec, _, _ = switch
    p, dt_rank, d_state = inner_params()
    assert dispatch.kernel_backend_for(p["xz"]) == "cuda"
    call_all(p, dt_rank, d_state)
    assert [c[0] for c in rec.calls] == ["selective_scan", "causal_conv1d", "mamba_inner"]
    scan_call, conv_call, inner_call = rec.calls
    assert scan_call[2]["delta_softplus"] is True and scan_call[2]["return_last_state"] is False
    assert conv_call[2]["activation"] == "silu"
    assert inner_call[1][1].shape == (8, 1, 4)  # mamba_inner_fn wants the (d, 1, w) conv weight
    assert inner_call[2]["delta_softplus"] is True and inner_call[2]["D"] is p["D"]


def test_cuda_without_out_proj_composes_fused_conv_and_scan(switch):
    rec, _, _ = switch
    p, dt_rank, d_state = inner_params()
    out = ops.mamba_inner(p["xz"], p["conv1d_weight"], p["conv1d_bias"], p["x_proj_weight"],
                          p["delta_proj_weight"], None, None, p["A"], p["D"], p["delta_bias"],
                          dt_rank, d_state)
    assert [c[0] for c in rec.calls] == ["causal_conv1d", "selective_scan"]
    assert rec.calls[0][1][1].shape == (8, 4)  # causal_conv1d_fn wants (d, w)
    assert out.shape == (2, 8, 11)


@pytest.mark.parametrize("how", ["set_kernel_backend", "env"])
def test_forced_torch_never_calls_kernels(switch, how):
    rec, _, monkeypatch = switch
    if how == "env":
        monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    else:
        dispatch.set_kernel_backend("torch")
    p, dt_rank, d_state = inner_params()
    assert dispatch.get_kernel_backend() == "torch"
    assert dispatch.kernel_backend_for(p["xz"]) == "torch"
    call_all(p, dt_rank, d_state)
    assert rec.calls == []


def test_setting_overrides_env(switch):
    _, _, monkeypatch = switch
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    dispatch.set_kernel_backend("auto")
    assert dispatch.kernel_backend_for(torch.zeros(1)) == "cuda"


def test_missing_kernels_fall_back_to_torch(switch):
    rec, _, monkeypatch = switch
    monkeypatch.setattr(dispatch, "_KERNELS", dict.fromkeys(dispatch.KERNEL_NAMES))
    p, dt_rank, d_state = inner_params()
    assert dispatch.kernel_backend_for(p["xz"]) == "torch"
    u, delta, A, B, C = scan_args()
    torch.testing.assert_close(ops.selective_scan(u, delta, A, B, C),
                               selective_scan_reference(u, delta, A, B, C), rtol=1e-5, atol=1e-6)
    call_all(p, dt_rank, d_state)


def test_cpu_tensors_use_torch_even_with_kernels(switch):
    rec, state, _ = switch
    state["cuda"] = False
    p, dt_rank, d_state = inner_params()
    for op in dispatch.KERNEL_NAMES:
        assert dispatch.kernel_backend_for(p["xz"], op) == "torch"
    call_all(p, dt_rank, d_state)
    assert rec.calls == []


def test_bad_settings_are_rejected(switch):
    _, _, monkeypatch = switch
    with pytest.raises(ValueError, match="kernel backend"):
        dispatch.set_kernel_backend("cuda-please")
    monkeypatch.setenv(dispatch.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="STAR_KERNELS"):
        dispatch.get_kernel_backend()
    with pytest.raises(ValueError, match="op must be"):
        dispatch.kernel_backend_for(torch.zeros(1), "conv2d")


def test_real_import_is_lazy_cached_and_never_raises(monkeypatch):
    monkeypatch.setattr(dispatch, "_KERNELS", None)
    first = dispatch._kernels()
    assert set(first) == set(dispatch.KERNEL_NAMES)
    assert all(fn is None or callable(fn) for fn in first.values())
    assert dispatch._kernels() is first  # imported once
    status = dispatch.kernel_status()
    for name, fn in first.items():
        assert status["kernels"][name]["available"] == (fn is not None)
        if fn is None:  # this machine: the reason is reported for the logs
            reason = status["kernels"][name]["reason"]
            assert reason and reason in dispatch.describe_kernels(torch.zeros(1))
    assert dispatch.kernel_backend_for(torch.zeros(1)) == "torch"  # CPU tensor


def test_kernel_table_seam_routes_cpu_tensors_and_restores(switch):
    rec, state, _ = switch
    state["cuda"] = False
    before = dispatch._KERNELS
    p, dt_rank, d_state = inner_params()
    with dispatch._kernel_table({"mamba_inner": rec.fake("mamba_inner")}):
        assert dispatch.kernel_backend_for(p["xz"]) == "cuda"
        assert dispatch.kernel_backend_for(p["xz"], "selective_scan") == "torch"  # not in the table
        call_all(p, dt_rank, d_state)
    assert [c[0] for c in rec.calls] == ["mamba_inner"]
    assert dispatch._KERNELS is before and dispatch.kernel_backend_for(p["xz"]) == "torch"


# --- import probing, against fake mamba-ssm / causal-conv1d installs -------------------------
# Each fake mirrors the import structure of a real release, so the probe meets the same
# situations as on a cluster with a mismatched pair.

# mamba-ssm >= 2.2.5 (selective_scan_interface.py): causal-conv1d's new Python binding.
SSI_NEW = """
    try:
        from causal_conv1d import causal_conv1d_fn
        from causal_conv1d.cpp_functions import causal_conv1d_fwd_function
    except ImportError:
        causal_conv1d_fn = None
        causal_conv1d_fwd_function = None
    import selective_scan_cuda
    def selective_scan_fn(*args, **kwargs): return "fused scan"
    def mamba_inner_fn(*args, **kwargs): return "fused inner"
"""
# mamba-ssm <= 2.2.4: calls causal_conv1d_cuda.causal_conv1d_fwd directly (the old signature).
SSI_OLD = """
    try:
        import causal_conv1d_cuda
    except ImportError:
        causal_conv1d_cuda = None
    import selective_scan_cuda
    def selective_scan_fn(*args, **kwargs): return "fused scan"
    def mamba_inner_fn(*args, **kwargs): return "fused inner"
"""
# causal-conv1d >= 1.5.1 (cpp_functions.py, with torch.library.custom_op) and < 1.5.1.
_CONV_INIT = "__version__ = {!r}\nfrom causal_conv1d.causal_conv1d_interface import causal_conv1d_fn\n"
_CONV_FN = "def causal_conv1d_fn(*args, **kwargs): return 'fused conv'\n"
CONV_NEW = {
    "__init__.py": _CONV_INIT.format("1.5.1"),
    "causal_conv1d_interface.py": "from causal_conv1d.cpp_functions import causal_conv1d_fwd_function\n"
                                  + _CONV_FN,
    "cpp_functions.py": "import causal_conv1d_cuda\ndef causal_conv1d_fwd_function(*args): pass\n",
}
CONV_OLD = {
    "__init__.py": _CONV_INIT.format("1.4.0"),
    "causal_conv1d_interface.py": "import causal_conv1d_cuda\n" + _CONV_FN,
}
# causal-conv1d >= 1.5.1 on torch < 2.4: torch.library has no custom_op.
NO_CUSTOM_OP = "module 'torch.library' has no attribute 'custom_op'"
CONV_NO_CUSTOM_OP = dict(CONV_NEW, **{"cpp_functions.py": f"raise AttributeError({NO_CUSTOM_OP!r})\n"})


FAKE_ROOTS = ("mamba_ssm", "causal_conv1d", "selective_scan_cuda", "causal_conv1d_cuda")


def install_fakes(monkeypatch, root, ssi=None, conv=None,
                  extensions=("selective_scan_cuda.py", "causal_conv1d_cuda.py"),
                  mamba_init="__version__ = '2.2.5'\n"):
    """Write fake packages under ``root``, hide any real ones, run the probe from scratch
    and return (kernel table, kernel_status())."""
    files = {name: "" for name in extensions}
    if ssi is not None:
        files.update({"mamba_ssm/__init__.py": mamba_init,
                      "mamba_ssm/ops/__init__.py": "",
                      "mamba_ssm/ops/selective_scan_interface.py": textwrap.dedent(ssi)})
    for name, text in (conv or {}).items():
        files[f"causal_conv1d/{name}"] = text
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for name in list(sys.modules):
        if name.split(".")[0] in FAKE_ROOTS:
            monkeypatch.delitem(sys.modules, name)
    if ssi is None:
        monkeypatch.setitem(sys.modules, "mamba_ssm", None)  # "not installed"
    if conv is None:
        monkeypatch.setitem(sys.modules, "causal_conv1d", None)
    monkeypatch.syspath_prepend(str(root))
    for attr, value in (("_KERNELS", None), ("_REASONS", {}), ("_VERSIONS", {})):
        monkeypatch.setattr(dispatch, attr, value)
    table = dispatch._kernels()
    # Leave no fake module behind (plain pop: monkeypatch.delitem would put them back at
    # teardown); monkeypatch restores the real entries hidden above.
    for name in list(sys.modules):
        if name.split(".")[0] in FAKE_ROOTS and sys.modules[name] is not None:
            sys.modules.pop(name)
    return table, dispatch.kernel_status()


def available(status):
    return {name for name, k in status["kernels"].items() if k["available"]}


def test_probe_matched_pair_registers_all(monkeypatch, tmp_path):
    table, status = install_fakes(monkeypatch, tmp_path, ssi=SSI_NEW, conv=CONV_NEW)
    assert available(status) == set(dispatch.KERNEL_NAMES)
    assert table["mamba_inner"]() == "fused inner" and table["causal_conv1d"]() == "fused conv"
    assert status["versions"] == {"mamba_ssm": "2.2.5", "causal_conv1d": "1.5.1"}
    assert all(k["reason"] is None for k in status["kernels"].values())
    line = dispatch.describe_kernels()
    assert "fused kernels available: selective_scan, causal_conv1d, mamba_inner" in line


def test_probe_new_mamba_with_old_causal_conv1d_refuses_mamba_inner(monkeypatch, tmp_path):
    # `from causal_conv1d import causal_conv1d_fn` works, but mamba-ssm's own conv function is None
    table, status = install_fakes(monkeypatch, tmp_path, ssi=SSI_NEW, conv=CONV_OLD)
    assert available(status) == {"selective_scan", "causal_conv1d"}
    reason = status["kernels"]["mamba_inner"]["reason"]
    assert "causal_conv1d_fwd_function is None" in reason and "causal-conv1d>=1.5.1" in reason
    assert status["versions"]["causal_conv1d"] == "1.4.0"
    with dispatch._kernel_table(table):  # the 1-scan layer then composes the fused conv and scan
        p, dt_rank, d_state = inner_params()
        assert dispatch.kernel_backend_for(p["xz"], "mamba_inner") == "torch"
        assert dispatch.kernel_backend_for(p["xz"], "selective_scan") == "cuda"


def test_probe_old_mamba_with_new_causal_conv1d_refuses_mamba_inner(monkeypatch, tmp_path):
    # mamba-ssm <= 2.2.4 would call the pre-1.5.1 entry point: TypeError on the first forward
    _, status = install_fakes(monkeypatch, tmp_path, ssi=SSI_OLD, conv=CONV_NEW,
                              mamba_init="__version__ = '2.2.4'\n")
    assert available(status) == {"selective_scan", "causal_conv1d"}
    reason = status["kernels"]["mamba_inner"]["reason"]
    assert "mamba_ssm 2.2.4 predates 2.2.5" in reason and "mamba-ssm>=2.2.5" in reason


def test_probe_import_raising_attribute_error_falls_back_with_the_text(monkeypatch, tmp_path):
    # causal-conv1d >= 1.5.1 on torch < 2.4: AttributeError, which mamba-ssm's own
    # `except ImportError` does not catch either, so its import fails too
    _, status = install_fakes(monkeypatch, tmp_path, ssi=SSI_NEW, conv=CONV_NO_CUSTOM_OP)
    assert available(status) == set()
    for name in dispatch.KERNEL_NAMES:
        reason = status["kernels"][name]["reason"]
        assert f"not importable (AttributeError: {NO_CUSTOM_OP})" in reason
    line = dispatch.describe_kernels()
    assert "fused kernels available: none" in line and "AttributeError" in line


def test_probe_missing_selective_scan_cuda(monkeypatch, tmp_path):
    _, status = install_fakes(monkeypatch, tmp_path, ssi=SSI_NEW, conv=CONV_NEW,
                              extensions=("causal_conv1d_cuda.py",))
    assert available(status) == {"causal_conv1d"}
    for name in ("selective_scan", "mamba_inner"):
        assert "No module named 'selective_scan_cuda'" in status["kernels"][name]["reason"]


def test_probe_selective_scan_cuda_none(monkeypatch, tmp_path):
    # an interface module that swallowed the extension's ImportError into None
    ssi = SSI_NEW.replace("import selective_scan_cuda", "selective_scan_cuda = None")
    _, status = install_fakes(monkeypatch, tmp_path, ssi=ssi, conv=CONV_NEW)
    assert available(status) == {"causal_conv1d"}
    assert "selective_scan_cuda" in status["kernels"]["mamba_inner"]["reason"]


def test_probe_any_exception_at_package_import(monkeypatch, tmp_path):
    # recent mamba-ssm imports Triton/TileLang modules in its __init__; any failure is caught
    _, status = install_fakes(monkeypatch, tmp_path, ssi=SSI_NEW, conv=None,
                              mamba_init="raise RuntimeError('triton: no GPU driver')\n")
    assert available(status) == set()
    assert "RuntimeError: triton: no GPU driver" in status["kernels"]["mamba_inner"]["reason"]
    assert "causal_conv1d not importable" in status["kernels"]["causal_conv1d"]["reason"]
    assert status["versions"] == {"mamba_ssm": None, "causal_conv1d": None}
