"""Checks on the committed offline demo model in generation/demo_model/."""

import datetime
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

MODEL_DIR = Path(__file__).resolve().parents[1] / "generation" / "demo_model"
PROMPT_TEMPLATE = 'Print exactly {count} repetitions of the token "{word}". Do not include anything else.'
PINNED_DATE = "26 Jul 2024"

# Dataset prompts at both ends of the count range 5..49 and in between, with different words.
GENERATION_CASES = [("hello", 5), ("python", 49), ("apple", 23), ("sun", 37)]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    loaded = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
    loaded.eval()
    return loaded


def user_messages(word: str, count: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": PROMPT_TEMPLATE.format(count=count, word=word)}]


def render(tokenizer, word: str, count: int, **kwargs) -> str:
    return tokenizer.apply_chat_template(user_messages(word, count), add_generation_prompt=True, tokenize=False, **kwargs)


def test_model_is_llama(model):
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.model_type == "llama"


def test_tokenizer_is_fast(tokenizer):
    assert isinstance(tokenizer, PreTrainedTokenizerFast)


def test_files_under_5_mb():
    sizes = {path.name: path.stat().st_size for path in MODEL_DIR.iterdir() if path.is_file()}
    assert "model.safetensors" in sizes
    assert "tokenizer.json" in sizes
    assert sum(sizes.values()) < 5 * 1024 * 1024, sizes


def test_special_token_ids(tokenizer, model):
    eot_id = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    bos_id = tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
    assert tokenizer.eos_token_id == eot_id
    assert tokenizer.bos_token_id == bos_id
    assert tokenizer.pad_token_id not in (eot_id, bos_id, None)
    assert model.generation_config.eos_token_id in (eot_id, [eot_id])
    assert model.generation_config.do_sample is False


def test_template_pinned_date(tokenizer):
    text = render(tokenizer, "cat", 7, date_string=PINNED_DATE)

    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")
    assert "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>" in text
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_template_today_date(tokenizer):
    before = datetime.date.today().strftime("%d %b %Y")
    text = render(tokenizer, "cat", 7)
    after = datetime.date.today().strftime("%d %b %Y")

    # Two readings cover a render that runs across midnight.
    assert f"Today Date: {before}\n" in text or f"Today Date: {after}\n" in text, text


def test_prompt_round_trips(tokenizer):
    text = render(tokenizer, "dog", 12, date_string=PINNED_DATE)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]

    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids
    assert ids.count(tokenizer.bos_token_id) == 1


def test_words_and_numbers_single_tokens(tokenizer):
    for text in ["hello", " hello", "python", " python", "5", "49", "999"]:
        assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) == 1, text


@pytest.mark.parametrize(("word", "count"), GENERATION_CASES)
def test_greedy_exact_count(tokenizer, model, word, count):
    text = render(tokenizer, word, count, date_string=PINNED_DATE)
    input_ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    expected_text = " ".join([word] * count)
    expected_ids = tokenizer(expected_text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    with torch.no_grad():
        output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False, max_new_tokens=200)
    new_ids = output[0, input_ids.shape[1]:].tolist()

    assert tokenizer.decode(new_ids, skip_special_tokens=True) == expected_text
    assert new_ids == expected_ids
