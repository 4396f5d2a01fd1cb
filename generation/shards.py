"""Writing shards and their records so that a killed run leaves nothing that looks complete.

A batch becomes one "part": an Arrow IPC file per config, then a JSON record in `parts/` listing its
samples, rows and checksums. Every file is written under a temporary name and renamed when complete,
and the record is written last, so a part exists exactly when its record does. The manifest is made
from the records once every sample is done.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from length_probe import (
    FORMAT_VERSION,
    LAST_LAYER,
    MANIFEST_FILE,
    METADATA_FILE,
    PARTS_DIR,
    RUN_FILE,
    SHARD_SUFFIX,
    row_schema,
)

from .errors import ExtractionError

logger = logging.getLogger(__name__)

TEMPORARY_SUFFIX = ".tmp"


def write_atomically(path: Path, data: bytes | pa.Buffer) -> None:
    """Write `data` to a temporary file beside `path`, flush it to disk, then rename it into place."""
    temporary = path.with_name(path.name + TEMPORARY_SUFFIX)
    try:
        with open(temporary, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        if error.errno == errno.ENOSPC:
            hint = "free some space"
        elif error.errno == errno.EFBIG:
            hint = "raise this process's file size limit (ulimit -f)"
        else:
            hint = "check the directory's permissions and space"
        raise ExtractionError(
            f"failed to write {path}: {error.strerror or error}; {hint}, then re-run the same command to resume"
        ) from error


def write_json_atomically(path: Path, content: dict, *, indent: int | None = None) -> None:
    # Compact by default: with an indent, json.dumps falls back from its C encoder to pure Python, which
    # took longer than writing the shards for the manifest and part records of a demo extraction.
    write_atomically(path, (json.dumps(content, indent=indent, ensure_ascii=False) + "\n").encode("utf-8"))


def part_name(rank: int, sequence: int) -> str:
    return f"part-r{rank:05d}-s{sequence:05d}"


def shard_table(rows: dict[str, list], states: np.ndarray, storage_dtype: str) -> pa.Table:
    """Build one shard's table from per-row columns and states of shape [rows, values_per_row]."""
    values_per_row = states.shape[1]
    schema = row_schema(values_per_row, storage_dtype)
    flat = pa.array(np.ascontiguousarray(states).reshape(-1), type=schema.field("hidden_states").type.value_type)
    columns = [pa.array(rows[field.name], type=field.type) for field in schema if field.name != "hidden_states"]
    columns.append(pa.FixedSizeListArray.from_arrays(flat, values_per_row))
    return pa.Table.from_arrays(columns, schema=schema)


def write_shard(path: Path, table: pa.Table) -> dict:
    """Write a table as an Arrow IPC file and return its size and sha256."""
    # A first pass that copies nothing measures the file, so it is serialised once into a buffer of the
    # exact size. Growing a BufferOutputStream and copying it into bytes took 2 to 3 times as long for
    # a 330 MB shard (bench/gpu_bench.py's batches) on a 2-core VM.
    measure = pa.MockOutputStream()
    with ipc.new_file(measure, table.schema) as writer:
        writer.write_table(table)
    data = pa.allocate_buffer(measure.size())
    with ipc.new_file(pa.FixedSizeBufferWriter(data), table.schema) as writer:
        writer.write_table(table)
    write_atomically(path, data)
    return {"bytes": data.size, "sha256": hashlib.sha256(data).hexdigest()}


def read_part_records(output_dir: Path) -> list[dict]:
    """Read every finished part's record, in name order."""
    parts_dir = output_dir / PARTS_DIR
    if not parts_dir.is_dir():
        return []
    records = []
    for path in sorted(parts_dir.glob("part-*.json")):
        try:
            records.append(json.loads(path.read_text(encoding="utf-8")))
        except ValueError as error:
            # Records are renamed into place whole, so this is damage from outside, not an interruption.
            raise ExtractionError(
                f"{path}: unreadable part record ({error}); delete it and its shards, or re-run with --overwrite"
            ) from error
    return records


def remove_unrecorded_files(output_dir: Path, records: list[dict], config_names: tuple[str, ...]) -> int:
    """Delete temporary files and shards that no record lists: the leftovers of an interrupted batch."""
    recorded = {entry["file"] for record in records for entry in record["files"].values()}
    removed = 0
    for directory in [output_dir / PARTS_DIR, *(output_dir / name for name in config_names)]:
        if not directory.is_dir():
            continue
        for path in directory.iterdir():
            relative = f"{directory.name}/{path.name}"
            is_leftover = path.name.endswith(TEMPORARY_SUFFIX) or (
                path.suffix == SHARD_SUFFIX and relative not in recorded
            )
            if is_leftover:
                logger.warning("Removing %s, left over from an interrupted run", path)
                path.unlink()
                removed += 1
    return removed


def build_manifest(run: dict, samples: list[dict], records: list[dict], summary: dict) -> dict:
    """Combine the part records into the manifest that the builder and `verify` read."""
    configs = {}
    for name in run["resume_key"]["configs"]:
        shards = [record["files"][name] for record in records]
        configs[name] = {
            **run["layers"][name],
            "storage_dtype": run["resume_key"]["storage_dtype"],
            "rows": sum(shard["rows"] for shard in shards),
            "shards": shards,
        }
    return {
        "format_version": FORMAT_VERSION,
        "complete": True,
        "model": run["model"],
        "samples": samples,
        "truncated_sample_ids": [sample["sample_id"] for sample in samples if sample["is_truncated"]],
        "configs": configs,
        "summary": summary,
    }


def config_metadata(run: dict, name: str, rows: int) -> dict:
    """Describe one config for the builder and for readers of the directory."""
    layers = run["layers"][name]
    key = run["resume_key"]
    return {
        "config_name": name,
        "model": key["model"],
        "model_info": run["model"],
        **layers,
        "layer_description": (
            "hidden_states[-1], the last layer after the model's final norm"
            if name == LAST_LAYER
            else f"the outputs of decoder layers 1 to {len(layers['layers'])} (hidden_states[1:]), in order; "
            "the embedding output is excluded and the last block is after the model's final norm"
        ),
        "final_norm_applied_to_last_block": True,
        "compute_dtype": key["dtype"],
        "storage_dtype": key["storage_dtype"],
        "float16_overflow": key["float16_overflow"],
        "rows": rows,
        "prompt_template": key["prompt_template"],
        "words": key["words"],
        "count_range": [key["min_count"], key["max_count"]],
        "chat_template_kwargs": {"date_string": key["date_string"]},
        "chat_template_sha256": key["chat_template_sha256"],
        "generation": {
            "decoding": "greedy",
            "max_new_tokens": key["max_new_tokens"],
            "end_token_ids": run["end_token_ids"],
        },
        "truncated_samples": "kept" if key["keep_truncated"] else "left out",
    }


def config_paths(output_dir: Path, config_names: tuple[str, ...]) -> list[Path]:
    """List the paths an extraction writes, for --overwrite to remove and nothing else."""
    paths = [output_dir / MANIFEST_FILE, output_dir / RUN_FILE, output_dir / PARTS_DIR]
    return paths + [output_dir / name for name in config_names] + [output_dir / name / METADATA_FILE for name in config_names]
