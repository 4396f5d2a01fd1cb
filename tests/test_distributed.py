"""`torchrun --nproc-per-node 2` on the CPU writes the same dataset as a single process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from length_probe import ALL_LAYERS, LAST_LAYER, MANIFEST_FILE, build_dataset

from generation import ExtractionConfig, run_extraction

REPO_ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_TIMEOUT_SECONDS = 120

# The tiny model's end_bias of 2.0 ends some completions and lets others reach the token limit, and
# keeping truncated rows puts both kinds in the comparison. The batch sizes differ on purpose, so the
# test also shows that the rows do not depend on how samples are batched.
WORDS = ("hello", "cat", "dog")
MIN_COUNT, MAX_COUNT, MAX_NEW_TOKENS = 5, 12, 20
SINGLE_BATCH_SIZE, DISTRIBUTED_BATCH_SIZE = 8, 3

# Stored as float32, but the two runs batch samples differently, and a matrix product over another
# batch shape may round differently.
ATOL = 1e-5
RTOL = 1e-4


@pytest.fixture(scope="module")
def single_dir(llama_dir, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("single") / "data"
    run_extraction(ExtractionConfig(
        model=str(llama_dir), device="cpu", dtype="float32", storage_dtype="float32", keep_truncated=True,
        words=WORDS, min_count=MIN_COUNT, max_count=MAX_COUNT, max_new_tokens=MAX_NEW_TOKENS,
        batch_size=SINGLE_BATCH_SIZE, output_dir=output_dir,
    ))
    return output_dir


@pytest.fixture(scope="module")
def distributed_dir(llama_dir, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("distributed") / "data"
    command = [
        # --standalone runs the rendezvous on localhost with a free port, so parallel test runs do not clash.
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "generation", "--log-level", "WARNING", "extract",
        "--model", str(llama_dir), "--output-dir", str(output_dir),
        "--words", *WORDS, "--min-count", str(MIN_COUNT), "--max-count", str(MAX_COUNT),
        "--max-new-tokens", str(MAX_NEW_TOKENS), "--batch-size", str(DISTRIBUTED_BATCH_SIZE),
        "--device", "cpu", "--dtype", "float32", "--storage-dtype", "float32", "--keep-truncated",
    ]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True,
                               timeout=TORCHRUN_TIMEOUT_SECONDS)
    assert completed.returncode == 0, f"torchrun failed:\n{completed.stdout}\n{completed.stderr}"
    return output_dir


def load_splits(data_dir: Path, config_name: str, cache_dir: Path) -> dict:
    dataset = build_dataset(config_name, data_dir, cache_dir=str(cache_dir))
    return {name: dataset[name].with_format("numpy")[:] for name in ("train", "validation")}


def test_both_ranks_wrote_parts(distributed_dir):
    manifest = json.loads((distributed_dir / MANIFEST_FILE).read_text())
    ranks = {shard["file"].rsplit("/", 1)[1][:11] for shard in manifest["configs"][ALL_LAYERS]["shards"]}
    assert ranks == {"part-r00000", "part-r00001"}


def test_manifests_list_same_samples(single_dir, distributed_dir):
    def samples(data_dir):
        manifest = json.loads((data_dir / MANIFEST_FILE).read_text())
        return [{key: value for key, value in sample.items() if key != "part"} for sample in manifest["samples"]]

    assert samples(distributed_dir) == samples(single_dir)


@pytest.mark.parametrize("config_name", [ALL_LAYERS, LAST_LAYER])
def test_datasets_match_row_by_row(single_dir, distributed_dir, config_name, tmp_path):
    single = load_splits(single_dir, config_name, tmp_path / "single-cache")
    distributed = load_splits(distributed_dir, config_name, tmp_path / "distributed-cache")

    for split in ("train", "validation"):
        expected, actual = single[split], distributed[split]
        assert set(actual["sample_id"]) == set(expected["sample_id"]), split
        assert len(actual["sample_id"]) == len(expected["sample_id"]), split
        for column in ("sample_id", "step", "token_id", "token_text", "remaining_tokens", "completion_length",
                       "is_exact_count", "is_truncated"):
            np.testing.assert_array_equal(actual[column], expected[column], err_msg=f"{split}: {column}")
        np.testing.assert_allclose(actual["hidden_states"], expected["hidden_states"], rtol=RTOL, atol=ATOL,
                                   err_msg=f"{split}: hidden_states")


def test_split_has_both_sides(single_dir, tmp_path):
    splits = load_splits(single_dir, LAST_LAYER, tmp_path / "cache")
    assert len(splits["train"]["sample_id"]) > 0
    assert len(splits["validation"]["sample_id"]) > 0
