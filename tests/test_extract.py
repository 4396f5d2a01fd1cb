"""Extraction against ground truth: every row's token, count and hidden state, one sample at a time."""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import torch
from conftest import SMALL_PROMPTS, extract
from tiny_models import build_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer, MambaConfig, MambaForCausalLM, MistralConfig, MistralForCausalLM

import length_probe
from generation.capture import _batch_inputs, capture_batch, shared_prefix_length
from generation.extract import batch_slices
from generation.models import end_token_ids, load_model, load_tokenizer
from generation.prompts import DEFAULT_DATE_STRING, build_samples, render_prompts

ATOL = 1e-4
RTOL = 1e-4


def reference_completion(model, tokenizer, prompt: str, end_ids: list[int], max_new_tokens: int):
    """Decode greedily with a full forward pass per step: no cache, no padding, no generate().

    Returns the completion's token ids and, per step, the hidden states of the last position
    as a [steps, layers + 1, hidden] array that includes the embedding output at index 0.
    """
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    tokens, states = [], []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            output = model(ids, output_hidden_states=True)
            states.append(torch.stack([layer[0, -1] for layer in output.hidden_states]).numpy())
            token = int(output.logits[0, -1].argmax())
            tokens.append(token)
            if token in end_ids:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return tokens, np.stack(states)


def read_rows(data_dir, config_name) -> dict[str, dict]:
    """Read every shard of a config into {sample_id: {column: array}} in step order."""
    manifest = length_probe.load_manifest(data_dir)
    tables = []
    for shard in manifest["configs"][config_name]["shards"]:
        with pa.memory_map(str(data_dir / shard["file"])) as source:
            tables.append(ipc.open_file(source).read_all())
    table = pa.concat_tables(tables)
    rows = {}
    for sample_id in set(table.column("sample_id").to_pylist()):
        part = table.filter(pa.compute.equal(table.column("sample_id"), sample_id))
        columns = {name: part.column(name).to_numpy(zero_copy_only=False) for name in part.column_names if name != "hidden_states"}
        columns["hidden_states"] = np.stack(part.column("hidden_states").to_numpy(zero_copy_only=False))
        order = np.argsort(columns["step"])
        rows[sample_id] = {name: values[order] for name, values in columns.items()}
    return rows


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_fixture_tokenizers_keep_the_prompt_words(architecture, request):
    # Without this, a fixture whose tokenizer dropped the words would make every word's prompt the same.
    tokenizer = load_tokenizer(str(request.getfixturevalue(f"{architecture}_dir")))
    prompts = render_prompts(tokenizer, build_samples(("hello", "python"), 5, 5), DEFAULT_DATE_STRING)
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    decoded = [tokenizer.decode(ids) for ids in encoded]
    assert "hello" in decoded[0]
    assert "python" in decoded[1]
    if architecture == "qwen2":  # byte-level, so lossless; the word-level Llama tokenizer drops whitespace
        assert decoded == prompts
    assert encoded[0] != encoded[1]


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_rows_match_one_sample_reference(architecture, request):
    model_dir = request.getfixturevalue(f"{architecture}_dir")
    data_dir = request.getfixturevalue(f"{architecture}_dataset_dir")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    end_ids = model.generation_config.eos_token_id
    samples = build_samples(SMALL_PROMPTS["words"], SMALL_PROMPTS["min_count"], SMALL_PROMPTS["max_count"])
    prompts = render_prompts(tokenizer, samples, DEFAULT_DATE_STRING)
    manifest = length_probe.load_manifest(data_dir)
    recorded = {sample["sample_id"]: sample for sample in manifest["samples"]}
    last_rows = read_rows(data_dir, length_probe.LAST_LAYER)
    all_rows = read_rows(data_dir, length_probe.ALL_LAYERS)
    layer_count = model.config.num_hidden_layers
    ended = 0

    for sample, prompt in zip(samples, prompts):
        tokens, states = reference_completion(model, tokenizer, prompt, end_ids, SMALL_PROMPTS["max_new_tokens"])
        assert recorded[sample.sample_id]["completion_token_ids"] == tokens
        truncated = tokens[-1] not in end_ids
        assert recorded[sample.sample_id]["is_truncated"] == truncated
        if truncated:
            assert sample.sample_id not in all_rows
            continue
        ended += 1
        n = len(tokens)
        row = all_rows[sample.sample_id]
        assert row["step"].tolist() == list(range(n))
        assert row["token_id"].tolist() == tokens
        assert row["remaining_tokens"].tolist() == [n - 1 - i for i in range(n)]
        assert row["completion_length"].tolist() == [n] * n
        expected_all = states[:, 1:, :].reshape(n, -1)  # decoder layers 1..L, embedding output left out
        np.testing.assert_allclose(row["hidden_states"], expected_all, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(last_rows[sample.sample_id]["hidden_states"], states[:, layer_count, :], rtol=RTOL, atol=ATOL)
        assert last_rows[sample.sample_id]["token_id"].tolist() == tokens

    assert ended >= 3, "the tiny model should end some completions, or this test checks nothing"


def test_end_token_row_has_zero_remaining(llama_dataset_dir):
    rows = read_rows(llama_dataset_dir, length_probe.LAST_LAYER)
    end_ids = json.loads((llama_dataset_dir / length_probe.LAST_LAYER / "metadata.json").read_text())["generation"]["end_token_ids"]
    for row in rows.values():
        assert row["remaining_tokens"][-1] == 0
        assert row["token_id"][-1] in end_ids
        assert row["token_text"][-1] == "<|eot_id|>"


def test_last_layer_equals_last_block(llama_dataset_dir):
    last = read_rows(llama_dataset_dir, length_probe.LAST_LAYER)
    every = read_rows(llama_dataset_dir, length_probe.ALL_LAYERS)
    assert last.keys() == every.keys()
    for sample_id, row in last.items():
        hidden = row["hidden_states"].shape[1]
        np.testing.assert_array_equal(every[sample_id]["hidden_states"][:, -hidden:], row["hidden_states"])


def test_all_layers_exclude_embedding(llama_dir, llama_dataset_dir):
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    rows = read_rows(llama_dataset_dir, length_probe.ALL_LAYERS)
    hidden = model.config.hidden_size
    assert next(iter(rows.values()))["hidden_states"].shape[1] == hidden * model.config.num_hidden_layers
    embedding = model.get_input_embeddings().weight.detach().numpy()
    for row in rows.values():
        # Row i > 0 sits at the position of token g_{i-1}; its embedding must not be the first block.
        for step in range(1, len(row["step"])):
            first_block = row["hidden_states"][step, :hidden]
            assert not np.allclose(first_block, embedding[row["token_id"][step - 1]], atol=1e-3)


def test_batching_options_keep_rows(llama_dir, llama_dataset_dir, tmp_path):
    extract(llama_dir, tmp_path / "batch1", batch_size=1)
    extract(llama_dir, tmp_path / "batch5", batch_size=5)
    extract(llama_dir, tmp_path / "unshared", share_prompt_prefix=False)
    # This runs the --device-map code path (from_pretrained places the model, no .to(device) after it).
    # Without a GPU every layer lands on the CPU, so a split over several devices stays untested here.
    extract(llama_dir, tmp_path / "device-map", device_map="auto")
    reference = read_rows(llama_dataset_dir, length_probe.ALL_LAYERS)
    for name in ("batch1", "batch5", "unshared", "device-map"):
        rows = read_rows(tmp_path / name, length_probe.ALL_LAYERS)
        assert rows.keys() == reference.keys()
        for sample_id, row in rows.items():
            assert row["token_id"].tolist() == reference[sample_id]["token_id"].tolist()
            assert row["remaining_tokens"].tolist() == reference[sample_id]["remaining_tokens"].tolist()
            np.testing.assert_allclose(row["hidden_states"], reference[sample_id]["hidden_states"], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
@pytest.mark.parametrize("batch", ["unequal lengths", "one prompt extends another"])
def test_shared_prefix_matches_full_prompts(architecture, batch, request):
    """A batch whose shared tokens run once, padded in the middle, still gives each prompt its own rows."""
    model_dir = request.getfixturevalue(f"{architecture}_dir")
    model = load_model(str(model_dir), device=torch.device("cpu"), dtype="float32", device_map=None)
    tokenizer = load_tokenizer(str(model_dir))
    # "cat.dog.hello" is five tokens for the word-level tokenizer and "hello" one, so the prompts differ in length.
    samples = build_samples(("hello", "cat.dog.hello"), 5, 7)
    prompts = render_prompts(tokenizer, samples, DEFAULT_DATE_STRING)
    sample_ids = [sample.sample_id for sample in samples]
    if batch == "one prompt extends another":
        # The shared part must then stop one token short of the shorter prompt, whose last token still needs a pass.
        prompts, sample_ids = [prompts[0], prompts[0] + " 7"], [sample_ids[0], "extended"]
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    assert len({len(ids) for ids in encoded}) == 2
    shared = shared_prefix_length(encoded)
    if batch == "one prompt extends another":
        assert shared == len(encoded[0]) - 1
    assert shared > 10

    inputs, cache_arguments = _batch_inputs(model, tokenizer, prompts, share_prefix=True)
    (cache,) = cache_arguments.values()
    assert cache.get_seq_length() == shared
    width = inputs["input_ids"].shape[1]
    for ids, mask, own in zip(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist(), encoded):
        assert ids[:shared] + ids[width - (len(own) - shared):] == own
        assert mask == [1] * shared + [0] * (width - len(own)) + [1] * (len(own) - shared)

    settings = dict(layer_indices=[1, 2, 3], end_ids=end_token_ids(model, tokenizer), max_new_tokens=12,
                    storage_dtype="float32", float16_overflow="error", keep_truncated=True)
    with_cache = capture_batch(model, tokenizer, prompts, sample_ids, share_prefix=True, **settings)
    without = capture_batch(model, tokenizer, prompts, sample_ids, share_prefix=False, **settings)
    alone = [capture_batch(model, tokenizer, [prompt], [sample_id], **settings) for prompt, sample_id in zip(prompts, sample_ids)]
    assert with_cache.completions == without.completions == [capture.completions[0] for capture in alone]
    assert with_cache.kept_rows == without.kept_rows
    np.testing.assert_allclose(with_cache.states, without.states, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(with_cache.states, np.concatenate([capture.states for capture in alone]), rtol=RTOL, atol=ATOL)


def test_cache_off_in_generation_config_keeps_rows(llama_dir):
    model = load_model(str(llama_dir), device=torch.device("cpu"), dtype="float32", device_map=None)
    model.generation_config.use_cache = False
    tokenizer = load_tokenizer(str(llama_dir))
    samples = build_samples(("hello", "cat.dog.hello"), 5, 6)
    prompts = render_prompts(tokenizer, samples, DEFAULT_DATE_STRING)
    sample_ids = [sample.sample_id for sample in samples]
    settings = dict(layer_indices=[1, 2, 3], end_ids=end_token_ids(model, tokenizer), max_new_tokens=12,
                    storage_dtype="float32", float16_overflow="error", keep_truncated=True)

    shared = capture_batch(model, tokenizer, prompts, sample_ids, **settings)
    alone = [capture_batch(model, tokenizer, [prompt], [sample_id], **settings) for prompt, sample_id in zip(prompts, sample_ids)]

    assert shared.completions == [capture.completions[0] for capture in alone]
    assert max(len(completion) for completion in shared.completions) > 2
    np.testing.assert_allclose(shared.states, np.concatenate([capture.states for capture in alone]), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", ["sliding window", "state space"])
def test_unsuited_models_share_nothing(kind):
    """A sliding window or a recurrent state would see the padding inside the shared cache, so those models run prompts in full."""
    tokenizer = build_tokenizer(with_pad_token=True)
    torch.manual_seed(0)
    if kind == "sliding window":
        config = MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, sliding_window=16,
                               pad_token_id=tokenizer.pad_token_id)
        model = MistralForCausalLM(config).eval()
    else:
        config = MambaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, state_size=4,
                             pad_token_id=tokenizer.pad_token_id)
        model = MambaForCausalLM(config).eval()
    prompts = render_prompts(tokenizer, build_samples(("hello", "cat.dog.hello"), 5, 5), DEFAULT_DATE_STRING)
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    assert shared_prefix_length(encoded) > 10

    inputs, cache_arguments = _batch_inputs(model, tokenizer, prompts, share_prefix=True)

    assert cache_arguments == {}
    assert inputs["attention_mask"][:, 0].tolist() == [0, 1]  # plain left padding


def test_single_prompt_batch_shares_nothing(llama_dir):
    model = load_model(str(llama_dir), device=torch.device("cpu"), dtype="float32", device_map=None)
    tokenizer = load_tokenizer(str(llama_dir))
    prompts = render_prompts(tokenizer, build_samples(("hello",), 5, 5), DEFAULT_DATE_STRING)
    inputs, cache_arguments = _batch_inputs(model, tokenizer, prompts, share_prefix=True)
    assert cache_arguments == {}
    assert inputs["input_ids"].tolist() == tokenizer(prompts, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize(("count", "batch_size", "sizes"), [
    (450, 64, [56, 56, 57, 56, 56, 57, 56, 56]),
    (12, 5, [4, 4, 4]),
    (65, 64, [32, 33]),
    (64, 64, [64]),
    (3, 1, [1, 1, 1]),
    (0, 8, []),
])
def test_batch_slices_are_even(count, batch_size, sizes):
    slices = batch_slices(count, batch_size)
    assert [part.stop - part.start for part in slices] == sizes
    assert [index for part in slices for index in range(part.start, part.stop)] == list(range(count))


def test_truncated_samples_recorded_not_stored(llama_dataset_dir, llama_dir, tmp_path, caplog):
    manifest = length_probe.load_manifest(llama_dataset_dir)
    truncated = [sample for sample in manifest["samples"] if sample["is_truncated"]]
    assert truncated, "the tiny model should leave some completions unfinished"
    assert manifest["truncated_sample_ids"] == [sample["sample_id"] for sample in truncated]
    for sample in truncated:
        assert sample["completion_length"] == SMALL_PROMPTS["max_new_tokens"]
        assert sample["rows"] == 0
        assert sample["completion_text"]
    stored_ids = set(read_rows(llama_dataset_dir, length_probe.ALL_LAYERS))
    assert stored_ids.isdisjoint(sample["sample_id"] for sample in truncated)
    assert manifest["summary"]["truncated_samples"] == len(truncated)

    with caplog.at_level(logging.INFO, logger="generation"):
        extract(llama_dir, tmp_path / "again")
    assert f"truncated samples  {len(truncated)}" in caplog.text


def test_keep_truncated_flags_rows(llama_dir, tmp_path):
    extract(llama_dir, tmp_path / "kept", keep_truncated=True)
    manifest = length_probe.load_manifest(tmp_path / "kept")
    rows = read_rows(tmp_path / "kept", length_probe.LAST_LAYER)
    for sample in manifest["samples"]:
        row = rows[sample["sample_id"]]
        assert row["is_truncated"].tolist() == [sample["is_truncated"]] * sample["completion_length"]
    assert len(rows) == len(manifest["samples"])


def test_sample_ids_are_stable(llama_dataset_dir):
    manifest = length_probe.load_manifest(llama_dataset_dir)
    ids = [sample["sample_id"] for sample in manifest["samples"]]
    assert ids[:3] == ["hello-005", "hello-006", "hello-007"]
    assert ids[-1] == "dog-012"
    assert len(ids) == len(set(ids)) == 24


def test_metadata_records_layers_and_settings(llama_dataset_dir):
    last = json.loads((llama_dataset_dir / length_probe.LAST_LAYER / "metadata.json").read_text())
    every = json.loads((llama_dataset_dir / length_probe.ALL_LAYERS / "metadata.json").read_text())
    assert last["layers"] == [3]
    assert every["layers"] == [1, 2, 3]
    assert every["hidden_size"] == last["hidden_size"] == 32
    assert every["values_per_row"] == 96
    assert every["final_norm_applied_to_last_block"] is True
    assert every["chat_template_kwargs"] == {"date_string": DEFAULT_DATE_STRING}
    assert every["words"] == ["hello", "cat", "dog"]
    assert every["count_range"] == [5, 12]
    assert every["generation"]["max_new_tokens"] == 20


def test_exact_count_flag(llama_dataset_dir):
    from generation.prompts import is_exact_count

    assert is_exact_count("cat cat cat", "cat", 3, ended=True)
    assert not is_exact_count("cat cat cat", "cat", 3, ended=False)
    assert not is_exact_count("cat cat", "cat", 3, ended=True)
    assert not is_exact_count("cat, cat, cat", "cat", 3, ended=True)
    manifest = length_probe.load_manifest(llama_dataset_dir)
    assert not any(sample["is_exact_count"] for sample in manifest["samples"])  # a random model never counts


def test_rerun_rejects_damaged_finished_run(llama_dir, llama_dataset_dir, tmp_path):
    import shutil

    from generation.errors import ExtractionError

    damaged = tmp_path / "data"
    shutil.copytree(llama_dataset_dir, damaged)
    shard = length_probe.load_manifest(damaged)["configs"][length_probe.ALL_LAYERS]["shards"][0]["file"]
    (damaged / shard).unlink()
    with pytest.raises(ExtractionError, match="no longer match its manifest") as raised:
        extract(llama_dir, damaged)
    assert "python -m generation verify" in str(raised.value)
    assert "--overwrite" in str(raised.value)


def test_empty_date_string_rejected(llama_dir, tmp_path):
    from generation.errors import ExtractionError

    with pytest.raises(ExtractionError, match="the date string is empty"):
        extract(llama_dir, tmp_path / "data", date_string=" ")
