"""The STAR / ARM pretraining model: causal MambaMLP encoder + cluster-causal decoder.

    images (N*b, 3, S, S) --patch_embed + pos_embed--> (N*b, g*g, D)
        --packer--> (b, T, D) sequences with separators, cluster-priority order
        --layers (1 causal scan)--> features of layers depth/2, 2/3, 5/6, 1
        --decoder (queries = ar_token + dec_pos_embed of each target)--> (b, Q, p*p*3)
    loss = mean squared error against norm-pix patches / separator patterns.

Parameter and buffer names are those of ARM's ``models_pretrain.py`` (patch_embed.proj,
pos_embed, layers.{i}.{norm1,mixer,norm2,mlp}, ar_token, dec_pos_embed, enc2dec,
dec_block.{i}, norm_1..norm_4, ar_norm, ar_pred), so an ARM checkpoint loads into
``arm_base_pz16`` (ARM's cached ``mask`` buffer is not used: the mask comes from the layout).
STAR adds ``packer.sep_pos_embed`` / ``packer.sep_embed`` and ``dec_sep_pos_embed`` (the
decoder position of a separator target, one learned slot shared by all separator tokens).
The sin-cos tables ``pos_embed`` and ``dec_pos_embed`` are fixed, saved as buffers.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from star.models.blocks import MambaMLPBlock, PatchEmbed, init_encoder_weights
from star.models.decoder import ClusterDecoder, decode, feature_levels
from star.models.packing import IMAGE, PackingConfig, SequencePacker, patchify, unpatchify
from star.models.pos_embed import sincos_2d_table
from star.models.weight_decay import no_weight_decay_names


class StarPretrainModel(nn.Module):
    def __init__(self, img_size: int = 192, patch_size: int = 16, cluster_size: int = 4,
                 images_per_seq: int = 8, sep_type: str = "cluster", sep_value: str = "identity",
                 sep_position: str = "SC", embed_dim: int = 768, depth: int = 12,
                 decoder_dim: int = 512, decoder_depth: int = 4, decoder_heads: int = 8,
                 decoder_mlp_ratio: float = 4.0, d_state: int = 16, d_conv: int = 4,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        if decoder_depth != 4:
            raise ValueError(f"decoder_depth must be 4 (one block per encoder level), got {decoder_depth}")
        self.packing = PackingConfig(img_size, patch_size, cluster_size, images_per_seq,
                                     sep_type, sep_value, sep_position)
        self.embed_dim, self.depth = embed_dim, depth
        self.feature_layers = feature_levels(depth)
        grid = self.packing.grid

        self.patch_embed = PatchEmbed(img_size, patch_size, embed_dim)
        self.register_buffer("pos_embed", sincos_2d_table(embed_dim, grid)[None])
        self.packer = SequencePacker(self.packing, embed_dim)
        rates = torch.linspace(0, drop_path, depth).tolist()
        self.layers = nn.ModuleList(
            MambaMLPBlock(embed_dim, num_scans=1, drop_path=r, d_state=d_state, d_conv=d_conv)
            for r in rates)
        init_encoder_weights(self.layers)

        self.ar_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        nn.init.trunc_normal_(self.ar_token, std=0.02)
        self.register_buffer("dec_pos_embed", sincos_2d_table(decoder_dim, grid)[None])
        if sep_type != "none":
            self.dec_sep_pos_embed = nn.Parameter(torch.zeros(1, 1, decoder_dim))
            nn.init.trunc_normal_(self.dec_sep_pos_embed, std=0.02)
        # The decoder's modules live at this model's top level under ARM's names.
        decoder = ClusterDecoder(embed_dim, decoder_dim, decoder_depth, decoder_heads,
                                 decoder_mlp_ratio, out_dim=self.packing.target_dim)
        for name, child in decoder.named_children():
            self.add_module(name, child)

    @property
    def layout(self):
        return self.packer.layout

    def no_weight_decay(self) -> set[str]:
        return no_weight_decay_names(self)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # ARM's release caches its (fixed-geometry) decoder mask as a buffer; ours comes from
        # the layout, so that key is ignored rather than reported as unexpected.
        if state_dict.pop(prefix + "mask", None) is not None:
            warnings.warn("ignoring the checkpoint's cached decoder 'mask' buffer (ARM's release): "
                          "this model builds its mask from the packing layout", stacklevel=2)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Encoder outputs of the decoder's feature layers, each (b, encoder_length, D)."""
        tokens = self.patch_embed(images) + self.pos_embed
        hidden = self.packer(tokens)[:, : self.layout.encoder_length]
        kept: dict[int, torch.Tensor] = {}
        for index, layer in enumerate(self.layers, start=1):
            hidden = layer(hidden)
            if index in self.feature_layers:
                kept[index] = hidden
        return [kept[i] for i in self.feature_layers]

    def decoder_queries(self, batch: int, device: torch.device) -> torch.Tensor:
        """(b, Q, decoder_dim): ar_token + decoder position of each query's target."""
        layout = self.packer.layout_on(device)
        table = self.dec_pos_embed[0]
        if self.packing.sep_type != "none":
            table = torch.cat([table, self.dec_sep_pos_embed[0]], dim=0)
        queries = self.ar_token + table.index_select(0, layout.target_pos_index)[None]
        return queries.expand(batch, -1, -1)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (N*b, 3, S, S), normalised -> dict with ``loss`` (scalar, float32), ``pred``
        (b, Q, p*p*3), ``target`` (b, Q, p*p*3, float32) and ``target_kind`` (Q,) IMAGE or
        SEPARATOR per query; ``self.layout`` describes every query."""
        features = self.encode(images)
        layout = self.packer.layout_on(images.device)
        queries = self.decoder_queries(features[0].shape[0], images.device)
        pred = decode(self, features, queries, self.packer.attention_mask_on(images.device))
        target = self.packer.targets(images.float())  # norm-pix in float32 even under bf16
        loss = (pred.float() - target).pow(2).mean()
        return {"loss": loss, "pred": pred, "target": target, "target_kind": layout.target_kind}

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """(N*b, 3, S, S) images where every predicted patch is replaced by the model's
        prediction, de-normalised with the true patch's mean and std (as MAE visualises
        norm-pix predictions); context patches (e.g. ARM's first cluster) stay original."""
        pred = self.forward(images)["pred"]
        layout = self.packer.layout_on(images.device)
        n, g = self.packing.images_per_seq, self.packing.grid
        patches = patchify(images, self.packing.patch_size)
        mean = patches.mean(-1, keepdim=True)
        std = (patches.var(-1, keepdim=True) + 1e-6) ** 0.5
        is_image = layout.target_kind == IMAGE
        seq = torch.arange(pred.shape[0], device=images.device)[:, None]
        image_index = (seq * n + layout.target_image[is_image][None]).reshape(-1)
        patch_index = (layout.target_row * g + layout.target_col)[is_image].repeat(pred.shape[0])
        values = pred[:, is_image].reshape(-1, patches.shape[-1]).to(patches.dtype)
        out = patches.clone()
        out[image_index, patch_index] = values * std[image_index, patch_index] + mean[image_index, patch_index]
        return unpatchify(out, self.packing.patch_size)
