"""Depthwise causal 1-D convolution in pure PyTorch (causal-conv1d's ``causal_conv1d_fn``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = (None, "silu", "swish")


def causal_conv1d_torch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        activation: str | None = None) -> torch.Tensor:
    """out[b, d, t] = act(bias[d] + sum_k weight[d, k] * x[b, d, t - width + 1 + k]).

    x: (batch, dim, L); weight: (dim, width) (a Conv1d weight (dim, 1, width) is accepted too);
    bias: (dim,) or None; activation: None, "silu" or "swish". Steps before t = 0 count as
    zeros (left padding of width - 1), so out[..., t] never sees x[..., t + 1:]. Like the
    CUDA kernel, it computes in weight's dtype and returns x's dtype.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be None, 'silu' or 'swish', got {activation!r}")
    if weight.dim() == 3 and weight.shape[1] == 1:
        weight = weight[:, 0]
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(
            f"expected x (batch, dim, L) and weight (dim, width) with the same dim; got x "
            f"{tuple(x.shape)} and weight {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != (x.shape[1],):
        raise ValueError(f"bias must be (dim={x.shape[1]},), got {tuple(bias.shape)}")
    dim, width = weight.shape
    out = F.conv1d(F.pad(x.to(weight.dtype), (width - 1, 0)), weight.unsqueeze(1), bias, groups=dim)
    if activation is not None:
        out = F.silu(out)
    return out.to(x.dtype)
