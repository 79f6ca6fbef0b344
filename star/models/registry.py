"""Models by name: ``create_model(name, **overrides)``, ``model_config(name, **overrides)``,
``list_models()``.

Each name stands for one configuration instance; ``create_model`` builds its model class
from it, so ``model.config`` is exactly what the name and overrides say.

Pretraining forms (:class:`StarPretrainConfig` -> :class:`StarPretrainModel`):
  arm_{tiny_pz8,base,large,huge}_pz16   N = 1, no separator (ARM baseline)
  star_{tiny_pz8,base,large,huge}_pz16  N = 8, identity cluster separator before each image (SC)
Fine-tuning forms (:class:`StarClassifierConfig` -> :class:`StarClassifier`), suffix ``_ft``:
4 scans, 224 px, 1000 classes, drop path 0.1; class token ``middle`` for ARM, ``tail`` for
STAR (STAR*).

Sizes (width x depth): tiny 192 x 6 (96 px, 8 px patches: the paper's 12 x 12 grid and 9
clusters of 4 x 4, decoder 128 wide with 4 heads; fine-tuning at 112 px = 14 x 14),
base 768 x 12, large 1024 x 24, huge 1536 x 24.

Overrides are the configuration's settings, flat (:mod:`star.models.settings`): for
pretraining e.g. ``images_per_seq``, ``sep_type``, ``sep_value``, ``sep_position``,
``img_size``, ``cluster_size``, ``drop_path``; for fine-tuning ``num_classes``,
``cls_position``, ``readout``, ``drop_path``, ``drop_path_schedule``, ``head_init_std``,
``img_size``; both accept ``embed_dim`` and ``depth``.
"""

from __future__ import annotations

import difflib

from torch import nn

from star.models.classifier import StarClassifier, StarClassifierConfig
from star.models.pretrain import StarPretrainConfig, StarPretrainModel
from star.models.settings import Setting, apply_overrides, settings

AnyModelConfig = StarPretrainConfig | StarClassifierConfig
MODEL_CLASSES: dict[type, type[nn.Module]] = {StarPretrainConfig: StarPretrainModel,
                                              StarClassifierConfig: StarClassifier}

# Differences from each family's defaults (the -B sizes of STAR).
_SIZES = {
    "tiny_pz8": dict(embed_dim=192, depth=6, patch_size=8),
    "base_pz16": {},
    "large_pz16": dict(embed_dim=1024, depth=24),
    "huge_pz16": dict(embed_dim=1536, depth=24),
}
_PRETRAIN_SIZE = {"tiny_pz8": dict(img_size=96, decoder_dim=128, decoder_heads=4)}
_FINETUNE_SIZE = {"tiny_pz8": dict(img_size=112)}
_METHODS = {"arm": dict(images_per_seq=1, sep_type="none"), "star": {}}
_FINETUNE_METHODS = {"arm": dict(cls_position="middle"), "star": {}}


def _build_table() -> dict[str, AnyModelConfig]:
    table: dict[str, AnyModelConfig] = {}
    for method in ("arm", "star"):
        for size, dims in _SIZES.items():
            name = f"{method}_{size}"
            table[name] = apply_overrides(
                StarPretrainConfig(), {**dims, **_PRETRAIN_SIZE.get(size, {}), **_METHODS[method]})
            table[f"{name}_ft"] = apply_overrides(
                StarClassifierConfig(), {**dims, **_FINETUNE_SIZE.get(size, {}), **_FINETUNE_METHODS[method]})
    return table


_MODELS = _build_table()


def list_models() -> list[str]:
    return sorted(_MODELS)


def _lookup(name: str) -> AnyModelConfig:
    if name not in _MODELS:
        close = difflib.get_close_matches(name, _MODELS, n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Available: {', '.join(list_models())}")
    return _MODELS[name]


def model_settings(name: str) -> dict[str, Setting]:
    """The settings a name's overrides may set (flat, :func:`star.models.settings.settings`)."""
    return settings(type(_lookup(name)))


def all_settings() -> dict[str, Setting]:
    """Every setting of every model family (for parsing ``model.*`` keys before the name is known)."""
    out: dict[str, Setting] = {}
    for config_class in MODEL_CLASSES:
        out.update(settings(config_class))
    return out


def model_config(name: str, **overrides) -> AnyModelConfig:
    """The configuration a name stands for, with ``overrides`` applied."""
    config = _lookup(name)
    return apply_overrides(config, overrides, owner=f"{name} ({type(config).__name__})")


def create_model(name: str, **overrides) -> nn.Module:
    """Build a model by name; ``overrides`` replace settings of its configuration."""
    config = model_config(name, **overrides)
    return MODEL_CLASSES[type(config)](config)
