"""STAR / ARM models: ``create_model(name, **overrides)``, ``model_config(name, **overrides)``
and ``list_models()``.

See :mod:`star.models.registry` for the names and :mod:`star.models.pretrain` for the
pretraining model, read top to bottom (configuration, layout, packing, decoder, model).
Every model keeps its configuration dataclass as ``model.config``.
"""

from star.models.classifier import LoadReport, StarClassifier, StarClassifierConfig
from star.models.mamba import fp32_parameter_names
from star.models.pretrain import (
                                  Layout,
                                  PackingConfig,
                                  StarPretrainConfig,
                                  StarPretrainModel,
                                  build_layout,
                                  from_arm_state_dict,
                                  to_arm_state_dict,
)
from star.models.registry import all_settings, create_model, list_models, model_config, model_settings

__all__ = [
    "Layout", "LoadReport", "PackingConfig", "StarClassifier", "StarClassifierConfig", "StarPretrainConfig",
    "StarPretrainModel", "all_settings", "build_layout", "create_model", "fp32_parameter_names",
    "from_arm_state_dict", "list_models", "model_config", "model_settings", "to_arm_state_dict",
]
