"""Damaged dataset directories and hidden states that do not fit: each problem is reported and named.

`verify` lists every problem in a directory and the builder rejects it, naming the file. No NaN or
infinite value reaches a shard, and float16 overflow stops the run unless clipping was requested.
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import torch
from extraction_helpers import (
    error_lines,
    extract_args,
    read_arrow,
    read_manifest,
    read_rows,
    run_cli,
    shard_paths,
    shared_launcher,
)
from tiny_models import save_tiny_model
from transformers import AutoModelForCausalLM

from length_probe import (
    ALL_LAYERS,
    LAST_LAYER,
    MANIFEST_FILE,
    DatasetIntegrityError,
    build_dataset,
    file_sha256,
    find_problems,
)

FLOAT16_MAX = 65504.0

PART = "part-r00000-s00001.arrow"


@pytest.fixture(scope="module")
def launcher():
    return shared_launcher()


def extract(launcher, tmp_path_factory, name: str, **model_options):
    model_dir = save_tiny_model(tmp_path_factory.mktemp(f"{name}-model"), "llama", end_bias=2.0, **model_options)
    output_dir = tmp_path_factory.mktemp(name) / "data"
    result = launcher.run(extract_args(model_dir, output_dir))
    assert result.returncode == 0, result.stderr
    return output_dir


@pytest.fixture(scope="module")
def base_dir(launcher, tmp_path_factory):
    return extract(launcher, tmp_path_factory, "base")


@pytest.fixture(scope="module")
def wider_dir(launcher, tmp_path_factory):
    """An extraction of a model with hidden size 48 instead of 32."""
    return extract(launcher, tmp_path_factory, "wider", hidden=48)


@pytest.fixture(scope="module")
def shallower_dir(launcher, tmp_path_factory):
    """An extraction of a model with 2 layers instead of 3."""
    return extract(launcher, tmp_path_factory, "shallower", layers=2)


def truncate(data_dir, sources):
    path = data_dir / LAST_LAYER / PART
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path, ["bytes, the manifest records"]


def flip_bytes(data_dir, sources):
    path = data_dir / LAST_LAYER / PART
    content = bytearray(path.read_bytes())
    middle = len(content) // 2
    content[middle : middle + 4] = bytes(255 - byte for byte in content[middle : middle + 4])
    path.write_bytes(bytes(content))
    return path, ["sha256 differs from the manifest"]


def delete(data_dir, sources):
    path = data_dir / LAST_LAYER / PART
    path.unlink()
    return path, ["shard missing"]


def add_stray_file(data_dir, sources):
    path = data_dir / LAST_LAYER / "part-r00000-s00099.arrow"
    shutil.copyfile(data_dir / LAST_LAYER / PART, path)
    return path, ["file unknown to the manifest"]


def replace_with_wider_shard(data_dir, sources):
    path = data_dir / ALL_LAYERS / PART
    shutil.copyfile(sources["wider"] / ALL_LAYERS / PART, path)
    return path, ["hidden_states is fixed_size_list<item: halffloat>[144] but the manifest expects fixed_size_list<item: halffloat>[96]"]


def replace_with_shallower_shard(data_dir, sources):
    path = data_dir / ALL_LAYERS / PART
    shutil.copyfile(sources["shallower"] / ALL_LAYERS / PART, path)
    return path, ["hidden_states is fixed_size_list<item: halffloat>[64] but the manifest expects fixed_size_list<item: halffloat>[96]"]


def add_wider_shard(data_dir, sources):
    path = data_dir / ALL_LAYERS / "part-r00001-s00000.arrow"
    shutil.copyfile(sources["wider"] / ALL_LAYERS / PART, path)
    return path, ["file unknown to the manifest"]


def replace_metadata_with_wider(data_dir, sources):
    path = data_dir / ALL_LAYERS / "metadata.json"
    shutil.copyfile(sources["wider"] / ALL_LAYERS / "metadata.json", path)
    return path, ["values_per_row is 144 but the manifest records 96", "hidden_size is 48 but the manifest records 32"]


# Each corruption damages a copy of the base directory and returns the damaged file and the text of each
# problem it causes, in the order that verify lists them.
CORRUPTIONS = {
    "truncated": (truncate, LAST_LAYER),
    "flipped-bytes": (flip_bytes, LAST_LAYER),
    "deleted": (delete, LAST_LAYER),
    "stray-file": (add_stray_file, LAST_LAYER),
    "wider-model-shard": (replace_with_wider_shard, ALL_LAYERS),
    "shallower-model-shard": (replace_with_shallower_shard, ALL_LAYERS),
    "wider-model-stray": (add_wider_shard, ALL_LAYERS),
    "wider-model-metadata": (replace_metadata_with_wider, ALL_LAYERS),
}


@pytest.fixture
def sources(wider_dir, shallower_dir):
    return {"wider": wider_dir, "shallower": shallower_dir}


@pytest.fixture(params=list(CORRUPTIONS))
def damaged(base_dir, sources, tmp_path, request):
    """A copy of the base directory with one corruption: (directory, config, damaged file, expected problems)."""
    data_dir = tmp_path / "data"
    shutil.copytree(base_dir, data_dir)
    corrupt, config_name = CORRUPTIONS[request.param]
    path, expected = corrupt(data_dir, sources)
    return data_dir, config_name, path, expected


def test_verify_reports_damage(launcher, damaged):
    data_dir, _, path, expected = damaged

    result = launcher.run(["verify", data_dir])

    assert result.returncode == 1
    problems = [line for line in result.stderr.splitlines() if line.startswith("problem: ")]
    assert len(problems) == len(expected), result.stderr
    for problem, text in zip(problems, expected):
        assert problem.startswith(f"problem: {path}: ")
        assert text in problem
    assert result.stderr.splitlines()[-1] == f"{data_dir}: {len(expected)} problem(s) found"


def test_builder_rejects_damage(damaged, tmp_path):
    data_dir, config_name, path, expected = damaged

    with pytest.raises(DatasetIntegrityError, match=re.escape(f"{path}: ")) as raised:
        build_dataset(config_name, data_dir, cache_dir=str(tmp_path / "cache"))
    for text in expected:
        assert text in str(raised.value)


def test_verify_lists_every_problem(base_dir, sources, tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(base_dir, data_dir)
    damaged_files = [
        truncate(data_dir, sources)[0],
        add_stray_file(data_dir, sources)[0],
        replace_with_wider_shard(data_dir, sources)[0],
        add_wider_shard(data_dir, sources)[0],
    ]
    (data_dir / ALL_LAYERS / "part-r00000-s00000.arrow").unlink()
    damaged_files.append(data_dir / ALL_LAYERS / "part-r00000-s00000.arrow")

    result = run_cli(["verify", str(data_dir)])

    assert result.returncode == 1
    problems = [line for line in result.stderr.splitlines() if line.startswith("problem: ")]
    assert sorted(problem.split(": ")[1] for problem in problems) == sorted(str(path) for path in damaged_files)
    assert result.stderr.splitlines()[-1] == f"{data_dir}: 5 problem(s) found"


def test_verify_accepts_sound_directory(base_dir):
    result = run_cli(["verify", str(base_dir)])

    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{base_dir}: OK\n"


def test_verify_finds_nan_behind_valid_checksum(launcher, base_dir, tmp_path):
    # A shard with NaN and a manifest updated to match, as a broken or older extractor could have written.
    data_dir = tmp_path / "data"
    shutil.copytree(base_dir, data_dir)
    path = data_dir / LAST_LAYER / PART
    table = read_arrow(path)
    states = table.column("hidden_states").combine_chunks()
    values = states.flatten().to_numpy(zero_copy_only=False).copy()
    values[[0, 5]] = np.nan
    poisoned = pa.FixedSizeListArray.from_arrays(pa.array(values, type=pa.float16()), states.type.list_size)
    table = table.set_column(table.schema.get_field_index("hidden_states"), table.schema.field("hidden_states"), poisoned)
    with ipc.new_file(str(path), table.schema) as writer:
        writer.write_table(table)
    manifest = read_manifest(data_dir)
    for shard in manifest["configs"][LAST_LAYER]["shards"]:
        if shard["file"] == f"{LAST_LAYER}/{PART}":
            shard["bytes"] = path.stat().st_size
            shard["sha256"] = file_sha256(path)
    (data_dir / MANIFEST_FILE).write_text(json.dumps(manifest), encoding="utf-8")

    result = launcher.run(["verify", data_dir])

    assert result.returncode == 1
    assert f"problem: {path}: 2 hidden-state values are NaN or infinite" in result.stderr.splitlines()


# ---------------------------------------------------------------- hidden-state values


def save_edited_model(directory, edit):
    """Save a tiny model after `edit(model)` changes its weights in place."""
    model_dir = save_tiny_model(directory, "llama", end_bias=2.0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        edit(model)
    model.save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="module")
def overflow_model_dir(tmp_path_factory):
    # The final norm scales hidden_states[-1] (layer 3) alone to about 1e6, beyond float16's 65504;
    # the greedy tokens stay the same because scaling the logits keeps their order.
    return save_edited_model(tmp_path_factory.mktemp("overflow-model"), lambda model: model.model.norm.weight.mul_(1e6))


@pytest.fixture(scope="module")
def nan_model_dir(tmp_path_factory):
    def poison(model):
        model.model.layers[0].mlp.down_proj.weight[0, 0] = float("nan")

    return save_edited_model(tmp_path_factory.mktemp("nan-model"), poison)


FLOAT16_OVERFLOW_ERROR = re.compile(
    r"error: hidden state value [0-9.e+]+ of sample 'cat-005' at step 0, layer 3 \(index into hidden_states\) "
    r"exceeds the float16 maximum 65504; store with --storage-dtype float32, "
    r"or pass --float16-overflow clip to saturate"
)


def test_float16_overflow_rejected(launcher, overflow_model_dir, tmp_path):
    output_dir = tmp_path / "data"

    result = launcher.run(extract_args(overflow_model_dir, output_dir))

    assert result.returncode == 1
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert FLOAT16_OVERFLOW_ERROR.fullmatch(lines[0])
    assert result.stderr.splitlines()[-1] == lines[0]
    assert not (output_dir / MANIFEST_FILE).exists()
    assert shard_paths(output_dir) == []


def test_float16_overflow_stored_as_float32(launcher, overflow_model_dir, tmp_path):
    output_dir = tmp_path / "data"

    result = launcher.run(extract_args(overflow_model_dir, output_dir, "--storage-dtype", "float32"))

    assert result.returncode == 0, result.stderr
    values = read_rows(output_dir, LAST_LAYER).column("hidden_states").combine_chunks().flatten().to_numpy()
    assert np.abs(values).max() > FLOAT16_MAX
    assert find_problems(output_dir, check_values=True) == []


def test_float16_overflow_clipped_on_request(launcher, overflow_model_dir, tmp_path):
    output_dir = tmp_path / "data"

    result = launcher.run(extract_args(overflow_model_dir, output_dir, "--float16-overflow", "clip"))

    assert result.returncode == 0, result.stderr
    values = read_rows(output_dir, LAST_LAYER).column("hidden_states").combine_chunks().flatten().to_numpy()
    assert np.abs(values).max() == FLOAT16_MAX
    # Only the last layer overflows, so every clipped value is one of its stored values at the limit.
    samples = read_manifest(output_dir)["samples"]
    assert all(sample["clipped_values"] > 0 for sample in samples)
    assert sum(sample["clipped_values"] for sample in samples) == np.count_nonzero(np.abs(values) == FLOAT16_MAX)
    assert find_problems(output_dir, check_values=True) == []


NAN_ERROR = (
    "error: the model produced a NaN or infinite hidden state for sample 'cat-005' at step 0, layer 1 "
    "(index into hidden_states); nothing was stored for this batch. Try --dtype float32, or check the model's weights"
)


# The NaN model never ends a completion, so with truncated rows left out no row is kept at all, and the
# error is still expected.
@pytest.mark.parametrize("truncated_rows", ["kept", "left-out"])
def test_nan_model_reported(launcher, nan_model_dir, tmp_path, truncated_rows):
    output_dir = tmp_path / "data"
    args = extract_args(nan_model_dir, output_dir)
    if truncated_rows == "left-out":
        args.remove("--keep-truncated")

    result = launcher.run(args)

    assert result.returncode == 1
    assert error_lines(result.stderr) == [NAN_ERROR]
    assert result.stderr.splitlines()[-1] == NAN_ERROR
    assert not (output_dir / MANIFEST_FILE).exists()
    assert shard_paths(output_dir) == []
