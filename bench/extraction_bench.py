"""Compare this project's extraction with the research-script baseline: time, rows/s, peak memory, bytes.

One command, from the repository root (the demo model must be in generation/demo_model/):

    python bench/extraction_bench.py --json bench/results/extraction.json

Each measured run happens in its own child process, so one run's peak resident memory (the kernel's
high-water mark, `ru_maxrss`) cannot hide another's. The runs:

1. this project's `run_extraction` on the prompt set (450 prompts at --samples-scale 1);
2. the baseline of bench/research_baseline.py on --baseline-samples of those prompts, evenly spread
   over words and counts, and on half as many. With fewer than all prompts, its time at full size is
   extrapolated per row and labelled as an estimate. With --repeats N, runs 1 and 2 (at full size)
   happen N times, taking turns, and the run with the median wall time stands for each side;
3. with --growth-scale M (default 10), this project's extraction on the prompt set and on M times as
   many prompts, both with completions forced to count + 1 tokens, to show that its peak memory stays
   flat. The baseline's peak at the larger size is extrapolated from the growth between its two runs,
   since it keeps every row in memory.

Times cover loading the model's weights, generating, capturing and writing. Starting Python and
importing the libraries happen before the clock starts, the same in every child. Those libraries are
torch, transformers and the model architecture's code, which transformers imports on first use. The
time of that last import is printed on a line of its own.

On a CPU that other processes share, pass --threads 1. With torch's default thread count, both sides
ran about 10 times slower on a busy 2-core machine.

Both sides could run in one process, which would pay the imports once. They run in two children of
one command instead, because a process's peak resident memory is one number for its whole life.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(BENCH_DIR))

from length_probe import ALL_LAYERS, CONFIG_NAMES, LAST_LAYER  # noqa: E402

from generation.prompts import DEFAULT_DATE_STRING, DEFAULT_MAX_COUNT, DEFAULT_MIN_COUNT, DEFAULT_WORDS  # noqa: E402

logger = logging.getLogger("extraction_bench")

RANDOM_MODEL = "random"
MAX_NEW_TOKENS = 200
KIB = 1024
MIB = 1024 * 1024


# ---------------------------------------------------------------- prompt sets


def word_pool() -> list[str]:
    """Return the dataset's words, then the other words the demo model was trained on (counts 1 to 80).

    A scaled prompt set built from them still gets sensible completions. Imported here rather than at the
    top because the training script imports transformers' Llama code, whose import the children time.
    """
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    from train_demo_model import EXTRA_WORDS

    return list(DEFAULT_WORDS) + [word for word in EXTRA_WORDS if word not in DEFAULT_WORDS]


def scaled_prompt_set(scale: int) -> dict:
    """Return `scale` times the default 450 samples: 10 x scale words, counts 5 to 49 as by default.

    The count range stays, so completions keep their lengths. The words are the demo model's training
    words first, then made-up ones ("filler001", ...) that the demo model answers with long off-target
    completions: fine for memory runs, which force completion lengths anyway.
    """
    word_count = len(DEFAULT_WORDS) * scale
    pool = word_pool()
    fillers = [f"filler{index:03d}" for index in range(1, word_count - len(pool) + 1)]
    return {"words": (pool + fillers)[:word_count], "min_count": DEFAULT_MIN_COUNT, "max_count": DEFAULT_MAX_COUNT}


def spread_subset(total: int, size: int) -> list[int]:
    """Pick `size` indices spread evenly over range(total), so a subset has the whole set's mix of counts."""
    size = min(size, total)
    return sorted({round(i * (total - 1) / max(size - 1, 1)) for i in range(size)}) if size > 1 else [0]


# ---------------------------------------------------------------- child processes


def resident_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def child_main(spec_path: Path) -> None:
    """Run one measured job as described in the spec file and write its result beside it."""
    spec = json.loads(spec_path.read_text())
    logging.basicConfig(level=spec["log_level"], format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if spec["threads"]:
        import torch

        torch.set_num_threads(spec["threads"])

    import torch  # noqa: F811  (imported before the baseline RSS is read, like every other import)
    import transformers  # noqa: F401

    from generation import ExtractionConfig, run_extraction

    from generation.models import load_model, load_tokenizer

    import_seconds = import_model_code(spec["model"])
    rss_before = resident_kib()
    started = time.perf_counter()
    # Both sides load the model through the extractor's own loader, timed apart from the work, so the
    # baseline's time can be extrapolated per row without scaling the fixed loading cost.
    tokenizer = load_tokenizer(spec["model"])
    model = load_model(spec["model"], device=torch.device("cpu"), dtype="float32", device_map=None)
    loaded = time.perf_counter()
    if spec["kind"] == "extract":
        factory = _forced_factory(tokenizer, spec["force_extra_tokens"])
        config = ExtractionConfig(
            model=spec["model"], device="cpu", dtype="float32", output_dir=Path(spec["output_dir"]),
            configs=(spec["config"],), batch_size=spec["batch_size"], max_new_tokens=MAX_NEW_TOKENS,
            words=tuple(spec["words"]), min_count=spec["min_count"], max_count=spec["max_count"],
        )
        summary = run_extraction(config, model=model, tokenizer=tokenizer, logits_processor_factory=factory)
        result = {
            "rows": summary["rows"],
            "samples": summary["samples"],
            "bytes_written": directory_bytes(Path(spec["output_dir"])),
        }
    else:
        result = _run_baseline_child(spec, model, tokenizer)
    finished = time.perf_counter()
    result["import_seconds"] = import_seconds
    result["load_seconds"] = loaded - started
    result["work_seconds"] = finished - loaded
    result["seconds"] = finished - started
    result["rss_before_kib"] = rss_before
    result["peak_rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result["torch_threads"] = torch.get_num_threads()
    Path(spec["result"]).write_text(json.dumps(result))


def import_model_code(model_dir: str) -> float:
    """Import the transformers modules of the model's architecture and return the seconds it took.

    transformers imports a model's code on first use, and on this project's 2-core machine that took
    1.8 s (most of it torch.distributed and torch._dynamo, which the modeling code imports). That cost is
    the same for both sides and for any run length, like importing torch, so it is measured here,
    reported apart, and kept out of the timed run. In one process running both sides it would be paid once.
    """
    started = time.perf_counter()
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(model_dir))]
    return time.perf_counter() - started


def _forced_factory(tokenizer, extra_tokens: int):
    if not extra_tokens:
        return None
    from forced_lengths import forced_length_factory

    return forced_length_factory([tokenizer.eos_token_id], extra_tokens)


def _run_baseline_child(spec: dict, model, tokenizer) -> dict:
    from research_baseline import run_baseline

    from generation.models import end_token_ids
    from generation.prompts import build_samples, render_prompts

    samples = build_samples(tuple(spec["words"]), spec["min_count"], spec["max_count"])
    samples = [samples[i] for i in spec["sample_indices"]]
    prompts = render_prompts(tokenizer, samples, DEFAULT_DATE_STRING)
    layer_count = model.config.num_hidden_layers
    layers = list(range(1, layer_count + 1)) if spec["config"] == ALL_LAYERS else [layer_count]
    factory = _forced_factory(tokenizer, spec["force_extra_tokens"])
    processors = [factory([sample]) for sample in samples] if factory else None
    result = run_baseline(
        model, tokenizer, prompts, Path(spec["output_dir"]), layer_indices=layers,
        end_ids=end_token_ids(model, tokenizer), max_new_tokens=MAX_NEW_TOKENS, logits_processors=processors,
    )
    result["samples"] = len(samples)
    return result


def directory_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


def run_child(kind: str, work_dir: Path, label: str, settings: dict) -> dict:
    """Run one job in a fresh Python process and return its measurements."""
    job_dir = work_dir / label
    shutil.rmtree(job_dir, ignore_errors=True)
    job_dir.mkdir(parents=True)
    spec = {**settings, "kind": kind, "output_dir": str(job_dir / "output"), "result": str(job_dir / "result.json")}
    spec_path = job_dir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    logger.info("Running %s (%s)", label, kind)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(BENCH_DIR)])}
    completed = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)], env=environment)
    if completed.returncode != 0:
        raise SystemExit(f"error: the {label} run failed with exit status {completed.returncode}; see its output above")
    result = json.loads((job_dir / "result.json").read_text())
    shutil.rmtree(job_dir / "output", ignore_errors=True)
    logger.info("%s: %.1f s, %d rows, peak RSS %.0f MiB", label, result["seconds"], result["rows"], result["peak_rss_kib"] / KIB)
    return result


# ---------------------------------------------------------------- the comparison


def prepare_model(args, work_dir: Path) -> tuple[str, int]:
    """Return the model directory and the forced extra tokens (0 for none)."""
    if args.model == RANDOM_MODEL:
        sys.path.insert(0, str(REPO_ROOT / "tests"))
        from tiny_models import save_tiny_model

        model_dir = work_dir / "random-model"
        # The demo model's size (scripts/train_demo_model.py): hidden 128, 3 layers, MLP 256, 4 heads.
        save_tiny_model(model_dir, "llama", hidden=128, layers=3)
        return str(model_dir), args.force_lengths if args.force_lengths is not None else 1
    from generation.models import resolve_model_path

    path = Path(resolve_model_path(args.model))
    if not (path / "config.json").is_file():
        raise SystemExit(
            f"error: model {args.model!r} not found at {path}; train the demo model with "
            f"`python scripts/train_demo_model.py`, pass a model directory, or use --model {RANDOM_MODEL}"
        )
    return str(path), args.force_lengths or 0


def median_run(runs: list[dict]) -> dict:
    """Return the run with the median wall time (the lower of the two middle ones for an even count)."""
    return sorted(runs, key=lambda run: run["seconds"])[(len(runs) - 1) // 2]


def estimate_peak(measured: list[dict], rows: int) -> float:
    """Extrapolate the baseline's peak RSS (KiB) linearly in rows from its two measured runs."""
    small, large = sorted(measured, key=lambda result: result["rows"])
    slope = (large["peak_rss_kib"] - small["peak_rss_kib"]) / max(large["rows"] - small["rows"], 1)
    return large["peak_rss_kib"] + slope * (rows - large["rows"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo",
                        help=f"'demo', a model directory, or '{RANDOM_MODEL}' for an untrained model of the demo "
                        "model's size with forced completion lengths (default: demo)")
    parser.add_argument("--config", default=ALL_LAYERS, choices=CONFIG_NAMES,
                        help=f"layers captured by both sides (default: {ALL_LAYERS})")
    parser.add_argument("--samples-scale", type=int, default=1,
                        help="multiply the 450-prompt set by this integer through more words, counts still 5 to 49; "
                        "past the demo model's training words the words are made up (default: 1)")
    parser.add_argument("--baseline-samples", type=int, default=None,
                        help="run the baseline on this many prompts spread over the set and extrapolate "
                        "its time per row (default: all prompts)")
    parser.add_argument("--growth-scale", type=int, default=10,
                        help="also run this project's extraction on this many times the prompts to measure "
                        "memory growth; 0 skips it (default: 10)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run each side this many times, taking turns, and report the run with the median "
                        "wall time (default: 1)")
    parser.add_argument("--batch-size", type=int, default=None, help="extraction batch size (default: the extractor's)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads in every run; 0 keeps torch's default")
    parser.add_argument("--force-lengths", type=int, default=None, metavar="EXTRA",
                        help="force completions of count + EXTRA tokens, end token included, on both sides "
                        f"(default: 1 with --model {RANDOM_MODEL}, else off)")
    parser.add_argument("--work-dir", type=Path, default=None, help="directory for the runs' files (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--log-level", default="WARNING", help="log level of the child processes (default: WARNING)")
    args = parser.parse_args()
    if args.child:
        child_main(args.child)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.samples_scale < 1 or args.growth_scale < 0 or args.repeats < 1:
        parser.error("--samples-scale and --repeats must be at least 1, and --growth-scale at least 0")

    from generation.config import ExtractionConfig

    batch_size = args.batch_size or ExtractionConfig.batch_size
    temporary = None
    if args.work_dir is None:
        temporary = tempfile.TemporaryDirectory(prefix="extraction-bench-")
        args.work_dir = Path(temporary.name)
    work_dir = args.work_dir.resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    try:
        results = compare(args, work_dir, batch_size)
    finally:
        if temporary is not None:
            temporary.cleanup()
    print_results(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        logger.info("Wrote %s", args.json)


def compare(args, work_dir: Path, batch_size: int) -> dict:
    model_dir, extra_tokens = prepare_model(args, work_dir)
    prompt_set = scaled_prompt_set(args.samples_scale)
    sample_count = len(prompt_set["words"]) * (prompt_set["max_count"] - prompt_set["min_count"] + 1)
    common = {"model": model_dir, "config": args.config, "threads": args.threads, "log_level": args.log_level,
              "force_extra_tokens": extra_tokens, "batch_size": batch_size}

    baseline_size = args.baseline_samples or sample_count
    indices = spread_subset(sample_count, baseline_size)
    # The two sides take turns, so that a change in the machine's speed during the run hits both.
    projects, baselines = [], []
    for repeat in range(args.repeats):
        projects.append(run_child("extract", work_dir, f"project-{repeat}", {**common, **prompt_set}))
        baselines.append(run_child("baseline", work_dir, f"baseline-{len(indices)}-{repeat}",
                                   {**common, **prompt_set, "sample_indices": indices}))
    project, baseline = median_run(projects), median_run(baselines)
    half = spread_subset(sample_count, max(baseline_size // 2, 1))
    baseline_runs = [baseline, run_child("baseline", work_dir, f"baseline-{len(half)}",
                                         {**common, **prompt_set, "sample_indices": half})]
    baseline_is_full = baseline["samples"] == sample_count
    # Loading is a fixed cost, and only the work after it grows with the rows.
    baseline_work = baseline["work_seconds"] if baseline_is_full else baseline["work_seconds"] / baseline["rows"] * project["rows"]
    baseline_seconds = baseline["load_seconds"] + baseline_work
    baseline_bytes = baseline["bytes_written"] if baseline_is_full else baseline["bytes_written"] / baseline["rows"] * project["rows"]

    results = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "platform": sys.platform},
        "model": args.model,
        "config": args.config,
        "batch_size": batch_size,
        "forced_extra_tokens": extra_tokens,
        "prompt_set": {**prompt_set, "samples": sample_count, "scale": args.samples_scale},
        "repeats": args.repeats,
        "project_seconds_each_repeat": [run["seconds"] for run in projects],
        "baseline_seconds_each_repeat": [run["seconds"] for run in baselines],
        "project": {**project, "rows_per_second": project["rows"] / project["seconds"]},
        "baseline": {
            "measured_runs": baseline_runs,
            "samples_run": baseline["samples"],
            "estimated": not baseline_is_full,
            "seconds": baseline_seconds,
            "import_seconds": baseline["import_seconds"],
            "load_seconds": baseline["load_seconds"],
            "work_seconds": baseline_work,
            "rows": baseline["rows"] if baseline_is_full else project["rows"],
            "rows_per_second": (baseline["rows"] if baseline_is_full else project["rows"]) / baseline_seconds,
            "bytes_written": baseline_bytes,
            "peak_rss_kib": baseline["peak_rss_kib"] if baseline_is_full else estimate_peak(baseline_runs, project["rows"]),
        },
    }
    results["speedup"] = baseline_seconds / project["seconds"]
    results["speedup_after_loading"] = baseline_work / project["work_seconds"]

    if args.growth_scale:
        results["growth"] = measure_growth(args, work_dir, common, extra_tokens, project, baseline_runs, baseline)
    return results


def measure_growth(args, work_dir: Path, common: dict, extra_tokens: int, project: dict,
                   baseline_runs: list[dict], baseline: dict) -> dict:
    """Compare this project's peak memory on the prompt set and on --growth-scale times as many prompts.

    Both runs force completions to count + 1 tokens, so the larger set has the same lengths and only
    the number of samples differs. Without forcing, made-up words make the demo model write long
    off-target completions, and longer completions raise the peak by themselves.
    """
    forced_extra = extra_tokens or 1
    settings = {**common, "force_extra_tokens": forced_extra}
    small = project if extra_tokens else run_child(
        "extract", work_dir, "project-forced", {**settings, **scaled_prompt_set(args.samples_scale)})
    grown_set = scaled_prompt_set(args.samples_scale * args.growth_scale)
    grown = run_child("extract", work_dir, "project-grown", {**settings, **grown_set})
    baseline_grown = estimate_peak(baseline_runs, grown["rows"])
    baseline_small = baseline["peak_rss_kib"]
    return {
        "scale": args.growth_scale,
        "forced_extra_tokens": forced_extra,
        "prompt_set": {**grown_set, "words": len(grown_set["words"])},
        "project_small": small,
        "project_grown": grown,
        "project_peak_ratio": grown["peak_rss_kib"] / small["peak_rss_kib"],
        "project_growth_above_start_ratio": (
            (grown["peak_rss_kib"] - grown["rss_before_kib"]) / max(small["peak_rss_kib"] - small["rss_before_kib"], 1)
        ),
        "baseline_peak_kib_estimated": baseline_grown,
        "baseline_peak_ratio_estimated": baseline_grown / baseline_small,
    }


def print_results(results: dict) -> None:
    project, baseline = results["project"], results["baseline"]
    estimate = " (estimated)" if baseline["estimated"] else ""
    lines = [
        f"model {results['model']}, {results['config']}, {results['prompt_set']['samples']} prompts, "
        f"{project['rows']} rows, batch size {results['batch_size']}, torch threads {project['torch_threads']}",
        f"{'':28}{'this project':>16}{'baseline':>16}{'ratio':>10}",
        f"{'wall time (s)':28}{project['seconds']:16.2f}{baseline['seconds']:16.2f}"
        f"{results['speedup']:10.1f}x{estimate}",
        f"{'  loading the model (s)':28}{project['load_seconds']:16.2f}{baseline['load_seconds']:16.2f}",
        f"{'  extraction (s)':28}{project['work_seconds']:16.2f}{baseline['work_seconds']:16.2f}"
        f"{results['speedup_after_loading']:10.1f}x{estimate}",
        f"{'rows per second':28}{project['rows_per_second']:16.0f}{baseline['rows_per_second']:16.0f}"
        f"{project['rows_per_second'] / baseline['rows_per_second']:10.1f}x",
        f"{'peak RSS (MiB)':28}{project['peak_rss_kib'] / KIB:16.0f}{baseline['peak_rss_kib'] / KIB:16.0f}{estimate}",
        f"{'bytes written (MiB)':28}{project['bytes_written'] / MIB:16.1f}{baseline['bytes_written'] / MIB:16.1f}{estimate}",
        f"{'not timed: model code import (s)':32}{project['import_seconds']:12.2f}{baseline['import_seconds']:16.2f}",
        f"wall time of each repeat (s), this project: "
        f"{', '.join(f'{seconds:.2f}' for seconds in results['project_seconds_each_repeat'])}; baseline"
        + (f" on its {baseline['samples_run']} prompts, before extrapolating: " if baseline["estimated"] else ": ")
        + f"{', '.join(f'{seconds:.2f}' for seconds in results['baseline_seconds_each_repeat'])}"
        " (the table above is built from the median run of each side)",
        f"speedup end to end: {results['speedup']:.1f}x"
        + (f" (baseline time extrapolated from {baseline['samples_run']} prompts)" if baseline["estimated"] else ""),
    ]
    growth = results.get("growth")
    if growth:
        small, grown = growth["project_small"], growth["project_grown"]
        lines += [
            f"peak memory, {small['samples']} against {grown['samples']} prompts "
            f"({small['rows']} against {grown['rows']} rows), completions forced to count + {growth['forced_extra_tokens']}:",
            f"  this project: {small['peak_rss_kib'] / KIB:.0f} -> {grown['peak_rss_kib'] / KIB:.0f} MiB, "
            f"{growth['project_peak_ratio']:.2f}x (target: at most 1.3x); above the RSS after imports "
            f"{(small['peak_rss_kib'] - small['rss_before_kib']) / KIB:.0f} -> "
            f"{(grown['peak_rss_kib'] - grown['rss_before_kib']) / KIB:.0f} MiB",
            f"  baseline, extrapolated in rows from its two runs: {results['baseline']['peak_rss_kib'] / KIB:.0f} -> "
            f"{growth['baseline_peak_kib_estimated'] / KIB:.0f} MiB, {growth['baseline_peak_ratio_estimated']:.2f}x (estimated)",
        ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
