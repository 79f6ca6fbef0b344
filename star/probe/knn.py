"""Weighted k-NN classification of frozen features (DINO's evaluation, Caron et al. 2021).

Rule (DINO's ``eval_knn.py``): features are L2-normalised, a val image's k nearest train
images by cosine similarity s_j vote for their labels with weight exp(s_j / T); the class
scores are the summed votes and the prediction is their ranking (k = 20, T = 0.07).

The similarity matrix is never materialised whole: val is processed in chunks of
``chunk_size`` rows, so ImageNet (1.28 M x 768 train features, bf16 or fp32 on one GPU)
needs chunk_size x 1.28 M similarities at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

K_DEFAULT, TEMPERATURE_DEFAULT = 20, 0.07


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
                *, num_classes: int, k: int = K_DEFAULT, temperature: float = TEMPERATURE_DEFAULT,
                topk: int = 5, chunk_size: int = 256) -> torch.Tensor:
    """(N_val, min(topk, num_classes)) class indices, best first, by DINO's weighted vote;
    -1 where fewer classes than that received a vote.

    ``train_features`` (N_train, D) and ``val_features`` (N_val, D) may be in any float dtype
    on any device (the matmul runs in that dtype, the votes in float32); labels are int64.
    """
    if train_features.ndim != 2 or val_features.ndim != 2 or train_features.shape[1] != val_features.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D, got {tuple(train_features.shape)} "
                         f"and {tuple(val_features.shape)}")
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(f"{train_labels.shape[0]} train labels for {train_features.shape[0]} features")
    if k < 1 or temperature <= 0 or chunk_size < 1:
        raise ValueError(f"need k >= 1, temperature > 0, chunk_size >= 1 (got {k}, {temperature}, {chunk_size})")
    k = min(k, train_features.shape[0])
    train = F.normalize(train_features, dim=1)
    labels = train_labels.to(train.device)
    out = []
    for start in range(0, val_features.shape[0], chunk_size):
        val = F.normalize(val_features[start : start + chunk_size].to(train.device, train.dtype), dim=1)
        sim, idx = (val @ train.t()).topk(k, dim=1)  # (c, k), most similar first
        weights = (sim.float() / temperature).exp()
        votes = torch.zeros(val.shape[0], num_classes, device=train.device, dtype=torch.float32)
        votes.scatter_add_(1, labels[idx], weights)
        best = votes.topk(min(topk, num_classes), dim=1)
        # A class without a vote is no prediction (-1): DINO's topk would rank such classes in an
        # arbitrary order when fewer than ``topk`` classes are among the neighbours.
        out.append(torch.where(best.values > 0, best.indices, -1).cpu())
    if not out:
        return torch.zeros(0, min(topk, num_classes), dtype=torch.long)
    return torch.cat(out)


def topk_accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> dict:
    """{"top1", "top5" (percent), "images"} from (N, >=1) ranked predictions."""
    labels = labels.to(predictions.device)
    hits = predictions == labels[:, None]
    n = max(int(labels.numel()), 1)
    return {"top1": 100.0 * hits[:, 0].sum().item() / n, "top5": 100.0 * hits[:, :5].any(1).sum().item() / n,
            "images": int(labels.numel())}


def knn_classify(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
                 val_labels: torch.Tensor, *, num_classes: int, k: int = K_DEFAULT,
                 temperature: float = TEMPERATURE_DEFAULT, chunk_size: int = 256) -> dict:
    """Top-1 / top-5 (percent) of DINO's weighted k-NN on val, plus the image count."""
    pred = knn_predict(train_features, train_labels, val_features, num_classes=num_classes, k=k,
                       temperature=temperature, chunk_size=chunk_size)
    return topk_accuracy(pred, val_labels)
