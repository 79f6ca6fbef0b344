"""Sequential reference implementations, written directly from the equations.

These are slow on purpose: one Python step per token, in whatever dtype the inputs have
(tests pass float64). They are the yardstick the fast paths are tested and benchmarked
against, and they share no code with them.

Selective scan (mamba-ssm's ``selective_scan_fn`` semantics), per batch b, channel d,
state n and time t:

    delta_t = softplus(delta_t + delta_bias)          (if delta_softplus; threshold 20)
    h_t     = exp(delta_t * A[d, n]) * h_{t-1} + delta_t * B_t[n] * u_t
    y_t     = sum_n C_t[n] * h_t[n] + D[d] * u_t
    out_t   = y_t * silu(z_t)                         (if z is given)

B and C are either (D, N) ("time-invariant") or (B, N, L) / (B, G, N, L) ("selective",
G groups sharing channels). The last state h_L has shape (B, D, N).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _expand_bc(x: torch.Tensor, batch: int, dim: int, length: int) -> torch.Tensor:
    """Return B or C as (batch, dim, N, length) whatever its input layout."""
    if x.dim() == 2:  # (D, N): same for every time step
        return x[None, :, :, None].expand(batch, dim, x.shape[1], length)
    if x.dim() == 3:  # (B, N, L): shared by all channels
        return x[:, None].expand(batch, dim, x.shape[1], length)
    groups = x.shape[1]  # (B, G, N, L): channel d uses group d // (D // G)
    return x.repeat_interleave(dim // groups, dim=1)


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                             delta_softplus=False, return_last_state=False):
    """u, delta, z: (batch, dim, L); A: (dim, N); D, delta_bias: (dim,)."""
    batch, dim, length = u.shape
    if delta_bias is not None:
        delta = delta + delta_bias[None, :, None]
    if delta_softplus:
        delta = torch.where(delta > 20.0, delta, torch.log1p(torch.exp(delta)))
    Bx = _expand_bc(B, batch, dim, length)
    Cx = _expand_bc(C, batch, dim, length)
    h = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(length):
        dt = delta[:, :, t, None]
        h = torch.exp(dt * A) * h + dt * Bx[..., t] * u[:, :, t, None]
        ys.append((h * Cx[..., t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D[None, :, None] * u
    if z is not None:
        y = y * F.silu(z)
    return (y, h) if return_last_state else y


def causal_conv1d_reference(x, weight, bias=None, activation=None):
    """x: (batch, dim, L); weight: (dim, width); out_t = sum_k w[k] * x_{t - width + 1 + k}."""
    batch, dim, length = x.shape
    width = weight.shape[1]
    out = x.new_zeros(batch, dim, length)
    for t in range(length):
        for k in range(width):
            src = t - width + 1 + k
            if src >= 0:
                out[:, :, t] += weight[None, :, k] * x[:, :, src]
    if bias is not None:
        out = out + bias[None, :, None]
    if activation in ("silu", "swish"):
        out = F.silu(out)
    elif activation is not None:
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    return out
