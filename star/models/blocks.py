"""The MambaMLP block (ARM / STAR encoder layer) and its pieces: SwiGLU and DropPath.

Pre-norm residual block, as ARM's release:
    x = x + DropPath(Mamba(norm1(x)))
    x = x + DropPath(SwiGLU(norm2(x)))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from star.models.mamba import Mamba, ScanGrid


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability ``p``."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class SwiGLU(nn.Module):
    """w3(silu(w1 x) * w2 x), hidden width int(D * 4 * 2 / 3) by default (ARM's names, biases)."""

    def __init__(self, dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or int(dim * 4 * 2 / 3)
        self.w1 = nn.Linear(dim, hidden)
        self.w2 = nn.Linear(dim, hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))


class MambaMLPBlock(nn.Module):
    """One encoder layer: ``mixer`` (Mamba, 1 or 4 scans) and ``mlp`` (SwiGLU), pre-norm."""

    def __init__(self, dim: int, num_scans: int = 1, drop_path: float = 0.0, **mamba_kwargs) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.mixer = Mamba(dim, num_scans=num_scans, **mamba_kwargs)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = SwiGLU(dim)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, grid: ScanGrid | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.mixer(self.norm1(x), grid))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def init_encoder_weights(layers: nn.ModuleList) -> None:
    """ARM's Mamba initialisation: Linear biases zero (except dt_proj), LayerNorm 1/0, and
    out_proj re-drawn from PyTorch's default and scaled by 1/sqrt(depth) (GPT-2 scheme)."""
    depth = len(layers)
    for module in layers.modules():
        if isinstance(module, nn.Linear) and module.bias is not None:
            if not getattr(module.bias, "_no_reinit", False):
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for layer in layers:
        weight = layer.mixer.out_proj.weight
        nn.init.kaiming_uniform_(weight, a=5**0.5)
        with torch.no_grad():
            weight /= depth**0.5


class PatchEmbed(nn.Module):
    """Conv2d(3, D, p, stride p) as ``proj``: (B, 3, S, S) -> (B, g*g, D), row-major patches."""

    def __init__(self, img_size: int, patch_size: int, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size={img_size} is not a multiple of patch_size={patch_size}")
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        fan_in = in_chans * patch_size * patch_size
        nn.init.trunc_normal_(self.proj.weight, std=(1.0 / fan_in) ** 0.5)  # LeCun normal, as ARM
        nn.init.zeros_(self.proj.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"expected images (B, 3, {self.img_size}, {self.img_size}), got {tuple(images.shape)}; "
                "resize them or build the model with img_size=...")
        return self.proj(images).flatten(2).transpose(1, 2)
