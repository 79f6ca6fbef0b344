"""The lightweight cross-attention decoder of ARM / STAR (SPEC section 4).

Four blocks of width 512. Block i lets the queries attend to one level of encoder features
(the outputs of encoder layers depth/2, 2/3, 5/6 and 1, each LayerNorm'd as ``norm_1..norm_4``,
concatenated and projected by one Linear ``enc2dec`` to 4 x 512). As in ARM's release, the
projection is split channel-interleaved: level i is ``features[..., i::4]`` (ARM reshapes to
(..., 512, 4) and takes [..., i]), which keeps official checkpoints meaningful.

Queries are the learned ``ar_token`` plus the decoder position embedding of the token they
predict. A block has no self-attention: queries only read encoder tokens, through a boolean
block-causal mask built from cluster ids (:meth:`Layout.attention_mask`), so a query for a
token of cluster j sees encoder clusters 0..j-1, whatever the cluster sizes.
Parameter names follow ARM: ``dec_block.{i}.attn2.{q,kv,proj}``, ``norm2_1`` (queries),
``norm2_2`` (keys/values), ``norm2`` + ``mlp.fc1/fc2`` (GELU MLP), ``ar_norm``, ``ar_pred``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, nq, dim = queries.shape
        nk, h = keys.shape[1], self.num_heads
        q = self.q(queries).reshape(b, nq, h, dim // h).transpose(1, 2)
        k, v = self.kv(keys).reshape(b, nk, 2, h, dim // h).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, nq, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class DecoderBlock(nn.Module):
    """q = q + attn2(norm2_1(q), norm2_2(kv)); q = q + mlp(norm2(q))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm2_1 = nn.LayerNorm(dim)
        self.norm2_2 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        queries = queries + self.attn2(self.norm2_1(queries), self.norm2_2(keys), mask)
        return queries + self.mlp(self.norm2(queries))


def feature_levels(depth: int) -> tuple[int, int, int, int]:
    """1-based encoder layers whose outputs feed the decoder: depth/2, 2/3, 5/6 and depth."""
    return depth // 2, depth * 2 // 3, depth * 5 // 6, depth


def block_causal_mask(key_cluster: torch.Tensor, query_cluster: torch.Tensor) -> torch.Tensor:
    """(Q, L) bool, True = may attend: a query predicting cluster j sees keys of clusters < j."""
    return key_cluster[None, :] < query_cluster[:, None]


class ClusterDecoder(nn.Module):
    """The decoder stack. Its parameter names are ARM's top-level names (``norm_1``..``norm_4``,
    ``enc2dec``, ``dec_block``, ``ar_norm``, ``ar_pred``); the pretraining model mounts these
    children at its own top level and runs them with :func:`decode`, so ARM checkpoints
    load unchanged."""

    def __init__(self, enc_dim: int, dim: int = 512, depth: int = 4, num_heads: int = 8,
                 mlp_ratio: float = 4.0, out_dim: int = 768) -> None:
        super().__init__()
        self.depth = depth
        for i in range(depth):
            setattr(self, f"norm_{i + 1}", nn.LayerNorm(enc_dim))
        self.enc2dec = nn.Linear(enc_dim * depth, dim * depth)
        self.dec_block = nn.ModuleList(DecoderBlock(dim, num_heads, mlp_ratio) for _ in range(depth))
        self.ar_norm = nn.LayerNorm(dim)
        self.ar_pred = nn.Linear(dim, out_dim)
        self.apply(_xavier_init)

    def forward(self, features: list[torch.Tensor], queries: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """features: ``depth`` tensors (b, L, enc_dim); queries (b, Q, dim); mask (Q, L) bool."""
        return decode(self, features, queries, mask)


def decode(parts: nn.Module, features: list[torch.Tensor], queries: torch.Tensor,
           mask: torch.Tensor) -> torch.Tensor:
    """Run the decoder whose modules (ARM names) are attributes of ``parts``."""
    depth = len(parts.dec_block)
    if len(features) != depth:
        raise ValueError(f"decoder expects {depth} feature levels, got {len(features)}")
    normed = [getattr(parts, f"norm_{i + 1}")(f) for i, f in enumerate(features)]
    levels = parts.enc2dec(torch.cat(normed, dim=-1))
    for i, block in enumerate(parts.dec_block):
        queries = block(queries, levels[..., i::depth], mask)
    return parts.ar_pred(parts.ar_norm(queries))


def _xavier_init(module: nn.Module) -> None:
    """ARM's decoder init (as the official JAX ViT): xavier-uniform Linear, zero bias."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
