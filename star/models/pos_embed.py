"""Position embeddings: the fixed 2-D sin-cos table and its resizing between grids.

The table follows MAE: half of the channels encode the row, half the column, each as
sin/cos of the coordinate at geometrically spaced frequencies. Tokens are in row-major
order over the g x g patch grid, so entry ``r * g + c`` belongs to patch (r, c).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(len(positions), dim) table: first half sin, second half cos (MAE's layout)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width per axis, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d(dim: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(len(rows), dim) sin-cos encodings of the cells (rows[i], cols[i]), float32; any
    coordinates, e.g. the virtual cell (-1, -1) of the separators (docs/fidelity.md, section 2)."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    # MAE puts the column (w) coordinate in the first half and the row (h) in the second.
    emb_w = _sincos_1d(dim // 2, cols.to(torch.float64).reshape(-1))
    emb_h = _sincos_1d(dim // 2, rows.to(torch.float64).reshape(-1))
    return torch.cat([emb_w, emb_h], dim=1).float()


def sincos_2d_table(dim: int, grid_size: int) -> torch.Tensor:
    """Fixed (grid_size**2, dim) position table in row-major patch order, float32."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    return sincos_2d(dim, rows, cols)


def resize_grid_table(table: torch.Tensor, new_grid: int) -> torch.Tensor:
    """Bicubic resize of a (..., g*g, D) row-major table to (..., new_grid**2, D).

    As MAE's ``interpolate_pos_embed``: the table is viewed as a D-channel g x g image and
    resized with bicubic interpolation (align_corners=False). Leading dims are kept.
    """
    num = table.shape[-2]
    old_grid = math.isqrt(num)
    if old_grid * old_grid != num:
        raise ValueError(f"position table has {num} entries, which is not a square grid")
    if old_grid == new_grid:
        return table.clone()
    lead, dim = table.shape[:-2], table.shape[-1]
    image = table.reshape(-1, old_grid, old_grid, dim).permute(0, 3, 1, 2).float()
    image = F.interpolate(image, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    out = image.permute(0, 2, 3, 1).reshape(*lead, new_grid * new_grid, dim)
    return out.to(table.dtype)
