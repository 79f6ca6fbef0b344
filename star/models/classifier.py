"""The fine-tuning form: 4-scan MambaMLP encoder, class token, final norm and linear head.

Names follow ARM's fine-tuning release: patch_embed.proj, cls_token, pos_embed,
layers.{i}.{norm1,mixer,norm2,mlp}, norm_f, head; the 4-scan mixer directions carry ARM's
suffixes (see :mod:`star.models.mamba`).

Class token (``cls_position``): ``middle`` inserts it at index g*g // 2 (ARM / Vim),
``tail`` appends it after the last patch (STAR*, default), ``none`` has no class token and
mean-pools all tokens. ``pos_embed`` is indexed by sequence position (ARM's convention): its
entry at the class token's index is the class token's own slot, the others follow the patch
grid row-major.

Readout (``readout``): ``token`` classifies from the class token's output (STAR Tables 1-5),
``mean_patches`` from the mean of the patch tokens' outputs with the class token still in
the sequence: ARM's ``--global_pool`` (``Finetuning/models_mamba.py`` ``forward_features``,
used by ARM README's fine-tuning commands). The recipe choices around loading pretrained
weights (drop-path schedule, head init, the class token's position slot) follow
``Finetuning/`` of ARM's code; docs/fidelity.md, section 3, cites each.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from star.models.blocks import MambaMLPBlock, PatchEmbed, init_encoder_weights
from star.models.mamba import PER_DIRECTION_PARAMS, SCAN_DIRECTIONS, ScanGrid, direction_param_name
from star.models.pos_embed import resize_grid_table
from star.models.settings import check_choices, choice_field
from star.models.weight_decay import no_weight_decay_names

CLS_POSITIONS = ("middle", "tail", "none")
READOUTS = ("token", "mean_patches")
DROP_PATH_SCHEDULES = ("arm", "linspace")
# keys of a pretraining checkpoint that the classifier has no use for (decoder, separators),
# under our names (decoder.*) and under ARM's top-level ones
_PRETRAIN_ONLY = re.compile(
    r"^(decoder\.|ar_token|dec_pos_embed|dec_sep_pos_embed|mask|enc2dec\.|dec_block\.|norm_[1-4]\.|"
    r"ar_norm\.|ar_pred\.|packer\.)")


@dataclass(frozen=True)
class StarClassifierConfig:
    """Everything that defines a fine-tuning model; the defaults are STAR-B* (STAR Sec. 4.1,
    Table 5: 224 px, tail class token, drop path 0.1)."""

    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_classes: int = 1000
    cls_position: str = choice_field("tail", CLS_POSITIONS)
    # token: the class token's output; mean_patches: ARM's --global_pool (class token kept in
    # the sequence, excluded from the mean). With cls_position none both are the patch mean.
    readout: str = choice_field("token", READOUTS)
    drop_path: float = 0.1
    # arm: block i gets ([0] + linspace(0, drop_path, depth))[i] (ARM Finetuning/models_mamba.py
    # `inter_dpr`): the first two blocks 0, the last (depth-2)/(depth-1) x drop_path.
    # linspace: block i gets linspace(0, drop_path, depth)[i] (timm's rule; reaches drop_path).
    drop_path_schedule: str = choice_field("arm", DROP_PATH_SCHEDULES)
    # std of the head's trunc-normal weights (bias 0) when load_pretrained fills an encoder
    # from a checkpoint without a head: ARM main_finetune.py's `trunc_normal_(model.head.weight,
    # std=2e-5)` after loading. A model built without loading keeps the 0.02 of ARM's
    # segm_init_weights; 0.02 here gives our first recipe (the construction init kept).
    head_init_std: float = 2e-5
    d_state: int = 16
    d_conv: int = 4

    def __post_init__(self) -> None:
        check_choices(self)
        if not self.head_init_std >= 0:
            raise ValueError(f"head_init_std={self.head_init_std!r} must be >= 0")
        if not 0 <= self.drop_path < 1:
            raise ValueError(f"drop_path={self.drop_path!r} must lie in [0, 1)")

    def drop_path_rates(self) -> list[float]:
        """The drop-path probability of each block, under ``drop_path_schedule``."""
        rates = torch.linspace(0, self.drop_path, self.depth).tolist()
        if self.drop_path_schedule == "arm":
            rates = ([0.0] + rates)[: self.depth]
        return rates


@dataclass
class LoadReport:
    """What :meth:`StarClassifier.load_pretrained` did."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    dropped_keys: list[str] = field(default_factory=list)  # decoder / separator keys, by design
    expanded_keys: list[str] = field(default_factory=list)  # 4-scan params copied from 1-scan ones
    pos_embed_resized: tuple[int, int] | None = None  # (old grid, new grid)
    cls_slot_zeroed: int | None = None  # index of the class token's pos_embed entry set to 0
    head_reset_std: float | None = None  # the head was re-initialised with this std

    def __str__(self) -> str:
        lines = [f"dropped {len(self.dropped_keys)} pretraining-only keys (decoder, separators)"]
        if self.pos_embed_resized:
            old, new = self.pos_embed_resized
            lines.append(f"pos_embed interpolated {old}x{old} -> {new}x{new} (bicubic)")
        if self.cls_slot_zeroed is not None:
            lines.append(f"pos_embed entry {self.cls_slot_zeroed} (the class token's) set to 0")
        if self.head_reset_std is not None:
            lines.append(f"head re-initialised: trunc-normal std {self.head_reset_std:g}, bias 0")
        if self.expanded_keys:
            lines.append(f"initialised {len(self.expanded_keys)} backward/column scan parameters "
                         "from the causal scan's")
        lines.append(f"missing keys ({len(self.missing_keys)}): {', '.join(self.missing_keys) or '-'}")
        lines.append(f"unexpected keys ({len(self.unexpected_keys)}): {', '.join(self.unexpected_keys) or '-'}")
        return "\n".join(lines)


class StarClassifier(nn.Module):
    """4-scan encoder, class token and head; ``config`` holds every setting."""

    def __init__(self, config: StarClassifierConfig) -> None:
        super().__init__()
        self.config = config
        embed_dim, num_classes = config.embed_dim, config.num_classes
        self.patch_embed = PatchEmbed(config.img_size, config.patch_size, embed_dim)
        num_patches = self.patch_embed.num_patches
        cls_index = {"middle": num_patches // 2, "tail": num_patches, "none": None}[config.cls_position]
        self.grid = ScanGrid(self.patch_embed.grid_size, cls_index)

        if cls_index is not None:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid.seq_len, embed_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        rates = config.drop_path_rates()
        self.layers = nn.ModuleList(
            MambaMLPBlock(embed_dim, num_scans=4, drop_path=r, d_state=config.d_state, d_conv=config.d_conv)
            for r in rates)
        init_encoder_weights(self.layers)
        self.norm_f = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    # -- training-team helpers -------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        return no_weight_decay_names(self)

    @property
    def num_layers_for_lr_decay(self) -> int:
        """Largest :meth:`layer_id` (the head); ids run 0..num_layers_for_lr_decay."""
        return self.config.depth + 1

    def layer_id(self, name: str) -> int:
        """Layer-wise lr decay id: 0 embeddings, i + 1 for ``layers.i``, depth + 1 head/norm_f."""
        if name.startswith(("cls_token", "pos_embed", "patch_embed")):
            return 0
        match = re.match(r"layers\.(\d+)\.", name)
        if match:
            return int(match.group(1)) + 1
        return self.config.depth + 1

    # -- forward -----------------------------------------------------------------------------
    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)
        index = self.grid.cls_index
        if index is not None:
            cls = self.cls_token.expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :index], cls, x[:, index:]], dim=1)
        x = x + self.pos_embed
        for layer in self.layers:
            x = layer(x, self.grid)
        x = self.norm_f(x)
        if index is None:
            return x.mean(dim=1)
        if self.config.readout == "mean_patches":
            # mean over the patch tokens. ARM averages the means of the two halves around its
            # middle token, the same number for the even patch counts of its grids (14 x 14)
            return torch.cat([x[:, :index], x[:, index + 1:]], dim=1).mean(dim=1)
        return x[:, index]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(images))

    # -- loading a pretraining checkpoint --------------------------------------------------------
    def load_pretrained(self, state_dict: dict[str, torch.Tensor], verbose: bool = True) -> LoadReport:
        """Load encoder weights from a pretraining (or fine-tuning) state dict.

        * decoder and separator keys are dropped;
        * a square (no class token) ``pos_embed`` table is resized bicubically to this grid
          (e.g. 12x12 at 192 px -> 14x14 at 224 px) and a zero vector is inserted at the class
          token's index (ARM ``Finetuning/util/pos_embed.py`` ``interpolate_pos_embed``);
        * 1-scan mixer weights (conv1d, x_proj, dt_proj, A_log, D) are copied into each of the
          four scan directions: every direction starts from the dynamics the causal scan
          learned, only its reading order differs (in_proj/out_proj are shared anyway);
        * a checkpoint without a head (a pretraining one) leaves the head re-initialised:
          trunc-normal weights of std ``config.head_init_std``, bias 0 (ARM ``main_finetune.py``).
        Shape mismatches raise; missing and unexpected keys are reported (and printed).
        """
        report = LoadReport()
        state = _unwrap(state_dict)
        for key in [k for k in state if _PRETRAIN_ONLY.match(k)]:
            report.dropped_keys.append(key)
            del state[key]
        if "pos_embed" in state:
            state["pos_embed"] = self._adapt_pos_embed(state["pos_embed"], report)
        for key in list(state):
            match = re.match(r"(layers\.\d+\.mixer\.)(.+)$", key)
            if not match or match.group(2) not in PER_DIRECTION_PARAMS:
                continue
            for suffix in list(SCAN_DIRECTIONS.values())[1:]:
                target = match.group(1) + direction_param_name(match.group(2), suffix)
                if target not in state:
                    state[target] = state[key].clone()
                    report.expanded_keys.append(target)
        own = self.state_dict()
        wrong = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                 for k, v in state.items() if k in own and v.shape != own[k].shape]
        if wrong:
            raise ValueError("checkpoint does not fit this model (build it with matching "
                             "embed_dim/depth/num_classes):\n  " + "\n  ".join(wrong))
        result = self.load_state_dict(state, strict=False)
        report.missing_keys, report.unexpected_keys = list(result.missing_keys), list(result.unexpected_keys)
        if isinstance(self.head, nn.Linear) and "head.weight" not in state:
            self.reset_head(self.config.head_init_std)
            report.head_reset_std = self.config.head_init_std
        if verbose:
            print(report)
        return report

    @torch.no_grad()
    def reset_head(self, std: float) -> None:
        """Trunc-normal head weights of standard deviation ``std``, zero bias. The cut stays at
        +-2 absolute, as timm's ``trunc_normal_`` that ARM calls: for 2e-5 a plain normal."""
        nn.init.trunc_normal_(self.head.weight, std=std)
        nn.init.zeros_(self.head.bias)

    def _adapt_pos_embed(self, table: torch.Tensor, report: LoadReport) -> torch.Tensor:
        if table.shape == self.pos_embed.shape:
            return table
        num = table.shape[-2]
        old_grid = math.isqrt(num)
        if table.dim() != 3 or old_grid * old_grid != num or table.shape[-1] != self.config.embed_dim:
            raise ValueError(
                f"cannot adapt pos_embed of shape {tuple(table.shape)} to {tuple(self.pos_embed.shape)}: "
                "only a square patch table (pretraining checkpoint, no class token) is resized")
        grid = resize_grid_table(table, self.grid.size).to(self.pos_embed.dtype)
        report.pos_embed_resized = (old_grid, self.grid.size)
        index = self.grid.cls_index
        if index is None:
            return grid
        # ARM inserts torch.zeros at the class token's index: its slot starts at 0
        cls_slot = grid.new_zeros(grid.shape[0], 1, grid.shape[2])
        report.cls_slot_zeroed = index
        return torch.cat([grid[:, :index], cls_slot, grid[:, index:]], dim=1)


def _unwrap(state_dict: dict) -> dict[str, torch.Tensor]:
    """Accept a bare state dict or a checkpoint holding one under 'model'/'module'/'state_dict';
    strip a DistributedDataParallel ``module.`` prefix. Returns a shallow copy."""
    for key in ("model", "module", "state_dict"):
        if key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
            break
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
