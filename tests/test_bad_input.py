"""Bad input to the command line and the builder: one clear error line, a non-zero exit status, no manifest.

Extraction commands run in real child processes (tests/cli_launcher.py). The usage errors run through
`python -m generation` itself. The read-only and full filesystems are tmpfs mounts in a private user and
mount namespace, which needs no privileges where the kernel allows unprivileged user namespaces.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import datasets
import pytest
import torch
from extraction_helpers import (
    REPO_ROOT,
    CliLauncher,
    cli_environment,
    error_lines,
    extract_args,
    run_cli,
    shard_paths,
    shared_launcher,
)
from tiny_models import build_model, build_tokenizer, save_tiny_model

from length_probe import ALL_LAYERS, MANIFEST_FILE, DatasetIntegrityError, build_dataset

EXIT_ERROR = 1
EXIT_USAGE = 2


@pytest.fixture(scope="module")
def launcher():
    return shared_launcher()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("model"), "llama", end_bias=2.0)


@pytest.fixture(scope="module")
def no_template_model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("no-template-model")
    tokenizer = build_tokenizer(chat_template=None)
    build_model("llama", tokenizer, end_bias=2.0).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def assert_one_error_line(result, expected: str):
    """Check that stderr ends with `expected` as its only error line."""
    assert error_lines(result.stderr) == [expected], result.stderr
    assert result.stderr.splitlines()[-1] == expected


# ---------------------------------------------------------------- options


def test_unknown_config_is_usage_error(model_dir, tmp_path):
    output_dir = tmp_path / "data"

    result = run_cli(extract_args(model_dir, output_dir, "--config", "last"))

    assert result.returncode == EXIT_USAGE
    assert result.stderr == (
        "python -m generation extract: error: argument --config: invalid choice: 'last' (choose from "
        "'single_prompt_last_layer', 'single_prompt_all_layers', 'all') (see python -m generation extract --help)\n"
    )
    assert not output_dir.exists()


def test_missing_word_list_is_usage_error(model_dir, tmp_path):
    output_dir = tmp_path / "data"

    result = run_cli(extract_args(model_dir, output_dir, "--words"))

    assert result.returncode == EXIT_USAGE
    assert result.stderr == (
        "python -m generation extract: error: argument --words: expected at least one argument "
        "(see python -m generation extract --help)\n"
    )
    assert not output_dir.exists()


# Runs the command line's main() in a fresh interpreter and prints whether torch got imported.
IMPORT_CHECK = "import sys; from generation.cli import main; status = main(sys.argv[1:]); print('torch' in sys.modules); sys.exit(status)"


def test_invalid_option_fails_before_torch_import(model_dir, tmp_path):
    output_dir = tmp_path / "data"
    args = extract_args(model_dir, output_dir, "--min-count", "9", "--max-count", "3")

    result = subprocess.run(
        [sys.executable, "-c", IMPORT_CHECK, *args], cwd=REPO_ROOT, env=cli_environment(), capture_output=True, text=True, timeout=60
    )

    assert result.returncode == EXIT_ERROR
    assert result.stderr == (
        "error: invalid count range 9..3: expected 1 <= --min-count <= --max-count, e.g. --min-count 5 --max-count 49\n"
    )
    assert result.stdout == "False\n"
    assert not output_dir.exists()


INVALID_OPTIONS = {
    "count-range-reversed": (
        ["--min-count", "9", "--max-count", "3"],
        "error: invalid count range 9..3: expected 1 <= --min-count <= --max-count, e.g. --min-count 5 --max-count 49",
    ),
    "count-zero": (
        ["--min-count", "0"],
        "error: invalid count range 0..10: expected 1 <= --min-count <= --max-count, e.g. --min-count 5 --max-count 49",
    ),
    "empty-word": (["--words", ""], "error: invalid word '': a word must be non-empty, without spaces or double quotes"),
    "repeated-word": (
        ["--words", "cat", "cat"],
        "error: the word list ['cat', 'cat'] repeats a word; list each word once",
    ),
    "batch-size-zero": (["--batch-size", "0"], "error: invalid --batch-size 0: expected at least 1, e.g. --batch-size 32"),
    "batch-size-negative": (["--batch-size", "-4"], "error: invalid --batch-size -4: expected at least 1, e.g. --batch-size 32"),
    "max-new-tokens-zero": (["--max-new-tokens", "0"], "error: invalid --max-new-tokens 0: expected at least 1"),
}


@pytest.mark.parametrize("case", INVALID_OPTIONS)
def test_invalid_option_rejected(launcher, model_dir, tmp_path, case):
    output_dir = tmp_path / "data"
    extra, expected = INVALID_OPTIONS[case]

    result = launcher.run(extract_args(model_dir, output_dir, *extra))

    assert result.returncode == EXIT_ERROR
    assert result.stderr == expected + "\n"
    assert not output_dir.exists()


# ---------------------------------------------------------------- model, device and output directory


def test_missing_model_path_rejected(launcher, tmp_path):
    missing = tmp_path / "no-such-model"
    output_dir = tmp_path / "data"

    result = launcher.run(extract_args(missing, output_dir))

    assert result.returncode == EXIT_ERROR
    assert_one_error_line(
        result,
        f"error: model path {str(missing)!r} not found; pass an existing model directory, a Hub id such as "
        "meta-llama/Llama-3.2-3B-Instruct, or --model demo",
    )
    assert not output_dir.exists()


def test_tokenizer_without_chat_template_rejected(launcher, no_template_model_dir, tmp_path):
    output_dir = tmp_path / "data"

    result = launcher.run(extract_args(no_template_model_dir, output_dir))

    assert result.returncode == EXIT_ERROR
    assert_one_error_line(
        result,
        f"error: the tokenizer of {str(no_template_model_dir)!r} has no chat template, so the prompts cannot be "
        "rendered; use an instruction-tuned model whose tokenizer_config.json defines chat_template",
    )
    assert not output_dir.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU, so --device cuda is valid")
def test_unavailable_device_rejected(launcher, model_dir, tmp_path):
    output_dir = tmp_path / "data"

    result = launcher.run(extract_args(model_dir, output_dir, "--device", "cuda"))

    assert result.returncode == EXIT_ERROR
    assert_one_error_line(result, "error: device 'cuda' is not available: torch sees no CUDA GPU; use --device cpu")
    assert not output_dir.exists()


def test_output_dir_below_file_rejected(launcher, model_dir, tmp_path):
    regular_file = tmp_path / "file"
    regular_file.write_text("not a directory\n")
    output_dir = regular_file / "data"

    result = launcher.run(extract_args(model_dir, output_dir))

    assert result.returncode == EXIT_ERROR
    assert_one_error_line(
        result,
        f"error: output directory {str(output_dir)!r} cannot be written (Not a directory); "
        "pass a directory you can write to --output-dir",
    )
    assert regular_file.read_text() == "not a directory\n"


def test_output_path_is_file_rejected(launcher, model_dir, tmp_path):
    output_file = tmp_path / "data"
    output_file.write_text("not a directory\n")

    result = launcher.run(extract_args(model_dir, output_file))

    assert result.returncode == EXIT_ERROR
    assert_one_error_line(result, f"error: output path {str(output_file)!r} is a file; pass a directory to --output-dir")
    assert output_file.read_text() == "not a directory\n"


def test_foreign_output_dir_rejected(launcher, model_dir, tmp_path):
    output_dir = tmp_path / "data"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("unrelated\n")

    result = launcher.run(extract_args(model_dir, output_dir))

    assert result.returncode == EXIT_ERROR
    assert_one_error_line(
        result,
        f"error: output directory {str(output_dir)!r} is not empty and contains no length-probe extraction; "
        "pass an empty or new directory to --output-dir",
    )
    assert sorted(path.name for path in output_dir.iterdir()) == ["notes.txt"]


def test_file_size_limit_reported(launcher, model_dir, tmp_path):
    # RLIMIT_FSIZE, as `ulimit -f` sets it: run.json (about 1 kB) fits, the first shard does not. Python
    # ignores SIGXFSZ, so the write fails with EFBIG instead of killing the process.
    output_dir = tmp_path / "data"
    shard = output_dir / "single_prompt_last_layer" / "part-r00000-s00000.arrow"

    result = launcher.run(extract_args(model_dir, output_dir), file_size_limit=2048)

    assert result.returncode == EXIT_ERROR
    assert_one_error_line(
        result,
        f"error: failed to write {shard}: File too large; raise this process's file size limit (ulimit -f), "
        "then re-run the same command to resume",
    )
    assert not (output_dir / MANIFEST_FILE).exists()
    assert shard_paths(output_dir) == []


# ---------------------------------------------------------------- read-only and full filesystems

# Mounts a read-only tmpfs on $0 and an 8 kB tmpfs on $1, then runs the remaining arguments. 8 kB
# (two pages) has room for run.json but not for the first shard as well.
MOUNT_SCRIPT = 'mount -t tmpfs -o ro tmpfs "$0" && mount -t tmpfs -o size=8k tmpfs "$1" && shift && exec "$@"'
UNSHARE = ("unshare", "--user", "--map-root-user", "--mount")


def private_mounts_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run([*UNSHARE, "true"], capture_output=True, timeout=30, cwd=REPO_ROOT)
    return probe.returncode == 0


@pytest.fixture(scope="module")
def mounts(tmp_path_factory):
    """A launcher whose children see a read-only and a full tmpfs; yields (launcher, read-only dir, small dir)."""
    if not private_mounts_available():
        pytest.skip("unshare cannot create a user and mount namespace here, so no tmpfs can be mounted")
    read_only = tmp_path_factory.mktemp("read-only")
    small = tmp_path_factory.mktemp("small")
    launcher = CliLauncher(prefix=(*UNSHARE, "sh", "-c", MOUNT_SCRIPT, str(read_only), str(small)))
    yield launcher, read_only, small
    launcher.close()


def test_read_only_filesystem_rejected(mounts, model_dir):
    launcher, read_only, _ = mounts
    output_dir = read_only / "data"

    result = launcher.run(extract_args(model_dir, output_dir), list_dir=read_only)

    assert result.returncode == EXIT_ERROR
    assert_one_error_line(
        result,
        f"error: output directory {str(output_dir)!r} cannot be written (Read-only file system); "
        "pass a directory you can write to --output-dir",
    )
    assert result.files == []


def test_full_filesystem_reported(mounts, model_dir):
    launcher, _, small = mounts
    output_dir = small / "data"

    result = launcher.run(extract_args(model_dir, output_dir), list_dir=output_dir)

    assert result.returncode == EXIT_ERROR
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert re.fullmatch(
        rf"error: failed to write {re.escape(str(output_dir))}/\S+: No space left on device; free some space, "
        "then re-run the same command to resume",
        lines[0],
    )
    assert MANIFEST_FILE not in result.files
    assert [name for name in result.files if name.endswith(".tmp")] == []


# ---------------------------------------------------------------- data directories for the builder and verify


def test_builder_rejects_empty_data_dir(tmp_path):
    with pytest.raises(DatasetIntegrityError, match=re.escape(f"no length-probe shards in {str(tmp_path)!r} (manifest.json not found)")):
        build_dataset(ALL_LAYERS, tmp_path, cache_dir=str(tmp_path / "cache"))


def test_loading_script_rejects_empty_data_dir(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()

    # load_dataset imports a copy of the script, so the error is that copy's DatasetIntegrityError class.
    with pytest.raises(ValueError, match=re.escape(f"no length-probe shards in {str(data_dir)!r}")) as raised:
        datasets.load_dataset(
            str(REPO_ROOT / "length_probe.py"),
            ALL_LAYERS,
            data_dir=str(data_dir),
            trust_remote_code=True,
            cache_dir=str(tmp_path / "cache"),
        )
    assert type(raised.value).__name__ == "DatasetIntegrityError"


def test_builder_rejects_missing_data_dir(tmp_path):
    missing = tmp_path / "missing"

    with pytest.raises(DatasetIntegrityError, match=re.escape(f"data directory {str(missing)!r} not found")):
        build_dataset(ALL_LAYERS, missing, cache_dir=str(tmp_path / "cache"))


def test_builder_rejects_unfinished_extraction(tmp_path):
    (tmp_path / "run.json").write_text("{}\n")

    with pytest.raises(DatasetIntegrityError, match=re.escape(f"{tmp_path / MANIFEST_FILE} is missing: the extraction")):
        build_dataset(ALL_LAYERS, tmp_path, cache_dir=str(tmp_path / "cache"))


def test_builder_rejects_unknown_config(tmp_path):
    with pytest.raises(ValueError, match=re.escape("unknown config 'last': expected one of")):
        build_dataset("last", tmp_path, cache_dir=str(tmp_path / "cache"))


def test_loading_script_rejects_unknown_config(tmp_path):
    with pytest.raises(ValueError, match=re.escape("BuilderConfig 'last' not found. Available: ")):
        datasets.load_dataset(
            str(REPO_ROOT / "length_probe.py"), "last", data_dir=str(tmp_path), trust_remote_code=True, cache_dir=str(tmp_path / "cache")
        )


def test_verify_rejects_empty_data_dir(tmp_path):
    result = run_cli(["verify", str(tmp_path)])

    assert result.returncode == EXIT_ERROR
    assert result.stderr.splitlines() == [
        f"problem: no length-probe shards in {str(tmp_path)!r} (manifest.json not found); make them with "
        "`python -m generation extract --model MODEL --config all --output-dir DIR` and pass that directory instead",
        f"{tmp_path}: 1 problem(s) found",
    ]
