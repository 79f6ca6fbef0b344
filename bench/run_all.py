"""Run the project's benchmarks and file their results: JSON, log, markdown table and PNG plot.

    python bench/run_all.py                      # all benchmarks, full sizes
    python bench/run_all.py --only scan --small  # one benchmark, quick sizes (a busy machine)

For each benchmark NAME it runs ``bench/bench_NAME.py ... --json`` (scan, loader, shard) or
``star profile model --config star_b_1600ep ... --json`` (model), keeps its console output,
and writes under ``--out`` (default ``bench/results/<gpu-or-cpu-model>-<date>/``; a later
call with ``--only`` replaces those benchmarks' files and keeps the others'):

    NAME.json  the figures exactly as the program wrote them
    NAME.log   its console output
    NAME.md    a markdown table of those figures, NAME.png a plot (bench/plots.py)
    README.md  the machine description, the commands, the load average, and every table

``--small`` uses smaller sizes; the results README says which sizes were used, how long each
run took and how loaded the machine was (``os.getloadavg``), since timings
taken while other processes hold the cores are not comparable with a quiet machine's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # star.profiling, from a checkout without install

# name -> (program: a script in bench/ or ``-m module`` arguments, full-size arguments, --small arguments)
BENCHMARKS: dict[str, tuple[list[str], list[str], list[str]]] = {
    "scan": (["bench_scan.py"], ["--lengths", "160", "320", "640", "1280", "--repeats", "3"],
             ["--lengths", "160", "320", "640", "1280", "--repeats", "2", "--ref-budget", "30"]),
    "loader": (["bench_loader.py"], ["--images", "768", "--repeats", "3"],
               ["--images", "256", "--repeats", "2"]),
    "shard": (["bench_shard.py"], ["--images", "6000", "--repeats", "2"],
              ["--images", "1000", "--repeats", "1"]),
    # STAR-B forward + backward (star profile model): the config's batch on a GPU, one sequence on a CPU
    "model": (["-m", "star", "profile", "model", "--config", "star_b_1600ep"], ["--batches", "10"],
              ["--batch-size", "8", "--batches", "2", "--warmup", "1"]),
}
# a CPU cannot hold STAR-B's per-GPU batch of 256 images in reasonable time: one sequence of 8
CPU_FULL_ARGS = {"model": ["--batch-size", "8", "--batches", "3", "--warmup", "1"]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    summary, details = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(prog="bench/run_all.py", description=summary, epilog=details,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", choices=sorted(BENCHMARKS), metavar="NAME",
                   help=f"run only this benchmark (repeatable; one of {', '.join(BENCHMARKS)}); default all")
    p.add_argument("--small", action="store_true", help="quick sizes for a busy or small machine (see BENCHMARKS)")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default bench/results/<gpu-or-cpu-model>-<date>)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds one benchmark may run (default 3600)")
    p.add_argument("--render-only", action="store_true",
                   help="do not run anything: rebuild the .md / .png / README from the .json files in --out")
    args = p.parse_args(argv)
    if args.render_only and args.out is None:
        p.error("--render-only needs --out, the folder holding the .json files")
    return args


def run_benchmark(name: str, small: bool, out: Path, timeout: float) -> dict:
    """Run one script with --json; its console output goes to the terminal and NAME.log."""
    import torch

    program, full, quick = BENCHMARKS[name]
    if not torch.cuda.is_available():
        full = CPU_FULL_ARGS.get(name, full)
    if program[0] != "-m":
        program = [str(HERE / program[0]), *program[1:]]
    command = [sys.executable, *program, *(quick if small else full), "--json", str(out / f"{name}.json")]
    print(f"\n=== {name}: {' '.join(command[1:])}", flush=True)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=HERE.parent)
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                log.write(line)
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = -9
    return {"name": name, "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "sizes": "small" if small else "full",
            "command": "python " + " ".join(str(Path(c).relative_to(HERE.parent))
                                                          if c.startswith(str(HERE.parent)) else c
                                                          for c in command[1:]),
            "exit_code": code, "seconds": round(time.perf_counter() - start, 1),
            "load_average_before": round(load_before, 2), "load_average_after": round(os.getloadavg()[0], 2)}


def _merge_earlier_runs(runs_file: Path, runs: list[dict]) -> list[dict]:
    """Keep the records of benchmarks an earlier call filed in the same folder and this one did
    not rerun (``--only``), so the README keeps listing every result the folder holds."""
    if not runs_file.is_file():
        return runs
    rerun = {r["name"] for r in runs}
    kept = [r for r in json.loads(runs_file.read_text())["runs"] if r["name"] not in rerun]
    order = list(BENCHMARKS)
    return sorted(kept + runs, key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))


def write_readme(out: Path, machine: dict, runs: list[dict], sections: dict[str, str]) -> None:
    lines = [f"# Benchmark results: {machine.get('gpu_model') or machine['cpu_model']}, {machine['date_utc'][:10]}", ""]
    gpu = f"{machine['gpu_count']} x {machine['gpu_model']}" if machine.get("gpu_count") else "none"
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v)
    lines += [f"- host `{machine['hostname']}`, {machine['date_utc']}",
              f"- CPU: {machine['cpu_model']}, {machine['cpu_count']} cores; GPU: {gpu}",
              f"- {machine['platform']}, Python {machine['python']}; {versions}",
              f"- kernels: {machine['kernels']}", ""]
    loaded = [r for r in runs if max(r["load_average_before"], r["load_average_after"]) > (machine["cpu_count"] or 1)]
    if loaded:
        lines += [f"**Taken on a loaded machine**: the load average exceeded the {machine['cpu_count']} cores "
                  "during " + ", ".join(r["name"] for r in loaded) + " (other processes held the cores), so absolute "
                  "figures are pessimistic; ratios measured in one run are the meaningful part.", ""]
    lines += ["| benchmark | sizes | finished (UTC) | command | exit code | seconds | load average before / after |",
              "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r.get('sizes', '-')} | {r.get('date_utc', '-')} | `{r['command']}` | {r['exit_code']} "
              f"| {r['seconds']} | {r['load_average_before']} / {r['load_average_after']} |" for r in runs]
    lines.append("")
    for section in sections.values():
        lines += [section, ""]
    (out / "README.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    from bench.plots import render
    from star.profiling.machine import describe_machine, machine_slug

    out: Path = args.out
    runs_file = None
    if args.render_only:
        runs_file = out / "runs.json"
        if not runs_file.is_file():
            print(f"run_all: {runs_file} not found; run without --render-only first", file=sys.stderr)
            return 2
        saved = json.loads(runs_file.read_text())
        machine, runs = saved["machine"], saved["runs"]
    else:
        machine = describe_machine("cuda" if torch.cuda.is_available() else "cpu")
        out = out or HERE / "results" / machine_slug(machine)
        out.mkdir(parents=True, exist_ok=True)
        runs = [run_benchmark(name, args.small, out, args.timeout) for name in (args.only or list(BENCHMARKS))]
        runs = _merge_earlier_runs(out / "runs.json", runs)
        (out / "runs.json").write_text(json.dumps({"machine": machine, "runs": runs}, indent=1) + "\n")

    sections: dict[str, str] = {}
    failed = []
    for run in runs:
        name = run["name"]
        figures_file = out / f"{name}.json"
        if run["exit_code"] != 0 or not figures_file.is_file():
            failed.append(name)
            sections[name] = f"## {name}\n\nfailed (exit code {run['exit_code']}); see `{name}.log`."
            continue
        section = render(name, json.loads(figures_file.read_text()), out)
        (out / f"{name}.md").write_text(section)
        sections[name] = section
    write_readme(out, machine, runs, sections)
    print(f"\nresults in {out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
