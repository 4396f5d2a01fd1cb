"""The prompt set: one instruction, asked for every pair of word and count."""

from __future__ import annotations

import dataclasses
import hashlib

from length_probe import sample_id_for

PROMPT_TEMPLATE = 'Print exactly {count} repetitions of the token "{word}". Do not include anything else.'
DEFAULT_WORDS = ("hello", "world", "cat", "dog", "python", "test", "apple", "blue", "sun", "code")
DEFAULT_MIN_COUNT = 5
DEFAULT_MAX_COUNT = 49

# Llama 3.x chat templates write today's date into the system header unless `date_string` is passed,
# so every prompt is rendered with this fixed date. It is the templates' own fallback date.
DEFAULT_DATE_STRING = "26 Jul 2024"


@dataclasses.dataclass(frozen=True)
class Sample:
    """One prompt of the set: the instruction for `count` repetitions of `word`."""

    word: str
    count: int

    @property
    def sample_id(self) -> str:
        return sample_id_for(self.word, self.count)

    @property
    def message(self) -> str:
        return PROMPT_TEMPLATE.format(count=self.count, word=self.word)


def build_samples(words: tuple[str, ...], min_count: int, max_count: int) -> list[Sample]:
    """List the samples in their canonical order: words as given, then counts ascending."""
    return [Sample(word, count) for word in words for count in range(min_count, max_count + 1)]


def render_prompts(tokenizer, samples: list[Sample], date_string: str) -> list[str]:
    """Render each sample's message with the tokenizer's chat template and its generation prompt."""
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": sample.message}],
            add_generation_prompt=True,
            tokenize=False,
            date_string=date_string,
        )
        for sample in samples
    ]


def chat_template_sha256(tokenizer) -> str:
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = "\n".join(f"{key}:{value}" for key, value in sorted(template.items()))
    return hashlib.sha256((template or "").encode("utf-8")).hexdigest()


def is_exact_count(completion_text: str, word: str, count: int, ended: bool) -> bool:
    """Tell whether a completion is exactly `count` repetitions of `word` separated by white space, then an end token."""
    return ended and completion_text.split() == [word] * count
