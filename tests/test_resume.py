"""Interrupted extractions: a re-run of the same command finishes them into the dataset of an uninterrupted run.

Each interrupted run is a real child process that sends itself SIGKILL or SIGINT at a chosen file
rename or directory deletion (see tests/cli_launcher.py). The re-run is the same command line.
"""

from __future__ import annotations

import shutil
from pathlib import Path
import signal

import pyarrow.ipc as ipc
import pytest
from extraction_helpers import (
    SMALL_RUN_PARTS,
    error_lines,
    extract_args,
    files_under,
    read_manifest,
    read_rows,
    shard_paths,
    shared_launcher,
)
from conftest import extract
from tiny_models import save_tiny_model

import generation.cli
from generation.errors import ExtractionError, ResumeMismatchError
from length_probe import CONFIG_NAMES, MANIFEST_FILE, RUN_FILE, build_dataset, find_problems

EXIT_INTERRUPTED = 130
INTERRUPTED_LINE = "interrupted; every batch finished so far is kept. Re-run the same command to resume"

# Where a run is interrupted, as (file name glob, nth matching rename, before or after that rename).
# Each part writes the last-layer shard, then the all-layers shard, then its record in parts/.
INTERRUPTION_POINTS = {
    "before-run-json": ("run.json", 1, "before"),
    "before-first-shard": ("run.json", 1, "after"),
    "between-parts": ("part-r00000-s00000.json", 1, "after"),
    # the second part's last-layer shard is in place, its all-layers shard is still a temporary file
    "mid-part": ("*.arrow", 4, "before"),
    "before-manifest": ("manifest.json", 1, "before"),
}
SIGNALS = ("KILL", "INT")


@pytest.fixture(scope="module")
def launcher():
    return shared_launcher()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model"), "llama", end_bias=2.0)


@pytest.fixture(scope="module")
def reference_dir(launcher, model_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("reference") / "data"
    result = launcher.run(extract_args(model_dir, output_dir))
    assert result.returncode == 0, result.stderr
    return output_dir


@pytest.fixture(scope="module")
def interrupted_dir(launcher, model_dir, tmp_path_factory):
    """An extraction killed after its first part; tests copy it before changing it."""
    output_dir = tmp_path_factory.mktemp("interrupted") / "data"
    result = launcher.run(extract_args(model_dir, output_dir), interrupt=("KILL", "part-r00000-s00000.json", 1, "after"))
    assert result.returncode == -signal.SIGKILL, result.stderr
    return output_dir


def interrupt(launcher, model_dir, output_dir, signal_name: str, point: str):
    pattern, nth, when = INTERRUPTION_POINTS[point]
    return launcher.run(extract_args(model_dir, output_dir), interrupt=(signal_name, pattern, nth, when))


def assert_same_rows(data_dir, reference_dir):
    for config_name in CONFIG_NAMES:
        rows = read_rows(data_dir, config_name)
        expected = read_rows(reference_dir, config_name)
        assert rows.num_rows == expected.num_rows, config_name
        for column in expected.column_names:
            assert rows.column(column).equals(expected.column(column)), f"{config_name}: column {column} differs"


def assert_no_duplicate_or_stray_rows(data_dir):
    manifest = read_manifest(data_dir)
    listed = {data_dir / shard["file"] for entry in manifest["configs"].values() for shard in entry["shards"]}
    assert set(shard_paths(data_dir)) == listed
    for config_name in CONFIG_NAMES:
        rows = read_rows(data_dir, config_name)
        keys = list(zip(rows.column("sample_id").to_pylist(), rows.column("step").to_pylist()))
        assert len(set(keys)) == len(keys), config_name
        assert manifest["configs"][config_name]["rows"] == rows.num_rows, config_name


def sample_records(data_dir):
    return [{key: value for key, value in sample.items() if key != "part"} for sample in read_manifest(data_dir)["samples"]]


@pytest.mark.parametrize("point", INTERRUPTION_POINTS)
@pytest.mark.parametrize("signal_name", SIGNALS)
def test_resume_matches_uninterrupted(launcher, model_dir, reference_dir, tmp_path, signal_name, point):
    output_dir = tmp_path / "data"

    interrupted = interrupt(launcher, model_dir, output_dir, signal_name, point)
    if signal_name == "KILL":
        assert interrupted.returncode == -signal.SIGKILL, interrupted.stderr
    else:
        assert interrupted.returncode == EXIT_INTERRUPTED, interrupted.stderr
        assert INTERRUPTED_LINE in interrupted.stderr.splitlines()
    assert not (output_dir / MANIFEST_FILE).exists()

    resumed = launcher.run(extract_args(model_dir, output_dir))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_rows(output_dir, reference_dir)
    assert sample_records(output_dir) == sample_records(reference_dir)
    assert_no_duplicate_or_stray_rows(output_dir)
    assert find_problems(output_dir, check_values=True) == []


def test_resumed_dataset_loads_like_uninterrupted(launcher, model_dir, reference_dir, tmp_path):
    output_dir = tmp_path / "data"
    interrupt(launcher, model_dir, output_dir, "KILL", "mid-part")
    assert launcher.run(extract_args(model_dir, output_dir)).returncode == 0

    for config_name in CONFIG_NAMES:
        resumed = build_dataset(config_name, output_dir, cache_dir=str(tmp_path / "cache-resumed"))
        expected = build_dataset(config_name, reference_dir, cache_dir=str(tmp_path / "cache-reference"))
        for split in ("train", "validation"):
            assert resumed[split].num_rows == expected[split].num_rows, f"{config_name} {split}"
            assert resumed[split].data.table.equals(expected[split].data.table), f"{config_name} {split}"


def test_resume_skips_finished_parts(launcher, model_dir, interrupted_dir, tmp_path):
    output_dir = tmp_path / "data"
    shutil.copytree(interrupted_dir, output_dir)
    first_record = output_dir / "parts" / "part-r00000-s00000.json"
    before = (first_record.read_bytes(), first_record.stat().st_mtime_ns)

    resumed = launcher.run(extract_args(model_dir, output_dir))

    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming: 4 of 12 samples already done" in resumed.stderr
    assert (first_record.read_bytes(), first_record.stat().st_mtime_ns) == before
    assert len(read_manifest(output_dir)["configs"][CONFIG_NAMES[0]]["shards"]) == SMALL_RUN_PARTS


def test_shard_hidden_until_renamed(launcher, model_dir, tmp_path):
    output_dir = tmp_path / "data"
    shard = output_dir / CONFIG_NAMES[0] / "part-r00000-s00000.arrow"

    result = launcher.run(extract_args(model_dir, output_dir), interrupt=("KILL", "*.arrow", 1, "before"))

    assert result.returncode == -signal.SIGKILL, result.stderr
    assert not shard.exists()
    temporary = shard.with_name(shard.name + ".tmp")
    # The temporary file is already complete and only lacks the rename.
    assert ipc.open_file(temporary.read_bytes()).num_record_batches == 1


def test_finished_extraction_rerun_changes_nothing(launcher, model_dir, reference_dir, tmp_path):
    output_dir = tmp_path / "data"
    shutil.copytree(reference_dir, output_dir)
    before = {path: (content, (output_dir / path).stat().st_mtime_ns) for path, content in files_under(output_dir).items()}

    result = launcher.run(extract_args(model_dir, output_dir))

    assert result.returncode == 0, result.stderr
    assert "already contains a complete extraction with these settings; nothing to do" in result.stderr
    after = {path: (content, (output_dir / path).stat().st_mtime_ns) for path, content in files_under(output_dir).items()}
    assert after == before


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("other-model"), "llama", end_bias=2.0, seed=1)


# Each case changes one setting of the resume key; `expected` is the start of the difference the error names.
MISMATCHES = {
    "model": (None, "model: "),
    "words": (["--words", "hello", "dog"], "words: ['hello', 'cat'] in "),
    "layer-set": (["--config", "single_prompt_last_layer"], "configs: ['single_prompt_last_layer', 'single_prompt_all_layers'] in "),
    "storage-dtype": (["--storage-dtype", "float32"], "storage_dtype: 'float16' in "),
    "compute-dtype": (["--dtype", "bfloat16"], "dtype: 'float32' in "),
}


@pytest.mark.parametrize("case", MISMATCHES)
def test_resume_with_other_settings_rejected(launcher, model_dir, other_model_dir, interrupted_dir, tmp_path, case):
    output_dir = tmp_path / "data"
    shutil.copytree(interrupted_dir, output_dir)
    before = files_under(output_dir)
    extra, expected = MISMATCHES[case]
    if extra is None:
        args = extract_args(other_model_dir, output_dir)
        expected += f"{str(model_dir)!r} in {output_dir / RUN_FILE}, {str(other_model_dir)!r} now"
    else:
        args = extract_args(model_dir, output_dir, *extra)

    result = launcher.run(args)

    assert result.returncode == 1
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {output_dir} contains an extraction made with other settings (")
    assert expected in lines[0]
    assert lines[0].endswith("pass --overwrite to start over, or choose another --output-dir")
    assert files_under(output_dir) == before


def test_overwrite_starts_over(launcher, model_dir, interrupted_dir, tmp_path):
    output_dir = tmp_path / "data"
    shutil.copytree(interrupted_dir, output_dir)

    result = launcher.run(extract_args(model_dir, output_dir, "--storage-dtype", "float32", "--overwrite"))

    assert result.returncode == 0, result.stderr
    manifest = read_manifest(output_dir)
    assert [entry["storage_dtype"] for entry in manifest["configs"].values()] == ["float32", "float32"]
    assert_no_duplicate_or_stray_rows(output_dir)
    assert find_problems(output_dir, check_values=True) == []


def test_interrupted_overwrite_can_be_repeated(launcher, model_dir, reference_dir, interrupted_dir, tmp_path):
    output_dir = tmp_path / "data"
    shutil.copytree(interrupted_dir, output_dir)

    killed = launcher.run(
        extract_args(model_dir, output_dir, "--overwrite"), interrupt=("KILL", "parts", 1, "after", "shutil.rmtree")
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    result = launcher.run(extract_args(model_dir, output_dir, "--overwrite"))

    assert result.returncode == 0, result.stderr
    assert_same_rows(output_dir, reference_dir)
    assert_no_duplicate_or_stray_rows(output_dir)


def test_interrupted_verify_names_no_batches(monkeypatch, capsys, tmp_path):
    def interrupt(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(generation.cli, "run_verify", interrupt)

    status = generation.cli.main(["verify", str(tmp_path)])

    assert status == EXIT_INTERRUPTED
    assert capsys.readouterr().err == "interrupted\n"


@pytest.fixture
def weightless_model_dir(llama_dir, tmp_path) -> Path:
    """Return a copy of the tiny model whose finished extraction exists, with its weights then deleted."""
    model_dir = tmp_path / "model"
    shutil.copytree(llama_dir, model_dir)
    extract(model_dir, tmp_path / "data")
    (model_dir / "model.safetensors").unlink()
    return model_dir


def test_finished_run_needs_no_model_load(weightless_model_dir, tmp_path):
    summary = extract(weightless_model_dir, tmp_path / "data")

    assert summary == read_manifest(tmp_path / "data")["summary"]


def test_settings_mismatch_found_before_model_load(weightless_model_dir, tmp_path):
    with pytest.raises(ResumeMismatchError, match="contains an extraction made with other settings"):
        extract(weightless_model_dir, tmp_path / "data", words=("hello",))


def test_output_file_found_before_model_load(weightless_model_dir, tmp_path):
    output_file = tmp_path / "file"
    output_file.write_text("not a directory")

    with pytest.raises(ExtractionError, match="is a file; pass a directory to --output-dir"):
        extract(weightless_model_dir, output_file)


def test_weightless_model_fails_to_load(weightless_model_dir, tmp_path):
    # The control for the tests above: with work to do, the missing weights do stop the run.
    with pytest.raises(ExtractionError, match="failed to load model"):
        extract(weightless_model_dir, tmp_path / "new")
