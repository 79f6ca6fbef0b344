"""The figures of `star demo`: training curves, fine-tuning accuracy, frozen-feature probes,
the in-loop k-NN monitor, and what the model predicts.

Everything here reads what the commands wrote (``metrics.jsonl``, ``eval.jsonl``, the probes'
JSON, the exported weights, the shards), so the figures can be redrawn from a finished demo
directory without training again. matplotlib runs headless (Agg).
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import torch
import yaml

from pipelines import build_loader
from star.config import load_config
from star.train.runtime import build_model

FIGURE_DPI = 110
RUN_STYLES = {"pretrained": {"color": "tab:blue", "label": "from STAR pretraining"},
              "scratch": {"color": "tab:orange", "label": "from random init"}}
INIT_STYLES = {"random_init": {"color": "tab:orange", "label": "random init"},
               "pretrained": {"color": "tab:blue", "label": "STAR pretrained"}}
# where the in-loop k-NN monitor's records may be, in a pretraining run directory
MONITOR_FILES = ("metrics.jsonl", "monitor.jsonl", "eval.jsonl")


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file; a missing file is an error naming it (the run did not log)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the run that should have written it did not log")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def moving_average(values: list[float], window: int) -> np.ndarray:
    """Trailing mean over up to ``window`` values (shorter at the start), same length as input."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return x
    cumsum = np.concatenate([[0.0], np.cumsum(x)])
    idx = np.arange(1, len(x) + 1)
    start = np.maximum(0, idx - window)
    return (cumsum[idx] - cumsum[start]) / (idx - start)


def _series(records: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = [(r["step"], float(r[key])) for r in records if isinstance(r.get(key), (int, float))]
    if not pairs:
        return np.zeros(0), np.zeros(0)
    steps, values = zip(*pairs)
    return np.asarray(steps), np.asarray(values)


def plot_training_curves(pretrain: list[dict], finetunes: dict[str, list[dict]], out: Path) -> Path:
    """2 x 2 panels: pretraining loss and lr; fine-tuning training loss and lr of both runs."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    (ax_loss, ax_lr), (ax_ft_loss, ax_ft_lr) = axes

    steps, loss = _series(pretrain, "loss")
    window = max(1, len(loss) // 10)
    ax_loss.plot(steps, loss, color="tab:green", alpha=0.3, lw=1, label="per step")
    ax_loss.plot(steps, moving_average(list(loss), window), color="tab:green", lw=2,
                 label=f"mean of last {window} steps")
    ax_loss.set(title="STAR pretraining loss (MSE on norm-pix targets)", xlabel="optimizer step", ylabel="loss")
    ax_loss.legend()
    steps, lr = _series(pretrain, "lr")
    ax_lr.plot(steps, lr, color="tab:green", lw=2)
    ax_lr.set(title="pretraining learning rate (warmup + cosine)", xlabel="optimizer step", ylabel="lr")

    for name, records in finetunes.items():
        style = RUN_STYLES[name]
        steps, loss = _series(records, "loss")
        window = max(1, len(loss) // 10)
        ax_ft_loss.plot(steps, loss, color=style["color"], alpha=0.25, lw=1)
        ax_ft_loss.plot(steps, moving_average(list(loss), window), color=style["color"], lw=2,
                        label=style["label"])
        steps, lr = _series(records, "lr")
        ax_ft_lr.plot(steps, lr, color=style["color"], lw=2, label=style["label"],
                      ls="-" if name == "pretrained" else "--")
    ax_ft_loss.set(title="fine-tuning training loss (cross-entropy)", xlabel="optimizer step", ylabel="loss")
    ax_ft_loss.legend()
    ax_ft_lr.set(title="fine-tuning learning rate (same schedule for both)", xlabel="optimizer step", ylabel="lr")
    ax_ft_lr.legend()
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out)


def plot_accuracy(evals: dict[str, list[dict]], num_classes: int, out: Path) -> Path:
    """Validation top-1 after each fine-tuning epoch: model (solid) and EMA (dotted), both runs."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for name, records in evals.items():
        style = RUN_STYLES[name]
        epochs = [r["epoch"] + 1 for r in records]
        ax.plot(epochs, [r["top1"] for r in records], marker="o", lw=2, color=style["color"],
                label=f"{style['label']}")
        if all("ema_top1" in r for r in records) and records:
            ax.plot(epochs, [r["ema_top1"] for r in records], marker=".", lw=1.5, ls=":",
                    color=style["color"], label=f"{style['label']} (EMA weights)")
    ax.axhline(100.0 / num_classes, color="gray", ls="--", lw=1, label=f"chance ({100.0 / num_classes:.0f}%)")
    ax.set(title="fine-tuning: validation top-1 after each epoch", xlabel="epoch", ylabel="top-1 (%)",
           ylim=(0, 100))
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return _save(fig, out)


def plot_probe_comparison(results: dict[str, dict[str, float]], stderr: dict[str, float], num_classes: int,
                          out: Path) -> Path:
    """Validation top-1 of random init vs STAR pretrained, one group per measure.

    ``results``: ``{measure: {"random_init": top1, "pretrained": top1}}`` (e.g. "k-NN probe",
    "linear probe", "fine-tuned"); ``stderr``: ``{measure: one standard error}`` drawn as error
    bars on both bars (binomial, over the validation images).
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    width = 0.38
    for j, (init, style) in enumerate(INIT_STYLES.items()):
        xs = [i + (j - 0.5) * width for i in range(len(results))]
        values = [results[m][init] for m in results]
        errors = [stderr.get(m, 0.0) for m in results]
        bars = ax.bar(xs, values, width, yerr=errors, capsize=4, color=style["color"], label=style["label"])
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], padding=3, fontsize=8)
    ax.axhline(100.0 / num_classes, color="gray", ls="--", lw=1, label=f"chance ({100.0 / num_classes:.0f}%)")
    ax.set_xticks(range(len(results)), list(results))
    ax.set(title="validation top-1: what pretraining buys (error bars: one standard error)", ylabel="top-1 (%)",
           ylim=(0, 105))
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    return _save(fig, out)


def monitor_records(run_dir: Path) -> tuple[list[dict], Path | None]:
    """The in-loop k-NN monitor's records (those with ``knn_top1``) of a pretraining run, and
    the file they came from; ``([], None)`` when the monitor was off."""
    for name in MONITOR_FILES:
        path = Path(run_dir) / name
        if path.is_file():
            records = [r for r in read_jsonl(path) if isinstance(r.get("knn_top1"), (int, float))]
            if records:
                return records, path
    return [], None


def plot_knn_monitor(records: list[dict], out: Path, *, source: str = "", num_classes: int | None = None,
                     probes: dict[str, float] | None = None) -> Path:
    """``knn_top1`` (and ``knn_top5``) over pretraining from the in-loop monitor's records; with
    none, a figure that says the monitor was off and how to turn it on. ``probes``: the demo's
    own k-NN probes ({"random_init": top1, "pretrained": top1}) drawn as reference lines."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    if records:
        x_key = "step" if all("step" in r for r in records) else "epoch"
        xs = [r[x_key] for r in records]
        ax.plot(xs, [r["knn_top1"] for r in records], marker="o", lw=2, color="tab:green", label="k-NN top-1")
        if all(isinstance(r.get("knn_top5"), (int, float)) for r in records):
            ax.plot(xs, [r["knn_top5"] for r in records], marker=".", lw=1.5, ls=":", color="tab:green",
                    label="k-NN top-5")
        for init, value in (probes or {}).items():
            style = INIT_STYLES[init]
            ax.axhline(value, color=style["color"], lw=1, ls="-.",
                       label=f"`star probe knn`, {style['label']} (every train label): {value:.1f}%")
        if num_classes:
            ax.axhline(100.0 / num_classes, color="gray", ls="--", lw=1, label=f"chance ({100.0 / num_classes:.0f}%)")
        ax.set(title="in-loop k-NN monitor during pretraining", xlabel="optimizer step" if x_key == "step" else "epoch",
               ylabel="validation top-1 (%)", ylim=(0, 103))
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        if source:
            fig.text(0.99, 0.01, f"from {source}", ha="right", va="bottom", fontsize=7, color="gray")
    else:
        ax.set_axis_off()
        ax.text(0.5, 0.6, "monitor off", ha="center", va="center", fontsize=28, color="gray")
        ax.text(0.5, 0.38, textwrap.fill("The pretraining run logged no knn_top1 records. Turn the in-loop "
                                         "k-NN monitor on in the pretraining config (section `monitor`, "
                                         "knn_every_epochs > 0) to see feature quality over pretraining.", 60),
                ha="center", va="center", fontsize=10)
    fig.tight_layout()
    return _save(fig, out)


def to_display(images, mean, std) -> np.ndarray:
    """Normalised (B, 3, S, S) tensor -> (B, S, S, 3) floats in [0, 1] for imshow."""
    x = images.detach().float().cpu() * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    return x.clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _draw_clusters(ax, img_size: int, cluster_px: int) -> None:
    """Thin white lines on the cluster borders (the model's prediction units)."""
    for edge in range(cluster_px, img_size, cluster_px):
        ax.axhline(edge - 0.5, color="white", lw=0.8, alpha=0.8)
        ax.axvline(edge - 0.5, color="white", lw=0.8, alpha=0.8)


def plot_predictions(inputs: np.ndarray, predicted: np.ndarray, *, images_per_seq: int, cluster_px: int,
                     patch_px: int, out: Path) -> Path:
    """Pairs (input, prediction) per image, one row per packed sequence, with cluster borders."""
    plt = pyplot()
    n_images = inputs.shape[0]
    rows = max(1, n_images // images_per_seq)
    cols = 2 * images_per_seq
    fig, axes = plt.subplots(rows, cols, figsize=(2.3 * cols, 2.7 * rows + 1.4), squeeze=False)
    size = inputs.shape[1]
    for i in range(rows * images_per_seq):
        r, c = divmod(i, images_per_seq)
        for j, (pics, title) in enumerate(((inputs, "input"), (predicted, "predicted"))):
            ax = axes[r][2 * c + j]
            ax.imshow(pics[i], interpolation="nearest")
            _draw_clusters(ax, size, cluster_px)
            ax.set_title(f"seq {r + 1}, image {c + 1}: {title}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle("STAR pretraining: each cluster (white grid) predicted from every cluster before it", fontsize=10)
    caption = (f"Images of one row are packed into one sequence, each after a separator cluster. The model "
               f"predicts per-patch normalised pixels (norm-pix: each {patch_px}x{patch_px}x3 patch minus its mean, "
               f"over its std). For display each predicted patch is un-normalised with the TRUE patch's mean and "
               f"std (as MAE shows its predictions): a patch's overall brightness and contrast come from the input, "
               f"its colours and structure from the model.")
    width_in = fig.get_size_inches()[0]
    fig.text(0.5, 0.01, textwrap.fill(caption, width=int(width_in * 15)), ha="center", va="bottom", fontsize=7.5)
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    return _save(fig, out)


def predict_clusters(run_config: Path, weights: Path, shards: Path, *, sequences: int = 2) -> dict:
    """Run the pretrained model on the first validation images; display-ready arrays.

    Returns ``{"inputs", "predicted"}`` ((B, S, S, 3) in [0, 1]), ``images_per_seq``,
    ``cluster_px`` and ``patch_px`` (cluster and patch sides in pixels).
    """
    cfg = load_config(base=yaml.safe_load(Path(run_config).read_text()))
    model = build_model(cfg)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights} does not fit {cfg.model.name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.eval()
    n = cfg.model.images_per_seq
    loader = build_loader("eval", shards, split=cfg.data.val_split, batch_size=n * sequences,
                          image_size=cfg.model.img_size, backend=cfg.data.backend,
                          num_threads=cfg.data.num_threads, seed=cfg.seed)
    batch = next(iter(loader.epoch(0)))
    images = batch.images[: n * sequences]
    if images.shape[0] % n:
        raise ValueError(f"the validation split has {images.shape[0]} images, fewer than one sequence of {n}")
    with torch.no_grad():
        predicted = model.reconstruct(images)
    mean, std = loader.augment.mean, loader.augment.std
    packing = model.packing
    return {"inputs": to_display(images, mean, std), "predicted": to_display(predicted, mean, std),
            "images_per_seq": n, "cluster_px": packing.patch_size * packing.cluster_size,
            "patch_px": packing.patch_size}


def _save(fig, out: Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=FIGURE_DPI)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return out
