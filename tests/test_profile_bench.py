"""bench/run_all.py: tables and plots carry the figures of the benchmark scripts' JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# JSON shaped as bench_scan.py / bench_loader.py / bench_shard.py write it (only the keys the
# renderers read), with figures chosen to be recognisable in the output.
SCAN = {"benchmark": "selective_scan", "batch": 2, "dim": 768, "nstate": 16, "dtype": "float32",
        "seconds": {"torch": [{"length": 160, "forward_s": 0.011, "backward_s": 0.022, "total_s": 0.033},
                              {"length": 320, "forward_s": 0.021, "backward_s": 0.042, "total_s": 0.063}],
                    "pscan": [{"length": 160, "forward_s": 0.111, "backward_s": 0.122, "total_s": 0.233}],
                    "reference": [{"length": 160, "forward_s": 1.5, "backward_s": 7.25, "total_s": 8.75}]},
        "speedups": {"reference": {"length": 160, "total": 265.2}, "pscan": [{"length": 160, "total": 7.06}]}}
LOADER = {"mode": "pretrain", "images": 256, "batch_size": 64, "image_size": 192, "threads": 2,
          "interpolation": "cubic", "images_per_s": {"decode-only": 2400.0, "dali": 1300.0, "baseline": 650.0},
          "dali_vs_baseline": 2.0, "dali_vs_decode_only": 1300 / 2400}
SHARD = {"files": 1000, "bytes": 39_000_000, "workers": 2, "cpus": 2,
         "results": [{"method": "tar cf", "seconds": 0.5, "images_per_s": 2000.0, "mb_per_s": 78.0,
                      "ratio_vs_tar": 1.0},
                     {"method": "star shard --check markers", "seconds": 2.0, "images_per_s": 500.0,
                      "mb_per_s": 19.5, "ratio_vs_tar": 0.25}]}

MODEL = {"config": "star_b_1600ep", "command": "star profile model --config star_b_1600ep",
         "peak_tflops_source": "table: H100 SXM, dense bf16",
         "model_per_rank": [{"batch_images": 256, "precision": "bf16", "mamba_path": "cuda", "forward_s": 0.1,
                             "backward_s": 0.2, "images_per_s": 853.3, "tokens_per_s": 136533.0,
                             "flops": {"training_per_image": 100.59e9}, "achieved_tflops": 85.8, "mfu": 0.0868,
                             "peak_memory_bytes": 40 * 2**30, "peak_memory_kind": "cuda max_memory_allocated"}],
         "projection": {"epochs": 1600, "dataset_images": 1281167, "images_per_s": 853.3,
                        "based_on": "model", "hours": 667.2}}


@pytest.fixture(scope="module")
def run_all():
    """bench/run_all.py as a module (bench/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("run_all", REPO / "bench" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_render_only_rebuilds_tables_plots_and_readme(tmp_path, capsys, run_all):
    machine = {"hostname": "host1", "date_utc": "2026-11-23T20:00:00+00:00", "cpu_model": "Test CPU", "cpu_count": 2,
               "gpu_model": None, "gpu_count": 0, "platform": "Linux", "python": "3.11",
               "versions": {"torch": "2.13.0"}, "kernels": "torch"}
    runs = [{"name": name, "command": f"python bench/bench_{name}.py", "exit_code": 0, "seconds": 1.0,
             "load_average_before": 0.5, "load_average_after": 3.5} for name in ("scan", "loader", "shard", "model")]
    runs.append({"name": "missing", "command": "-", "exit_code": 1, "seconds": 0.0,
                 "load_average_before": 0.1, "load_average_after": 0.1})
    (tmp_path / "runs.json").write_text(json.dumps({"machine": machine, "runs": runs}))
    for name, figures in (("scan", SCAN), ("loader", LOADER), ("shard", SHARD), ("model", MODEL)):
        (tmp_path / f"{name}.json").write_text(json.dumps(figures))
    assert run_all.main(["--render-only", "--out", str(tmp_path)]) == 1  # the failed run is reported, not hidden
    assert "failed: missing" in capsys.readouterr().out
    for name in ("scan", "loader", "shard", "model"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scan = (tmp_path / "scan.md").read_text()
    assert "| PyTorch chunked scan (star.ops) | 320 | 0.021 | 0.042 | 0.063 |" in scan
    assert "| sequential reference (autograd) | 160 | 1.500 | 7.250 | 8.750 |" in scan
    assert "265.2x" in scan
    loader = (tmp_path / "loader.md").read_text()
    assert "| dali | 1,300 | 2.00 |" in loader and "| decode-only | 2,400 | 3.69 |" in loader
    shard = (tmp_path / "shard.md").read_text()
    assert "| star shard --check markers | 2.00 | 500 | 20 | 0.25 |" in shard
    model = (tmp_path / "model.md").read_text()
    assert "| 0 | 256 | bf16 | cuda | 100.0 | 200.0 | 853.30 | 136,533 | 100.6 | 85.8 | 8.7 % | 40,960 |" in model
    readme = (tmp_path / "README.md").read_text()
    assert "Taken on a loaded machine" in readme  # load 3.5 on 2 cores
    assert "host1" in readme and scan in readme and "failed (exit code 1)" in readme


def test_rerunning_some_benchmarks_keeps_the_others(tmp_path, run_all):
    earlier = [{"name": "scan", "seconds": 1.0}, {"name": "loader", "seconds": 2.0}]
    (tmp_path / "runs.json").write_text(json.dumps({"machine": {}, "runs": earlier}))
    merged = run_all._merge_earlier_runs(tmp_path / "runs.json", [{"name": "loader", "seconds": 9.0},
                                                                   {"name": "model", "seconds": 3.0}])
    assert merged == [{"name": "scan", "seconds": 1.0}, {"name": "loader", "seconds": 9.0},
                      {"name": "model", "seconds": 3.0}]
