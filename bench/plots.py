"""Markdown tables and PNG plots from the JSON files the benchmark scripts write.

One renderer per benchmark: ``render(name, figures, out_dir) -> markdown`` writes
``out_dir/<name>.png`` and returns the markdown section (table plus the image link). Values
are copied from the JSON as the scripts wrote them; nothing is recomputed except ratios
that are labelled as such.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

SCAN_LABELS = {"torch": "PyTorch chunked scan (star.ops)", "pscan": "mambapy-style parallel scan",
               "reference": "sequential reference (autograd)", "mamba_ssm": "mamba-ssm CUDA kernel"}


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_scan(figures: dict, out_dir: Path) -> str:
    """Forward+backward seconds against sequence length, one line per scan implementation."""
    seconds = figures["seconds"]
    fig, ax = plt.subplots(figsize=(8.8, 4.2))
    rows = []
    for path, runs in seconds.items():
        if not runs:
            continue
        runs = sorted(runs, key=lambda r: r["length"])
        lengths = [r["length"] for r in runs]
        ax.plot(lengths, [r["total_s"] for r in runs], marker="o", label=SCAN_LABELS.get(path, path) + ", fwd+bwd")
        ax.plot(lengths, [r["forward_s"] for r in runs], marker=".", linestyle="--", alpha=0.6,
                color=ax.lines[-1].get_color(), label="  forward only")
        rows += [[SCAN_LABELS.get(path, path), r["length"], f"{r['forward_s']:.3f}", f"{r['backward_s']:.3f}",
                  f"{r['total_s']:.3f}"] for r in runs]
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = sorted({r["length"] for runs in seconds.values() for r in runs})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("sequence length L")
    ax.set_ylabel("seconds (median)")
    ax.set_title(f"selective scan, batch {figures['batch']}, d_inner {figures['dim']}, d_state {figures['nstate']}, "
                 f"{figures['dtype']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(out_dir / "scan.png", dpi=120)
    plt.close(fig)
    speedups = figures.get("speedups", {})
    notes = []
    if "reference" in speedups:
        ref = speedups["reference"]
        notes.append(f"speed-up over the sequential reference at L={ref['length']}: {ref['total']:.1f}x")
    for item in speedups.get("pscan", []):
        notes.append(f"speed-up over the mambapy-style scan at L={item['length']}: {item['total']:.1f}x")
    if "mamba_ssm" not in seconds:
        notes.append("mamba-ssm's CUDA kernel is not timed by bench_scan.py (CPU machine).")
    header = ["path", "L", "forward s", "backward s", "fwd+bwd s"]
    return ("## Selective scan (`bench/bench_scan.py`)\n\n" + _table(header, rows) + "\n\n"
            + "".join(f"- {n}\n" for n in notes) + "\n![scan](scan.png)\n")


def render_loader(figures: dict, out_dir: Path) -> str:
    """Images/s of decode-only, DALI and the PIL baseline (bars)."""
    rates = figures["images_per_s"]
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    names = list(rates)
    colours = {"decode-only": "#888888", "dali": "#76b900", "baseline": "#4c72b0"}
    ax.bar(names, [rates[n] for n in names], color=[colours.get(n, "#4c72b0") for n in names])
    for i, n in enumerate(names):
        ax.text(i, rates[n], f"{rates[n]:,.0f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("images/s")
    ax.set_title(f"{figures['mode']} loader, S={figures['image_size']}, batch {figures['batch_size']}, "
                 f"{figures['threads']} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "loader.png", dpi=120)
    plt.close(fig)
    rows = [[n, f"{rates[n]:,.0f}", f"{rates[n] / rates['baseline']:.2f}" if "baseline" in rates else "-"]
            for n in names]
    return ("## Data loaders (`bench/bench_loader.py`)\n\n"
            + _table(["pipeline", "images/s", "x baseline"], rows)
            + f"\n\n- {figures['images']} JPEGs, {figures['interpolation']} resize; DALI / baseline "
              f"{figures['dali_vs_baseline']:.2f}x, DALI / decode-only {figures['dali_vs_decode_only']:.2f}x\n"
            + "\n![loader](loader.png)\n")


def render_shard(figures: dict, out_dir: Path) -> str:
    """Sharding throughput of `star shard` against plain `tar cf` of the same files (bars)."""
    results = figures["results"]
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    names = [r["method"] for r in results]
    ax.barh(names, [r["images_per_s"] for r in results], color="#4c72b0")
    for i, r in enumerate(results):
        ax.text(r["images_per_s"], i, f" {r['images_per_s']:,.0f}", va="center", fontsize=8)
    ax.set_xlabel("images/s")
    ax.set_title(f"{figures['files']} files, {figures['bytes'] / 1e6:.0f} MB, {figures['workers']} workers", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_dir / "shard.png", dpi=120)
    plt.close(fig)
    rows = [[r["method"], f"{r['seconds']:.2f}", f"{r['images_per_s']:,.0f}", f"{r['mb_per_s']:,.0f}",
             f"{r['ratio_vs_tar']:.2f}"] for r in results]
    return ("## Sharding (`bench/bench_shard.py`)\n\n"
            + _table(["method", "seconds", "images/s", "MB/s", "speed vs tar cf"], rows)
            + "\n\n![shard](shard.png)\n")


def render_model(figures: dict, out_dir: Path) -> str:
    """`star profile model`: forward and backward time per image per rank (stacked bars)."""
    ranks = figures["model_per_rank"]
    fig, ax = plt.subplots(figsize=(6.4, 1.6 + 0.5 * len(ranks)))
    labels = [f"rank {i}" for i in range(len(ranks))]
    fwd = [1e3 * r["forward_s"] / r["batch_images"] for r in ranks]
    bwd = [1e3 * r["backward_s"] / r["batch_images"] for r in ranks]
    ax.barh(labels, fwd, color="#4c72b0", label="forward")
    ax.barh(labels, bwd, left=fwd, color="#dd8452", label="backward")
    for i, r in enumerate(ranks):
        mfu = "" if r["mfu"] is None else f", MFU {100 * r['mfu']:.1f} %"
        ax.text(fwd[i] + bwd[i], i, f" {r['images_per_s']:,.1f} images/s{mfu}", va="center", fontsize=8)
    ax.set_xlabel("ms per image (median iteration / batch)")
    ax.set_xlim(0, 1.45 * max(f + b for f, b in zip(fwd, bwd)))
    ax.set_title(f"{figures['config']}: forward + backward, batch {ranks[0]['batch_images']}, "
                 f"{ranks[0]['precision']}, Mamba path {ranks[0]['mamba_path']}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out_dir / "model.png", dpi=120)
    plt.close(fig)
    rows = []
    for i, r in enumerate(ranks):
        rows.append([i, r["batch_images"], r["precision"], r["mamba_path"], f"{1e3 * r['forward_s']:,.1f}",
                     f"{1e3 * r['backward_s']:,.1f}", f"{r['images_per_s']:,.2f}", f"{r['tokens_per_s']:,.0f}",
                     f"{r['flops']['training_per_image'] / 1e9:,.1f}", f"{r['achieved_tflops']:.3g}",
                     "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f} %",
                     "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:,.0f}"])
    header = ["rank", "batch", "precision", "Mamba path", "forward ms", "backward ms", "images/s", "tokens/s",
              "train GFLOP/image", "TFLOP/s", "MFU", "peak MiB"]
    proj = figures.get("projection") or {}
    notes = [f"command: `{figures.get('command', 'star profile model')}`",
             f"peak memory: {ranks[0]['peak_memory_kind']}; peak TFLOP/s: {figures.get('peak_tflops_source')}"]
    if proj:
        notes.append(f"{proj['epochs']} epochs of {proj['dataset_images']:,} images at {proj['images_per_s']:,.1f} "
                     f"images/s ({proj['based_on']}): {proj['hours']:,.1f} h")
    return ("## Model forward + backward (`star profile model`)\n\n" + _table(header, rows) + "\n\n"
            + "".join(f"- {n}\n" for n in notes) + "\n![model](model.png)\n")


RENDERERS = {"scan": render_scan, "loader": render_loader, "shard": render_shard, "model": render_model}


def render(name: str, figures: dict, out_dir: Path) -> str:
    return RENDERERS[name](figures, Path(out_dir))
