"""`star smoke`: one forward + backward of a model by name on random images.

Prints the loss, the parameter count, the wall time, the peak memory and which kernel path
(``cuda``: mamba-ssm / causal-conv1d, ``torch``: the pure-PyTorch scan) ran. A quick check
that a model builds, fits and trains on a machine before launching a real job.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch


def build_parser() -> argparse.ArgumentParser:
    from star.models import list_models

    parser = argparse.ArgumentParser(
        prog="star smoke",
        description="One forward+backward of a model on random images; prints loss, parameters, "
                    "time, peak memory and the kernel path.")
    parser.add_argument("--model", required=True, metavar="NAME",
                        help=f"model name, one of: {', '.join(list_models())}")
    parser.add_argument("--batch", type=int, default=1,
                        help="pretraining forms: sequences (each holds images_per_seq images); "
                             "fine-tuning forms: images (default: 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device, e.g. cpu or cuda:0 (default: cuda if available, else cpu)")
    parser.add_argument("--images-per-seq", type=int, default=None,
                        help="override N, the images per pretraining sequence")
    parser.add_argument("--seed", type=int, default=0, help="random seed for weights and images")
    return parser


def _peak_memory_mib(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "CUDA allocated"
    # ru_maxrss is in KiB on Linux: the whole process, weights and Python included
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process RSS"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from star import ops
    from star.models import StarClassifier, create_model

    if args.batch < 1:
        print(f"star smoke: --batch must be >= 1, got {args.batch}", file=sys.stderr)
        return 2
    try:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("CUDA is not available on this machine; use --device cpu")
        overrides = {} if args.images_per_seq is None else {"images_per_seq": args.images_per_seq}
        torch.manual_seed(args.seed)
        model = create_model(args.model, **overrides).to(device)
    except (ValueError, RuntimeError) as err:
        print(f"star smoke: {err}", file=sys.stderr)
        return 2

    finetune = isinstance(model, StarClassifier)
    size = model.patch_embed.img_size
    num_images = args.batch if finetune else args.batch * model.packing.images_per_seq
    images = torch.randn(num_images, 3, size, size, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    if finetune:
        labels = torch.randint(0, max(model.num_classes, 1), (num_images,), device=device)
        loss = torch.nn.functional.cross_entropy(model(images), labels)
    else:
        loss = model(images)["loss"]
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    peak, what = _peak_memory_mib(device)

    params = sum(p.numel() for p in model.parameters())
    grads_ok = all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    print(f"model        {args.model} ({type(model).__name__})")
    print(f"input        {num_images} images of {size}x{size}"
          + ("" if finetune else f", {args.batch} sequence(s) of {model.layout.seq_len} tokens"))
    if not finetune:
        print(f"layout       {model.layout.pattern()} (S separator, C image cluster)")
    print(f"loss         {loss.item():.4f}")
    print(f"parameters   {params / 1e6:.2f} M")
    print(f"fwd+bwd      {elapsed:.2f} s")
    print(f"peak memory  {peak:.0f} MiB ({what})")
    print(f"kernels      {ops.kernel_backend_for(images)}")
    if not (torch.isfinite(loss) and grads_ok):
        print("star smoke: loss or gradients are not finite", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
