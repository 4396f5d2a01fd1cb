"""The extraction as the original research scripts did it, kept as the benchmarks' point of comparison.

It generates one prompt at a time with `output_hidden_states=True`, copies every step's states to host
memory, keeps every row in Python lists, and saves `.npy` files at the end, split into train and
validation at a row index. The states are saved in the model's compute dtype (float32 on a CPU),
since that is what `tensor.numpy()` gives. Nothing here is used by the extraction itself.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


@torch.inference_mode()
def run_baseline(
    model,
    tokenizer,
    prompts: list[str],
    output_dir: Path,
    *,
    layer_indices: list[int],
    end_ids: list[int],
    max_new_tokens: int,
    validation_fraction: float = 0.1,
    logits_processors=None,
) -> dict:
    """Generate and save the rows of `prompts`; return rows, seconds and bytes written.

    `logits_processors`, when given, contains one LogitsProcessorList (or None) per prompt.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    features: list[np.ndarray] = []
    labels: list[int] = []
    token_ids: list[int] = []

    for index, prompt in enumerate(tqdm(prompts, desc="Baseline", unit="prompt")):
        encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        # Some tokenizers also return token_type_ids, which generate() rejects for a causal LM.
        inputs = {key: encoded[key].to(model.device) for key in ("input_ids", "attention_mask")}
        prompt_length = inputs["input_ids"].shape[1]
        output = model.generate(
            **inputs,
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            eos_token_id=end_ids,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_ids[0],
            output_hidden_states=True,
            return_dict_in_generate=True,
            logits_processor=logits_processors[index] if logits_processors else None,
        )
        generated = output.sequences[0, prompt_length:].tolist()
        length = next((i + 1 for i, token in enumerate(generated) if token in end_ids), len(generated))

        # Every step's states, all layers and (for the prompt pass) all positions, copied to the host.
        host_steps = [[layer.cpu() for layer in step] for step in output.hidden_states]
        for step in range(length):
            row = np.concatenate([host_steps[step][layer][0, -1].float().numpy() for layer in layer_indices])
            features.append(row)
            labels.append(length - 1 - step)
            token_ids.append(generated[step])

    states = np.stack(features)
    remaining = np.array(labels, dtype=np.int32)
    tokens = np.array(token_ids, dtype=np.int64)
    cut = int(len(states) * (1 - validation_fraction))
    arrays = {
        "train_states": states[:cut], "train_remaining": remaining[:cut], "train_token_ids": tokens[:cut],
        "validation_states": states[cut:], "validation_remaining": remaining[cut:],
        "validation_token_ids": tokens[cut:],
    }
    written = 0
    for name, array in arrays.items():
        path = output_dir / f"{name}.npy"
        np.save(path, array)
        written += path.stat().st_size
    return {"rows": len(states), "seconds": time.perf_counter() - started, "bytes_written": written}
