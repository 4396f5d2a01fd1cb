"""Shared fixtures: tiny models saved to disk and extractions made from them once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# No test may reach the Hub; set before datasets or huggingface_hub is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest

TESTS_DIR = Path(__file__).parent
REPO_ROOT = TESTS_DIR.parent
sys.path.insert(0, str(TESTS_DIR))

from tiny_models import save_tiny_model  # noqa: E402

from generation.config import ExtractionConfig  # noqa: E402

SMALL_PROMPTS = dict(words=("hello", "cat", "dog"), min_count=5, max_count=12, max_new_tokens=20)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("llama"), "llama", end_bias=2.0)


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("qwen2"), "qwen2", end_bias=2.0)


def extract(model_dir: Path, output_dir: Path, **overrides) -> dict:
    """Run an in-process extraction of the small prompt set on the CPU in float32."""
    from generation.extract import run_extraction

    settings = dict(SMALL_PROMPTS, model=str(model_dir), device="cpu", dtype="float32",
                    storage_dtype="float32", batch_size=8, output_dir=output_dir)
    settings.update(overrides)
    return run_extraction(ExtractionConfig(**settings))


@pytest.fixture(scope="session")
def llama_dataset_dir(llama_dir, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("llama-data") / "data"
    extract(llama_dir, output_dir)
    return output_dir


@pytest.fixture(scope="session")
def qwen2_dataset_dir(qwen2_dir, tmp_path_factory) -> Path:
    output_dir = tmp_path_factory.mktemp("qwen2-data") / "data"
    extract(qwen2_dir, output_dir)
    return output_dir
