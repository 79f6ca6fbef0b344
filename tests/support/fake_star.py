"""A stand-in for the `star` command that obeys the trainer contract the SLURM launchers rely on.

It lets the launcher tests exercise preemption, requeue and resume in seconds, without the model:

  fake_star.py pretrain --config C --run-dir D [key=value ...]
      trains `steps` steps of `step_time` seconds each; the "weights" are one float updated by
      weight_update(); resumes from D/state.json; appends one JSON per step to D/metrics.jsonl
      (rank 0); on SIGUSR1 or SIGTERM finishes the current step, saves and exits 75; exits 0
      when done. Keys: steps, step_time, fail_at (exit 3 at that step), stop_at (stop with 75
      after that step as if signalled), handle_signals (0: no handlers, a signal kills it).
  fake_star.py finetune --config C --init I --run-dir D [key=value ...]
      the same loop as pretrain.
  fake_star.py eval --ckpt D --data DIR [--ema] [--json F]
      appends {"ckpt", "data", "ema", "json", "w"} to D/eval.jsonl.
  fake_star.py export D --out F
      writes {"w": ...} from D/state.json.
  fake_star.py profile WHAT [options ...]
      prints its arguments.
  fake_star.py doctor [options ...]
      appends {"rank", "args"} to $FAKE_DOCTOR_LOG (when set) and passes, or, when
      FAKE_DOCTOR_FAIL=N is set, prints a FAIL line and exits N (the real doctor exits 1).

Every rank appends its view of the launch (rank, world size, rendezvous, restart count) to
D/launches.jsonl so tests can check what the launcher gave each task.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import yaml

EXIT_RESUME = 75
EXIT_FAILED = 3


def weight_update(w: float, step: int) -> float:
    return 0.5 * w + step


def _append_json(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def pretrain(args: argparse.Namespace) -> int:
    opts = dict(kv.split("=", 1) for kv in args.overrides)
    steps = int(opts.get("steps", 20))
    step_time = float(opts.get("step_time", 0.1))
    fail_at = int(opts["fail_at"]) if "fail_at" in opts else None
    stop_at = int(opts["stop_at"]) if "stop_at" in opts else None
    rank = int(os.environ.get("SLURM_PROCID", os.environ.get("RANK", 0)))
    restart = int(os.environ.get("SLURM_RESTART_COUNT", 0))
    run = Path(args.run_dir)
    run.mkdir(parents=True, exist_ok=True)

    stop = {"signal": None}

    def on_signal(signum, _frame):
        stop["signal"] = signal.Signals(signum).name

    if opts.get("handle_signals", "1") == "1":  # 0: die of USR1 like a task still starting up
        signal.signal(signal.SIGUSR1, on_signal)
        signal.signal(signal.SIGTERM, on_signal)

    _append_json(run / "launches.jsonl", {
        "rank": rank,
        "world_size": int(os.environ.get("SLURM_NTASKS", 1)),
        "master_addr": os.environ.get("MASTER_ADDR"),
        "master_port": os.environ.get("MASTER_PORT"),
        "restart": restart,
        "config": args.config,
        "overrides": args.overrides,
    })
    # The resolved config, as the real trainer records it (the launchers read data.dir, ema).
    (run / "config.yaml").write_text(yaml.safe_dump({
        "data": {"dir": opts.get("data.dir", "data/imagenet_shards")},
        "ema": {"enabled": opts.get("ema.enabled", "false") == "true"}}))
    state_file = run / "state.json"
    state = json.loads(state_file.read_text()) if state_file.exists() else {"step": 0, "w": 0.0}
    if state["step"] >= steps:
        return 0
    print(f"[fake rank {rank}] resuming at step {state['step']} of {steps}", flush=True)

    def save() -> None:
        if rank == 0:
            tmp = state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(state))
            os.replace(tmp, state_file)

    while state["step"] < steps:
        step = state["step"]
        if fail_at == step:
            print(f"[fake rank {rank}] failing at step {step}", flush=True)
            return EXIT_FAILED
        time.sleep(step_time)
        state["w"] = weight_update(state["w"], step)
        state["step"] = step + 1
        if rank == 0:
            _append_json(run / "metrics.jsonl", {"step": step, "w": state["w"], "restart": restart})
        if stop_at == step:  # passed once: a resumed run starts after it
            stop["signal"] = "stop_at"
        if stop["signal"] and state["step"] < steps:
            save()
            print(f"[fake rank {rank}] {stop['signal']}: saved at step {state['step']}, exit 75", flush=True)
            return EXIT_RESUME
    save()
    return 0


def evaluate(args: argparse.Namespace) -> int:
    state = json.loads((Path(args.ckpt) / "state.json").read_text())
    _append_json(Path(args.ckpt) / "eval.jsonl", {"ckpt": args.ckpt, "data": args.data, "ema": args.ema,
                                                   "json": args.json, "w": state["w"]})
    return 0


def export(args: argparse.Namespace) -> int:
    state = json.loads((Path(args.run_dir) / "state.json").read_text())
    Path(args.out).write_text(json.dumps({"w": state["w"], "step": state["step"]}))
    return 0


def doctor(options: list[str]) -> int:
    rank = int(os.environ.get("SLURM_PROCID", 0))
    if os.environ.get("FAKE_DOCTOR_LOG"):
        _append_json(Path(os.environ["FAKE_DOCTOR_LOG"]), {"rank": rank, "args": options})
    fail = int(os.environ.get("FAKE_DOCTOR_FAIL", 0))
    line = f"[fake rank {rank}] doctor: {'FAIL (FAKE_DOCTOR_FAIL)' if fail else 'all checks passed'}\n"
    os.write(sys.stdout.fileno(), line.encode())
    return fail


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fake_star")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("pretrain", "finetune"):
        p = sub.add_parser(name)
        p.add_argument("--config", required=True)
        p.add_argument("--run-dir", required=True)
        p.add_argument("overrides", nargs="*")
        if name == "finetune":
            p.add_argument("--init", required=True)
    e = sub.add_parser("eval")
    e.add_argument("--ckpt", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--ema", action="store_true")
    e.add_argument("--json")
    x = sub.add_parser("export")
    x.add_argument("run_dir")
    x.add_argument("--out", required=True)
    prof = sub.add_parser("profile")
    prof.add_argument("what")
    prof.add_argument("options", nargs=argparse.REMAINDER)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["doctor"]:  # takes any options: what the launcher passed is recorded
        return doctor(argv[1:])
    args = parser.parse_args(argv)
    if args.command == "profile":
        rank = os.environ.get("SLURM_PROCID", "0")
        line = f"[fake rank {rank}] profile {args.what} {' '.join(args.options)}\n"
        os.write(sys.stdout.fileno(), line.encode())  # one write: ranks share the log
        return 0
    commands = {"pretrain": pretrain, "finetune": pretrain, "eval": evaluate, "export": export}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
