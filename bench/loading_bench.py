"""Loading speed: preparing a config through length_probe.py against a plain pyarrow copy of its shards.

One command, from the repository root (the demo model must be in generation/demo_model/):

    python bench/loading_bench.py --json bench/results/loading.json

and one with rows as wide as a bigger model's (16,384 values, 1.2 GB), from an untrained model:

    python bench/loading_bench.py --model random --hidden 256 --layers 64 --samples-scale 3

Unless --data-dir names a finished extraction, it first extracts one (not timed): by default with
the demo model and 10 times the 450 prompts. Then, in one process, against the same shards, it
times these steps in turns, --repeats times, and keeps each step's fastest time:

1. the plain copy: read each shard as an Arrow IPC file, from its path and again memory-mapped, and
   write it as an IPC file to another directory;
2. the first load: `load_dataset("length_probe.py", CONFIG, ...)` with a fresh cache directory, which
   checks every shard's sha256, prepares the train and validation splits and memory-maps them;
3. the second load from the same cache directory, which should reuse the prepared files: its time and
   the cache files it added or changed are reported;
4. the first load again with verify_checksums=False, to show what the sha256 check costs.

Throughput is the shards' bytes (and rows) over the seconds. The shards stay in the page cache
throughout, and every step starts after `sync`, so none pays for writing back another's files.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(BENCH_DIR))
SCRIPT = REPO_ROOT / "length_probe.py"

logger = logging.getLogger("loading_bench")


def make_dataset(args, output_dir: Path) -> None:
    """Extract the dataset that the loads read; the extraction itself is not measured here."""
    from extraction_bench import RANDOM_MODEL, scaled_prompt_set

    from generation import ExtractionConfig, run_extraction

    model, factory = args.model, None
    if args.model == RANDOM_MODEL:
        sys.path.insert(0, str(REPO_ROOT / "tests"))
        from forced_lengths import forced_length_factory
        from tiny_models import save_tiny_model
        from transformers import AutoTokenizer

        model = str(save_tiny_model(output_dir.parent / "random-model", "llama", hidden=args.hidden, layers=args.layers))
        tokenizer = AutoTokenizer.from_pretrained(model)
        factory = forced_length_factory([tokenizer.eos_token_id], 1)
    config = ExtractionConfig(model=model, device="cpu", dtype="float32", output_dir=output_dir,
                              configs=(args.config,), **scaled_prompt_set(args.samples_scale))
    logger.info("Extracting %d prompts with %s into %s", config.sample_count, args.model, output_dir)
    run_extraction(config, logits_processor_factory=factory)


def copy_shards(shards: list[Path], target_dir: Path, *, memory_map: bool) -> float:
    """Read every shard as an IPC file and write it as an IPC file into target_dir; return the seconds.

    From a path, pyarrow reads the file into memory. With memory_map the table points into the page
    cache, so only the write touches the bytes: the fastest way pyarrow offers.
    """
    import pyarrow as pa
    import pyarrow.ipc as ipc

    shutil.rmtree(target_dir, ignore_errors=True)
    target_dir.mkdir(parents=True)
    started = time.perf_counter()
    for shard in shards:
        if memory_map:
            with pa.memory_map(str(shard)) as source:
                table = ipc.open_file(source).read_all()
        else:
            table = ipc.open_file(str(shard)).read_all()
        with ipc.new_file(str(target_dir / shard.name), table.schema) as writer:
            writer.write_table(table)
    return time.perf_counter() - started


def snapshot(directory: Path) -> dict[str, tuple[int, int]]:
    """Map each file under `directory` to its size and modification time, to detect writes."""
    return {
        str(path.relative_to(directory)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in directory.rglob("*")
        if path.is_file()
    }


def load(data_dir: Path, config_name: str, cache_dir: Path, **config_kwargs) -> tuple[float, int]:
    """Load the config through the loading script; return the seconds and the rows of both splits."""
    from datasets import load_dataset

    started = time.perf_counter()
    dataset = load_dataset(str(SCRIPT), config_name, data_dir=str(data_dir), cache_dir=str(cache_dir),
                           trust_remote_code=True, **config_kwargs)
    seconds = time.perf_counter() - started
    return seconds, sum(split.num_rows for split in dataset.values())


def throughput(seconds: float, shard_bytes: int, rows: int) -> dict:
    return {"seconds": seconds, "bytes_per_second": shard_bytes / seconds, "rows_per_second": rows / seconds}


def measure(args, data_dir: Path, work_dir: Path) -> dict:
    from length_probe import load_manifest

    manifest = load_manifest(data_dir)
    entry = manifest["configs"][args.config]
    shards = [data_dir / shard["file"] for shard in entry["shards"]]
    shard_bytes = sum(shard["bytes"] for shard in entry["shards"])
    rows = entry["rows"]
    cache_dir, unverified_cache = work_dir / "cache", work_dir / "cache-unverified"
    times = {"copy_read": [], "copy_memory_map": [], "first_load": [], "second_load": [], "first_load_unverified": []}
    changed: set[str] = set()

    def settle() -> None:
        # Every step starts with no dirty pages, so none pays for the write-back of an earlier step's files.
        for directory in (work_dir / "copy", cache_dir, unverified_cache):
            shutil.rmtree(directory, ignore_errors=True)
        os.sync()

    # The steps take turns, --repeats times, and each keeps its fastest time, so a burst of load from
    # other processes on the machine does not fall on one side only.
    for round_index in range(args.repeats):
        logger.info("Round %d of %d", round_index + 1, args.repeats)
        for kind in ("read", "memory_map"):
            settle()
            times[f"copy_{kind}"].append(copy_shards(shards, work_dir / "copy", memory_map=kind == "memory_map"))
        settle()
        seconds, loaded_rows = load(data_dir, args.config, cache_dir)
        times["first_load"].append(seconds)
        os.sync()
        before = snapshot(cache_dir)
        seconds, _ = load(data_dir, args.config, cache_dir)
        times["second_load"].append(seconds)
        after = snapshot(cache_dir)
        changed.update(name for name in after if before.get(name) != after[name])
        cache_bytes = sum(size for size, _ in after.values())
        settle()
        seconds, _ = load(data_dir, args.config, unverified_cache, verify_checksums=False)
        times["first_load_unverified"].append(seconds)
    settle()

    results = {
        "date": time.strftime("%Y-%m-%d"),
        "data_dir": str(data_dir),
        "config": args.config,
        "shards": len(shards),
        "shard_bytes": shard_bytes,
        "rows": rows,
        "rows_loaded": loaded_rows,
        "values_per_row": entry["values_per_row"],
        "cache_bytes": cache_bytes,
        "second_load_files_added_or_changed": sorted(changed),
    }
    for key, each in times.items():
        best = min(each)
        results[key] = {"seconds": best, "seconds_each": each, "bytes_per_second": shard_bytes / best,
                        "rows_per_second": rows / best}
    first = results["first_load"]["seconds"]
    results["first_load_throughput_ratio"] = results["copy_read"]["seconds"] / first
    results["first_load_throughput_ratio_memory_map"] = results["copy_memory_map"]["seconds"] / first
    results["unverified_load_throughput_ratio_memory_map"] = (
        results["copy_memory_map"]["seconds"] / results["first_load_unverified"]["seconds"]
    )
    results["second_load_time_fraction"] = results["second_load"]["seconds"] / first
    return results


def print_results(results: dict) -> None:
    changed = results["second_load_files_added_or_changed"]
    lines = [
        f"{results['config']}: {results['shards']} shards, {results['shard_bytes'] / 1e6:.1f} MB, "
        f"{results['rows']} rows of {results['values_per_row']} values",
        f"{'':48}{'seconds':>9}{'MB/s':>10}{'rows/s':>12}   each run (s)",
    ]
    for key, label in (("copy_read", "pyarrow copy, read from the path"),
                       ("copy_memory_map", "pyarrow copy, memory-mapped read"),
                       ("first_load", "first load, fresh cache, sha256 checked"),
                       ("first_load_unverified", "first load, fresh cache, verify_checksums=False"),
                       ("second_load", "second load, same cache")):
        row = results[key]
        lines.append(f"{label:48}{row['seconds']:9.2f}{row['bytes_per_second'] / 1e6:10.1f}"
                     f"{row['rows_per_second']:12.0f}   {', '.join(f'{s:.2f}' for s in row['seconds_each'])}")
    lines += [
        f"first load throughput: {results['first_load_throughput_ratio']:.2f}x the copy read from the path "
        f"(target: at least 0.5), {results['first_load_throughput_ratio_memory_map']:.2f}x the memory-mapped copy; "
        f"without the sha256 check {results['unverified_load_throughput_ratio_memory_map']:.2f}x the memory-mapped copy",
        f"second load: {results['second_load_time_fraction']:.1%} of the first load's time; "
        f"cache files it added or changed: {len(changed)}" + (f" ({', '.join(changed[:5])})" if changed else ""),
    ]
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="a finished extraction to load (default: extract one first into the work directory)")
    parser.add_argument("--model", default="demo",
                        help="model for the extraction when --data-dir is not given: 'demo', a directory, or "
                        "'random' for an untrained model of --hidden and --layers with completions forced to "
                        "count + 1 tokens (default: demo)")
    parser.add_argument("--hidden", type=int, default=128,
                        help="hidden size of the untrained model with --model random (default: 128, the demo model's)")
    parser.add_argument("--layers", type=int, default=3,
                        help="decoder layers of the untrained model with --model random (default: 3, the demo model's)")
    parser.add_argument("--samples-scale", type=int, default=10,
                        help="prompt set of that extraction, in multiples of 450 prompts (default: 10)")
    parser.add_argument("--config", default="single_prompt_all_layers",
                        choices=["single_prompt_all_layers", "single_prompt_last_layer"],
                        help="config to load (default: single_prompt_all_layers)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="rounds of all steps; each step's fastest round is reported (default: 2)")
    parser.add_argument("--work-dir", type=Path, default=None, help="directory for the copy and caches (default: temporary)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    temporary = None
    if args.work_dir is None:
        temporary = tempfile.TemporaryDirectory(prefix="loading-bench-")
        args.work_dir = Path(temporary.name)
    work_dir = args.work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    # datasets copies the loading script into this directory on the first load; keeping it here leaves
    # the user's module cache alone. It must be set before datasets is imported.
    os.environ.setdefault("HF_MODULES_CACHE", str(work_dir / "modules"))
    try:
        data_dir = args.data_dir
        if data_dir is None:
            data_dir = work_dir / "data"
            make_dataset(args, data_dir)
        results = measure(args, data_dir.resolve(), work_dir)
    finally:
        if temporary is not None:
            temporary.cleanup()
    print_results(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
