"""The builder script: loading, features, the split by sample, the cache, and prompts that never change."""

from __future__ import annotations

import datetime
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import REPO_ROOT, TESTS_DIR

import length_probe
from generation.prompts import DEFAULT_DATE_STRING, build_samples, render_prompts

SCRIPT = str(REPO_ROOT / "length_probe.py")


def load(config_name, data_dir, cache_dir, **kwargs):
    from datasets import load_dataset

    return load_dataset(SCRIPT, config_name, data_dir=str(data_dir), cache_dir=str(cache_dir), trust_remote_code=True, **kwargs)


def samples_of(split) -> set[str]:
    return set(split.unique("sample_id"))


# ---------------------------------------------------------------- split


def test_split_is_ninety_ten_by_sample():
    ids = [sample.sample_id for sample in build_samples(("hello", "world", "cat", "dog", "python", "test", "apple", "blue", "sun", "code"), 5, 49)]
    splits = length_probe.assign_splits(ids, seed=0, validation_fraction=0.1)
    assert len(splits) == 450
    assert sum(value == "validation" for value in splits.values()) == 45
    assert sum(value == "train" for value in splits.values()) == 405


def test_split_ignores_input_order():
    ids = [f"w-{i:03d}" for i in range(100)]
    assert length_probe.assign_splits(ids, 3, 0.1) == length_probe.assign_splits(list(reversed(ids)), 3, 0.1)


def test_split_changes_with_seed():
    ids = [f"w-{i:03d}" for i in range(100)]
    first = length_probe.assign_splits(ids, 0, 0.1)
    second = length_probe.assign_splits(ids, 1, 0.1)
    assert first != second


def test_split_is_pinned_across_machines():
    # numpy's PCG64 is portable, so these ids are the same on every machine; a change here changes the dataset.
    ids = [f"w-{i:02d}" for i in range(20)]
    validation = sorted(i for i, split in length_probe.assign_splits(ids, 0, 0.1).items() if split == "validation")
    assert validation == ["w-04", "w-19"]


def test_split_spans_counts():
    ids = [sample.sample_id for sample in build_samples(("hello", "world", "cat", "dog", "python", "test", "apple", "blue", "sun", "code"), 5, 49)]
    counts = [int(i.split("-")[1]) for i, split in length_probe.assign_splits(ids, 0, 0.1).items() if split == "validation"]
    # The research scripts' token-index cut put only the highest counts in validation.
    assert min(counts) < 20
    assert max(counts) > 35


def test_split_rejects_invalid_fraction():
    with pytest.raises(ValueError, match="invalid validation_fraction 1.5"):
        length_probe.assign_splits(["a-001", "b-001"], 0, 1.5)


def test_loaded_splits_share_no_sample(llama_dataset_dir, tmp_path):
    dataset = load(length_probe.ALL_LAYERS, llama_dataset_dir, tmp_path)
    train, validation = samples_of(dataset["train"]), samples_of(dataset["validation"])
    assert train and validation
    assert train.isdisjoint(validation)
    manifest = length_probe.load_manifest(llama_dataset_dir)
    stored = {s["sample_id"] for s in manifest["samples"] if s["rows"]}
    assert train | validation == stored


def test_split_same_for_both_configs(llama_dataset_dir, tmp_path):
    last = load(length_probe.LAST_LAYER, llama_dataset_dir, tmp_path / "a")
    every = load(length_probe.ALL_LAYERS, llama_dataset_dir, tmp_path / "b")
    for split in ("train", "validation"):
        assert last[split]["sample_id"] == every[split]["sample_id"]
        assert last[split]["step"] == every[split]["step"]


def test_split_seed_parameter(llama_dataset_dir, tmp_path):
    manifest = length_probe.load_manifest(llama_dataset_dir)
    all_ids = [s["sample_id"] for s in manifest["samples"]]
    stored = {s["sample_id"] for s in manifest["samples"] if s["rows"]}
    for seed in (0, 7, 11):
        expected = {i for i, split in length_probe.assign_splits(all_ids, seed, 0.25).items() if split == "validation"}
        loaded = load(length_probe.LAST_LAYER, llama_dataset_dir, tmp_path / str(seed), seed=seed, validation_fraction=0.25)
        assert samples_of(loaded["validation"]) == expected & stored
        assert samples_of(loaded["train"]) == stored - expected


# ---------------------------------------------------------------- loading


def test_features_and_rows(llama_dataset_dir, tmp_path):
    dataset = load(length_probe.ALL_LAYERS, llama_dataset_dir, tmp_path)
    features = dataset["train"].features
    assert features["hidden_states"].length == 96
    assert features["hidden_states"].feature.dtype == "float32"
    for name in ("remaining_tokens", "token_id", "token_text", "word", "count", "sample_id", "step",
                 "completion_length", "is_exact_count", "is_truncated"):
        assert name in features
    manifest = length_probe.load_manifest(llama_dataset_dir)
    assert dataset["train"].num_rows + dataset["validation"].num_rows == manifest["configs"][length_probe.ALL_LAYERS]["rows"]


def test_rows_in_sample_then_step_order(llama_dataset_dir, tmp_path):
    dataset = load(length_probe.LAST_LAYER, llama_dataset_dir, tmp_path)
    manifest_order = [s["sample_id"] for s in length_probe.load_manifest(llama_dataset_dir)["samples"]]
    ids, steps = dataset["train"]["sample_id"], dataset["train"]["step"]
    positions = [manifest_order.index(i) for i in ids]
    assert positions == sorted(positions)
    for index in range(1, len(ids)):
        if ids[index] == ids[index - 1]:
            assert steps[index] == steps[index - 1] + 1


def test_second_load_reuses_cache(llama_dataset_dir, tmp_path):
    load(length_probe.LAST_LAYER, llama_dataset_dir, tmp_path)
    files_before = sorted(p for p in tmp_path.rglob("*.arrow"))
    load(length_probe.LAST_LAYER, llama_dataset_dir, tmp_path)
    assert sorted(p for p in tmp_path.rglob("*.arrow")) == files_before


def test_new_extraction_invalidates_cache(llama_dir, tmp_path):
    from conftest import extract

    data_dir = tmp_path / "data"
    extract(llama_dir, data_dir, words=("cat",))
    first = load(length_probe.LAST_LAYER, data_dir, tmp_path / "cache")
    extract(llama_dir, data_dir, words=("hello",), overwrite=True)
    second = load(length_probe.LAST_LAYER, data_dir, tmp_path / "cache")
    assert set().union(*(split["word"] for split in first.values())) == {"cat"}
    assert set().union(*(split["word"] for split in second.values())) == {"hello"}


def test_missing_shards_name_extract_command(tmp_path):
    # datasets imports the script as its own module, so the class is matched by name.
    with pytest.raises(ValueError, match="python -m generation extract") as raised:
        load(length_probe.ALL_LAYERS, tmp_path / "nowhere", tmp_path / "cache")
    assert type(raised.value).__name__ == "DatasetIntegrityError"


def test_build_dataset_matches_script(llama_dataset_dir, tmp_path):
    scripted = load(length_probe.ALL_LAYERS, llama_dataset_dir, tmp_path / "a")
    built = length_probe.build_dataset(length_probe.ALL_LAYERS, llama_dataset_dir, cache_dir=str(tmp_path / "b"))
    for split in ("train", "validation"):
        assert built[split]["sample_id"] == scripted[split]["sample_id"]
        np.testing.assert_array_equal(np.array(built[split]["hidden_states"]), np.array(scripted[split]["hidden_states"]))


def test_unknown_config_rejected(llama_dataset_dir, tmp_path):
    with pytest.raises(ValueError, match="single_prompt_every_layer"):
        length_probe.build_dataset("single_prompt_every_layer", llama_dataset_dir, cache_dir=str(tmp_path))


def test_loads_without_torch(llama_dataset_dir, tmp_path):
    # A child process whose path finder cannot see torch or transformers, as on a machine without them.
    code = textwrap.dedent(f"""
        import importlib.machinery, sys
        class HidingPathFinder(importlib.machinery.PathFinder):
            @classmethod
            def find_spec(cls, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers"):
                    return None
                return importlib.machinery.PathFinder.find_spec(name, path, target)
        sys.meta_path = [HidingPathFinder if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
        import datasets.config
        assert not datasets.config.TORCH_AVAILABLE
        from datasets import load_dataset
        dataset = load_dataset({SCRIPT!r}, "single_prompt_all_layers", data_dir={str(llama_dataset_dir)!r},
                               cache_dir={str(tmp_path)!r}, trust_remote_code=True)
        assert "torch" not in sys.modules
        assert "transformers" not in sys.modules
        print(dataset["train"].num_rows + dataset["validation"].num_rows)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=TESTS_DIR, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = length_probe.load_manifest(llama_dataset_dir)["configs"][length_probe.ALL_LAYERS]["rows"]
    assert result.stdout.split()[-1] == str(rows)


# ---------------------------------------------------------------- prompts


class FrozenDate(datetime.datetime):
    """A datetime whose now() is a chosen day, standing in for running on another date."""

    day_to_return = datetime.datetime(2026, 1, 2)

    @classmethod
    def now(cls, tz=None):
        return cls.day_to_return


def render_on(monkeypatch, day, date_string):
    from tiny_models import build_tokenizer
    import transformers.utils.chat_template_utils as chat_template_utils

    FrozenDate.day_to_return = day
    monkeypatch.setattr(chat_template_utils, "datetime", FrozenDate)
    chat_template_utils._compile_jinja_template.cache_clear()
    tokenizer = build_tokenizer()
    samples = build_samples(("hello",), 5, 6)
    if date_string is None:
        return [tokenizer.apply_chat_template([{"role": "user", "content": s.message}], add_generation_prompt=True, tokenize=False) for s in samples]
    return render_prompts(tokenizer, samples, date_string)


def test_prompts_identical_on_any_day(monkeypatch):
    first = render_on(monkeypatch, datetime.datetime(2025, 3, 1), DEFAULT_DATE_STRING)
    second = render_on(monkeypatch, datetime.datetime(2027, 11, 30), DEFAULT_DATE_STRING)
    assert first == second
    assert "Today Date: 26 Jul 2024" in first[0]


def test_unpinned_template_changes_with_day(monkeypatch):
    # The control: without the pinned date the same template writes the day it runs on.
    first = render_on(monkeypatch, datetime.datetime(2025, 3, 1), None)
    second = render_on(monkeypatch, datetime.datetime(2027, 11, 30), None)
    assert first != second
    assert "Today Date: 01 Mar 2025" in first[0]


def test_prompt_text_and_single_bos(llama_dir, llama_dataset_dir):
    from transformers import AutoTokenizer

    manifest = length_probe.load_manifest(llama_dataset_dir)
    prompt = manifest["samples"][0]["prompt"]
    assert 'Print exactly 5 repetitions of the token "hello". Do not include anything else.' in prompt
    assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1
    assert ids[0] == tokenizer.bos_token_id
