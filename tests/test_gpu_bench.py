"""bench/gpu_bench.py --tiny runs on a CPU without `datasets` and writes a dataset that verify accepts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
GPU_BENCH = REPO_ROOT / "bench" / "gpu_bench.py"
TIMEOUT_SECONDS = 120

# A machine lent for the GPU benchmark has torch and transformers but not `datasets`, so the benchmark
# runs here in a child process whose path finder cannot see it.
RUN_WITHOUT_DATASETS = textwrap.dedent("""
    import importlib.machinery, runpy, sys
    class HidingPathFinder(importlib.machinery.PathFinder):
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if name.split(".")[0] == "datasets":
                return None
            return importlib.machinery.PathFinder.find_spec(name, path, target)
    sys.meta_path = [HidingPathFinder if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
    assert "datasets" not in sys.modules, "the GPU benchmark imported datasets"
""")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("gpu-bench")
    json_path = work_dir / "results.json"
    command = [sys.executable, "-c", RUN_WITHOUT_DATASETS, str(GPU_BENCH), "--tiny", "--device", "cpu",
               "--work-dir", str(work_dir), "--json", str(json_path)]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    completed = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True,
                               timeout=TIMEOUT_SECONDS)
    assert completed.returncode == 0, f"gpu_bench.py --tiny failed:\n{completed.stdout}\n{completed.stderr[-4000:]}"
    return completed.stdout, json.loads(json_path.read_text()), work_dir / "dataset"


def test_prints_speed_and_floors(bench_run):
    stdout, _, _ = bench_run
    for label in ("extraction:", "tokens/s", "MB/s written", "arithmetic floor", "weight-read floor", "disk floor",
                  "baseline:"):
        assert label in stdout, f"{label!r} missing from the output:\n{stdout}"


def test_json_numbers_are_positive(bench_run):
    _, results, _ = bench_run
    numbers = {
        "extraction seconds": results["extraction"]["seconds"],
        "tokens per second": results["extraction"]["tokens_per_second"],
        "bytes per second": results["extraction"]["bytes_per_second"],
        "arithmetic floor": results["floors"]["arithmetic_seconds"],
        "weight-read floor": results["floors"]["weight_reads_seconds"],
        "disk floor": results["floors"]["disk_seconds"],
        "baseline estimate": results["baseline"]["seconds_estimated"],
    }
    for name, value in numbers.items():
        assert value > 0, f"{name} is {value}"


def test_forced_lengths_are_count_plus_two(bench_run):
    _, results, dataset_dir = bench_run
    manifest = json.loads((dataset_dir / "manifest.json").read_text())
    lengths = {sample["count"]: sample["completion_length"] for sample in manifest["samples"]}
    assert all(length == count + 2 for count, length in lengths.items()), lengths
    assert results["rows"] == sum(lengths[sample["count"]] for sample in manifest["samples"])


def test_dataset_passes_verify(bench_run):
    _, _, dataset_dir = bench_run
    completed = subprocess.run([sys.executable, "-m", "generation", "verify", str(dataset_dir)], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=TIMEOUT_SECONDS)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip().endswith("OK")
