"""Loading the model and tokenizer, and the facts about them that the dataset records."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .errors import ExtractionError

logger = logging.getLogger(__name__)

DEMO_MODEL_NAME = "demo"
DEMO_MODEL_DIR = Path(__file__).parent / "demo_model"
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(model: str) -> str:
    """Map "demo" to the committed demo model and check that a local-looking path exists."""
    if model == DEMO_MODEL_NAME:
        return str(DEMO_MODEL_DIR)
    looks_local = model.startswith((".", "/", "~")) or Path(model).expanduser().exists() or model.count("/") > 1
    if looks_local and not Path(model).expanduser().is_dir():
        raise ExtractionError(
            f"model path {model!r} not found; pass an existing model directory, a Hub id such as "
            "meta-llama/Llama-3.2-3B-Instruct, or --model demo"
        )
    return str(Path(model).expanduser()) if looks_local else model


def resolve_device(device: str, *, local_rank: int = 0) -> torch.device:
    """Turn the --device option into a torch device, raising when it is not available here."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as error:
        raise ExtractionError(f"invalid device {device!r} ({error}); use cpu, cuda, cuda:N or mps") from error
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ExtractionError(f"device {device!r} is not available: torch sees no CUDA GPU; use --device cpu")
        index = resolved.index if resolved.index is not None else local_rank
        if index >= torch.cuda.device_count():
            raise ExtractionError(
                f"device {device!r} is not available: torch sees {torch.cuda.device_count()} CUDA GPU(s)"
            )
        return torch.device("cuda", index)
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ExtractionError(f"device {device!r} is not available on this machine; use --device cpu")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """Pick the compute dtype: bfloat16 on a GPU that supports it, float32 elsewhere, unless one is given."""
    if dtype != "auto":
        return dtype
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


def load_tokenizer(model: str):
    """Load the tokenizer, pad on the left for batched generation, and require a chat template."""
    from transformers import AutoTokenizer

    path = resolve_model_path(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ExtractionError(
            f"failed to load the tokenizer of {model!r}: {error}. Pass a local model directory, "
            "a Hub id you can download, or --model demo"
        ) from error
    if not tokenizer.chat_template:
        raise ExtractionError(
            f"the tokenizer of {model!r} has no chat template, so the prompts cannot be rendered; "
            "use an instruction-tuned model whose tokenizer_config.json defines chat_template"
        )
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        # Llama 3 tokenizers have no pad token. Padding is masked out, so any id will do; the end token
        # is what generate() also falls back to.
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("The tokenizer has no pad token; padding with %r", tokenizer.eos_token)
    return tokenizer


def load_model(model: str, *, device: torch.device, dtype: str, device_map: str | None):
    """Load the causal LM in evaluation mode on `device`, or across devices with device_map="auto"."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(model)
    kwargs = {"dtype": TORCH_DTYPES[dtype]}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        loaded = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        raise ExtractionError(
            f"failed to load model {model!r}: {error}. Pass a local model directory, a Hub id you can "
            "download, or --model demo"
        ) from error
    if device_map is None:
        loaded.to(device)
    loaded.eval()
    return loaded


def end_token_ids(model, tokenizer) -> list[int]:
    """List every id that ends a completion: the generation config's end ids, else the tokenizer's."""
    configured = model.generation_config.eos_token_id
    if configured is None:
        configured = tokenizer.eos_token_id
    if configured is None:
        raise ExtractionError("the model defines no end-of-sequence token, so completions could never end")
    ids = [configured] if isinstance(configured, int) else list(configured)
    return sorted(set(int(i) for i in ids))


def describe_model(model, model_name: str) -> dict:
    """Return the facts about a model that the metadata records."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return {
        "model": model_name,
        "architecture": type(model).__name__,
        "num_hidden_layers": int(config.num_hidden_layers),
        "hidden_size": int(config.hidden_size),
        "vocab_size": int(config.vocab_size),
    }
