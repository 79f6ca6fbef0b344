"""The STAR / ARM pretraining model, top to bottom: configuration, sequence layout, separator
packing, cluster-causal decoder, and the model (STAR paper Sec. 3.2-3.3, Fig. 2).

    images (N*b, 3, S, S) --patch_embed + pos_embed--> (N*b, g*g, D)
        --packer--> (b, T, D): N images and their separators, cluster-priority order
        --layers (MambaMLP, 1 causal scan)--> outputs of layers depth/2, 2/3, 5/6, depth
        --decoder (queries = ar_token + position of each target)--> (b, Q, p*p*3)
    loss = mean squared error against norm-pix patches / separator patterns (Eq. 7).

Vocabulary:

* patch: a p x p pixel square; an image has a g x g grid of them (g = S / p).
* cluster: the prediction unit. An image cluster is a k x k block of patches; a separator is
  a cluster too (k x k tokens for type ``cluster``, one token for type ``token``).
  Cluster ids run over the whole sequence: 0, 1, 2, ... in sequence order.
* cluster-priority order: image clusters row-major over the (g/k) x (g/k) cluster grid,
  and inside each cluster its k x k patches row-major.
* separator position (Fig. 4): ``SC`` one separator before each image, ``CS`` one after,
  ``SCS`` one before every row of g/k clusters, ``CSC`` one after every row.

Prediction rule (Sec. 3.3, Eq. 7): cluster i predicts cluster i + 1 of the whole sequence.
Cluster 0 is context only. After the last cluster comes what the next image would start
with: if the per-image pattern starts with a separator (``SC``, ``SCS``) the last cluster
predicts that separator (c_{L*N+1} := c_sp), otherwise (``CS``, ``CSC``, type ``none``)
nothing follows and the last cluster predicts nothing. Hence:

* ARM (N = 1, type none): 9 clusters, 8 predicted (clusters 1..8).
* type none, N > 1: image n + 1's first cluster is predicted from image n's last;
  N * 9 - 1 predicted clusters.
* SC, N = 8: 80 clusters (8 x (1 separator + 9 image clusters)) = 1280 tokens. Predicted:
  clusters 1..79 (72 image clusters and the separators of images 2..8) plus one trailing
  separator after the last cluster = 80 predicted clusters (72 image + 8 separator).

Everything that depends only on the configuration (which token goes where, what each query
predicts, which encoder tokens it may see) is computed once, at index level, as a
:class:`Layout`; the per-batch work is two gathers.

Separators (Fig. 3) bypass the patch embedding and live in embedding space. All separator
tokens share one position encoding (Sec. 4.2: "shared positional encoding across the tokens"),
``sep_pos_embed``: ``fixed`` (default) the 2-D sin-cos encoding of the virtual grid cell
(-1, -1), which no patch has, as a non-persistent buffer; ``none`` nothing; ``learned`` one
trainable trunc-normal vector (our first recipe; it makes "zeros" a learned vector and
collapses Table 2's value ablation: docs/fidelity.md, section 2). The decoder's queries for
separator targets have the same choice, ``dec_sep_pos_embed`` (``none``: the query is
``ar_token`` alone). Separator values per token at slot (r, c) of the k x k separator: ``zeros`` 0,
``ones`` 1, ``embedding`` a learned nn.Embedding(1, D) vector, ``identity`` 1 when r == c else
0. Targets use the same pattern in target space (p*p*3 values); the learned ``embedding``
value has no pixel-space meaning, so its target is the zeros pattern. A ``token`` separator
is the single slot (0, 0), so an ``identity`` token is all ones.

Names. Encoder names are ARM's (patch_embed.proj, pos_embed, layers.{i}.{norm1,mixer,norm2,mlp}).
The decoder is one submodule here; ARM keeps its pieces at the top level. The two naming
schemes meet at the boundary only: :func:`to_arm_state_dict` gives a state dict ARM's names
(``star export``, consolidated runs), :func:`from_arm_state_dict` maps ARM's names to ours and
drops ARM's cached ``mask`` buffer, and ``load_state_dict`` applies it, so an official ARM
checkpoint loads strictly into ``arm_base_pz16``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from star.models.blocks import MambaMLPBlock, PatchEmbed, init_encoder_weights
from star.models.pos_embed import sincos_2d, sincos_2d_table
from star.models.settings import check_choices, choice_field
from star.models.weight_decay import no_weight_decay_names

# ----------------------------------------------------------------------------- configuration

SEP_TYPES = ("none", "token", "cluster")
SEP_VALUES = ("zeros", "ones", "embedding", "identity")
SEP_POSITIONS = ("SC", "CS", "SCS", "CSC")
SEP_POS_EMBEDS = ("none", "fixed", "learned")  # the separators' shared position encoding
SEPARATOR_CELL = (-1, -1)  # the virtual grid cell whose sin-cos encoding ``fixed`` uses
DECODER_LEVELS = 4  # one decoder block per encoder feature level (ARM's design)

IMAGE, SEPARATOR = 0, 1  # token kinds (Layout's ``kind`` tensors)


@dataclass(frozen=True)
class PackingConfig:
    """How images become one sequence: S, p, k, N and the separator (Sec. 3.3, Figs. 3-4)."""

    img_size: int = 192
    patch_size: int = 16
    cluster_size: int = 4
    images_per_seq: int = 8
    sep_type: str = choice_field("cluster", SEP_TYPES)
    sep_value: str = choice_field("identity", SEP_VALUES)
    sep_position: str = choice_field("SC", SEP_POSITIONS)
    sep_pos_embed: str = choice_field("fixed", SEP_POS_EMBEDS)

    def __post_init__(self) -> None:
        check_choices(self)
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
    def separator_slots(self) -> list[tuple[int, int]]:
        """(row, col) of each separator token inside the k x k separator pattern."""
        k = self.cluster_size
        return [(0, 0)] if self.sep_type == "token" else [(r, c) for r in range(k) for c in range(k)]

    @property
    def target_dim(self) -> int:
        return self.patch_size**2 * 3


@dataclass(frozen=True)
class StarPretrainConfig:
    """Everything that defines a pretraining model; the defaults are STAR-B (Sec. 4.1)."""

    packing: PackingConfig = field(default_factory=PackingConfig)
    embed_dim: int = 768
    depth: int = 12
    decoder_dim: int = 512
    decoder_depth: int = DECODER_LEVELS
    decoder_heads: int = 8
    decoder_mlp_ratio: float = 4.0
    d_state: int = 16
    d_conv: int = 4
    drop_path: float = 0.0
    dec_sep_pos_embed: str = choice_field("fixed", SEP_POS_EMBEDS)  # separator queries' position

    def __post_init__(self) -> None:
        check_choices(self)
        if self.decoder_depth != DECODER_LEVELS:
            raise ValueError(f"decoder_depth must be {DECODER_LEVELS} (one block per encoder level), "
                             f"got {self.decoder_depth}")


def feature_levels(depth: int) -> tuple[int, int, int, int]:
    """1-based encoder layers whose outputs feed the decoder: depth/2, 2/3, 5/6 and depth."""
    return depth // 2, depth * 2 // 3, depth * 5 // 6, depth


# ----------------------------------------------------------------------------- layout


class Slots(NamedTuple):
    """Where each token of a list sits; every field is a (length,) long tensor.

    kind     IMAGE or SEPARATOR
    image    image n the token belongs to; a separator belongs to the image it introduces
             (SC/SCS) or closes (CS/CSC); the trailing separator target has image N
    cluster  running cluster id over the whole sequence (separators are clusters)
    row, col patch position in its image, or the slot inside the separator pattern
    source   index into the per-sequence source table [N*g*g patch tokens, separator slots]
    """

    kind: torch.Tensor
    image: torch.Tensor
    cluster: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    source: torch.Tensor

    def to(self, device: torch.device | str) -> Slots:
        return Slots(*(t.to(device) for t in self))


@dataclass(frozen=True)
class Layout:
    """Index-level description of one packed sequence; the same for every batch.

    tokens          the T tokens of the sequence, in scan order
    targets         the Q predicted tokens, one per decoder query, in sequence order; a query
                    predicting cluster j may see encoder clusters < j
    target_token    (Q,) index of each target in the sequence, -1 for the trailing separator
    encoder_length  tokens the encoder reads: those some query may see
    """

    tokens: Slots
    targets: Slots
    target_token: torch.Tensor
    encoder_length: int

    @property
    def seq_len(self) -> int:
        return int(self.tokens.kind.numel())

    @property
    def num_queries(self) -> int:
        return int(self.targets.kind.numel())

    @property
    def num_clusters(self) -> int:
        return int(self.tokens.cluster.max()) + 1

    @property
    def num_predicted_clusters(self) -> int:
        return int(torch.unique(self.targets.cluster).numel())

    def pattern(self) -> str:
        """The sequence as one letter per cluster, e.g. ``SCCCCCCCCC SCCCCCCCCC`` for SC with
        N = 2 (S separator, C image cluster; a space starts each image)."""
        letters, previous_image = [], None
        for cid in range(self.num_clusters):
            first = int(torch.nonzero(self.tokens.cluster == cid)[0])
            image = int(self.tokens.image[first])
            if previous_image is not None and image != previous_image:
                letters.append(" ")
            letters.append("S" if int(self.tokens.kind[first]) == SEPARATOR else "C")
            previous_image = image
        return "".join(letters)

    def attention_mask(self) -> torch.Tensor:
        """(Q, encoder_length) bool, True = may attend: encoder clusters < target cluster
        (bidirectional within a cluster, causal between clusters: Fig. 2)."""
        return self.tokens.cluster[None, : self.encoder_length] < self.targets.cluster[:, None]

    def decoder_position(self, grid: int) -> torch.Tensor:
        """(Q,) row of the decoder's position table per target: r * g + c for a patch, g * g
        (the one separator slot, ``dec_sep_pos_embed``) for a separator."""
        t = self.targets
        return torch.where(t.kind == IMAGE, t.row * grid + t.col, torch.full_like(t.kind, grid * grid))

    def to(self, device: torch.device | str) -> Layout:
        return Layout(self.tokens.to(device), self.targets.to(device), self.target_token.to(device),
                      self.encoder_length)


class _Cluster(NamedTuple):
    """One cluster of the sequence before it is expanded into tokens."""

    kind: int
    image: int
    row: int  # cluster row / col in the (g/k) x (g/k) cluster grid; -1 for a separator
    col: int


class _Token(NamedTuple):
    kind: int
    image: int
    cluster: int
    row: int
    col: int
    source: int


def cluster_priority_order(grid: int, cluster_size: int) -> torch.Tensor:
    """Row-major patch indices (r * grid + c) of one image, listed in cluster-priority order."""
    k, side = cluster_size, grid // cluster_size
    idx = torch.arange(grid * grid).reshape(side, k, side, k)  # (cluster row, r, cluster col, c)
    return idx.permute(0, 2, 1, 3).reshape(-1)


def _clusters(cfg: PackingConfig) -> list[_Cluster]:
    """The sequence as clusters, images in order, separators placed by ``sep_position``."""
    side = cfg.clusters_per_side
    out: list[_Cluster] = []
    for n in range(cfg.images_per_seq):
        sep = [_Cluster(SEPARATOR, n, -1, -1)] if cfg.sep_type != "none" else []
        image: list[_Cluster] = []
        for cr in range(side):
            row = [_Cluster(IMAGE, n, cr, cc) for cc in range(side)]
            if cfg.sep_position == "SCS":
                row = sep + row
            elif cfg.sep_position == "CSC":
                row = row + sep
            image += row
        if cfg.sep_position == "SC":
            image = sep + image
        elif cfg.sep_position == "CS":
            image = image + sep
        out += image
    return out


def _stack(tokens: list[_Token]) -> Slots:
    return Slots(*(torch.tensor(column, dtype=torch.long) for column in zip(*tokens)))


def build_layout(cfg: PackingConfig) -> Layout:
    """Compute the :class:`Layout` of a configuration (pure index arithmetic, no data)."""
    g, k = cfg.grid, cfg.cluster_size
    num_patch_tokens = cfg.images_per_seq * g * g  # separator slots follow in the source table

    def expand(unit: _Cluster, cid: int) -> list[_Token]:
        """The tokens of one cluster, in scan order."""
        if unit.kind == SEPARATOR:
            return [_Token(SEPARATOR, unit.image, cid, r, c, num_patch_tokens + slot)
                    for slot, (r, c) in enumerate(cfg.separator_slots)]
        return [_Token(IMAGE, unit.image, cid, row, col, unit.image * g * g + row * g + col)
                for row in range(unit.row * k, unit.row * k + k)
                for col in range(unit.col * k, unit.col * k + k)]

    units = _clusters(cfg)
    clusters = [expand(unit, cid) for cid, unit in enumerate(units)]
    first_token = [0]
    for tokens in clusters:
        first_token.append(first_token[-1] + len(tokens))

    # Cluster j (1 <= j < U) is predicted from clusters < j; if the per-image pattern starts
    # with a separator, a trailing separator (id U) is predicted from the whole sequence.
    targets: list[_Token] = []
    target_token: list[int] = []
    for cid in range(1, len(units)):
        targets += clusters[cid]
        target_token += range(first_token[cid], first_token[cid + 1])
    if units[0].kind == SEPARATOR:
        trailing = expand(_Cluster(SEPARATOR, cfg.images_per_seq, -1, -1), len(units))
        targets += trailing
        target_token += [-1] * len(trailing)
    if not targets:
        raise ValueError(f"{cfg} has a single cluster and no separator, so nothing can be predicted")

    tokens = _stack([t for cluster in clusters for t in cluster])
    targets_t = _stack(targets)
    encoder_length = int((tokens.cluster < targets_t.cluster.max()).sum())
    return Layout(tokens, targets_t, torch.tensor(target_token, dtype=torch.long), encoder_length)


# ----------------------------------------------------------------------------- pixels and separators


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
    slots = cfg.separator_slots
    if value == "ones":
        return torch.ones(len(slots), dim)
    if value == "identity":
        diag = torch.tensor([1.0 if r == c else 0.0 for r, c in slots])
        return diag[:, None].expand(len(slots), dim).clone()
    return torch.zeros(len(slots), dim)  # zeros, and the target of a learned embedding


def separator_position(dim: int) -> torch.Tensor:
    """(1, 1, dim) the fixed encoding shared by every separator token: sin-cos of the virtual
    cell (-1, -1) before the first patch (docs/fidelity.md, section 2)."""
    row, col = SEPARATOR_CELL
    return sincos_2d(dim, torch.tensor([row]), torch.tensor([col]))[None]


def _separator_position_slot(module: nn.Module, kind: str, dim: int) -> None:
    """Give ``module`` its ``sep_pos_embed``: a trainable trunc-normal vector (``learned``, a
    state-dict entry), or a non-persistent buffer (``fixed`` sin-cos, ``none`` zeros), so state
    dicts only carry the learned kind."""
    if kind == "learned":
        module.sep_pos_embed = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(module.sep_pos_embed, std=0.02)
    else:
        value = separator_position(dim) if kind == "fixed" else torch.zeros(1, 1, dim)
        module.register_buffer("sep_pos_embed", value, persistent=False)


class SequencePacker(nn.Module):
    """Turns per-image patch tokens into packed sequences and builds the matching targets.

    Images arrive as (N*b, ...): images ``s*N .. s*N + N - 1`` form sequence ``s``.
    Learned parameters (only when separators exist): ``sep_pos_embed`` (1, 1, D) with
    ``sep_pos_embed=learned`` (else a fixed buffer), and ``sep_embed`` (nn.Embedding(1, D))
    for the ``embedding`` value.
    """

    def __init__(self, cfg: PackingConfig, embed_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.layout = build_layout(cfg)
        self._device_layout: Layout | None = None
        self._device_mask: torch.Tensor | None = None
        if cfg.sep_type != "none":
            _separator_position_slot(self, cfg.sep_pos_embed, embed_dim)
            if cfg.sep_value == "embedding":
                self.sep_embed = nn.Embedding(1, embed_dim)
                nn.init.normal_(self.sep_embed.weight, std=0.02)
            self.register_buffer("sep_pattern", separator_pattern(cfg, embed_dim), persistent=False)
            self.register_buffer("sep_target", separator_pattern(cfg, cfg.target_dim), persistent=False)

    def layout_on(self, device: torch.device) -> Layout:
        """The layout with its tensors on ``device`` (cached)."""
        if self._device_layout is None or self._device_layout.target_token.device != device:
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
        if self.cfg.sep_pos_embed == "none":
            return tokens  # a zeros separator enters the encoder as exact zeros
        return tokens + self.sep_pos_embed[0]

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """(N*b, g*g, D) embedded patches (position included) -> (b, T, D) packed sequence."""
        layout = self.layout_on(patch_tokens.device)
        table = self._split(patch_tokens)                                     # (b, N*g*g, D)
        if self.cfg.sep_type != "none":
            sep = self.separator_tokens().to(table.dtype)
            table = torch.cat([table, sep[None].expand(table.shape[0], -1, -1)], dim=1)
        return table.index_select(1, layout.tokens.source)

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """(N*b, 3, S, S) -> (b, Q, p*p*3): norm-pix patches / separator patterns per query."""
        layout = self.layout_on(images.device)
        table = self._split(norm_pix(patchify(images, self.cfg.patch_size)))  # (b, N*g*g, p*p*3)
        if self.cfg.sep_type != "none":
            sep = self.sep_target.to(table.dtype)
            table = torch.cat([table, sep[None].expand(table.shape[0], -1, -1)], dim=1)
        return table.index_select(1, layout.targets.source)


# ----------------------------------------------------------------------------- decoder


class CrossAttention(nn.Module):
    """Queries read keys / values; no self-attention among queries (ARM's ``attn2``)."""

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
        q = self.q(queries).reshape(b, nq, h, dim // h).transpose(1, 2)             # (b, h, Q, d/h)
        k, v = self.kv(keys).reshape(b, nk, 2, h, dim // h).permute(2, 0, 3, 1, 4)  # (b, h, L, d/h) each
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)              # (b, h, Q, d/h)
        return self.proj(out.transpose(1, 2).reshape(b, nq, dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class DecoderBlock(nn.Module):
    """q = q + attn2(norm2_1(q), norm2_2(kv)); q = q + mlp(norm2(q)) (ARM's names)."""

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


class Decoder(nn.Module):
    """ARM's lightweight cluster-causal decoder: four blocks, block i reading encoder level i.

    The four levels are LayerNorm'd (``feature_norms``), concatenated and projected by one
    Linear ``enc2dec`` to 4 x decoder_dim. As in ARM's release the projection is split
    channel-interleaved: level i is ``levels[..., i::4]`` (ARM reshapes to (..., dim, 4) and
    takes [..., i]), which keeps official checkpoints meaningful. A query is ``ar_token`` plus
    the fixed sin-cos position of the patch it predicts (``pos_embed``), or ``sep_pos_embed``
    for a separator target (``dec_sep_pos_embed``: fixed sin-cos of cell (-1, -1), zeros, or
    learned).

    Initialisation as ARM's ``models_pretrain.py``: xavier-uniform on the decoder blocks only
    (``dec_block.apply(atten_init_weights)``); ``enc2dec`` and ``pred`` keep PyTorch's default
    weights with zero biases (``self.apply(_init_weights)`` zeroes every Linear bias).
    """

    def __init__(self, config: StarPretrainConfig) -> None:
        super().__init__()
        dim, levels, packing = config.decoder_dim, config.decoder_depth, config.packing
        self.ar_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.ar_token, std=0.02)
        self.register_buffer("pos_embed", sincos_2d_table(dim, packing.grid)[None])
        if packing.sep_type != "none":
            _separator_position_slot(self, config.dec_sep_pos_embed, dim)
        self.feature_norms = nn.ModuleList(nn.LayerNorm(config.embed_dim) for _ in range(levels))
        self.enc2dec = nn.Linear(config.embed_dim * levels, dim * levels)
        self.blocks = nn.ModuleList(DecoderBlock(dim, config.decoder_heads, config.decoder_mlp_ratio)
                                    for _ in range(levels))
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, packing.target_dim)
        for linear in (self.enc2dec, self.pred):
            nn.init.zeros_(linear.bias)
        self.blocks.apply(_xavier_init)

    def queries(self, position: torch.Tensor, batch: int) -> torch.Tensor:
        """(Q,) decoder positions (:meth:`Layout.decoder_position`) -> (b, Q, dim) queries."""
        table = self.pos_embed[0]                                             # (g*g, dim)
        if hasattr(self, "sep_pos_embed"):
            table = torch.cat([table, self.sep_pos_embed[0]], dim=0)          # (g*g + 1, dim)
        queries = self.ar_token + table.index_select(0, position)[None]      # (1, Q, dim)
        return queries.expand(batch, -1, -1)

    def forward(self, features: list[torch.Tensor], queries: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """features: 4 x (b, L, D); queries (b, Q, dim); mask (Q, L) bool -> (b, Q, p*p*3)."""
        depth = len(self.blocks)
        if len(features) != depth:
            raise ValueError(f"decoder expects {depth} feature levels, got {len(features)}")
        normed = [norm(f) for norm, f in zip(self.feature_norms, features)]
        levels = self.enc2dec(torch.cat(normed, dim=-1))                      # (b, L, 4 * dim)
        for i, block in enumerate(self.blocks):
            queries = block(queries, levels[..., i::depth], mask)            # (b, Q, dim)
        return self.pred(self.norm(queries))


def _xavier_init(module: nn.Module) -> None:
    """ARM's decoder init (as the official JAX ViT): xavier-uniform Linear, zero bias."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


# ----------------------------------------------------------------------------- the model


class StarPretrainModel(nn.Module):
    """Causal MambaMLP encoder over packed sequences + cluster-causal decoder; ``config``
    holds every setting (:class:`StarPretrainConfig`)."""

    def __init__(self, config: StarPretrainConfig) -> None:
        super().__init__()
        self.config = config
        packing, dim = config.packing, config.embed_dim
        self.patch_embed = PatchEmbed(packing.img_size, packing.patch_size, dim)
        self.register_buffer("pos_embed", sincos_2d_table(dim, packing.grid)[None])
        self.packer = SequencePacker(packing, dim)
        rates = torch.linspace(0, config.drop_path, config.depth).tolist()
        self.layers = nn.ModuleList(
            MambaMLPBlock(dim, num_scans=1, drop_path=r, d_state=config.d_state, d_conv=config.d_conv)
            for r in rates)
        init_encoder_weights(self.layers)
        self.decoder = Decoder(config)

    @property
    def packing(self) -> PackingConfig:
        return self.config.packing

    @property
    def layout(self) -> Layout:
        return self.packer.layout

    def no_weight_decay(self) -> set[str]:
        return no_weight_decay_names(self)

    def forward_encoder(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(N*b, 3, S, S) -> outputs of the decoder's feature layers, 4 x (b, L, D)."""
        tokens = self.patch_embed(images) + self.pos_embed                   # (N*b, g*g, D)
        hidden = self.packer(tokens)[:, : self.layout.encoder_length]        # (b, L, D)
        levels = feature_levels(self.config.depth)
        kept: dict[int, torch.Tensor] = {}
        for index, layer in enumerate(self.layers, start=1):
            hidden = layer(hidden)
            if index in levels:
                kept[index] = hidden
        return [kept[i] for i in levels]

    def forward_decoder(self, features: list[torch.Tensor]) -> torch.Tensor:
        """4 x (b, L, D) -> (b, Q, p*p*3) predictions, one per target of the layout."""
        device = features[0].device
        layout = self.packer.layout_on(device)
        queries = self.decoder.queries(layout.decoder_position(self.packing.grid), features[0].shape[0])
        return self.decoder(features, queries, self.packer.attention_mask_on(device))

    def forward_loss(self, images: torch.Tensor, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean squared error over every predicted value (Eq. 7) -> (loss, target (b, Q, p*p*3))."""
        target = self.packer.targets(images.float())  # norm-pix in float32 even under bf16
        return (pred.float() - target).pow(2).mean(), target

    @torch.no_grad()
    def loss_parts(self, pred: torch.Tensor, target: torch.Tensor, kind: torch.Tensor) -> dict[str, torch.Tensor]:
        """The optimised loss split by target kind, for the logs (detached, float32 scalars):
        ``loss_image`` over the image-cluster queries, ``loss_sep`` over the separator queries
        (absent without separators). Separator targets are a fixed pattern on 10-25 % of the
        queries, so only ``loss_image`` compares across N and positions (docs/fidelity.md,
        section 1). ``loss`` = (n_img * loss_image + n_sep * loss_sep) / (n_img + n_sep)."""
        per_query = (pred.float() - target).pow(2).mean(dim=(0, 2))          # (Q,)
        parts = {}
        for key, value in (("loss_image", IMAGE), ("loss_sep", SEPARATOR)):
            weight = (kind == value).to(per_query.dtype)
            count = self.layout.targets.kind.eq(value).sum().item()          # host copy: no sync
            if count:
                parts[key] = (per_query * weight).sum() / count
        return parts

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (N*b, 3, S, S), normalised -> dict with ``loss`` (scalar, float32, what is
        optimised), ``loss_image`` and ``loss_sep`` (its split by target kind, detached:
        :meth:`loss_parts`), ``pred`` (b, Q, p*p*3), ``target`` (b, Q, p*p*3, float32) and
        ``target_kind`` (Q,) IMAGE or SEPARATOR per query; ``self.layout`` describes every query."""
        pred = self.forward_decoder(self.forward_encoder(images))
        loss, target = self.forward_loss(images, pred)
        kind = self.packer.layout_on(images.device).targets.kind
        return {"loss": loss, **self.loss_parts(pred, target, kind), "pred": pred, "target": target,
                "target_kind": kind}

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """(N*b, 3, S, S) images where every predicted patch is replaced by the model's
        prediction, de-normalised with the true patch's mean and std (as MAE visualises
        norm-pix predictions); context patches (e.g. ARM's first cluster) stay original."""
        pred = self.forward(images)["pred"]                                   # (b, Q, p*p*3)
        targets = self.packer.layout_on(images.device).targets
        n, g = self.packing.images_per_seq, self.packing.grid
        patches = patchify(images, self.packing.patch_size)                   # (N*b, g*g, p*p*3)
        mean = patches.mean(-1, keepdim=True)
        std = (patches.var(-1, keepdim=True) + 1e-6) ** 0.5
        is_image = targets.kind == IMAGE
        seq = torch.arange(pred.shape[0], device=images.device)[:, None]
        image_index = (seq * n + targets.image[is_image][None]).reshape(-1)
        patch_index = (targets.row * g + targets.col)[is_image].repeat(pred.shape[0])
        values = pred[:, is_image].reshape(-1, patches.shape[-1]).to(patches.dtype)
        out = patches.clone()
        out[image_index, patch_index] = values * std[image_index, patch_index] + mean[image_index, patch_index]
        return unpatchify(out, self.packing.patch_size)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # The boundary: a state dict with ARM's names (official checkpoints, `star export`
        # files) is renamed to ours before loading.
        own = {key[len(prefix):]: key for key in state_dict if key.startswith(prefix)}
        renamed = from_arm_state_dict({name: state_dict[key] for name, key in own.items()})
        for key in own.values():
            del state_dict[key]
        state_dict.update({prefix + name: value for name, value in renamed.items()})
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


# ----------------------------------------------------------------------------- ARM's names

# ARM keeps the decoder's pieces at the model's top level; here they form ``decoder``.
_ARM_TO_OURS = {
    "ar_token": "decoder.ar_token",
    "dec_pos_embed": "decoder.pos_embed",
    "dec_sep_pos_embed": "decoder.sep_pos_embed",  # STAR's separator slot (not in ARM)
    **{f"norm_{i + 1}": f"decoder.feature_norms.{i}" for i in range(DECODER_LEVELS)},
    "enc2dec": "decoder.enc2dec",
    "dec_block": "decoder.blocks",
    "ar_norm": "decoder.norm",
    "ar_pred": "decoder.pred",
}
_OURS_TO_ARM = {ours: arm for arm, ours in _ARM_TO_OURS.items()}
ARM_MASK_KEY = "mask"  # ARM's cached (fixed-geometry) decoder mask buffer; ours comes from the layout


def _rename(key: str, table: dict[str, str]) -> str:
    """Replace the leading dotted components of ``key`` that ``table`` maps."""
    for old, new in table.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old):]
    return key


def to_arm_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our pretraining names -> ARM's (same order, same tensors); other keys pass unchanged."""
    return {_rename(key, _OURS_TO_ARM): value for key, value in state.items()}


def from_arm_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ARM's pretraining names -> ours (timm's ``checkpoint_filter_fn``): idempotent on our own
    names; ARM's cached ``mask`` buffer is dropped with a warning."""
    if ARM_MASK_KEY in state:
        warnings.warn("ignoring the checkpoint's cached decoder 'mask' buffer (ARM's release): "
                      "this model builds its mask from the packing layout", stacklevel=2)
    return {_rename(key, _ARM_TO_OURS): value for key, value in state.items() if key != ARM_MASK_KEY}

