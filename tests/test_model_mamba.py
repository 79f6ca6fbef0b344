"""The Mamba mixer: equations, initialisation, and the order each of the 4 scans reads."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from star.models.mamba import SCAN_DIRECTIONS, Mamba, ScanGrid, direction_param_name
from star.ops.reference import causal_conv1d_reference, selective_scan_reference


def mixer_from_equations(m: Mamba, x: torch.Tensor, suffix: str = "") -> torch.Tensor:
    """One causal direction of mamba-ssm's Mamba, token by token, with the sequential
    reference kernels; returns (B, L, d_inner) before out_proj."""
    xz = x @ m.in_proj.weight.t()  # (B, L, 2 d_inner)
    u, z = xz.transpose(1, 2).chunk(2, dim=1)
    conv = getattr(m, f"conv1d{suffix}")
    u = causal_conv1d_reference(u, conv.weight[:, 0], conv.bias, activation="silu")
    proj = u.transpose(1, 2) @ getattr(m, f"x_proj{suffix}").weight.t()  # (B, L, R + 2N)
    dt_low, B, C = proj.split([m.dt_rank, m.d_state, m.d_state], dim=-1)
    dt_proj = getattr(m, f"dt_proj{suffix}")
    delta = (dt_low @ dt_proj.weight.t()).transpose(1, 2)
    A = -torch.exp(getattr(m, f"A{suffix}_log"))
    y = selective_scan_reference(u, delta, A, B.transpose(1, 2), C.transpose(1, 2),
                                 D=getattr(m, f"D{suffix}"), z=z, delta_bias=dt_proj.bias,
                                 delta_softplus=True)
    return y.transpose(1, 2)


def test_causal_mixer_matches_equations():
    torch.manual_seed(0)
    m = Mamba(16, d_state=4).double()
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    want = mixer_from_equations(m, x) @ m.out_proj.weight.t()
    torch.testing.assert_close(m(x), want, rtol=1e-4, atol=1e-5)


def test_four_scan_mixer_matches_equations_on_reordered_sequences():
    torch.manual_seed(1)
    m = Mamba(16, d_state=4, num_scans=4).double()
    g, cls = 3, 9  # 3 x 3 grid, class token at the tail
    x = torch.randn(2, 10, 16, dtype=torch.float64)
    col = torch.tensor([0, 3, 6, 1, 4, 7, 2, 5, 8, 9])  # column-major grid, cls last, written out
    inv = torch.argsort(col)
    total = mixer_from_equations(m, x, "")
    total = total + mixer_from_equations(m, x.flip(1), "_b").flip(1)
    total = total + mixer_from_equations(m, x[:, col], "_c")[:, inv]
    total = total + mixer_from_equations(m, x[:, col].flip(1), "_c_b").flip(1)[:, inv]
    want = (total / 4) @ m.out_proj.weight.t()
    torch.testing.assert_close(m(x, ScanGrid(g, cls)), want, rtol=1e-4, atol=1e-5)


def _predecessor_probe(grid: ScanGrid, direction: str) -> list[int | None]:
    """Hand-set a 4-scan mixer so that only ``direction`` contributes and the output at a token
    is the id of the token read just before it in that scan (0 if it is read first)."""
    m = Mamba(2, d_state=1, d_conv=4, num_scans=4, dt_rank=1).double()
    with torch.no_grad():
        for p in m.parameters():
            p.zero_()
        # channels of the input token: [id, 1]; x = id, z = 10 (gate silu(10) ~ 10)
        m.in_proj.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 10.0], [0.0, 0.0]]))
        suffix = SCAN_DIRECTIONS[direction]
        conv = getattr(m, f"conv1d{suffix}")
        conv.weight[0, 0, 2] = 1.0  # causal conv: x_t = id of the previous token in scan order
        getattr(m, f"D{suffix}")[0] = 1.0  # the SSM path is off (B = C = 0): y_t = D * x_t
        m.out_proj.weight[0, 0] = 4.0 / F.silu(torch.tensor(10.0, dtype=torch.float64))  # undo / 4
    ids = torch.arange(1, grid.seq_len + 1, dtype=torch.float64)  # ids from 1, so 0 = "nothing"
    x = torch.stack([ids, torch.ones_like(ids)], dim=-1)[None]
    out = m(x, grid)[0, :, 0]
    # silu(conv) is applied before the scan; invert it on the (positive) ids
    values = []
    for v in out.tolist():
        if abs(v) < 1e-9:
            values.append(None)
        else:
            values.append(next(i for i in range(grid.seq_len) if abs(F.silu(torch.tensor(i + 1.0)).item() - v) < 1e-6))
    return values


def _expected_predecessors(order: list[int]) -> list[int | None]:
    pred: list[int | None] = [None] * len(order)
    for prev, cur in zip(order, order[1:]):
        pred[cur] = prev
    return pred


@pytest.mark.parametrize("cls_index", [None, 4, 9], ids=["no-cls", "middle-cls", "tail-cls"])
def test_each_scan_reads_the_documented_order(cls_index):
    g = 3
    grid = ScanGrid(g, cls_index)
    length = grid.seq_len
    # sequence index of grid cell (r, c) and of the class token, built from the definition
    seq_of_cell, i = {}, 0
    for cell in [(r, c) for r in range(g) for c in range(g)]:
        if i == cls_index:
            i += 1
        seq_of_cell[cell] = i
        i += 1
    row_major = list(range(length))
    column_major = [seq_of_cell[(r, c)] for c in range(g) for r in range(g)]
    if cls_index is not None:  # the class token keeps its sequence index in every order
        column_major.insert(cls_index, cls_index)
    expected = {
        "row_forward": row_major,
        "row_backward": row_major[::-1],
        "col_forward": column_major,
        "col_backward": column_major[::-1],
    }
    for direction, order in expected.items():
        assert _predecessor_probe(grid, direction) == _expected_predecessors(order), direction


def test_column_scan_on_a_plain_grid_reads_down_the_columns():
    # tokens 0..8 in a 3 x 3 grid: column-major forward reads 0,3,6,1,4,7,2,5,8
    preds = _predecessor_probe(ScanGrid(3), "col_forward")
    assert preds == [None, 6, 7, 0, 1, 2, 3, 4, 5]


def test_initialisation_follows_mamba_ssm():
    torch.manual_seed(0)
    m = Mamba(64, num_scans=4)
    assert m.dt_rank == 4 and m.d_inner == 64 and m.in_proj.bias is None and m.out_proj.bias is None
    for suffix in SCAN_DIRECTIONS.values():
        A_log = getattr(m, f"A{suffix}_log")
        torch.testing.assert_close(A_log, torch.log(torch.arange(1, 17.0)).expand(64, 16))
        assert A_log._no_weight_decay and getattr(m, f"D{suffix}")._no_weight_decay
        assert torch.all(getattr(m, f"D{suffix}") == 1)
        dt = F.softplus(getattr(m, f"dt_proj{suffix}").bias)
        assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001
        bound = m.dt_rank**-0.5
        assert getattr(m, f"dt_proj{suffix}").weight.abs().max() <= bound
        assert getattr(m, f"conv1d{suffix}").weight.shape == (64, 1, 4)
        assert getattr(m, f"x_proj{suffix}").weight.shape == (4 + 32, 64)
    assert direction_param_name("A_log", "_c_b") == "A_c_b_log"
    assert direction_param_name("dt_proj.bias", "_b") == "dt_proj_b.bias"
    assert math.isclose(m.dt_rank, math.ceil(64 / 16))


def test_four_scans_need_the_grid():
    m = Mamba(8, num_scans=4)
    with pytest.raises(ValueError, match="token grid"):
        m(torch.randn(1, 10, 8))


@pytest.mark.parametrize("cls_index", [None, 4, 9], ids=["no-cls", "middle-cls", "tail-cls"])
def test_four_scan_out_proj_per_direction_equals_out_proj_of_the_mean(monkeypatch, cls_index):
    """The two ways of mapping the 4-scan mixer onto fused kernels (Mamba's
    FOUR_SCAN_OUT_PROJ_PER_DIRECTION) agree in output and every gradient, bias included
    (out_proj gets one here: averaging four projections must add it once)."""
    torch.manual_seed(2)
    m = Mamba(12, d_state=4, num_scans=4).double()
    m.out_proj.bias = torch.nn.Parameter(torch.randn(12, dtype=torch.float64))
    grid = ScanGrid(3, cls_index)
    x = torch.randn(2, grid.seq_len, 12, dtype=torch.float64, requires_grad=True)
    cot = torch.randn(2, grid.seq_len, 12, dtype=torch.float64)
    leaves = [x, *m.parameters()]
    results = {}
    for per_direction in (False, True):
        monkeypatch.setattr(Mamba, "FOUR_SCAN_OUT_PROJ_PER_DIRECTION", per_direction)
        out = m(x, grid)
        results[per_direction] = (out, torch.autograd.grad((out * cot).sum(), leaves))
    (out_mean, g_mean), (out_each, g_each) = results[False], results[True]
    torch.testing.assert_close(out_each, out_mean, rtol=1e-12, atol=1e-12)
    for a, e in zip(g_each, g_mean):
        torch.testing.assert_close(a, e, rtol=1e-11, atol=1e-12)
    # and the bias is there exactly once: zero input -> out_proj(0) + bias == bias
    zero = m(torch.zeros(1, grid.seq_len, 12, dtype=torch.float64), grid)
    torch.testing.assert_close(zero, m.out_proj.bias.detach().expand_as(zero), rtol=0, atol=1e-12)
