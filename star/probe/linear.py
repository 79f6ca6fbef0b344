"""Linear probing of frozen features: MAE's recipe (He et al. 2022, Sec. 4 and appendix A.3).

MAE's head is ``BatchNorm1d(D, affine=False, eps=1e-6)`` then ``Linear(D, C)`` (weight
trunc-normal std 0.01, bias 0): the BN without affine only standardises the frozen features,
whose scale varies wildly between models, and is foldable into the linear layer. MAE trains
it with LARS (momentum 0.9, trust coefficient 0.001, no weight decay), base lr 0.1 scaled by
batch / 256, 10 warm-up epochs then a per-step cosine decay, 90 epochs, batch 16384.

Scaled down here by options: the features are extracted once (no per-epoch augmentation, so
one centre crop per image), and a small split gives few steps per epoch. LARS takes steps of
lr x 0.001 x |w| relative to the weights, which MAE's 7,000 steps at lr 6.4 afford and a few
hundred steps at the lr of a small batch do not; ``optimizer="sgd"`` (the same schedule with
momentum 0.9, no trust ratio) is the default for that reason, ``"lars"`` reproduces MAE's
optimizer at scale. The batch is capped so that an epoch has at least ``min_steps_per_epoch``
steps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from star.probe.knn import topk_accuracy


@dataclass
class LinearProbeConfig:
    epochs: int = 90
    batch_size: int = 16384       # MAE's global batch; capped for small splits (see above)
    base_lr: float = 0.1          # lr = base_lr * batch / 256
    warmup_epochs: int = 10
    weight_decay: float = 0.0
    optimizer: str = "sgd"        # sgd | lars (MAE)
    momentum: float = 0.9
    min_steps_per_epoch: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in ("sgd", "lars"):
            raise ValueError(f"optimizer {self.optimizer!r}: use 'sgd' or 'lars'")
        if self.epochs < 1 or self.batch_size < 1 or self.base_lr <= 0 or self.warmup_epochs < 0:
            raise ValueError(f"linear probe needs epochs >= 1, batch_size >= 1, base_lr > 0, "
                             f"warmup_epochs >= 0; got {asdict(self)}")


class LARS(torch.optim.Optimizer):
    """LARS as MAE's ``util/lars.py``: for weight matrices (ndim > 1) the update (gradient plus
    weight decay) is rescaled to trust_coefficient x |w| / |update|; biases and BN are plain
    momentum SGD."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum,
                                  "trust_coefficient": trust_coefficient})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = p.norm(), update.norm()
                    ratio = torch.where((w_norm > 0) & (u_norm > 0),
                                        group["trust_coefficient"] * w_norm / u_norm, torch.ones_like(w_norm))
                    update = update.mul(ratio)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(group["momentum"]).add_(update)
                p.add_(state["mu"], alpha=-group["lr"])


def probe_head(dim: int, num_classes: int) -> nn.Sequential:
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    return head


def _lr_at(cfg: LinearProbeConfig, lr: float, epoch_float: float) -> float:
    """MAE's lr_sched: linear warm-up, then half-cosine to 0, evaluated per step."""
    if epoch_float < cfg.warmup_epochs:
        return lr * epoch_float / cfg.warmup_epochs
    span = max(cfg.epochs - cfg.warmup_epochs, 1e-12)
    return lr * 0.5 * (1.0 + math.cos(math.pi * (epoch_float - cfg.warmup_epochs) / span))


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
                 val_labels: torch.Tensor, *, num_classes: int, config: LinearProbeConfig | None = None,
                 progress=None) -> dict:
    """Train MAE's BN + linear head on (train_features, train_labels), report val top-1 / top-5.

    Runs on the features' device; its own generator (``config.seed``) draws the init and the
    batch order, so the global random streams are untouched. ``progress(epoch, loss)`` is
    called after every epoch when given. Returns {"top1", "top5", "images", "train_top1",
    "used_batch_size", "lr", "steps", "config"}.
    """
    cfg = config or LinearProbeConfig()
    device = train_features.device
    n, dim = train_features.shape
    batch = max(1, min(cfg.batch_size, n // cfg.min_steps_per_epoch or 1))
    steps_per_epoch = n // batch  # drop the incomplete last batch, as MAE's loader
    lr = cfg.base_lr * batch / 256
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        head = probe_head(dim, num_classes).to(device)
    params = [p for p in head.parameters()]
    if cfg.optimizer == "lars":
        opt = LARS(params, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    x_all, y_all = train_features.float(), train_labels.to(device)
    loss = torch.zeros(())
    for epoch in range(cfg.epochs):
        head.train()
        order = torch.randperm(n, generator=gen).to(device)
        for step in range(steps_per_epoch):
            for group in opt.param_groups:
                group["lr"] = _lr_at(cfg, lr, epoch + step / steps_per_epoch)
            idx = order[step * batch : (step + 1) * batch]
            loss = F.cross_entropy(head(x_all[idx]), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if progress is not None:
            progress(epoch + 1, float(loss))
    head.eval()
    with torch.no_grad():
        k = min(5, num_classes)
        val_pred = head(val_features.float().to(device)).topk(k, dim=1).indices
        train_pred = head(x_all).topk(1, dim=1).indices
    out = topk_accuracy(val_pred, val_labels)
    out.update(train_top1=topk_accuracy(train_pred, train_labels)["top1"], used_batch_size=batch, lr=lr,
               steps=steps_per_epoch * cfg.epochs, config=asdict(cfg))
    return out
