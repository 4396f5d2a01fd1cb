"""A logits processor that makes an untrained model write completions of realistic lengths.

A randomly initialised model rarely or never picks its end token, so its completions all run to the
token limit, and their speed tells little about a trained model's. This processor masks the
end tokens until a sample's completion is `count + extra_tokens - 1` tokens long and then forces the
first end token, so each completion is `count + extra_tokens` tokens with the end token included,
close to what an instruction-tuned model writes for "Print exactly {count} repetitions ...".
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList


class ForcedLengthProcessor(LogitsProcessor):
    """Force each row's completion to end at its target length, counting the end token.

    `vocab_limit`, when set, masks token ids at or above it, so a model whose embedding table is larger
    than its tokenizer (a stand-in tokenizer for a real model's configuration) only writes ids that the
    tokenizer can decode.
    """

    def __init__(self, target_lengths: list[int], end_ids: list[int], vocab_limit: int | None = None):
        if min(target_lengths) < 1:
            raise ValueError(f"invalid target lengths {target_lengths}: every completion needs at least the end token")
        self.target_lengths = torch.tensor(target_lengths)
        self.end_ids = torch.tensor(end_ids)
        self.vocab_limit = vocab_limit
        self.prompt_length: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        # generate() left-pads the batch and calls this once per new token, starting with the prompt alone,
        # so the number of tokens written so far is the growth of input_ids since the first call.
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        written = input_ids.shape[1] - self.prompt_length
        device = scores.device
        targets = self.target_lengths.to(device)
        end_ids = self.end_ids.to(device)

        scores = scores.clone()
        if self.vocab_limit is not None and self.vocab_limit < scores.shape[1]:
            scores[:, self.vocab_limit :] = -float("inf")
        not_yet = written < targets - 1
        scores[not_yet.nonzero(as_tuple=True)[0][:, None], end_ids[None, :]] = -float("inf")
        due = (written >= targets - 1).nonzero(as_tuple=True)[0]
        if due.numel():
            scores[due] = -float("inf")
            scores[due, end_ids[0]] = 0.0
        return scores


def completion_lengths(counts: list[int], extra_tokens: int) -> list[int]:
    """Return the forced completion length of each count: the repetitions plus `extra_tokens`, end token included."""
    if extra_tokens < 1:
        raise ValueError(f"invalid extra_tokens {extra_tokens}: at least 1 is needed for the end token")
    return [count + extra_tokens for count in counts]


def forced_length_factory(end_ids: list[int], extra_tokens: int, vocab_limit: int | None = None):
    """Build the `logits_processor_factory` that `run_extraction` calls with each batch of samples."""

    def factory(samples) -> LogitsProcessorList:
        lengths = completion_lengths([sample.count for sample in samples], extra_tokens)
        return LogitsProcessorList([ForcedLengthProcessor(lengths, end_ids, vocab_limit)])

    return factory
