"""Analytic FLOPs of the STAR / ARM models, from their configuration alone.

One multiply-add is 2 FLOPs (papers that quote "FLOPs" of vision models often mean
multiply-adds: halve these figures to compare). Counted (forward pass):

* every Linear and the patch-embedding Conv2d: 2 * in * out per token it is applied to
  (the Mamba projections in_proj / x_proj / dt_proj / out_proj are Linears too, even though
  the model calls them through their weights);
* the depthwise causal conv1d of Mamba: 2 * L * d_inner * d_conv per scan direction;
* the selective scan: ``SCAN_FLOPS_PER_STATE`` = 9 FLOPs per (token, channel, state) per
  direction, the constant of mamba-ssm's and VMamba's FLOP counters: 2 for
  exp(delta * A), 3 for delta * B * u, 2 for the state update dA * h + dBu and 2 for the
  C . h reduction. It is 0.6 % of STAR-B's forward (3 % of the 4-scan fine-tuning model's),
  so its exact value hardly matters;
* decoder cross-attention: 2 * 2 * Q * L * d (the scores and the weighted sum), where L is
  the whole encoder length: the block-causal mask hides about half of the keys, but
  ``F.scaled_dot_product_attention`` computes the masked scores anyway, so they are counted
  as computed (the useful share is about half of this term).

Not counted: LayerNorm, activations (SiLU, GELU, softplus), the SwiGLU / gate products, the
D skip, residual adds, softmax, position-embedding adds, the loss, and the index gathers of
the sequence packer. They are elementwise, a few FLOPs per activation, and no peak-FLOP/s
figure is quoted for them.

Training FLOPs are 3 x forward (the backward pass costs two forwards: gradients with respect
to activations and to weights), the convention of MFU accounting (PaLM appendix B).

Usage::

    count = model_flops(model)                 # a built model: reads model.config
    count = config_flops(model_config("star_base_pz16", images_per_seq=4))
    count = flops_for_name("star_base_pz16")   # from the registry, without building the model
    count.forward_per_image, count.training_per_image, count.by_kind()
"""

from __future__ import annotations

import argparse
import math
from collections import defaultdict
from dataclasses import dataclass, field

from torch import nn

from star.models import StarClassifierConfig, StarPretrainConfig, build_layout, list_models, model_config

SCAN_FLOPS_PER_STATE = 9
TRAINING_MULTIPLIER = 3

# kinds of terms, for the breakdown
LINEAR, CONV, SCAN, ATTENTION = "linear", "conv", "scan", "attention"


@dataclass(frozen=True)
class Term:
    """One counted operation: ``name`` (where in the model), its ``kind`` and its FLOPs."""

    name: str
    kind: str
    flops: int


@dataclass
class FlopCount:
    """Forward FLOPs of one model input: a packed sequence of ``images`` images (pretraining)
    or one image (fine-tuning), with ``tokens`` encoder tokens."""

    images: int
    tokens: int
    terms: list[Term] = field(default_factory=list)

    def add(self, name: str, kind: str, flops: int) -> None:
        self.terms.append(Term(name, kind, int(flops)))

    @property
    def forward(self) -> int:
        """Forward FLOPs of one input (sequence or image)."""
        return sum(t.flops for t in self.terms)

    @property
    def forward_per_image(self) -> float:
        return self.forward / self.images

    @property
    def training_per_image(self) -> float:
        """Forward + backward FLOPs per image (3 x forward)."""
        return TRAINING_MULTIPLIER * self.forward_per_image

    @property
    def tokens_per_image(self) -> float:
        return self.tokens / self.images

    def by_kind(self) -> dict[str, int]:
        """Forward FLOPs of one input summed by kind (linear, conv, scan, attention)."""
        out: dict[str, int] = defaultdict(int)
        for term in self.terms:
            out[term.kind] += term.flops
        return dict(out)

    def to_dict(self) -> dict:
        return {"images_per_input": self.images, "tokens_per_input": self.tokens,
                "forward_per_input": self.forward, "forward_per_image": self.forward_per_image,
                "training_per_image": self.training_per_image, "by_kind": self.by_kind(),
                "scan_flops_per_state": SCAN_FLOPS_PER_STATE,
                "training_multiplier": TRAINING_MULTIPLIER,
                "masked_attention_counted": True}


def linear(tokens: int, d_in: int, d_out: int) -> int:
    """A Linear (or a conv written as one) applied to ``tokens`` tokens: 2 * in * out each."""
    return 2 * tokens * d_in * d_out


def attention(queries: int, keys: int, dim: int) -> int:
    """Scores q.k and the weighted sum of values over ``dim`` channels (all heads together)."""
    return 2 * 2 * queries * keys * dim


def add_mamba_layer(count: FlopCount, prefix: str, d_model: int, length: int, *, d_state: int,
                    d_conv: int, dt_rank: int, num_scans: int, expand: int = 1) -> None:
    """Terms of one Mamba mixer over ``length`` tokens: shared in_proj / out_proj, and per
    scan direction the conv1d, x_proj, dt_proj and the selective scan."""
    d_inner = expand * d_model
    count.add(f"{prefix}.in_proj", LINEAR, linear(length, d_model, 2 * d_inner))
    for direction in range(num_scans):
        where = f"{prefix}.scan{direction}"
        count.add(f"{where}.conv1d", CONV, 2 * length * d_inner * d_conv)
        count.add(f"{where}.x_proj", LINEAR, linear(length, d_inner, dt_rank + 2 * d_state))
        count.add(f"{where}.dt_proj", LINEAR, linear(length, dt_rank, d_inner))
        count.add(f"{where}.selective_scan", SCAN, SCAN_FLOPS_PER_STATE * length * d_inner * d_state)
    count.add(f"{prefix}.out_proj", LINEAR, linear(length, d_inner, d_model))


def add_encoder(count: FlopCount, *, embed_dim: int, depth: int, length: int, d_state: int,
                d_conv: int, num_scans: int, mlp_hidden: int | None = None) -> None:
    """``depth`` MambaMLP blocks over ``length`` tokens (Mamba mixer + SwiGLU)."""
    hidden = mlp_hidden or int(embed_dim * 4 * 2 / 3)
    dt_rank = math.ceil(embed_dim / 16)
    for i in range(depth):
        add_mamba_layer(count, f"layers.{i}.mixer", embed_dim, length, d_state=d_state,
                        d_conv=d_conv, dt_rank=dt_rank, num_scans=num_scans)
        count.add(f"layers.{i}.mlp.w1", LINEAR, linear(length, embed_dim, hidden))
        count.add(f"layers.{i}.mlp.w2", LINEAR, linear(length, embed_dim, hidden))
        count.add(f"layers.{i}.mlp.w3", LINEAR, linear(length, hidden, embed_dim))


def pretrain_flops(config: StarPretrainConfig) -> FlopCount:
    """Forward FLOPs of one packed sequence of the pretraining model. Sequence geometry
    (encoder length, number of queries) comes from the packing layout, which is pure index
    arithmetic; drop path and the number of heads do not change the count."""
    packing = config.packing
    layout = build_layout(packing)
    length, queries = layout.encoder_length, layout.num_queries
    dim, dec_dim, levels, p = config.embed_dim, config.decoder_dim, config.decoder_depth, packing.patch_size
    count = FlopCount(images=packing.images_per_seq, tokens=length)
    # every patch of every image is embedded, even one the encoder does not read (ARM's last cluster)
    count.add("patch_embed", CONV, linear(packing.images_per_seq * packing.grid**2, 3 * p**2, dim))
    add_encoder(count, embed_dim=dim, depth=config.depth, length=length, d_state=config.d_state,
                d_conv=config.d_conv, num_scans=1)
    count.add("decoder.enc2dec", LINEAR, linear(length, levels * dim, levels * dec_dim))
    mlp_hidden = int(dec_dim * config.decoder_mlp_ratio)
    for i in range(levels):
        where = f"decoder.blocks.{i}"
        count.add(f"{where}.attn2.q", LINEAR, linear(queries, dec_dim, dec_dim))
        count.add(f"{where}.attn2.kv", LINEAR, linear(length, dec_dim, 2 * dec_dim))
        count.add(f"{where}.attn2.sdpa", ATTENTION, attention(queries, length, dec_dim))
        count.add(f"{where}.attn2.proj", LINEAR, linear(queries, dec_dim, dec_dim))
        count.add(f"{where}.mlp.fc1", LINEAR, linear(queries, dec_dim, mlp_hidden))
        count.add(f"{where}.mlp.fc2", LINEAR, linear(queries, mlp_hidden, dec_dim))
    count.add("decoder.pred", LINEAR, linear(queries, dec_dim, packing.target_dim))
    return count


def classifier_flops(config: StarClassifierConfig) -> FlopCount:
    """Forward FLOPs of one image through the fine-tuning model (4 scans per layer)."""
    grid = config.img_size // config.patch_size
    length = grid * grid + (config.cls_position != "none")
    count = FlopCount(images=1, tokens=length)
    count.add("patch_embed", CONV, linear(grid * grid, 3 * config.patch_size**2, config.embed_dim))
    add_encoder(count, embed_dim=config.embed_dim, depth=config.depth, length=length,
                d_state=config.d_state, d_conv=config.d_conv, num_scans=4)
    if config.num_classes > 0:
        count.add("head", LINEAR, linear(1, config.embed_dim, config.num_classes))
    return count


def config_flops(config: StarPretrainConfig | StarClassifierConfig) -> FlopCount:
    """The count for a model configuration (``model.config``)."""
    if isinstance(config, StarPretrainConfig):
        return pretrain_flops(config)
    if isinstance(config, StarClassifierConfig):
        return classifier_flops(config)
    raise TypeError(f"no FLOP count for {type(config).__name__}; expected StarPretrainConfig or "
                    "StarClassifierConfig")


def model_flops(model: nn.Module) -> FlopCount:
    """The count for a built model, from the configuration it was built with."""
    module = getattr(model, "module", model)  # a DeepSpeed / DDP wrapper
    config = getattr(module, "config", None)
    if config is None:
        raise TypeError(f"no FLOP count for {type(module).__name__}: it has no model.config "
                        "(expected StarPretrainModel or StarClassifier)")
    return config_flops(config)


def flops_for_name(name: str, **overrides) -> FlopCount:
    """The count for a registry name and ``create_model`` overrides, without building it."""
    return config_flops(model_config(name, **overrides))


def main(argv: list[str] | None = None) -> int:
    """``python -m star.flops [NAME ...]``: forward / training GFLOPs per image by model name."""
    parser = argparse.ArgumentParser(prog="python -m star.flops", description=main.__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"registry names (default: all): {', '.join(list_models())}")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(list_models()))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(list_models())}")
    print(f"{'model':22s} {'tokens/image':>12s} {'fwd GFLOP/image':>16s} {'train GFLOP/image':>18s}  shares")
    for name in args.names or list_models():
        count = flops_for_name(name)
        shares = ", ".join(f"{k} {100 * v / count.forward:.1f}%" for k, v in sorted(count.by_kind().items()))
        print(f"{name:22s} {count.tokens_per_image:12.1f} {count.forward_per_image / 1e9:16.2f} "
              f"{count.training_per_image / 1e9:18.2f}  {shares}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
