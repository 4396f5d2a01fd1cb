"""The extraction pipeline: render prompts, generate, capture, write shards, summarise.

Memory is bounded by one batch: each batch's states go to disk as soon as they are captured. Under
`torchrun` every process takes every world_size-th sample of the canonical order and writes its own
parts. Rank 0 writes the manifest once all are done, so the dataset is the same for any process count.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from pathlib import Path

from tqdm.auto import tqdm

from length_probe import ALL_LAYERS, FORMAT_VERSION, LAST_LAYER, MANIFEST_FILE, METADATA_FILE, PARTS_DIR, RUN_FILE

from .capture import BatchCapture, capture_batch
from .config import ExtractionConfig
from .errors import ExtractionError, ResumeMismatchError
from .models import describe_model, end_token_ids, load_model, load_tokenizer, resolve_device, resolve_dtype
from .prompts import Sample, build_samples, chat_template_sha256, is_exact_count, render_prompts
from .shards import (
    TEMPORARY_SUFFIX,
    build_manifest,
    config_metadata,
    part_name,
    read_part_records,
    remove_unrecorded_files,
    shard_table,
    write_json_atomically,
    write_shard,
)

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ProcessGroup:
    """This process's place among the processes that torchrun (or accelerate launch) started."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed

            torch.distributed.barrier()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def join_process_group(device: str) -> ProcessGroup:
    """Join the process group that the launcher describes in the environment, if there is one.

    `device` is the --device option. accelerate's PartialState sets up gloo for processes on the CPU
    only when passed cpu=True. Without it, on a machine with no GPU, each process runs alone as rank 0.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return ProcessGroup()
    from accelerate import PartialState

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    on_cpu = resolve_device(device, local_rank=local_rank).type == "cpu"
    state = PartialState(cpu=on_cpu)
    return ProcessGroup(state.process_index, state.num_processes, state.local_process_index)


def run_extraction(config: ExtractionConfig, *, model=None, tokenizer=None, logits_processor_factory=None) -> dict:
    """Run one extraction into `config.output_dir` and return its summary.

    `model` and `tokenizer` may be passed already loaded (tests and benchmarks do); `config.model` still
    names them in the metadata. `logits_processor_factory(samples)` may return a LogitsProcessorList for
    a batch; the GPU benchmark uses it to force realistic completion lengths on an untrained model.
    """
    started = time.perf_counter()
    group = join_process_group(config.device)
    output_dir = config.output_dir

    # ---- tokenizer and the settings a resume must match. They are checked against the output directory
    # before the model loads, so that a wrong directory or a finished run costs no model load.
    device = resolve_device(config.device, local_rank=group.local_rank)
    dtype = resolve_dtype(config.dtype, device)
    if tokenizer is None:
        tokenizer = load_tokenizer(config.model)
    resume_key = config.resume_key(resolved_dtype=dtype, chat_template_sha256=chat_template_sha256(tokenizer))
    _check_output_dir(config)
    if not config.overwrite and (output_dir / RUN_FILE).is_file():
        _check_resume_key(output_dir, resume_key)
        if (output_dir / MANIFEST_FILE).is_file():
            return _finished_summary(output_dir)

    # ---- model, then the output directory: start or resume
    if model is None:
        logger.info("Loading %s on %s in %s", config.model, config.device_map or device, dtype)
        model = load_model(config.model, device=device, dtype=dtype, device_map=config.device_map)
    run = _describe_run(config, model, tokenizer, resume_key)
    if group.is_main:
        _prepare_output_dir(config, run)
    group.barrier()
    _check_resume_key(output_dir, run["resume_key"])
    if (output_dir / MANIFEST_FILE).is_file():
        return _finished_summary(output_dir)

    # ---- prompts: this process's share of the samples that no earlier run finished
    samples = build_samples(config.words, config.min_count, config.max_count)
    records = read_part_records(output_dir)
    done = {sample["sample_id"] for record in records for sample in record["samples"]}
    mine = [sample for index, sample in enumerate(samples) if index % group.world_size == group.rank]
    pending = [sample for sample in mine if sample.sample_id not in done]
    if done:
        logger.info("Resuming: %d of %d samples already done", len(done), len(samples))
    sequence = 1 + max(
        (int(record["part"].rsplit("-s", 1)[1]) for record in records if record["rank"] == group.rank), default=-1
    )

    # ---- generate, capture and write, one batch at a time
    progress = tqdm(total=len(pending), desc=f"Extracting (rank {group.rank})", unit="sample", disable=not group.is_main)
    written_bytes = 0
    # Closing the bar before an error propagates ends its line, so the error message starts a line of its own.
    with progress:
        for batch in plan_batches(pending, config.batch_size):
            prompts = render_prompts(tokenizer, batch, config.date_string)
            capture = capture_batch(
                model,
                tokenizer,
                prompts,
                [sample.sample_id for sample in batch],
                layer_indices=run["captured_layers"],
                end_ids=run["end_token_ids"],
                max_new_tokens=config.max_new_tokens,
                storage_dtype=config.storage_dtype,
                float16_overflow=config.float16_overflow,
                keep_truncated=config.keep_truncated,
                logits_processor=logits_processor_factory(batch) if logits_processor_factory else None,
                share_prefix=config.share_prompt_prefix,
            )
            record = _write_part(output_dir, part_name(group.rank, sequence), group.rank, batch, prompts, capture, tokenizer, config)
            written_bytes += sum(entry["bytes"] for entry in record["files"].values())
            sequence += 1
            progress.update(len(batch))

    # ---- manifest and summary, once every process is done
    group.barrier()
    if not group.is_main:
        return {"rank": group.rank, "bytes_written": written_bytes}
    summary = _finalize(output_dir, run, samples, time.perf_counter() - started, written_bytes)
    _log_summary(output_dir, summary)
    return summary


def plan_batches(samples: list[Sample], batch_size: int) -> list[list[Sample]]:
    """Sort samples by count, then word, and cut them into even batches.

    Samples of one count write completions of about the same length, so a batch wastes few passes on
    rows that have already ended.
    """
    ordered = sorted(samples, key=lambda sample: (sample.count, sample.word))
    return [ordered[part] for part in batch_slices(len(ordered), batch_size)]


def batch_slices(count: int, batch_size: int) -> list[slice]:
    """Cut `count` samples into the fewest batches of at most `batch_size`, their sizes differing by at most one.

    A batch costs one forward pass per token of its longest completion, whatever its size. So 450 samples
    in batches of 64 would leave a last batch of 2 that costs as many passes as a full one.
    """
    batches = -(-count // batch_size)
    bounds = [round(index * count / batches) for index in range(batches + 1)] if batches else [0]
    return [slice(start, end) for start, end in zip(bounds, bounds[1:])]


def _describe_run(config: ExtractionConfig, model, tokenizer, resume_key: dict) -> dict:
    facts = describe_model(model, config.model)
    layer_count, hidden_size = facts["num_hidden_layers"], facts["hidden_size"]
    all_layers = list(range(1, layer_count + 1))  # hidden_states[0] is the embedding output, left out
    layers = {
        LAST_LAYER: {"layers": [layer_count], "hidden_size": hidden_size, "values_per_row": hidden_size},
        ALL_LAYERS: {"layers": all_layers, "hidden_size": hidden_size, "values_per_row": hidden_size * layer_count},
    }
    return {
        "format_version": FORMAT_VERSION,
        "resume_key": resume_key,
        "model": facts,
        "layers": {name: layers[name] for name in config.configs},
        "captured_layers": all_layers if config.captures_all_layers else [layer_count],
        "end_token_ids": end_token_ids(model, tokenizer),
    }


def _check_output_dir(config: ExtractionConfig) -> None:
    """Raise when the output path is a file, or a directory that contains something other than an extraction."""
    output_dir = config.output_dir
    if output_dir.exists() and not output_dir.is_dir():
        raise ExtractionError(f"output path {str(output_dir)!r} is a file; pass a directory to --output-dir")
    if output_dir.is_dir() and not (output_dir / RUN_FILE).is_file() and _contains_foreign_files(output_dir):
        raise ExtractionError(
            f"output directory {str(output_dir)!r} is not empty and contains no length-probe extraction; "
            "pass an empty or new directory to --output-dir"
        )


def _prepare_output_dir(config: ExtractionConfig, run: dict) -> None:
    output_dir = config.output_dir
    _check_output_dir(config)
    if config.overwrite and (output_dir / RUN_FILE).is_file():
        logger.warning("--overwrite: deleting the extraction in %s", output_dir)
        for path in [output_dir / MANIFEST_FILE, output_dir / PARTS_DIR]:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        for name in (LAST_LAYER, ALL_LAYERS):
            shutil.rmtree(output_dir / name, ignore_errors=True)
        # Deleted last, so that an interrupted --overwrite leaves a directory that --overwrite still accepts.
        (output_dir / RUN_FILE).unlink()
    try:
        for name in [PARTS_DIR, *config.configs]:
            (output_dir / name).mkdir(parents=True, exist_ok=True)
        if not (output_dir / RUN_FILE).is_file():
            write_json_atomically(output_dir / RUN_FILE, run, indent=1)
    except OSError as error:
        raise ExtractionError(
            f"output directory {str(output_dir)!r} cannot be written ({error.strerror or error}); "
            "pass a directory you can write to --output-dir"
        ) from error


def _contains_foreign_files(output_dir: Path) -> bool:
    """Tell whether a directory without run.json contains more than a run killed before writing run.json leaves."""
    # Such a run leaves empty subdirectories and possibly run.json's temporary file, and re-running the
    # same command must be able to start over in that directory.
    leftovers = {PARTS_DIR, LAST_LAYER, ALL_LAYERS, RUN_FILE + TEMPORARY_SUFFIX}
    return any(path.name not in leftovers or (path.is_dir() and any(path.iterdir())) for path in output_dir.iterdir())


def _check_resume_key(output_dir: Path, resume_key: dict) -> None:
    from length_probe import read_json

    existing = read_json(output_dir / RUN_FILE).get("resume_key", {})
    differences = [
        f"{key}: {existing.get(key)!r} in {output_dir / RUN_FILE}, {value!r} now"
        for key, value in resume_key.items()
        if existing.get(key) != value
    ]
    if differences:
        raise ResumeMismatchError(
            f"{output_dir} contains an extraction made with other settings ({'; '.join(differences)}); "
            "re-run with the same settings to resume it, pass --overwrite to start over, or choose another --output-dir"
        )


def _write_part(output_dir, name, rank, batch: list[Sample], prompts, capture: BatchCapture, tokenizer, config) -> dict:
    """Write one batch's shards, then its record; the record makes the part count as done."""
    token_texts = {}
    columns = {key: [] for key in (
        "sample_id", "word", "count", "step", "token_id", "token_text",
        "remaining_tokens", "completion_length", "is_exact_count", "is_truncated",
    )}
    sample_records, locations, row = [], [], 0
    for sample, prompt, completion, truncated, kept, clipped in zip(
        batch, prompts, capture.completions, capture.truncated, capture.kept_rows, capture.clipped_values
    ):
        length = len(completion)
        text = tokenizer.decode(completion[:-1] if not truncated else completion, skip_special_tokens=False)
        exact = is_exact_count(text, sample.word, sample.count, ended=not truncated)
        sample_records.append({
            "sample_id": sample.sample_id, "word": sample.word, "count": sample.count,
            "prompt": prompt, "completion_text": text, "completion_token_ids": completion,
            "completion_length": length, "is_truncated": truncated, "is_exact_count": exact,
            "rows": kept, "clipped_values": clipped, "part": name,
        })
        if not kept:
            continue
        locations.append([sample.sample_id, row, kept])
        row += kept
        tokens = completion[:kept]
        for token in tokens:
            if token not in token_texts:
                token_texts[token] = tokenizer.decode([token], skip_special_tokens=False)
        for key, values in (
            ("sample_id", [sample.sample_id] * kept), ("word", [sample.word] * kept), ("count", [sample.count] * kept),
            ("step", range(kept)), ("token_id", tokens), ("token_text", [token_texts[token] for token in tokens]),
            ("remaining_tokens", range(length - 1, length - 1 - kept, -1)), ("completion_length", [length] * kept),
            ("is_exact_count", [exact] * kept), ("is_truncated", [truncated] * kept),
        ):
            columns[key].extend(values)

    states = capture.states  # [rows, captured layers, hidden]
    files = {}
    for config_name in config.configs:
        values = states[:, -1, :] if config_name == LAST_LAYER else states.reshape(states.shape[0], states.shape[1] * states.shape[2])
        relative = f"{config_name}/{name}.arrow"
        written = write_shard(output_dir / relative, shard_table(columns, values, config.storage_dtype))
        files[config_name] = {"file": relative, "rows": row, **written, "samples": locations}
    record = {"part": name, "rank": rank, "samples": sample_records, "files": files}
    write_json_atomically(output_dir / PARTS_DIR / f"{name}.json", record)
    return record


def _finalize(output_dir: Path, run: dict, samples: list[Sample], seconds: float, written_bytes: int) -> dict:
    records = read_part_records(output_dir)
    by_id = {}
    for record in records:
        for sample in record["samples"]:
            if sample["sample_id"] in by_id:
                raise ExtractionError(
                    f"sample {sample['sample_id']!r} is in two parts ({by_id[sample['sample_id']]['part']} and "
                    f"{record['part']}); the directory mixes two runs. Re-run with --overwrite"
                )
            by_id[sample["sample_id"]] = sample
    missing = [sample.sample_id for sample in samples if sample.sample_id not in by_id]
    if missing:
        raise ExtractionError(
            f"{len(missing)} samples have no shard (first: {missing[0]!r}); re-run the same command to finish them"
        )
    remove_unrecorded_files(output_dir, records, tuple(run["layers"]))

    ordered = [by_id[sample.sample_id] for sample in samples]
    summary = {
        "samples": len(ordered),
        "rows": sum(sample["rows"] for sample in ordered),
        "truncated_samples": sum(sample["is_truncated"] for sample in ordered),
        "truncated_rows_left_out": sum(
            sample["completion_length"] for sample in ordered if sample["is_truncated"] and not sample["rows"]
        ),
        "exact_count_samples": sum(sample["is_exact_count"] for sample in ordered),
        "seconds": round(seconds, 2),
        "bytes_written_this_run": written_bytes,
        "bytes_total": sum(entry["bytes"] for record in records for entry in record["files"].values()),
    }
    manifest = build_manifest(run, ordered, records, summary)
    for name, entry in manifest["configs"].items():
        metadata = config_metadata(run, name, entry["rows"])
        write_json_atomically(output_dir / name / METADATA_FILE, metadata, indent=1)
    write_json_atomically(output_dir / MANIFEST_FILE, manifest)
    return summary


def _check_finished_extraction(output_dir: Path) -> None:
    """Raise when a finished extraction's files no longer match its manifest, so a re-run never reports success on them."""
    from length_probe import find_problems

    problems = find_problems(output_dir)
    if problems:
        raise ExtractionError(
            f"{output_dir} contains a finished extraction whose files no longer match its manifest "
            f"({len(problems)} problem(s), first: {problems[0]}); run `python -m generation verify {output_dir}` "
            "for the list, then re-run with --overwrite to rebuild it"
        )


def _finished_summary(output_dir: Path) -> dict:
    """Check a finished extraction against its manifest and return its summary."""
    from length_probe import read_json

    _check_finished_extraction(output_dir)
    logger.info("%s already contains a complete extraction with these settings; nothing to do", output_dir)
    return read_json(output_dir / MANIFEST_FILE)["summary"]


def _log_summary(output_dir: Path, summary: dict) -> None:
    logger.info(
        "Extraction finished in %s:\n"
        "  samples            %d\n"
        "  rows               %d\n"
        "  truncated samples  %d (%d rows left out)\n"
        "  exact-count        %d of %d samples\n"
        "  seconds            %.1f\n"
        "  bytes written      %d (%d in the directory)",
        output_dir, summary["samples"], summary["rows"], summary["truncated_samples"],
        summary["truncated_rows_left_out"], summary["exact_count_samples"], summary["samples"],
        summary["seconds"], summary["bytes_written_this_run"], summary["bytes_total"],
    )
    if summary["truncated_samples"]:
        logger.warning(
            "%d samples reached the token limit without an end token; their rows are %s",
            summary["truncated_samples"], "kept (is_truncated=True)" if summary["truncated_rows_left_out"] == 0 else "left out",
        )
