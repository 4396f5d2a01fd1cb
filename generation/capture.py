"""Greedy generation of one batch and the hidden states behind every generated token.

Row alignment, the part most worth getting right: `generate(..., output_hidden_states=True)` returns,
for generation step t, the hidden states of the forward pass that produced token g_t. Step 0 is the
prompt pass, whose last position is the last prompt token; step t > 0 is the pass over g_{t-1}. So row t
of a completion is the last position of step t, and a completion of n tokens (its end token included)
has rows 0 … n-1 with `remaining_tokens` n - 1 - t.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os

import numpy as np
import torch

from .errors import Float16OverflowError, NonFiniteHiddenStateError

logger = logging.getLogger(__name__)

FLOAT16_MAX = float(torch.finfo(torch.float16).max)
STORAGE_TORCH_DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclasses.dataclass
class BatchCapture:
    """The completions of one batch and the hidden states of their kept rows.

    `states` has shape [rows, layers, hidden]: the kept samples' rows, sample after sample, in batch order.
    """

    completions: list[list[int]]  # token ids, the end token included when there is one
    truncated: list[bool]  # the completion reached max_new_tokens without an end token
    kept_rows: list[int]  # rows of each sample in `states`; 0 for a truncated sample left out
    states: np.ndarray
    clipped_values: list[int]  # values saturated at the float16 limit, per sample


@torch.inference_mode()
def capture_batch(
    model,
    tokenizer,
    prompts: list[str],
    sample_ids: list[str],
    *,
    layer_indices: list[int],
    end_ids: list[int],
    max_new_tokens: int,
    storage_dtype: str,
    float16_overflow: str,
    keep_truncated: bool,
    logits_processor=None,
    share_prefix: bool = True,
) -> BatchCapture:
    """Generate greedily for a batch of rendered prompts and capture the hidden states of every step.

    With `share_prefix`, the tokens that begin every prompt of the batch run through the model once, and
    generate() starts from a copy of their key-value cache in each row (see `_batch_inputs`).
    """
    inputs, cache_arguments = _batch_inputs(model, tokenizer, prompts, share_prefix)
    prompt_length = inputs["input_ids"].shape[1]
    output = model.generate(
        **inputs,
        **cache_arguments,
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        eos_token_id=end_ids,
        pad_token_id=tokenizer.pad_token_id,
        # With use_cache off in a checkpoint's generation config, rows after step 0 came out different from
        # one prompt at a time once a shared cache was passed, so the cache is always on.
        use_cache=True,
        output_hidden_states=True,
        return_dict_in_generate=True,
        logits_processor=logits_processor,
    )
    generated = output.sequences[:, prompt_length:].cpu()
    steps = generated.shape[1]

    completions, truncated = _split_completions(generated, end_ids, max_new_tokens)
    lengths = torch.tensor([len(tokens) for tokens in completions])
    keep = torch.tensor([keep_truncated or not cut for cut in truncated])
    rows_per_sample = torch.where(keep, lengths, torch.zeros_like(lengths))

    # [batch, steps, layers, hidden], still on the model's device
    states = torch.stack(
        [torch.stack([output.hidden_states[t][layer][:, -1, :] for layer in layer_indices], dim=1) for t in range(steps)],
        dim=1,
    )
    valid = torch.arange(steps)[None, :] < rows_per_sample[:, None]
    valid = valid.to(states.device)
    # Every generated step is checked, not only the kept rows, because a model that produces NaN may never
    # emit its end token. Leaving out its truncated completions would then hide the fault.
    generated_steps = (torch.arange(steps)[None, :] < lengths[:, None]).to(states.device)

    _check_finite(states, generated_steps, sample_ids, layer_indices)
    clipped = [0] * len(prompts)
    if storage_dtype == "float16":
        states, clipped = _fit_float16(states, valid, sample_ids, layer_indices, float16_overflow)

    kept = states[valid].to(STORAGE_TORCH_DTYPES[storage_dtype]).cpu().numpy()
    return BatchCapture(completions, truncated, rows_per_sample.tolist(), kept, clipped)


def shared_prefix_length(encoded: list[list[int]]) -> int:
    """Count the leading tokens that every tokenized prompt of a batch has in common, leaving each at least one."""
    # The token left outside the shared part is the one whose pass gives row 0's hidden state.
    return max(min(len(os.path.commonprefix(encoded)), min(len(ids) for ids in encoded) - 1), 0)


def _batch_inputs(model, tokenizer, prompts: list[str], share_prefix: bool) -> tuple[dict, dict]:
    """Tokenize a batch for generate(), and run the prompts' shared leading tokens once when allowed.

    Every prompt starts with the same chat header (32 of the demo model's 51 tokens). When they are shared,
    each row is laid out as shared tokens, then padding, then the row's own tokens, so that every prompt
    still ends at the last position. generate() derives position ids from the attention mask, so each
    token keeps the position it has in its unpadded prompt, and the masked padding changes no state.
    Without sharing this is plain left padding. Returns the tensors and the keyword argument that passes
    the cache to generate() (empty without sharing).
    """
    encoded = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    cache_keyword, cache = _empty_shareable_cache(model) if share_prefix and len(prompts) > 1 else (None, None)
    shared = shared_prefix_length(encoded) if cache is not None else 0

    own = [ids[shared:] for ids in encoded]
    width = max(len(ids) for ids in own)
    pad_id = tokenizer.pad_token_id
    input_ids = torch.tensor([encoded[0][:shared] + [pad_id] * (width - len(ids)) + ids for ids in own])
    attention_mask = torch.tensor([[1] * shared + [0] * (width - len(ids)) + [1] * len(ids) for ids in own])
    inputs = {"input_ids": input_ids.to(model.device), "attention_mask": attention_mask.to(model.device)}
    if not shared:
        return inputs, {}

    model(input_ids=inputs["input_ids"][:1, :shared], use_cache=True, logits_to_keep=1, **{cache_keyword: cache})
    cache.batch_repeat_interleave(len(prompts))
    return inputs, {cache_keyword: cache}


def _empty_shareable_cache(model) -> tuple[str | None, object | None]:
    """Return the forward() argument name for a key-value cache and an empty cache, or (None, None).

    Sharing needs a cache of plain full-attention layers. A sliding window counts cache slots, so the
    padding in the middle of a row would shorten that row's window. Linear-attention and state-space
    layers carry a recurrent state, which the padding would change. Such models run every prompt in full.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    supports_dynamic = getattr(model, "_supports_default_dynamic_cache", lambda: True)()
    custom_cache = getattr(model.generation_config, "cache_implementation", None) not in (None, "dynamic")
    if model.config.is_encoder_decoder or not supports_dynamic or custom_cache:
        return None, None
    parameters = inspect.signature(model.forward).parameters
    # transformers 5.25 calls the argument cache and warns that past_key_values, the older name, goes in 5.40.
    # NOTE: the shared cache is tested with transformers 5.25 only; earlier 5.x releases are untested.
    keyword = next((name for name in ("cache", "past_key_values") if name in parameters), None)
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    if keyword is None or not all(type(layer) is DynamicLayer for layer in cache.layers):
        return None, None
    return keyword, cache


def _split_completions(generated: torch.Tensor, end_ids: list[int], max_new_tokens: int):
    """Cut each row of generated ids after its first end token; rows without one are truncated."""
    is_end = torch.isin(generated, torch.tensor(end_ids))
    completions, truncated = [], []
    for row, ends in zip(generated.tolist(), is_end.tolist()):
        if True in ends:
            completions.append(row[: ends.index(True) + 1])
            truncated.append(False)
        else:
            # generate() stops early only when every sequence has ended, so this row is max_new_tokens long
            completions.append(row[:max_new_tokens])
            truncated.append(True)
    return completions, truncated


def _check_finite(states: torch.Tensor, valid: torch.Tensor, sample_ids: list[str], layer_indices: list[int]):
    nonfinite = (~torch.isfinite(states)).any(dim=-1) & valid[:, :, None]  # [batch, steps, layers]
    if bool(nonfinite.any()):
        batch_index, step, layer_position = (int(i) for i in nonfinite.nonzero()[0])
        raise NonFiniteHiddenStateError(
            f"the model produced a NaN or infinite hidden state for sample {sample_ids[batch_index]!r} "
            f"at step {step}, layer {layer_indices[layer_position]} (index into hidden_states); "
            "nothing was stored for this batch. Try --dtype float32, or check the model's weights"
        )


def _fit_float16(states, valid, sample_ids, layer_indices, policy):
    """Raise on values beyond the float16 range, or saturate them when the policy is "clip"."""
    magnitude = states.abs().masked_fill(~valid[:, :, None, None], 0)
    too_large = magnitude > FLOAT16_MAX  # [batch, steps, layers, hidden]
    if not bool(too_large.any()):
        return states, [0] * states.shape[0]
    if policy != "clip":
        batch_index, step, layer_position, _ = (int(i) for i in too_large.nonzero()[0])
        peak = float(magnitude[batch_index, :, layer_position].max())
        raise Float16OverflowError(
            f"hidden state value {peak:.4g} of sample {sample_ids[batch_index]!r} at step {step}, layer "
            f"{layer_indices[layer_position]} (index into hidden_states) exceeds the float16 maximum "
            f"{FLOAT16_MAX:.0f}; store with --storage-dtype float32, or pass --float16-overflow clip to saturate"
        )
    clipped = too_large.flatten(1).sum(dim=1).tolist()
    for sample_id, count in zip(sample_ids, clipped):
        if count:
            logger.warning("Clipped %d hidden-state values of sample %r to the float16 range", count, sample_id)
    return states.clamp(-FLOAT16_MAX, FLOAT16_MAX), [int(count) for count in clipped]
