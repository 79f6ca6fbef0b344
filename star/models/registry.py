"""Models by name: ``create_model(name, **overrides)``, ``list_models()``.

Pretraining forms (:class:`StarPretrainModel`):
  arm_{tiny_pz8,base,large,huge}_pz16   N = 1, no separator (ARM baseline)
  star_{tiny_pz8,base,large,huge}_pz16  N = 8, identity cluster separator before each image (SC)
Fine-tuning forms (:class:`StarClassifier`), suffix ``_ft``: 4 scans, 224 px, 1000 classes,
drop path 0.1; class token ``middle`` for ARM, ``tail`` for STAR (STAR*).

Sizes (width x depth): tiny 192 x 6 (96 px, 8 px patches: the paper's 12 x 12 grid and 9
clusters of 4 x 4, decoder 128 wide with 4 heads; fine-tuning at 112 px = 14 x 14),
base 768 x 12, large 1024 x 24, huge 1536 x 24.

Overrides are constructor arguments: for pretraining e.g. ``images_per_seq``, ``sep_type``,
``sep_value``, ``sep_position``, ``img_size``, ``cluster_size``, ``drop_path``; for
fine-tuning ``num_classes``, ``cls_position``, ``drop_path``, ``img_size``; both accept
``embed_dim`` and ``depth``.
"""

from __future__ import annotations

import difflib
import inspect

from torch import nn

from star.models.classifier import StarClassifier
from star.models.pretrain import StarPretrainModel

_SIZES = {
    "tiny_pz8": dict(embed_dim=192, depth=6, patch_size=8),
    "base_pz16": dict(embed_dim=768, depth=12, patch_size=16),
    "large_pz16": dict(embed_dim=1024, depth=24, patch_size=16),
    "huge_pz16": dict(embed_dim=1536, depth=24, patch_size=16),
}
_PRETRAIN_SIZE = {"tiny_pz8": dict(img_size=96, decoder_dim=128, decoder_heads=4)}
_FINETUNE_SIZE = {"tiny_pz8": dict(img_size=112)}
_METHODS = {
    "arm": dict(images_per_seq=1, sep_type="none"),
    "star": dict(images_per_seq=8, sep_type="cluster", sep_value="identity", sep_position="SC"),
}
_FINETUNE_METHODS = {"arm": dict(cls_position="middle"), "star": dict(cls_position="tail")}


def _build_table() -> dict[str, tuple[type[nn.Module], dict]]:
    table: dict[str, tuple[type[nn.Module], dict]] = {}
    for method in ("arm", "star"):
        for size, dims in _SIZES.items():
            name = f"{method}_{size}"
            table[name] = (StarPretrainModel,
                           {"img_size": 192, **dims, **_PRETRAIN_SIZE.get(size, {}), **_METHODS[method]})
            table[f"{name}_ft"] = (StarClassifier,
                                   {"img_size": 224, **dims, **_FINETUNE_SIZE.get(size, {}),
                                    **_FINETUNE_METHODS[method]})
    return table


_MODELS = _build_table()


def list_models() -> list[str]:
    return sorted(_MODELS)


def model_config(name: str) -> dict:
    """The constructor arguments a name stands for (before overrides)."""
    return dict(_lookup(name)[1])


def _lookup(name: str) -> tuple[type[nn.Module], dict]:
    if name not in _MODELS:
        close = difflib.get_close_matches(name, _MODELS, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Available: {', '.join(list_models())}")
    return _MODELS[name]


def create_model(name: str, **overrides) -> nn.Module:
    """Build a model by name; ``overrides`` replace entries of its configuration."""
    cls, config = _lookup(name)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise ValueError(f"{name} ({cls.__name__}) does not take {', '.join(unknown)}; "
                         f"it accepts: {', '.join(sorted(accepted))}")
    return cls(**{**config, **overrides})
