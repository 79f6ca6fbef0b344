"""Packing N images and their separators into one autoregressive sequence (STAR's core).

Vocabulary used throughout:

* patch: a p x p pixel square; an image has a g x g grid of them (g = S / p).
* cluster: the prediction unit. An image cluster is a k x k block of patches; a separator is
  a cluster too (k x k tokens for type ``cluster``, one token for type ``token``).
  Cluster ids run over the whole sequence: 0, 1, 2, ... in sequence order.
* cluster-priority order: image clusters row-major over the (g/k) x (g/k) cluster grid,
  and inside each cluster its k x k patches row-major.
* separator position: ``SC`` one separator before each image, ``CS`` one after,
  ``SCS`` one before every row of g/k clusters, ``CSC`` one after every row.

Prediction rule (SPEC section 4): cluster i predicts cluster i + 1 of the whole sequence.
Cluster 0 is context only. After the last cluster comes what the next image would start
with: if the per-image pattern starts with a separator (``SC``, ``SCS``) the last cluster
predicts that separator (its pattern is known), otherwise (``CS``, ``CSC``, type ``none``)
nothing follows and the last cluster predicts nothing. Hence:

* ARM (N = 1, type none): 9 clusters, 8 predicted (clusters 1..8).
* type none, N > 1: image n + 1's first cluster is predicted from image n's last;
  N * 9 - 1 predicted clusters.
* SC, N = 8: 80 clusters (8 x (1 separator + 9 image clusters)) = 1280 tokens. Predicted:
  clusters 1..79 (72 image clusters and the separators of images 2..8) plus one trailing
  separator after the last cluster = 80 predicted clusters (72 image + 8 separator).

Everything that depends only on the configuration (which token goes where, what each query
predicts, which encoder tokens it may see) is computed once, at index level, in
:class:`Layout`; the per-batch work is two gathers.

Separators bypass the patch embedding and live in embedding space. All separator tokens
share one learned position embedding (``sep_pos_embed``, one D-vector): a separator has no
spatial position, and a learned slot lets the model mark "separator" however it prefers.
Separator values in embedding space (per token at slot (r, c) of the k x k separator):
``zeros`` 0, ``ones`` 1, ``embedding`` a learned nn.Embedding(1, D) vector, ``identity``
1 when r == c else 0. Targets use the same pattern in target space (p*p*3 values); the
learned ``embedding`` value has no pixel-space meaning, so its target is the zeros pattern.
A ``token`` separator is the single slot (0, 0), so an ``identity`` token is all ones.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import nn

from star.models.decoder import block_causal_mask

SEP_TYPES = ("none", "token", "cluster")
SEP_VALUES = ("zeros", "ones", "embedding", "identity")
SEP_POSITIONS = ("SC", "CS", "SCS", "CSC")

IMAGE, SEPARATOR = 0, 1  # values of Layout.kind / Layout.target_kind


@dataclass(frozen=True)
class PackingConfig:
    img_size: int = 192
    patch_size: int = 16
    cluster_size: int = 4
    images_per_seq: int = 8
    sep_type: str = "cluster"
    sep_value: str = "identity"
    sep_position: str = "SC"

    def __post_init__(self) -> None:
        def choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not one of {', '.join(allowed)}")

        choice("sep_type", self.sep_type, SEP_TYPES)
        choice("sep_value", self.sep_value, SEP_VALUES)
        choice("sep_position", self.sep_position, SEP_POSITIONS)
        if self.img_size % self.patch_size:
            raise ValueError(
                f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")
        if self.grid % self.cluster_size:
            raise ValueError(
                f"the {self.grid}x{self.grid} patch grid does not split into "
                f"cluster_size={self.cluster_size} clusters; choose a divisor of {self.grid}")
        if self.images_per_seq < 1:
            raise ValueError(f"images_per_seq must be >= 1, got {self.images_per_seq}")

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def clusters_per_side(self) -> int:
        return self.grid // self.cluster_size

    @property
    def separator_tokens(self) -> int:
        """Tokens in one separator: k*k for ``cluster``, 1 for ``token``, 0 for ``none``."""
        return {"none": 0, "token": 1, "cluster": self.cluster_size**2}[self.sep_type]

    @property
    def target_dim(self) -> int:
        return self.patch_size**2 * 3


def cluster_priority_order(grid: int, cluster_size: int) -> torch.Tensor:
    """Row-major patch indices (r * grid + c) of one image, listed in cluster-priority order."""
    k, side = cluster_size, grid // cluster_size
    idx = torch.arange(grid * grid).reshape(side, k, side, k)  # (cluster row, r, cluster col, c)
    return idx.permute(0, 2, 1, 3).reshape(-1)


@dataclass(frozen=True)
class Layout:
    """Index-level description of one packed sequence; the same for every batch.

    Per sequence token (length T):
      kind      IMAGE or SEPARATOR
      image     index n of the image the token belongs to (a separator belongs to the image
                it introduces (SC/SCS) or closes (CS/CSC))
      cluster   running cluster id over the whole sequence (separators are clusters)
      row, col  patch position in its image, or the slot inside the separator pattern
      source    index into the per-sequence source table [N*g*g patch tokens, separator slots]
      is_target whether some query predicts this token
    Per query (one per predicted token, length Q, in sequence order):
      target_cluster   id j of the cluster it predicts; it may see encoder clusters < j
      target_kind, target_image, target_row, target_col   as above, for the target (the
                       trailing separator has target_image = N, the image that would follow)
      target_source    index into the source table (patch or separator slot)
      target_token     index of the target in the sequence, -1 for the trailing separator
      target_pos_index row * g + col for a patch, g * g for a separator (decoder position)
    """

    kind: torch.Tensor
    image: torch.Tensor
    cluster: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    source: torch.Tensor
    is_target: torch.Tensor
    target_cluster: torch.Tensor
    target_kind: torch.Tensor
    target_image: torch.Tensor
    target_row: torch.Tensor
    target_col: torch.Tensor
    target_source: torch.Tensor
    target_token: torch.Tensor
    target_pos_index: torch.Tensor
    num_clusters: int
    encoder_length: int

    @property
    def seq_len(self) -> int:
        return int(self.kind.numel())

    @property
    def num_queries(self) -> int:
        return int(self.target_cluster.numel())

    @property
    def num_predicted_clusters(self) -> int:
        return int(torch.unique(self.target_cluster).numel())

    def pattern(self) -> str:
        """The sequence as one letter per cluster, e.g. ``SCCCCCCCCC SCCCCCCCCC`` for SC with
        N = 2 (S separator, C image cluster; a space starts each image)."""
        letters, previous_image = [], None
        for cid in range(self.num_clusters):
            first = int(torch.nonzero(self.cluster == cid)[0])
            image = int(self.image[first])
            if previous_image is not None and image != previous_image:
                letters.append(" ")
            letters.append("S" if int(self.kind[first]) == SEPARATOR else "C")
            previous_image = image
        return "".join(letters)

    def attention_mask(self) -> torch.Tensor:
        """(Q, encoder_length) bool, True = may attend: encoder clusters < target cluster."""
        return block_causal_mask(self.cluster[: self.encoder_length], self.target_cluster)

    def to(self, device: torch.device | str) -> "Layout":
        moved = {
            f.name: (getattr(self, f.name).to(device)
                     if isinstance(getattr(self, f.name), torch.Tensor) else getattr(self, f.name))
            for f in fields(self)
        }
        return Layout(**moved)


def _units(cfg: PackingConfig) -> list[tuple[int, int, int, int]]:
    """The sequence as clusters: (kind, image, cluster row, cluster col); separators use -1."""
    side, with_sep = cfg.clusters_per_side, cfg.sep_type != "none"
    units: list[tuple[int, int, int, int]] = []
    for n in range(cfg.images_per_seq):
        sep = [(SEPARATOR, n, -1, -1)] if with_sep else []
        image_units: list[tuple[int, int, int, int]] = []
        for cr in range(side):
            row_units = [(IMAGE, n, cr, cc) for cc in range(side)]
            if cfg.sep_position == "SCS":
                row_units = sep + row_units
            elif cfg.sep_position == "CSC":
                row_units = row_units + sep
            image_units += row_units
        if cfg.sep_position == "SC":
            image_units = sep + image_units
        elif cfg.sep_position == "CS":
            image_units = image_units + sep
        units += image_units
    return units


def build_layout(cfg: PackingConfig) -> Layout:
    """Compute the :class:`Layout` of a configuration (pure index arithmetic, no data)."""
    g, k = cfg.grid, cfg.cluster_size
    num_patch_tokens = cfg.images_per_seq * g * g  # separator slots follow in the source table
    sep_slots = [(0, 0)] if cfg.sep_type == "token" else [(r, c) for r in range(k) for c in range(k)]

    def unit_tokens(unit: tuple[int, int, int, int]) -> list[tuple[int, int, int, int, int]]:
        """(kind, image, row, col, source) for each token of a cluster, in scan order."""
        kind, n, cr, cc = unit
        if kind == SEPARATOR:
            return [(SEPARATOR, n, r, c, num_patch_tokens + slot) for slot, (r, c) in enumerate(sep_slots)]
        out = []
        for r in range(k):
            for c in range(k):
                row, col = cr * k + r, cc * k + c
                out.append((IMAGE, n, row, col, n * g * g + row * g + col))
        return out

    units = _units(cfg)
    tokens, cluster_of_token, first_token = [], [], []
    for cid, unit in enumerate(units):
        first_token.append(len(tokens))
        toks = unit_tokens(unit)
        tokens += toks
        cluster_of_token += [cid] * len(toks)

    # Queries: cluster j (1 <= j < U) is predicted from clusters < j; if the per-image pattern
    # starts with a separator, a trailing separator (id U) is predicted from the whole sequence.
    queries: list[tuple[int, int, int, int, int, int, int]] = []
    for cid in range(1, len(units)):
        for offset, (kind, n, row, col, src) in enumerate(unit_tokens(units[cid])):
            queries.append((cid, kind, n, row, col, src, first_token[cid] + offset))
    if units[0][0] == SEPARATOR:
        for kind, _, row, col, src in unit_tokens((SEPARATOR, cfg.images_per_seq, -1, -1)):
            queries.append((len(units), kind, cfg.images_per_seq, row, col, src, -1))
    if not queries:
        raise ValueError(
            f"{cfg} has a single cluster and no separator, so nothing can be predicted")

    def col_of(rows: list[tuple], i: int) -> torch.Tensor:
        return torch.tensor([r[i] for r in rows], dtype=torch.long)

    is_target = torch.zeros(len(tokens), dtype=torch.bool)
    target_token = col_of(queries, 6)
    is_target[target_token[target_token >= 0]] = True
    target_kind = col_of(queries, 1)
    target_pos_index = torch.where(
        target_kind == IMAGE, col_of(queries, 3) * g + col_of(queries, 4), torch.full_like(target_kind, g * g))
    target_cluster = col_of(queries, 0)
    cluster = torch.tensor(cluster_of_token, dtype=torch.long)
    encoder_length = int((cluster < target_cluster.max()).sum())
    return Layout(
        kind=col_of(tokens, 0), image=col_of(tokens, 1), cluster=cluster,
        row=col_of(tokens, 2), col=col_of(tokens, 3), source=col_of(tokens, 4), is_target=is_target,
        target_cluster=target_cluster, target_kind=target_kind,
        target_image=col_of(queries, 2), target_row=col_of(queries, 3), target_col=col_of(queries, 4),
        target_source=col_of(queries, 5), target_token=target_token, target_pos_index=target_pos_index,
        num_clusters=len(units), encoder_length=encoder_length,
    )


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, 3, S, S) -> (B, g*g, p*p*3), row-major patches, pixels ordered (py, px, channel) as MAE."""
    b, ch, h, w = images.shape
    p = patch_size
    if h != w or h % p:
        raise ValueError(f"images must be square with a side divisible by {p}, got {h}x{w}")
    g = h // p
    x = images.reshape(b, ch, g, p, g, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, g * g, p * p * ch)


def unpatchify(patches: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, g*g, p*p*3) -> (B, 3, S, S)."""
    b, num, _ = patches.shape
    p, g = patch_size, int(round(num**0.5))
    x = patches.reshape(b, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, 3, g * p, g * p)


def norm_pix(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """MAE's norm_pix target: per patch (x - mean) / sqrt(var + eps) over its p*p*3 values."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)  # unbiased, as MAE and ARM
    return (patches - mean) / (var + eps) ** 0.5


def separator_pattern(cfg: PackingConfig, dim: int, value: str | None = None) -> torch.Tensor:
    """(separator_tokens, dim) fixed pattern of a separator; ``embedding`` gives zeros here."""
    value = value or cfg.sep_value
    k = cfg.cluster_size
    slots = [(0, 0)] if cfg.sep_type == "token" else [(r, c) for r in range(k) for c in range(k)]
    if value == "ones":
        return torch.ones(len(slots), dim)
    if value == "identity":
        diag = torch.tensor([1.0 if r == c else 0.0 for r, c in slots])
        return diag[:, None].expand(len(slots), dim).clone()
    return torch.zeros(len(slots), dim)  # zeros, and the target of a learned embedding


class SequencePacker(nn.Module):
    """Turns per-image patch tokens into packed sequences and builds the matching targets.

    Images arrive as (N*b, ...): images ``s*N .. s*N + N - 1`` form sequence ``s``.
    Learned parameters (only when separators exist): ``sep_pos_embed`` (1, 1, D), and
    ``sep_embed`` (nn.Embedding(1, D)) for the ``embedding`` value.
    """

    def __init__(self, cfg: PackingConfig, embed_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layout = build_layout(cfg)
        self._device_layout: Layout | None = None
        self._device_mask: torch.Tensor | None = None
        if cfg.sep_type != "none":
            self.sep_pos_embed = nn.Parameter(torch.zeros(1, 1, embed_dim))
            nn.init.trunc_normal_(self.sep_pos_embed, std=0.02)
            if cfg.sep_value == "embedding":
                self.sep_embed = nn.Embedding(1, embed_dim)
                nn.init.normal_(self.sep_embed.weight, std=0.02)
            self.register_buffer(
                "sep_pattern", separator_pattern(cfg, embed_dim), persistent=False)
            self.register_buffer(
                "sep_target", separator_pattern(cfg, cfg.target_dim), persistent=False)

    def layout_on(self, device: torch.device) -> Layout:
        """The layout with its tensors on ``device`` (cached)."""
        if self._device_layout is None or self._device_layout.kind.device != device:
            self._device_layout = self.layout.to(device)
            self._device_mask = self._device_layout.attention_mask()
        return self._device_layout

    def attention_mask_on(self, device: torch.device) -> torch.Tensor:
        """The decoder's (Q, encoder_length) boolean mask on ``device`` (cached)."""
        self.layout_on(device)
        return self._device_mask

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """(N*b, g*g, C) -> (b, N*g*g, C) with the images of one sequence consecutive."""
        n = self.cfg.images_per_seq
        if x.shape[0] % n:
            raise ValueError(
                f"got {x.shape[0]} images, not a multiple of images_per_seq={n}; "
                "the batch must hold whole sequences")
        return x.reshape(x.shape[0] // n, n * x.shape[1], x.shape[2])

    def separator_tokens(self) -> torch.Tensor:
        """(separator_tokens, D) separator in embedding space, position embedding included."""
        if self.cfg.sep_value == "embedding":
            tokens = self.sep_embed.weight.expand(self.cfg.separator_tokens, -1)
        else:
            tokens = self.sep_pattern
        return tokens + self.sep_pos_embed[0]

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """(N*b, g*g, D) embedded patches (position included) -> (b, T, D) packed sequence."""
        layout = self.layout_on(patch_tokens.device)
        table = self._split(patch_tokens)
        if self.cfg.sep_type != "none":
            sep = self.separator_tokens().to(table.dtype)
            table = torch.cat([table, sep[None].expand(table.shape[0], -1, -1)], dim=1)
        return table.index_select(1, layout.source)

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """(N*b, 3, S, S) -> (b, Q, p*p*3): norm-pix patches / separator patterns per query."""
        layout = self.layout_on(images.device)
        table = self._split(norm_pix(patchify(images, self.cfg.patch_size)))
        if self.cfg.sep_type != "none":
            sep = self.sep_target.to(table.dtype)
            table = torch.cat([table, sep[None].expand(table.shape[0], -1, -1)], dim=1)
        return table.index_select(1, layout.target_source)
