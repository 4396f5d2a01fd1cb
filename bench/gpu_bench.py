"""Extraction speed on one GPU with a model of Llama-3.2-3B-Instruct's size, beside the floors it cannot beat.

One command, from the repository root of a machine with a GPU:

    python bench/gpu_bench.py --json gpu_bench.json

and a shrunken configuration that runs on a CPU in seconds, which tests/test_gpu_bench.py runs:

    python bench/gpu_bench.py --tiny

NOTE: so far only --tiny has run, on a CPU. The full run has not been on a GPU yet; by an estimate from
its sizes (2.2 GB of shards, 262 forward passes of a 3-billion-parameter model) it needs a few
minutes on an H200, well inside an 8-minute limit, but that is unmeasured.

No weights are needed or downloaded: the model is a randomly initialised `LlamaForCausalLM` with
Llama-3.2-3B-Instruct's configuration in bfloat16, and the tokenizer is the word-level one that
tests/tiny_models.py builds offline, with a Llama-3.2-style chat template. Its vocabulary is smaller
than the model's, so a logits processor keeps generation inside it. The same processor forces
completion lengths like an instruction-tuned model's: `count + 2` tokens, the end token included.
`datasets` is not needed.

What it prints, all measured in the same run:
- the extraction of the 450 prompts, all layers, float16 shards on local disk: seconds, generated
  tokens per second and bytes per second written;
- three floors, each at a rate measured here. The arithmetic is 2 x parameters x tokens at the bf16
  matrix multiply rate, where the tokens are the generated ones and the prompt tokens that the model
  runs (a batch's shared leading tokens once). Every weight is read once per decoding step at the
  device-to-device copy rate. The bytes written go at the disk write rate;
- the research-script baseline on a subset of the prompts, extrapolated per row to the whole set.
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

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for path in (REPO_ROOT, REPO_ROOT / "tests", BENCH_DIR):
    sys.path.insert(0, str(path))

from forced_lengths import completion_lengths, forced_length_factory  # noqa: E402
from research_baseline import run_baseline  # noqa: E402
from tiny_models import build_tokenizer  # noqa: E402
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

from generation import ExtractionConfig, run_extraction  # noqa: E402
from generation.capture import shared_prefix_length  # noqa: E402
from generation.extract import plan_batches  # noqa: E402
from generation.prompts import DEFAULT_DATE_STRING, build_samples, render_prompts  # noqa: E402
from length_probe import ALL_LAYERS, MANIFEST_FILE  # noqa: E402

logger = logging.getLogger("gpu_bench")

MODEL_NAME = "random-init Llama-3.2-3B-Instruct configuration"
EXTRA_TOKENS = 2  # forced completion length is count + 2, the end token included
GIB = 1024**3

# The values of meta-llama/Llama-3.2-3B-Instruct's config.json, in transformers 5 names (rope_parameters
# replaced rope_scaling and rope_theta). Taken from copies of that file, since no machine here reaches the Hub.
LLAMA_3_2_3B = dict(
    vocab_size=128_256,
    hidden_size=3072,
    intermediate_size=8192,
    num_hidden_layers=28,
    num_attention_heads=24,
    num_key_value_heads=8,
    head_dim=128,
    hidden_act="silu",
    max_position_embeddings=131_072,
    rms_norm_eps=1e-5,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 500_000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    tie_word_embeddings=True,
    attention_bias=False,
    mlp_bias=False,
)
# --tiny: the same shape of model, small enough for a CPU, with a vocabulary still larger than the tokenizer's.
TINY = dict(LLAMA_3_2_3B, vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)

FULL_RUN = dict(words=None, min_count=None, max_count=None, batch_size=64, baseline_samples=16,
                matmul_size=8192, copy_bytes=2 * GIB, disk_bytes=2 * GIB)
TINY_RUN = dict(words=("hello", "cat"), min_count=5, max_count=12, batch_size=8, baseline_samples=4,
                matmul_size=256, copy_bytes=64 * 1024**2, disk_bytes=16 * 1024**2)


# ---------------------------------------------------------------- model and tokenizer


def build_tokenizer_and_model(model_settings: dict, device: torch.device, dtype: torch.dtype):
    tokenizer = build_tokenizer(with_pad_token=True)
    tokenizer.padding_side = "left"
    end_id = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    config = LlamaConfig(**model_settings, bos_token_id=tokenizer.bos_token_id, eos_token_id=end_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    # Built on the device itself, so the random initialisation of 3 billion parameters runs there.
    with torch.device(device):
        model = LlamaForCausalLM(config)
    model = model.to(dtype).eval()
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=[end_id],
                                               pad_token_id=tokenizer.pad_token_id)
    return tokenizer, model, end_id


# ---------------------------------------------------------------- rates measured in this run


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops_per_second(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 10) -> float:
    """Time a square matrix product in the model's dtype; return floating-point operations per second."""
    left = torch.randn(size, size, device=device, dtype=dtype)
    right = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        torch.matmul(left, right)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        torch.matmul(left, right)
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - started)


def copy_bytes_per_second(device: torch.device, size: int, repeats: int = 10) -> float:
    """Time a device-to-device copy; return bytes moved (read plus written) per second."""
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    synchronize(device)
    return 2 * size * repeats / (time.perf_counter() - started)


def disk_write_bytes_per_second(directory: Path, size: int, chunk: int = 64 * 1024**2) -> float:
    """Write `size` bytes to a file in `directory` and fsync it, as the extractor writes its shards."""
    data = os.urandom(min(chunk, size))
    path = directory / "disk-probe.bin"
    started = time.perf_counter()
    with open(path, "wb") as stream:
        written = 0
        while written < size:
            stream.write(data)
            written += len(data)
        stream.flush()
        os.fsync(stream.fileno())
    seconds = time.perf_counter() - started
    path.unlink()
    return written / seconds


# ---------------------------------------------------------------- runs


def forward_passes(batches: list[list]) -> int:
    """Count the decoding passes: a batch whose longest completion has n tokens takes n passes."""
    return sum(max(completion_lengths([sample.count for sample in batch], EXTRA_TOKENS)) for batch in batches)


def prompt_work(tokenizer, batches: list[list], share_prefix: bool) -> tuple[int, int]:
    """Count the prompt tokens the model runs and the extra passes over shared leading tokens, one per batch."""
    tokens, shared_passes = 0, 0
    for batch in batches:
        encoded = tokenizer(render_prompts(tokenizer, batch, DEFAULT_DATE_STRING), add_special_tokens=False)["input_ids"]
        shared = shared_prefix_length(encoded) if share_prefix and len(batch) > 1 else 0
        tokens += shared + sum(len(ids) - shared for ids in encoded)
        shared_passes += shared > 0
    return tokens, shared_passes


def run(args) -> dict:
    run_settings = TINY_RUN if args.tiny else FULL_RUN
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16
    work_dir = args.work_dir.resolve()
    dataset_dir, baseline_dir = work_dir / "dataset", work_dir / "baseline"
    work_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(baseline_dir, ignore_errors=True)

    started = time.perf_counter()
    tokenizer, model, end_id = build_tokenizer_and_model(TINY if args.tiny else LLAMA_3_2_3B, device, dtype)
    synchronize(device)
    build_seconds = time.perf_counter() - started
    parameters = sum(parameter.numel() for parameter in model.parameters())
    logger.info("Built %s: %.2f billion parameters on %s in %.1f s", MODEL_NAME, parameters / 1e9, device, build_seconds)

    matmul_rate = matmul_flops_per_second(device, dtype, run_settings["matmul_size"])
    copy_rate = copy_bytes_per_second(device, run_settings["copy_bytes"])
    disk_rate = disk_write_bytes_per_second(work_dir, run_settings["disk_bytes"])
    logger.info("bf16 matmul %.1f TFLOP/s, device copy %.0f GB/s, disk write %.2f GB/s",
                matmul_rate / 1e12, copy_rate / 1e9, disk_rate / 1e9)

    prompt_settings = {key: run_settings[key] for key in ("words", "min_count", "max_count") if run_settings[key]}
    config = ExtractionConfig(
        model=MODEL_NAME, device=str(device), dtype="bfloat16", output_dir=dataset_dir, configs=(ALL_LAYERS,),
        storage_dtype="float16", float16_overflow="clip", batch_size=args.batch_size or run_settings["batch_size"],
        overwrite=True, **prompt_settings,
    )
    samples = build_samples(config.words, config.min_count, config.max_count)
    prompts = render_prompts(tokenizer, samples, DEFAULT_DATE_STRING)
    batches = plan_batches(samples, config.batch_size)
    # The benchmark's model is a Llama, whose cache the extractor can share.
    prompt_tokens, shared_passes = prompt_work(tokenizer, batches, config.share_prompt_prefix)
    factory = forced_length_factory([end_id], EXTRA_TOKENS, vocab_limit=len(tokenizer))

    # A short generation first, so CUDA context and kernel selection are not charged to either side.
    run_baseline(model, tokenizer, prompts[:1], work_dir / "warmup", layer_indices=[1], end_ids=[end_id],
                 max_new_tokens=4, logits_processors=[factory(samples[:1])])
    shutil.rmtree(work_dir / "warmup", ignore_errors=True)

    synchronize(device)
    started = time.perf_counter()
    summary = run_extraction(config, model=model, tokenizer=tokenizer, logits_processor_factory=factory)
    synchronize(device)
    extraction_seconds = time.perf_counter() - started
    manifest = json.loads((dataset_dir / MANIFEST_FILE).read_text())
    generated_tokens = sum(sample["completion_length"] for sample in manifest["samples"])
    clipped = sum(sample["clipped_values"] for sample in manifest["samples"])
    written = summary["bytes_written_this_run"]

    subset = spread(len(samples), args.baseline_samples or run_settings["baseline_samples"])
    layers = list(range(1, model.config.num_hidden_layers + 1))
    baseline = run_baseline(
        model, tokenizer, [prompts[i] for i in subset], baseline_dir, layer_indices=layers, end_ids=[end_id],
        max_new_tokens=config.max_new_tokens, logits_processors=[factory([samples[i]]) for i in subset],
    )
    shutil.rmtree(baseline_dir, ignore_errors=True)
    baseline_seconds = baseline["seconds"] / baseline["rows"] * summary["rows"]

    passes = forward_passes(batches) + shared_passes
    weight_bytes = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
    flops = 2 * parameters * (generated_tokens + prompt_tokens)
    return {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "tiny": args.tiny,
        "torch": torch.__version__,
        "model": {"parameters": parameters, "layers": model.config.num_hidden_layers,
                  "hidden_size": model.config.hidden_size, "dtype": str(dtype), "build_seconds": build_seconds},
        "prompts": len(samples),
        "batch_size": config.batch_size,
        "prompt_tokens": prompt_tokens,
        "generated_tokens": generated_tokens,
        "rows": summary["rows"],
        "clipped_values": clipped,
        "extraction": {
            "seconds": extraction_seconds,
            "tokens_per_second": generated_tokens / extraction_seconds,
            "bytes_written": written,
            "bytes_per_second": written / extraction_seconds,
        },
        "rates": {"matmul_flops_per_second": matmul_rate, "device_copy_bytes_per_second": copy_rate,
                  "disk_write_bytes_per_second": disk_rate},
        "floors": {
            "arithmetic_seconds": flops / matmul_rate,
            # Every forward pass reads every weight once. The copy rate counts bytes read and written,
            # which share the same memory bandwidth that reading the weights needs.
            "weight_reads_seconds": passes * weight_bytes / copy_rate,
            "disk_seconds": written / disk_rate,
            "flops": flops,
            "forward_passes": passes,
        },
        "baseline": {
            "prompts_run": len(subset),
            "rows_run": baseline["rows"],
            "seconds_run": baseline["seconds"],
            "seconds_estimated": baseline_seconds,
            "tokens_per_second": baseline["rows"] / baseline["seconds"],
        },
        "dataset_dir": str(dataset_dir),
    }


def spread(total: int, size: int) -> list[int]:
    size = max(1, min(size, total))
    return sorted({round(i * (total - 1) / max(size - 1, 1)) for i in range(size)})


def print_results(results: dict) -> None:
    extraction, floors, baseline = results["extraction"], results["floors"], results["baseline"]
    rates = results["rates"]
    print("\n".join([
        f"{results['device']}, torch {results['torch']}, {results['model']['parameters']:,} parameters "
        f"in bfloat16{' (--tiny)' if results['tiny'] else ''}",
        f"{results['prompts']} prompts, batch size {results['batch_size']}: {results['prompt_tokens']} prompt tokens run, "
        f"{results['generated_tokens']} generated tokens, {results['rows']} rows, all layers in float16",
        f"extraction:      {extraction['seconds']:8.2f} s   {extraction['tokens_per_second']:10.0f} tokens/s   "
        f"{extraction['bytes_per_second'] / 1e6:10.1f} MB/s written ({extraction['bytes_written'] / 1e6:.1f} MB)",
        f"arithmetic floor {floors['arithmetic_seconds']:8.2f} s   ({floors['flops'] / 1e12:.3g} TFLOP at "
        f"{rates['matmul_flops_per_second'] / 1e12:.3g} TFLOP/s measured)",
        f"weight-read floor{floors['weight_reads_seconds']:8.2f} s   ({floors['forward_passes']} forward passes, each "
        f"reading every weight, at {rates['device_copy_bytes_per_second'] / 1e9:.0f} GB/s, the measured copy rate)",
        f"disk floor       {floors['disk_seconds']:8.2f} s   (at {rates['disk_write_bytes_per_second'] / 1e6:.0f} MB/s "
        "measured with fsync)",
        f"baseline:        {baseline['seconds_estimated']:8.2f} s   estimated from {baseline['prompts_run']} prompts "
        f"({baseline['rows_run']} rows in {baseline['seconds_run']:.2f} s, {baseline['tokens_per_second']:.0f} tokens/s); "
        f"{baseline['seconds_estimated'] / extraction['seconds']:.1f}x the extraction's time",
        f"dataset: {results['dataset_dir']}",
    ]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a shrunken model and prompt set that run on a CPU in seconds")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--batch-size", type=int, default=None, help="extraction batch size (default: 64, or 8 with --tiny)")
    parser.add_argument("--baseline-samples", type=int, default=None,
                        help="prompts the baseline runs before extrapolating (default: 16, or 4 with --tiny)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="local directory for the dataset and the disk probe; an existing dataset in it is "
                        "replaced (default: a new directory under the system's temporary directory, kept)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.work_dir is None:
        # A new directory per run, so that two runs never replace each other's dataset.
        args.work_dir = Path(tempfile.mkdtemp(prefix="length-probe-gpu-bench-"))
    results = run(args)
    print_results(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
