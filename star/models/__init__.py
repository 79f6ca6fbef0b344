"""STAR / ARM models: ``create_model(name, **overrides)`` and ``list_models()``.

See :mod:`star.models.registry` for the names, :mod:`star.models.packing` for how images and
separators become one sequence, and the model contract for what training expects.
"""

from star.models.classifier import LoadReport, StarClassifier
from star.models.mamba import fp32_parameter_names
from star.models.packing import Layout, PackingConfig, build_layout
from star.models.pretrain import StarPretrainModel
from star.models.registry import create_model, list_models, model_config

__all__ = [
    "Layout", "LoadReport", "PackingConfig", "StarClassifier", "StarPretrainModel",
    "build_layout", "create_model", "fp32_parameter_names", "list_models", "model_config",
]
