"""Feature-quality probes of a pretraining encoder: DINO's weighted k-NN and MAE's linear probe
on frozen features (``star probe``; see star/probe/cli.py)."""

from star.probe.extract import (
                                FeatureSet,
                                encoder_features,
                                extract_features,
                                features_of_split,
                                gather_features,
                                knn_accuracy,
                                probe_loader,
                                restrict_loader,
                                subset_indices,
)
from star.probe.knn import knn_classify, knn_predict, topk_accuracy
from star.probe.linear import LinearProbeConfig, linear_probe

__all__ = ["FeatureSet", "LinearProbeConfig", "encoder_features", "extract_features", "features_of_split",
           "gather_features", "knn_accuracy", "knn_classify", "knn_predict", "linear_probe", "probe_loader",
           "restrict_loader", "subset_indices", "topk_accuracy"]
