"""Analytic FLOPs of the STAR / ARM models, from their configuration alone.

One multiply-add is 2 FLOPs (papers that quote "FLOPs" of vision models often mean
multiply-adds: halve these figures to compare). Counted (forward pass):

* every Linear and the patch-embedding Conv2d: 2 * in * out per token it is applied to
  (the Mamba projections in_proj / x_proj / dt_proj / out_proj are Linears too, even though
  the model calls them through their weights);
* the depthwise causal conv1d of Mamba: 2 * L * d_inner * d_conv per scan direction;
* the selective scan: ``SCAN_FLOPS_PER_STATE`` = 9 FLOPs per (token, channel, state) per
  direction, the constant of mamba-ssm's and VMamba's counters (SPEC section 10): 2 for
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

    count = model_flops(model)                 # a built StarPretrainModel / StarClassifier
    count = flops_for_name("star_base_pz16")   # from the registry, without building the model
    count.forward_per_image, count.training_per_image, count.by_kind()
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from torch import nn

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


def pretrain_flops(*, img_size: int = 192, patch_size: int = 16, cluster_size: int = 4,
                   images_per_seq: int = 8, sep_type: str = "cluster", sep_value: str = "identity",
                   sep_position: str = "SC", embed_dim: int = 768, depth: int = 12,
                   decoder_dim: int = 512, decoder_depth: int = 4, decoder_heads: int = 8,
                   decoder_mlp_ratio: float = 4.0, d_state: int = 16, d_conv: int = 4,
                   drop_path: float = 0.0) -> FlopCount:
    """Forward FLOPs of one packed sequence of the pretraining model (StarPretrainModel's
    constructor arguments). Sequence geometry (encoder length, number of queries) comes
    from the packing layout, which is pure index arithmetic."""
    from star.models.packing import PackingConfig, build_layout

    del decoder_heads, drop_path  # no effect on FLOPs
    layout = build_layout(PackingConfig(img_size, patch_size, cluster_size, images_per_seq,
                                        sep_type, sep_value, sep_position))
    length, queries = layout.encoder_length, layout.num_queries
    grid = img_size // patch_size
    count = FlopCount(images=images_per_seq, tokens=length)
    # every patch of every image is embedded, even one the encoder does not read (ARM's last cluster)
    count.add("patch_embed", CONV, linear(images_per_seq * grid * grid, 3 * patch_size**2, embed_dim))
    add_encoder(count, embed_dim=embed_dim, depth=depth, length=length, d_state=d_state,
                d_conv=d_conv, num_scans=1)
    count.add("enc2dec", LINEAR, linear(length, decoder_depth * embed_dim, decoder_depth * decoder_dim))
    mlp_hidden = int(decoder_dim * decoder_mlp_ratio)
    for i in range(decoder_depth):
        where = f"dec_block.{i}"
        count.add(f"{where}.attn2.q", LINEAR, linear(queries, decoder_dim, decoder_dim))
        count.add(f"{where}.attn2.kv", LINEAR, linear(length, decoder_dim, 2 * decoder_dim))
        count.add(f"{where}.attn2.sdpa", ATTENTION, attention(queries, length, decoder_dim))
        count.add(f"{where}.attn2.proj", LINEAR, linear(queries, decoder_dim, decoder_dim))
        count.add(f"{where}.mlp.fc1", LINEAR, linear(queries, decoder_dim, mlp_hidden))
        count.add(f"{where}.mlp.fc2", LINEAR, linear(queries, mlp_hidden, decoder_dim))
    count.add("ar_pred", LINEAR, linear(queries, decoder_dim, 3 * patch_size**2))
    return count


def classifier_flops(*, img_size: int = 224, patch_size: int = 16, embed_dim: int = 768,
                     depth: int = 12, num_classes: int = 1000, cls_position: str = "tail",
                     drop_path: float = 0.1, d_state: int = 16, d_conv: int = 4) -> FlopCount:
    """Forward FLOPs of one image through the fine-tuning model (4 scans per layer)."""
    del drop_path
    grid = img_size // patch_size
    length = grid * grid + (cls_position != "none")
    count = FlopCount(images=1, tokens=length)
    count.add("patch_embed", CONV, linear(grid * grid, 3 * patch_size**2, embed_dim))
    add_encoder(count, embed_dim=embed_dim, depth=depth, length=length, d_state=d_state,
                d_conv=d_conv, num_scans=4)
    if num_classes > 0:
        count.add("head", LINEAR, linear(1, embed_dim, num_classes))
    return count


def model_flops(model: nn.Module) -> FlopCount:
    """The count for a built model, from the configuration it was built with."""
    from star.models import StarClassifier, StarPretrainModel

    module = getattr(model, "module", model)  # a DeepSpeed / DDP wrapper
    if not isinstance(module, (StarPretrainModel, StarClassifier)):
        raise TypeError(f"no FLOP count for {type(module).__name__}; expected StarPretrainModel or StarClassifier")
    mixer = module.layers[0].mixer
    common = dict(embed_dim=module.embed_dim, depth=module.depth, d_state=mixer.d_state, d_conv=mixer.d_conv)
    if isinstance(module, StarPretrainModel):
        p = module.packing
        blocks = module.dec_block
        return pretrain_flops(
            img_size=p.img_size, patch_size=p.patch_size, cluster_size=p.cluster_size,
            images_per_seq=p.images_per_seq, sep_type=p.sep_type, sep_value=p.sep_value,
            sep_position=p.sep_position,
            decoder_dim=module.ar_token.shape[-1], decoder_depth=len(blocks),
            decoder_mlp_ratio=blocks[0].mlp.fc1.out_features / blocks[0].mlp.fc1.in_features, **common)
    pe = module.patch_embed
    return classifier_flops(img_size=pe.img_size, patch_size=pe.patch_size,
                            num_classes=module.num_classes, cls_position=module.cls_position, **common)


def flops_for_name(name: str, **overrides) -> FlopCount:
    """The count for a registry name and ``create_model`` overrides, without building it."""
    from star.models import model_config

    config = {**model_config(name), **overrides}
    # the fine-tuning forms are the ones with a class-token setting (registry.py)
    return classifier_flops(**config) if "cls_position" in config else pretrain_flops(**config)


def main(argv: list[str] | None = None) -> int:
    """``python -m star.flops [NAME ...]``: forward / training GFLOPs per image by model name."""
    import argparse

    from star.models import list_models

    parser = argparse.ArgumentParser(prog="python -m star.flops", description=main.__doc__)
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"registry names (default: all): {', '.join(list_models())}")
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
