"""`star profile WHAT` (the one entry of all profiling) and its alias `star smoke`.

``data`` times the loader (star/profiling/data.py); ``model`` the forward + backward of the
network on synthetic images, or with ``--model NAME`` a one-pass check of a registry model
(what `star smoke` runs); ``step`` the whole DeepSpeed training step; ``all`` the three in one
table; ``flops`` prints the analytic FLOPs per image of registry models (star/flops.py).

Run on one GPU, or one process per GPU (srun / torchrun): every rank then times the model
on its own GPU (rows per rank plus their sum), and the training step runs data-parallel over
all ranks exactly as training does. Rank 0 prints the table and writes the JSON.
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch

from star import flops
from star.config import Config, ConfigError, load_config
from star.models import list_models
from star.profiling.data import data_profile, run_data
from star.profiling.machine import describe_machine, resolve_peak_tflops
from star.profiling.model import ModelProfileSettings, format_quick_check, profile_model, quick_check
from star.profiling.report import aggregate_model, print_report, projection, write_json
from star.profiling.step import StepProfileSettings, profile_step
from star.train.cli_common import add_config_argument, add_overrides_argument
from star.train.distributed import all_gather_objects, destroy, init_distributed, resolve_device, resolve_dist_env
from star.train.runtime import build_model, seed_everything

SUBCOMMANDS = {
    "data": "images/s of the data loader (DALI or baseline) per rank and overall",
    "model": "forward + backward of the model on synthetic images (images/s, tokens/s, MFU); "
             "--model NAME: a one-pass check of a registry model",
    "step": "the full training step with real data through DeepSpeed",
    "all": "data pipeline, model and training step in one run and one table",
    "flops": "analytic forward / training GFLOPs per image of registry models (nothing is built)",
}

WHAT_HELP = {
    "model": "forward + backward of the model on synthetic images: images/s, tokens/s, peak memory, "
             "Mamba kernel path, analytic FLOPs and MFU",
    "step": "the full training step with real data through DeepSpeed: images/s, share of time waiting for "
            "data, optimizer time",
    "all": "data pipeline, model and training step in one run and one table",
}


def _usage() -> str:
    lines = ["usage: star profile {data,model,step,all,flops} [options]", "", "subcommands:"]
    lines += [f"  {name:<6} {text}" for name, text in SUBCOMMANDS.items()]
    lines += ["", "Run `star profile WHAT --help` for the options of one."]
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser, *, config_required: bool = True) -> None:
    """The options shared by `star profile model`, `step` and `all`."""
    add_config_argument(parser, required=config_required,
                        when="" if config_required else " (or --model NAME for a quick check)")
    add_overrides_argument(parser, "model.images_per_seq=4")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="where to run (default: the config's device; auto = cuda when a GPU is visible)")
    parser.add_argument("--batches", type=int, default=10, metavar="N",
                        help="timed iterations (model: forward+backward passes; step: optimizer steps); "
                             "medians are reported (default 10)")
    parser.add_argument("--warmup", type=int, default=None, metavar="N",
                        help="untimed iterations before timing (default 3 on CUDA, 1 on CPU)")
    parser.add_argument("--batch-size", type=int, default=None, metavar="IMAGES",
                        help="images per GPU per forward, a multiple of the config's images per sequence "
                             "(default: the config's batch.micro_images; lower it on CPU). For the step, "
                             "sets batch.micro_images and batch.global_images = IMAGES x world size")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default=None,
                        help="model profile: bf16 autocast (default on CUDA, as training) or fp32 (default on CPU)")
    parser.add_argument("--peak-tflops", type=float, default=None, metavar="TFLOPS",
                        help="peak dense TFLOP/s of one device for MFU (default: looked up for A100 / H100 / "
                             "H200 from the device name; none on CPU, so MFU is n/a there)")
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="shard directory (overrides data.dir) for the data and step profiles")
    parser.add_argument("--loader", choices=("dali", "baseline"), default=None,
                        help="loader backend for the data and step profiles (overrides data.backend)")
    parser.add_argument("--projection-epochs", type=int, default=None, metavar="N",
                        help="epochs of ImageNet-1k (1,281,167 images) for the projected wall time (default: the "
                             "config's schedule.epochs, e.g. 1600 for star_b_1600ep); uses the step's images/s "
                             "when measured, else the model's summed over ranks")
    parser.add_argument("--trace", default=None, metavar="DIR",
                        help="model profile: also record one iteration with torch.profiler into DIR "
                             "(model-rank<R>.json, a Chrome / Perfetto trace, and model-rank<R>.txt, the operators "
                             "by their own device time)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write every figure to this JSON file")


def add_quick_check_arguments(parser: argparse.ArgumentParser) -> None:
    """`star profile model --model NAME` (and `star smoke`): a registry model with its defaults."""
    parser.add_argument("--model", metavar="NAME",
                        help=f"instead of --config: one float32 forward + backward of this registry model on "
                             f"random images, printing loss, parameters, time, peak memory and the kernel path "
                             f"(a check that it builds, fits and trains here). One of: {', '.join(list_models())}")
    parser.add_argument("--images-per-seq", type=int, default=None, metavar="N",
                        help="with --model: override N, the images per pretraining sequence")
    parser.add_argument("--seed", type=int, default=0, help="with --model: seed of weights and images (default 0)")


def build_parser(what: str, prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog or f"star profile {what}", description=WHAT_HELP[what])
    add_arguments(parser, config_required=what != "model")
    if what == "model":
        add_quick_check_arguments(parser)
    return parser


def _load(args) -> Config:
    overrides = list(args.overrides)
    if args.data:
        overrides.append(f"data.dir={args.data}")
    if args.loader:
        overrides.append(f"data.backend={args.loader}")
    return load_config(args.config, overrides)


def _rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _free_device_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def run_model_profile(cfg: Config, args, device: str) -> list[dict]:
    """This rank's model profile, gathered from all ranks (a list, rank order)."""
    seed_everything(cfg.seed)
    if cfg.kind == "finetune" and cfg.model.num_classes is None:
        cfg.model.num_classes = 1000  # synthetic labels: ImageNet-1k's head
    model = build_model(cfg).to(device).train()
    settings = ModelProfileSettings(
        device=device, batch_images=args.batch_size or cfg.batch.micro_images, batches=args.batches,
        warmup=args.warmup if args.warmup is not None else (3 if device == "cuda" else 1),
        precision=args.precision or ("bf16" if device == "cuda" else "fp32"),
        peak_tflops=args.peak_tflops, seed=cfg.seed,
        trace=str(Path(args.trace) / f"model-rank{_rank()}.json") if args.trace else None)
    try:
        result = profile_model(model, settings)
    finally:
        del model
        _free_device_memory(device)
    if device == "cuda":
        result["gpu"] = torch.cuda.get_device_name()
    return all_gather_objects(result)


def run_step_profile(cfg: Config, args, device: str, dist_env) -> dict:
    if args.batch_size:
        cfg.batch.micro_images = args.batch_size
        cfg.batch.global_images = args.batch_size * dist_env.world_size
    settings = StepProfileSettings(batches=args.batches,
                                   warmup=args.warmup if args.warmup is not None else (2 if device == "cuda" else 1))
    result = profile_step(cfg, device, dist_env, settings)
    # the ranks step in lockstep (gradient collectives), but each waits for its own loader
    result["data_wait_share_per_rank"] = all_gather_objects(result["data_wait_share"])
    peak, _ = resolve_peak_tflops(device, args.peak_tflops)
    result["achieved_tflops"] = result["training_flops_per_image"] * result["images_per_s"] / 1e12
    result["mfu"] = result["achieved_tflops"] / (peak * dist_env.world_size) if peak else None
    _free_device_memory(device)
    return result


def run(what: str, args) -> int:
    """Profile ``what`` (model | step | all); ``all`` runs the data profile first."""
    prog = f"star profile {what}"
    bad = [f"{option} {value} (must be >= {low})" for option, value, low in
           (("--batches", args.batches, 1), ("--warmup", args.warmup, 0), ("--batch-size", args.batch_size, 1),
            ("--projection-epochs", args.projection_epochs, 1)) if value is not None and value < low]
    if bad:
        print(f"{prog}: error: {'; '.join(bad)}", file=sys.stderr)
        return 2
    try:
        cfg = _load(args)
        device = resolve_device(args.device or cfg.device)
        manifest = Path(cfg.data.dir) / f"{cfg.data.train_split}.json"
        if what in ("step", "all") and not manifest.is_file():
            raise ConfigError(f"no shards for the data / step profile: {manifest} does not exist; give --data DIR, "
                              f"a folder written by `star shard` (or `star synth` + `star shard` for a test)")
    except (ConfigError, RuntimeError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    # the step needs DeepSpeed's process group even alone; the model profile only to gather ranks
    distributed = what in ("step", "all") or resolve_dist_env().world_size > 1
    dist_env = (init_distributed(device, use_deepspeed=what in ("step", "all")) if distributed
                else resolve_dist_env())
    try:
        result: dict = {"what": what, "command": " ".join(["star", "profile", what, *getattr(args, "argv", [])]),
                        "config": cfg.name or args.config, "kind": cfg.kind,
                        "world_size": dist_env.world_size, "machine": describe_machine(device)}
        machine = result["machine"]
        result["device_label"] = (f"{dist_env.world_size} x {machine['gpu_model']}" if device == "cuda"
                                  else f"CPU ({machine['cpu_model']}, {machine['cpus_usable']} cores usable)")
        result["peak_tflops_source"] = resolve_peak_tflops(device, args.peak_tflops)[1]
        if what == "all":
            result["data"] = data_profile(cfg, args, device, dist_env)
        if what in ("model", "all"):
            per_rank = run_model_profile(cfg, args, device)
            result["model_per_rank"] = per_rank
            result["model"] = aggregate_model(per_rank)
        if what in ("step", "all"):
            result["step"] = run_step_profile(cfg, args, device, dist_env)
        basis = ("train step", result["step"]["images_per_s"]) if "step" in result else \
                ("model forward+backward, no data or optimizer", result["model"]["images_per_s"])
        result["projection"] = projection(basis[1], args.projection_epochs or cfg.schedule.epochs, basis[0])
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        if distributed:
            destroy()
    if dist_env.rank == 0:
        print_report(result)
        if args.json:
            print(f"wrote {write_json(result, args.json)}")
    return 0


def run_quick_check(prog: str, *, model: str, batch: int | None, device: str | None,
                    images_per_seq: int | None, seed: int, batch_in_sequences: bool = False) -> int:
    """Print the one-pass check of a registry model; 1 when its loss or gradients are not finite."""
    if batch is not None and batch < 1:
        print(f"{prog}: error: the batch must be at least 1, got {batch}", file=sys.stderr)
        return 2
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        check = quick_check(model, batch=batch, device=device, images_per_seq=images_per_seq, seed=seed,
                            batch_in_sequences=batch_in_sequences)
    except (ValueError, RuntimeError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    print(format_quick_check(check))
    if not check["finite"]:
        print(f"{prog}: loss or gradients are not finite", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """`star profile WHAT [options]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    what, rest = argv[0], argv[1:]
    if what == "data":
        return run_data(rest)
    if what == "flops":
        return flops.main(rest)
    if what not in WHAT_HELP:
        print(f"star profile: unknown subcommand {what!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    parser = build_parser(what)
    args = parser.parse_intermixed_args(rest)
    args.argv = rest
    if what == "model":
        if (args.config is None) == (args.model is None):
            parser.error("give either --config NAME|PATH (the profile) or --model NAME (a quick check)")
        if args.model is not None:
            if args.overrides:
                parser.error(f"overrides {args.overrides} need --config; with --model the registry's defaults apply")
            return run_quick_check("star profile model", model=args.model, batch=args.batch_size,
                                   device=args.device, images_per_seq=args.images_per_seq, seed=args.seed)
    return run(what, args)


def build_smoke_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="star smoke",
        description="Alias of `star profile model --model NAME`: one forward+backward of a model on random "
                    "images; prints loss, parameters, time, peak memory and the kernel path.")
    parser.add_argument("--model", required=True, metavar="NAME",
                        help=f"model name, one of: {', '.join(list_models())}")
    parser.add_argument("--batch", type=int, default=1,
                        help="pretraining forms: sequences (each holds images_per_seq images); "
                             "fine-tuning forms: images (default: 1)")
    parser.add_argument("--device", default=None,
                        help="torch device, e.g. cpu or cuda:0 (default: cuda if available, else cpu)")
    parser.add_argument("--images-per-seq", type=int, default=None,
                        help="override N, the images per pretraining sequence")
    parser.add_argument("--seed", type=int, default=0, help="random seed for weights and images")
    return parser


def smoke_main(argv: list[str] | None = None) -> int:
    """`star smoke`: the quick check of `star profile model --model NAME`, batch in sequences."""
    args = build_smoke_parser().parse_args(argv)
    return run_quick_check("star smoke", model=args.model, batch=args.batch, device=args.device,
                           images_per_seq=args.images_per_seq, seed=args.seed, batch_in_sequences=True)


if __name__ == "__main__":
    sys.exit(main())
