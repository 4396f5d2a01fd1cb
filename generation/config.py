"""The settings of one extraction run, checked where they are built and saved beside the shards."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from length_probe import ALL_LAYERS, CONFIG_NAMES, LAST_LAYER, STORAGE_DTYPES

from .errors import ExtractionError
from .prompts import DEFAULT_DATE_STRING, DEFAULT_MAX_COUNT, DEFAULT_MIN_COUNT, DEFAULT_WORDS, PROMPT_TEMPLATE

DEFAULT_MODEL = "meta-llama/Llama-3.2-3B-Instruct"
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")
OVERFLOW_POLICIES = ("error", "clip")
WORD_PATTERN = re.compile(r"^[^\s\"]+$")


@dataclasses.dataclass
class ExtractionConfig:
    """Settings of one extraction.

    The fields marked "resume key" are compared with `run.json` when an interrupted run is resumed,
    because changing any of them would mix two different datasets in one directory.
    """

    # ---- model
    model: str = DEFAULT_MODEL  # resume key: a Hub id, a local directory, or "demo"
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", "mps"
    device_map: str | None = None  # "auto" spreads a model too large for one device over all of them
    dtype: str = "auto"  # resume key (resolved): compute dtype; auto is bfloat16 on GPU, float32 on CPU

    # ---- prompts (resume keys)
    words: tuple[str, ...] = DEFAULT_WORDS
    min_count: int = DEFAULT_MIN_COUNT
    max_count: int = DEFAULT_MAX_COUNT
    date_string: str = DEFAULT_DATE_STRING

    # ---- generation
    max_new_tokens: int = 200  # resume key
    batch_size: int = 64
    # Run the tokens that begin every prompt of a batch once and copy their key-value cache to each row.
    # Not a resume key: rows agree with unshared runs to float rounding, as they do across batch sizes.
    share_prompt_prefix: bool = True

    # ---- output
    output_dir: Path = Path("data")
    configs: tuple[str, ...] = CONFIG_NAMES  # resume key
    storage_dtype: str = "float16"  # resume key
    float16_overflow: str = "error"  # resume key: "error" stops the run, "clip" saturates at ±65504
    keep_truncated: bool = False  # resume key: keep rows of completions that never ended
    overwrite: bool = False  # delete an existing extraction in output_dir and start over

    def __post_init__(self):
        self.words = tuple(self.words)
        self.configs = tuple(dict.fromkeys(self.configs))
        self.output_dir = Path(self.output_dir)
        if not self.words:
            raise ExtractionError("the word list is empty; pass at least one word, e.g. --words hello world")
        for word in self.words:
            if not WORD_PATTERN.match(word):
                raise ExtractionError(f"invalid word {word!r}: a word must be non-empty, without spaces or double quotes")
        if len(set(self.words)) != len(self.words):
            raise ExtractionError(f"the word list {list(self.words)} repeats a word; list each word once")
        if not (1 <= self.min_count <= self.max_count):
            raise ExtractionError(
                f"invalid count range {self.min_count}..{self.max_count}: "
                "expected 1 <= --min-count <= --max-count, e.g. --min-count 5 --max-count 49"
            )
        if not self.date_string.strip():
            raise ExtractionError(
                "the date string is empty; pass the date the chat template should show, e.g. --date-string '26 Jul 2024'"
            )
        if self.max_new_tokens < 1:
            raise ExtractionError(f"invalid --max-new-tokens {self.max_new_tokens}: expected at least 1")
        if self.batch_size < 1:
            raise ExtractionError(f"invalid --batch-size {self.batch_size}: expected at least 1, e.g. --batch-size 32")
        if not self.configs or any(name not in CONFIG_NAMES for name in self.configs):
            raise ExtractionError(
                f"unknown config in {list(self.configs)}: expected {LAST_LAYER}, {ALL_LAYERS} or all"
            )
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ExtractionError(
                f"invalid storage dtype {self.storage_dtype!r}: expected one of {sorted(STORAGE_DTYPES)}"
            )
        if self.dtype not in COMPUTE_DTYPES:
            raise ExtractionError(f"invalid dtype {self.dtype!r}: expected one of {list(COMPUTE_DTYPES)}")
        if self.float16_overflow not in OVERFLOW_POLICIES:
            raise ExtractionError(
                f"invalid float16 overflow policy {self.float16_overflow!r}: expected one of {list(OVERFLOW_POLICIES)}"
            )
        if self.device_map not in (None, "auto"):
            raise ExtractionError(f"invalid device map {self.device_map!r}: the only supported value is 'auto'")

    @property
    def sample_count(self) -> int:
        return len(self.words) * (self.max_count - self.min_count + 1)

    @property
    def captures_all_layers(self) -> bool:
        return ALL_LAYERS in self.configs

    def resume_key(self, *, resolved_dtype: str, chat_template_sha256: str) -> dict:
        """Return the settings that an interrupted run must share with the run that resumes it."""
        return {
            "model": self.model,
            "dtype": resolved_dtype,
            "prompt_template": PROMPT_TEMPLATE,
            "words": list(self.words),
            "min_count": self.min_count,
            "max_count": self.max_count,
            "date_string": self.date_string,
            "chat_template_sha256": chat_template_sha256,
            "max_new_tokens": self.max_new_tokens,
            "configs": list(self.configs),
            "storage_dtype": self.storage_dtype,
            "float16_overflow": self.float16_overflow,
            "keep_truncated": self.keep_truncated,
        }
