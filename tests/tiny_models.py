"""Tiny causal LMs and tokenizers built offline, for tests.

The models are randomly initialised, so they never learn to stop; `end_bias` raises the end token's
logit so that greedy completions end after a few tokens, at lengths that differ from prompt to prompt,
and some run into a short token limit. That gives the alignment tests ended and truncated samples.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT_PATTERN

SPECIAL_TOKENS = ["<unk>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<pad>"]
WORDS = (
    "system user assistant Cutting Knowledge Date : December 2023 Today Jul Jan 2024 2025 2026 Print exactly "
    "repetitions of the token Do not include anything else . \" hello world cat dog python test apple blue sun code"
).split()

# A Llama 3.2 style template: the system header carries today's date unless `date_string` is passed.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- set date_string = strftime_now('%d %b %Y') %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\nToday Date: ' + date_string + '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)


def build_tokenizer(*, with_pad_token: bool = False, chat_template: str | None = CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """Build a word-level tokenizer whose vocabulary covers the prompts, with numbers 0 to 999 as single tokens."""
    vocabulary = SPECIAL_TOKENS + WORDS + [str(number) for number in range(1000)] + [f"{n:02d}" for n in range(10)]
    vocabulary = list(dict.fromkeys(vocabulary))
    model = models.WordLevel({token: index for index, token in enumerate(vocabulary)}, unk_token="<unk>")
    backend = Tokenizer(model)
    backend.add_special_tokens(SPECIAL_TOKENS)
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        unk_token="<unk>",
        pad_token="<pad>" if with_pad_token else None,
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def build_byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """Build a byte-level BPE tokenizer, trained on the prompt words, that loads unchanged as Qwen2's tokenizer.

    AutoTokenizer loads a Qwen2 model's tokenizer as Qwen2Tokenizer, which rebuilds a byte-level BPE from
    the saved vocabulary and merges with Qwen2's split pattern. The word-level tokenizer above does not
    survive that (it comes back dropping every word), so the Qwen2 fixture uses this one, whose words,
    spaces and digits tokenize the same after the round trip.
    """
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS)] * 3 + list(WORDS) + ["0123456789", "\n\n", ": "]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                        unk_token="<unk>", pad_token="<pad>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(architecture: str, tokenizer, *, seed: int = 0, layers: int = 3, hidden: int = 32, end_bias: float = 4.0):
    """Build a randomly initialised model with an end token that wins greedy decoding now and then."""
    torch.manual_seed(seed)
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    if architecture == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif architecture == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        raise ValueError(f"unknown architecture {architecture!r}: expected llama or qwen2")
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
        head[eot] = head[eot] * end_bias
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=[eot], pad_token_id=tokenizer.pad_token_id
    )
    return model.eval()


def save_tiny_model(directory: Path, architecture: str = "llama", **kwargs) -> Path:
    """Save a tiny model and its tokenizer so they load with from_pretrained, and return the directory."""
    tokenizer = build_byte_level_tokenizer() if architecture == "qwen2" else build_tokenizer()
    model = build_model(architecture, tokenizer, **kwargs)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)
