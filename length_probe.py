"""Length-probe: per-token hidden states labelled with the number of tokens the model has left to write.

This file is both the `datasets` loading script and the one definition of the row schema, the on-disk
layout, the integrity checks and the train/validation split. It needs only `datasets`, `pyarrow` and
`numpy`, so it loads where torch and transformers are not installed.

A dataset directory, as `python -m generation extract` writes it::

    data/
    ├── run.json                          # the extraction settings; a re-run must match them to resume
    ├── manifest.json                     # written last: every sample, every shard with rows and sha256
    ├── parts/part-r00000-s00000.json     # one record per finished batch, for resuming
    ├── single_prompt_last_layer/
    │   ├── metadata.json                 # model, layers, hidden size, dtypes, prompt settings
    │   └── part-r00000-s00000.arrow      # Arrow IPC file, one per batch and process rank
    └── single_prompt_all_layers/
        ├── metadata.json
        └── part-r00000-s00000.arrow

Each row is one generated token g_i of a completion g_0 … g_{n-1}, where n counts the final end token:

    sample_id          string   "<word>-<count>", the same in every run, e.g. "hello-005"
    word, count        string, int32   the instruction's parameters
    step               int32    i, the position of the token in its completion
    token_id           int64    g_i
    token_text         string   g_i decoded on its own
    remaining_tokens   int32    n - 1 - i: 0 on the end-token row
    completion_length  int32    n
    is_exact_count     bool     the completion is exactly `count` repetitions of `word`, then an end token
    is_truncated       bool     the completion hit the token limit without an end token (rows kept only on request)
    hidden_states      fixed-size list of float16 or float32: the state at the position whose forward pass
                       produced g_i (the last prompt token for i = 0, then g_{i-1}); shape [layers * hidden]

Usage with datasets 3.x::

    load_dataset("./length_probe.py", "single_prompt_all_layers", trust_remote_code=True)

datasets 4.0 removed loading scripts; there, call `build_dataset("single_prompt_all_layers")` from this module.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import mmap
import os
from pathlib import Path

try:
    import datasets
except ImportError:  # extraction and verification work without it, but the builder and build_dataset do not
    datasets = None
import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

logger = logging.getLogger(__name__)

LAST_LAYER = "single_prompt_last_layer"
ALL_LAYERS = "single_prompt_all_layers"
CONFIG_NAMES = (LAST_LAYER, ALL_LAYERS)

MANIFEST_FILE = "manifest.json"
RUN_FILE = "run.json"
METADATA_FILE = "metadata.json"
PARTS_DIR = "parts"
SHARD_SUFFIX = ".arrow"
FORMAT_VERSION = 1

DEFAULT_SPLIT_SEED = 0
TABLE_BYTES = 8 * 1024 * 1024  # size of the tables the builder hands to datasets' writer
MAX_CHECK_THREADS = 8  # shards checked at once, each with its values in memory when check_values is set
DEFAULT_VALIDATION_FRACTION = 0.1

EXTRACT_HINT = "python -m generation extract --model MODEL --config all --output-dir DIR"
STORAGE_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}


class DatasetIntegrityError(ValueError):
    """A dataset directory that is missing, incomplete, or whose files disagree with its manifest."""


# ---------------------------------------------------------------- row schema


def row_schema(values_per_row: int, storage_dtype: str) -> pa.Schema:
    """Build the Arrow schema of one row; the extractor writes it and the builder checks shards against it."""
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"invalid storage dtype {storage_dtype!r}: expected one of {sorted(STORAGE_DTYPES)}")
    return pa.schema(
        [
            ("sample_id", pa.string()),
            ("word", pa.string()),
            ("count", pa.int32()),
            ("step", pa.int32()),
            ("token_id", pa.int64()),
            ("token_text", pa.string()),
            ("remaining_tokens", pa.int32()),
            ("completion_length", pa.int32()),
            ("is_exact_count", pa.bool_()),
            ("is_truncated", pa.bool_()),
            ("hidden_states", pa.list_(STORAGE_DTYPES[storage_dtype], values_per_row)),
        ]
    )


def sample_id_for(word: str, count: int) -> str:
    """Return the stable id of the sample that requests `count` repetitions of `word`."""
    return f"{word}-{count:03d}"


# ---------------------------------------------------------------- split


def assign_splits(sample_ids: list[str], seed: int, validation_fraction: float) -> dict[str, str]:
    """Map every sample id to "train" or "validation", whole samples at a time.

    The ids are sorted before a seeded permutation picks round(n * validation_fraction) of them for
    validation, so the result depends only on the set of ids, the seed and the fraction: not on batch
    size, process count, run order or config, and not on the machine (numpy's PCG64 is portable).
    """
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(
            f"invalid validation_fraction {validation_fraction!r}: expected a number between 0 and 1, e.g. 0.1"
        )
    ordered = sorted(set(sample_ids))
    validation_count = round(len(ordered) * validation_fraction)
    if len(ordered) >= 2:
        validation_count = min(max(validation_count, 1), len(ordered) - 1)
    permutation = np.random.default_rng(seed).permutation(len(ordered))
    validation = {ordered[i] for i in permutation[:validation_count]}
    return {sample_id: "validation" if sample_id in validation else "train" for sample_id in ordered}


# ---------------------------------------------------------------- manifest and integrity


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as error:
        raise DatasetIntegrityError(f"{path}: unreadable JSON ({error}); re-run the extraction to rewrite it") from error


def file_sha256(path: Path) -> str:
    # Hashing a memory map skips the copies that read() makes. On a 2-core AMD EPYC VM it hashed
    # shards at about 1.1 GB/s, against 0.7 GB/s through 8 MiB reads.
    with open(path, "rb") as stream:
        if os.fstat(stream.fileno()).st_size == 0:
            return hashlib.sha256().hexdigest()  # mmap cannot map an empty file
        with mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return hashlib.sha256(mapped).hexdigest()


def load_manifest(data_dir: Path) -> dict:
    """Read the manifest of a finished extraction, or raise an error that names the command that makes one."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetIntegrityError(
            f"data directory {str(data_dir)!r} not found; make the shards with `{EXTRACT_HINT}` "
            "and pass that directory instead"
        )
    manifest_path = data_dir / MANIFEST_FILE
    if not manifest_path.is_file():
        if (data_dir / RUN_FILE).is_file():
            raise DatasetIntegrityError(
                f"{manifest_path} is missing: the extraction in {data_dir} did not finish; "
                "re-run the same extract command to resume it"
            )
        raise DatasetIntegrityError(
            f"no length-probe shards in {str(data_dir)!r} ({MANIFEST_FILE} not found); "
            f"make them with `{EXTRACT_HINT}` and pass that directory instead"
        )
    manifest = read_json(manifest_path)
    if manifest.get("format_version") != FORMAT_VERSION or not manifest.get("complete"):
        raise DatasetIntegrityError(
            f"{manifest_path}: not a complete length-probe manifest of format {FORMAT_VERSION}; "
            "re-run the extraction"
        )
    return manifest


def find_problems(data_dir: Path, config_names: tuple[str, ...] | None = None, *, check_values: bool = False) -> list[str]:
    """List every problem in a dataset directory, each naming the file; an empty list means it is sound.

    Checks that each shard listed in the manifest exists with its recorded size, sha256, row count and
    schema, that no shard is unknown to the manifest, that the configs agree with each other on samples,
    and with `check_values`, that no hidden state is NaN or infinite.
    """
    data_dir = Path(data_dir)
    try:
        manifest = load_manifest(data_dir)
    except DatasetIntegrityError as error:
        return [str(error)]
    return _manifest_problems(data_dir, manifest, config_names, check_values=check_values)


def _manifest_problems(data_dir: Path, manifest: dict, config_names: tuple[str, ...] | None, *, check_values: bool) -> list[str]:
    problems: list[str] = []
    configs = manifest["configs"]
    names = config_names or tuple(configs)
    for name in names:
        if name not in configs:
            problems.append(
                f"config {name!r} not found in {data_dir / MANIFEST_FILE} (it has {sorted(configs)}); "
                f"extract it with `{EXTRACT_HINT.replace('all', name)}`"
            )
            continue
        problems.extend(_config_problems(data_dir, name, configs[name], check_values=check_values))

    row_counts = {name: configs[name]["rows"] for name in names if name in configs}
    if len(set(row_counts.values())) > 1:
        problems.append(f"configs disagree on the number of rows: {row_counts}")
    return problems


def _config_problems(data_dir: Path, name: str, entry: dict, *, check_values: bool) -> list[str]:
    problems = []
    config_dir = data_dir / name
    metadata_path = config_dir / METADATA_FILE
    try:
        metadata = read_json(metadata_path)
    except FileNotFoundError:
        return [f"{metadata_path}: missing; re-run the extraction"]
    except DatasetIntegrityError as error:
        return [str(error)]

    for key in ("values_per_row", "hidden_size", "layers", "storage_dtype"):
        if metadata.get(key) != entry.get(key):
            problems.append(
                f"{metadata_path}: {key} is {metadata.get(key)!r} but the manifest records {entry.get(key)!r}; "
                "the directory mixes files of two extractions"
            )
    expected_schema = row_schema(entry["values_per_row"], entry["storage_dtype"])

    listed = {shard["file"] for shard in entry["shards"]}
    on_disk = {f"{name}/{path.name}" for path in config_dir.iterdir() if path.name != METADATA_FILE}
    for stray in sorted(on_disk - listed):
        problems.append(f"{data_dir / stray}: file unknown to the manifest; remove it or re-run the extraction")

    # Shards are checked in threads, in manifest order: sha256 releases the GIL, and hashing is most of
    # the time a first load takes, so several cores divide it.
    workers = max(1, min(len(entry["shards"]), os.cpu_count() or 1, MAX_CHECK_THREADS))
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
        checks = pool.map(lambda shard: _shard_problems(data_dir, shard, expected_schema, check_values), entry["shards"])
        for shard_problems in checks:
            problems.extend(shard_problems)
    return problems


def _shard_problems(data_dir: Path, shard: dict, expected_schema: pa.Schema, check_values: bool) -> list[str]:
    path = data_dir / shard["file"]
    if not path.is_file():
        return [f"{path}: shard missing; re-run the extraction with --overwrite to rebuild it"]
    size = path.stat().st_size
    if size != shard["bytes"]:
        return [
            _foreign_schema_problem(path, expected_schema)
            or f"{path}: {size} bytes, the manifest records {shard['bytes']}; the shard is truncated or altered"
        ]
    if file_sha256(path) != shard["sha256"]:
        return [
            _foreign_schema_problem(path, expected_schema)
            or f"{path}: sha256 differs from the manifest; the shard is corrupt or from another run"
        ]
    return _shard_content_problems(path, shard, expected_schema, check_values=check_values)


def _foreign_schema_problem(path: Path, expected_schema: pa.Schema) -> str | None:
    """Describe a readable shard whose schema differs from the manifest's, or return None.

    A shard copied in from another model or layer set differs in size and checksum too, but saying that
    its hidden states have another width points at the cause.
    """
    try:
        with pa.memory_map(str(path)) as source:
            schema = ipc.open_file(source).schema
    except (pa.ArrowInvalid, OSError):
        return None
    if schema.equals(expected_schema):
        return None
    found = schema.field("hidden_states").type if "hidden_states" in schema.names else f"schema {schema}"
    return (
        f"{path}: hidden_states is {found} but the manifest expects {expected_schema.field('hidden_states').type}; "
        "the shard comes from another extraction (another model or layer set). Remove it or re-run the extraction"
    )


def _shard_content_problems(path: Path, shard: dict, expected_schema: pa.Schema, *, check_values: bool) -> list[str]:
    try:
        with pa.memory_map(str(path)) as source:
            table = ipc.open_file(source).read_all()
    except (pa.ArrowInvalid, OSError) as error:
        return [f"{path}: unreadable Arrow file ({error})"]

    problems = []
    if not table.schema.equals(expected_schema):
        problems.append(f"{path}: schema {table.schema.field('hidden_states').type} does not match the manifest's "
                        f"{expected_schema.field('hidden_states').type}; the shard comes from another extraction")
        return problems
    if table.num_rows != shard["rows"]:
        problems.append(f"{path}: {table.num_rows} rows, the manifest records {shard['rows']}")
    if check_values:
        values = table.column("hidden_states").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        bad = int(values.size - np.count_nonzero(np.isfinite(values)))
        if bad:
            problems.append(f"{path}: {bad} hidden-state values are NaN or infinite")
    return problems


def verify_or_raise(data_dir: Path, config_name: str) -> dict:
    """Check one config of a dataset directory and return its manifest; raise on the first problems."""
    # The manifest is parsed once here and shared with the checks: at thousands of samples a parse
    # is a noticeable part of a first load.
    data_dir = Path(data_dir)
    try:
        manifest = load_manifest(data_dir)
        problems = _manifest_problems(data_dir, manifest, (config_name,), check_values=False)
    except DatasetIntegrityError as error:
        manifest, problems = None, [str(error)]
    if problems:
        listing = "\n  ".join(problems)
        raise DatasetIntegrityError(
            f"{len(problems)} problem(s) in {data_dir}:\n  {listing}\n"
            f"Run `python -m generation verify {data_dir}` for a full report."
        )
    return manifest


# ---------------------------------------------------------------- builder


# The builder exists only where `datasets` is installed. Writing shards needs only the code above, so
# `python -m generation extract` also runs on a machine without `datasets`, such as a GPU box.
if datasets is not None:

    @dataclasses.dataclass
    class LengthProbeConfig(datasets.BuilderConfig):
        """Builder config: which layers, and how samples are split.

        Attributes:
            seed: seed of the train/validation permutation of sample ids (default 0).
            validation_fraction: share of samples, not rows, that goes to validation (default 0.1).
            verify_checksums: compare every shard's sha256 with the manifest before reading it.
        """

        seed: int = DEFAULT_SPLIT_SEED
        validation_fraction: float = DEFAULT_VALIDATION_FRACTION
        verify_checksums: bool = True

        def __post_init__(self):
            super().__post_init__()
            if self.name not in CONFIG_NAMES:
                raise ValueError(f"unknown config {self.name!r}: expected one of {list(CONFIG_NAMES)}")
            if not 0.0 < self.validation_fraction < 1.0:
                raise ValueError(
                    f"invalid validation_fraction {self.validation_fraction!r}: expected a number between 0 and 1"
                )

    def _default_data_dir(base_path: str | None) -> Path:
        return Path(base_path or Path(__file__).parent) / "data"

    class LengthProbe(datasets.ArrowBasedBuilder):
        """Per-token hidden states of greedy completions, labelled with the tokens remaining.

        An `ArrowBasedBuilder` rather than a `GeneratorBasedBuilder`: the shards are already Arrow tables
        in the final schema, and yielding them whole avoids converting every row to Python, which for
        rows of 86,016 values is the difference between copy speed and a fraction of it.
        """

        BUILDER_CONFIG_CLASS = LengthProbeConfig
        BUILDER_CONFIGS = [
            LengthProbeConfig(name=LAST_LAYER, description="The last hidden state (after the final norm) per token."),
            LengthProbeConfig(name=ALL_LAYERS, description="The outputs of every decoder layer, in order, concatenated."),
        ]
        DEFAULT_CONFIG_NAME = ALL_LAYERS

        def __init__(self, *args, **kwargs):
            # The cache key must change when the shards do: datasets keys a script's cache on the script and
            # the config arguments only, so the manifest's digest joins the hash. A missing manifest is left to
            # _info, which raises the error that names the extract command.
            data_dir = Path(kwargs.get("data_dir") or _default_data_dir(kwargs.get("base_path")))
            manifest_path = data_dir / MANIFEST_FILE
            if manifest_path.is_file():
                digest = hashlib.sha256(manifest_path.read_bytes()).hexdigest()[:16]
                kwargs["hash"] = f"{kwargs.get('hash') or 'local'}-{digest}"
            super().__init__(*args, **kwargs)

        @property
        def shard_dir(self) -> Path:
            return Path(self.config.data_dir or _default_data_dir(self.base_path)).resolve()

        def _metadata(self) -> dict:
            path = self.shard_dir / self.config.name / METADATA_FILE
            if not path.is_file():
                load_manifest(self.shard_dir)  # raises the clearer error when the whole extraction is missing
                raise DatasetIntegrityError(
                    f"config {self.config.name!r} not found in {self.shard_dir} ({path} missing); "
                    f"extract it with `{EXTRACT_HINT.replace('all', self.config.name)}`"
                )
            return read_json(path)

        def _info(self) -> datasets.DatasetInfo:
            metadata = self._metadata()
            schema = row_schema(metadata["values_per_row"], metadata["storage_dtype"])
            return datasets.DatasetInfo(
                description=(
                    f"Hidden states of {metadata['model']} ({metadata['layer_description']}), "
                    "one row per generated token, labelled with the tokens remaining."
                ),
                features=datasets.Features.from_arrow_schema(schema),
            )

        def _split_generators(self, dl_manager):
            if self.config.verify_checksums:
                manifest = verify_or_raise(self.shard_dir, self.config.name)
            else:
                manifest = load_manifest(self.shard_dir)
            split_of = assign_splits(
                [sample["sample_id"] for sample in manifest["samples"]], self.config.seed, self.config.validation_fraction
            )
            order = {sample["sample_id"]: index for index, sample in enumerate(manifest["samples"])}
            stored = {sample["sample_id"] for sample in manifest["samples"] if sample["rows"]}
            shards = manifest["configs"][self.config.name]["shards"]
            generators = []
            for split_name in (datasets.Split.TRAIN, datasets.Split.VALIDATION):
                sample_ids = sorted((i for i, s in split_of.items() if s == split_name and i in stored), key=order.__getitem__)
                if not sample_ids:
                    # datasets cannot read back a split with no rows, so an empty one is left out.
                    logger.warning("The %s split has no rows (all its samples were truncated); it is left out", split_name)
                    continue
                generators.append(datasets.SplitGenerator(name=split_name, gen_kwargs={"shards": shards, "sample_ids": sample_ids}))
            if not generators:
                raise DatasetIntegrityError(
                    f"{self.shard_dir} has no rows: every completion reached the token limit without an end token; "
                    "extract again with a larger --max-new-tokens, or with --keep-truncated to keep their rows"
                )
            return generators

        def _generate_tables(self, shards: list[dict], sample_ids: list[str]):
            # Rows come out in the manifest's sample order, whatever shard and batch a sample landed in, so the
            # dataset does not depend on batch size, process count or resumes.
            location = {}
            for shard in shards:
                for sample_id, start, rows in shard["samples"]:
                    location[sample_id] = (shard["file"], start, rows)
            # Slices are gathered into tables of about TABLE_BYTES before they are yielded: datasets writes
            # each yielded table with a few dozen Python-level calls, which per sample would cost more than
            # copying the sample's bytes.
            tables, row_bytes = {}, {}
            pending, pending_bytes = [], 0
            for index, sample_id in enumerate(sample_ids):
                file_name, start, rows = location[sample_id]
                if file_name not in tables:
                    table = ipc.open_file(pa.memory_map(str(self.shard_dir / file_name))).read_all()
                    tables[file_name], row_bytes[file_name] = table, table.nbytes / max(table.num_rows, 1)
                pending.append(tables[file_name].slice(start, rows))
                pending_bytes += rows * row_bytes[file_name]
                if pending_bytes >= TABLE_BYTES:
                    yield index, pa.concat_tables(pending)
                    pending, pending_bytes = [], 0
            if pending:
                yield len(sample_ids), pa.concat_tables(pending)


def build_dataset(
    config_name: str = ALL_LAYERS,
    data_dir: str | os.PathLike | None = None,
    *,
    cache_dir: str | None = None,
    seed: int = DEFAULT_SPLIT_SEED,
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
) -> datasets.DatasetDict:
    """Build the train and validation splits through the builder class, without a loading script.

    This is the path for datasets 4 and newer, where `load_dataset` no longer runs scripts::

        from length_probe import build_dataset
        dataset = build_dataset("single_prompt_all_layers", data_dir="data")
    """
    if datasets is None:
        raise ImportError(
            "build_dataset needs the datasets library, which is not installed; install it with "
            "pip install 'datasets>=3.6,<4' (extraction and `python -m generation verify` work without it)"
        )
    if config_name not in CONFIG_NAMES:
        raise ValueError(f"unknown config {config_name!r}: expected one of {list(CONFIG_NAMES)}")
    builder = LengthProbe(
        config_name=config_name,
        data_dir=str(Path(data_dir).resolve()) if data_dir is not None else None,
        cache_dir=cache_dir,
        seed=seed,
        validation_fraction=validation_fraction,
    )
    builder.download_and_prepare()
    return builder.as_dataset()
