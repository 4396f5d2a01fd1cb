"""Train the offline demo chat model stored in generation/demo_model/.

No machine that runs length-probe's tests can download Llama-3.2-3B-Instruct, so
this script builds a stand-in that answers the length-probe prompts
(`Print exactly {count} repetitions of the token "{word}". ...`) the way an
instruction-tuned model does: the word `count` times, separated by spaces,
then `<|eot_id|>`.

The stand-in copies the parts of Llama 3.2 that length-probe depends on.
The tokenizer is a byte-level BPE that splits text with the Llama 3 regular
expression, so numbers become groups of up to 3 digits, and it has the Llama 3
special tokens. The chat template writes the same system header and handles
the date the same way. The model is a `LlamaForCausalLM` with rotary position
embeddings, trained from scratch on synthetic conversations with wider
counts, more words and random dates than the dataset uses. The training
dates leave out the dataset's pinned date, so none of the 450 dataset prompts
is ever a training prompt.

Besides the answer-token cross-entropy, training fits a linear head that
reads the tokens left to write from the final hidden state (see
`--count-loss-weight`). A 1000-step run without that head also answered all
450 dataset prompts exactly, but a ridge probe on its final hidden states
reached only R^2 = 0.75 on held-out prompts, below the 0.9 that length-probe's
demo expects. The head is not saved.

Run from the repository root:

    time python scripts/train_demo_model.py

With the defaults it wrote 2.97 MB in 3 min 47 s of wall time (`time`, 2 CPU
cores with no other load, torch 2.13 CPU). With other jobs on the same 2
cores, an earlier version of this configuration took up to 17.5 min. Two runs
with the same seed, torch version and thread count wrote byte-identical
files.
"""

import argparse
import datetime
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|begin_of_text|>"
START_HEADER_TOKEN = "<|start_header_id|>"
END_HEADER_TOKEN = "<|end_header_id|>"
EOT_TOKEN = "<|eot_id|>"
PAD_TOKEN = "<|finetune_right_pad_id|>"
SPECIAL_TOKENS = [BOS_TOKEN, START_HEADER_TOKEN, END_HEADER_TOKEN, EOT_TOKEN, PAD_TOKEN]

# The pre-tokenizer pattern of Llama 3 (the same as tiktoken's cl100k_base):
# letters stay together with at most one leading non-letter, and digits split
# into groups of 1 to 3.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Llama 3.2 style: a system block with the knowledge cutoff and today's date,
# where the date comes from `date_string` when the caller passes one and from
# the renderer's `strftime_now` otherwise. Renderers without `strftime_now`
# get the fixed date Llama 3.2's template uses for that case.
CHAT_TEMPLATE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}
{{- 'Cutting Knowledge Date: December 2023\\n' }}
{{- 'Today Date: ' + date_string + '\\n\\n' }}
{{- system_message }}
{{- '<|eot_id|>' }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

PROMPT_TEMPLATE = 'Print exactly {count} repetitions of the token "{word}". Do not include anything else.'

# The prompts length-probe's dataset is built from, and the date it pins.
DATASET_WORDS = ["hello", "world", "cat", "dog", "python", "test", "apple", "blue", "sun", "code"]
DATASET_COUNTS = range(5, 50)
DATASET_DATE = "26 Jul 2024"

# Training uses many more words and a wider count range than the dataset, so
# the model has to read the word and the count instead of recalling prompts.
EXTRA_WORDS = """
red green house tree river stone moon star fish bird book door car road rain
snow fire water light dark music paper pencil table chair window garden flower
cloud ocean mountain bread milk coffee tea sugar salt lemon orange banana grape
cherry king queen robot train plane ship horse mouse lion tiger bear wolf fox
frog duck egg box cup key ring bell drum song game ball data file node loop
byte city
""".split()
TRAIN_WORDS = DATASET_WORDS + EXTRA_WORDS
MIN_TRAIN_COUNT = 1
MAX_TRAIN_COUNT = 80
MICRO_BATCHES = 4
FIRST_TRAIN_DATE = datetime.date(2020, 1, 1)
LAST_TRAIN_DATE = datetime.date(2030, 12, 31)


@dataclass(frozen=True)
class Example:
    """One synthetic conversation: the prompt ids and the answer ids (ending with eot)."""

    word: str
    count: int
    prompt_ids: list[int]
    answer_ids: list[int]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=Path("generation/demo_model"),
                        help="folder the model and tokenizer files are written to (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the synthetic conversations and the weight initialisation (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=64, help="conversations per optimizer step (default: %(default)s)")
    parser.add_argument("--learning-rate", type=float, default=3e-3, help="peak AdamW learning rate (default: %(default)s)")
    parser.add_argument("--hidden-size", type=int, default=128, help="model width (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=3, help="decoder layers (default: %(default)s)")
    parser.add_argument("--heads", type=int, default=4, help="attention heads per layer (default: %(default)s)")
    parser.add_argument("--intermediate-size", type=int, default=256, help="MLP width (default: %(default)s)")
    parser.add_argument("--count-loss-weight", type=float, default=1.0,
                        help="weight of the auxiliary loss that reads the tokens left to write from the final hidden state; "
                             "0 turns it off (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads; the output depends on it (default: %(default)s)")
    parser.add_argument("--eval-every", type=int, default=100, help="steps between validation checks (default: %(default)s)")
    return parser.parse_args()


def render_prompt(tokenizer: PreTrainedTokenizerFast, word: str, count: int, date_string: str) -> str:
    messages = [{"role": "user", "content": PROMPT_TEMPLATE.format(count=count, word=word)}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, date_string=date_string)


def expected_answer(word: str, count: int) -> str:
    return " ".join([word] * count)


def bpe_training_texts() -> list[str]:
    """Return texts whose pre-tokens must each become one token.

    The BPE trainer merges until no pair is left, so every pre-token in these
    texts (template words, each word with and without a leading space, every
    month and number of up to 3 digits) ends up as a single token.
    """
    texts = [
        "system\n\nuser\n\nassistant\n\n",
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n",
        "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec",
    ]
    for word in TRAIN_WORDS:
        texts.append(PROMPT_TEMPLATE.format(count=1, word=word))
        texts.append(f"{word} {word}")
    # Every string of 1 to 3 digits, leading zeros included, as Llama 3 has.
    for width in (1, 2, 3):
        texts.extend(f"{number:0{width}d}" for number in range(10**width))
    return texts


def build_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=100_000,  # a ceiling only: merging stops when no pair is left
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(bpe_training_texts(), trainer)

    # Added after training so, as in Llama 3, the special tokens follow the BPE vocabulary.
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )

    fast_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOT_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=512,
    )
    fast_tokenizer.chat_template = CHAT_TEMPLATE
    check_tokenizer(fast_tokenizer)
    return fast_tokenizer


def check_tokenizer(tokenizer: PreTrainedTokenizerFast) -> None:
    """Raise ValueError when a word, number or dataset prompt does not tokenize as designed."""
    for word in TRAIN_WORDS:
        for text in (word, " " + word):
            ids = tokenizer.encode(text, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"word {text!r} tokenizes into {len(ids)} tokens {ids}; expected 1. Add it to bpe_training_texts().")
    for number in range(1000):
        ids = tokenizer.encode(str(number), add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"number {number} tokenizes into {len(ids)} tokens {ids}; expected 1. Check the digit strings in bpe_training_texts().")

    prompt = render_prompt(tokenizer, "hello", 17, DATASET_DATE)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    if tokenizer.decode(ids) != prompt:
        raise ValueError(f"prompt does not round-trip through the tokenizer: {prompt!r} decodes as {tokenizer.decode(ids)!r}; "
                         "check the pre-tokenizer and decoder")
    answer = expected_answer("hello", 3)
    if tokenizer.decode(tokenizer.encode(answer, add_special_tokens=False)) != answer:
        raise ValueError(f"answer text {answer!r} does not round-trip through the tokenizer; check the ByteLevel decoder")


def make_example(tokenizer: PreTrainedTokenizerFast, word: str, count: int, date_string: str) -> Example:
    prompt_ids = tokenizer.encode(render_prompt(tokenizer, word, count, date_string), add_special_tokens=False)
    answer_ids = tokenizer.encode(expected_answer(word, count), add_special_tokens=False)
    answer_ids.append(tokenizer.convert_tokens_to_ids(EOT_TOKEN))
    return Example(word, count, prompt_ids, answer_ids)


def random_example(tokenizer: PreTrainedTokenizerFast, rng: random.Random) -> Example:
    word = rng.choice(TRAIN_WORDS)
    count = rng.randint(MIN_TRAIN_COUNT, MAX_TRAIN_COUNT)
    date_string = DATASET_DATE
    # The dataset's pinned date is left out, so no dataset prompt is ever a training prompt.
    while date_string == DATASET_DATE:
        day = FIRST_TRAIN_DATE + datetime.timedelta(days=rng.randint(0, (LAST_TRAIN_DATE - FIRST_TRAIN_DATE).days))
        date_string = day.strftime("%d %b %Y")
    return make_example(tokenizer, word, count, date_string)


def dataset_examples(tokenizer: PreTrainedTokenizerFast) -> list[Example]:
    return [make_example(tokenizer, word, count, DATASET_DATE) for word in DATASET_WORDS for count in DATASET_COUNTS]


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad a batch into input ids, attention mask and labels (-100 outside the answers)."""
    length = max(len(e.prompt_ids) + len(e.answer_ids) for e in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    for row, example in enumerate(examples):
        ids = example.prompt_ids + example.answer_ids
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, len(example.prompt_ids) : len(ids)] = torch.tensor(example.answer_ids)
    return input_ids, attention_mask, labels


def answer_positions(model: LlamaForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the final hidden states, targets and tokens left to write at the positions that predict answer tokens.

    The tokens left to write count the target itself, so the position before
    the first answer token has `count + 1` (the words and eot) and the one
    before eot has 1.
    """
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    targets = labels[:, 1:]
    predicting = targets != -100
    # Counting answer positions from the right gives the tokens left to write.
    tokens_left = predicting.flip(1).cumsum(1).flip(1)
    return hidden[:, :-1][predicting], targets[predicting], tokens_left[predicting]


@torch.no_grad()
def teacher_forced_exact_rate(model: LlamaForCausalLM, examples: list[Example], pad_id: int) -> float:
    """Return the share of examples whose every answer token is the argmax given the true prefix.

    That is the same event as greedy decoding writing the exact answer, so it
    is a fast stand-in for generation during training.
    """
    model.eval()
    exact = 0
    for start in range(0, len(examples), 64):
        batch = examples[start : start + 64]
        input_ids, attention_mask, labels = collate(batch, pad_id)
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        predictions = logits[:, :-1].argmax(-1)
        targets = labels[:, 1:]
        wrong = ((predictions != targets) & (targets != -100)).any(dim=1)
        exact += int((~wrong).sum())
    model.train()
    return exact / len(examples)


@torch.no_grad()
def greedy_exact_rate(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, max_new_tokens: int = 200) -> float:
    """Generate greedily for each dataset prompt, one at a time, and return the share answered exactly."""
    model.eval()
    exact = 0
    examples = dataset_examples(tokenizer)
    for example in tqdm(examples, desc="greedy check", leave=False):
        input_ids = torch.tensor([example.prompt_ids])
        output = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                max_new_tokens=max_new_tokens)
        new_ids = output[0, input_ids.shape[1]:].tolist()
        if new_ids == example.answer_ids:
            exact += 1
        else:
            logger.debug("wrong answer for count=%d word=%r: %r", example.count, example.word, tokenizer.decode(new_ids))
    return exact / len(examples)


def build_model(args: argparse.Namespace, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config)


def learning_rate_schedule(steps: int) -> Callable[[int], float]:
    """Return a LambdaLR factor: linear warmup over 5% of the steps, then cosine decay to 5% of the peak."""
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(progress * math.pi))

    return factor


def train(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, args: argparse.Namespace,
          rng: random.Random) -> float:
    """Train on fresh random conversations each step and return the last step's language-model loss.

    The loss is the cross-entropy of the answer tokens plus, weighted by
    `--count-loss-weight`, the squared error of a linear head that reads the
    tokens left to write from the final hidden state. The head is discarded
    after training.
    """
    validation = [random_example(tokenizer, rng) for _ in range(256)]
    pad_id = tokenizer.pad_token_id
    count_head = torch.nn.Linear(model.config.hidden_size, 1)
    parameters = list(model.parameters()) + list(count_head.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=args.learning_rate, weight_decay=0.01, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_schedule(args.steps))
    model.train()
    language_loss_value = float("nan")
    progress_bar = tqdm(range(args.steps), desc="training")
    for step in progress_bar:
        batch = [random_example(tokenizer, rng) for _ in range(args.batch_size)]
        # Grouping conversations of similar length into micro-batches cuts the
        # padding. On 2 idle cores that took a step from 0.44 s to 0.31 s.
        batch.sort(key=lambda example: len(example.prompt_ids) + len(example.answer_ids))
        micro_batches = [batch[i * len(batch) // MICRO_BATCHES : (i + 1) * len(batch) // MICRO_BATCHES]
                         for i in range(MICRO_BATCHES)]
        answer_tokens = sum(len(example.answer_ids) for example in batch)

        optimizer.zero_grad(set_to_none=True)
        language_loss_sum = 0.0
        count_loss_sum = 0.0
        for micro_batch in micro_batches:
            if not micro_batch:
                continue
            hidden, targets, tokens_left = answer_positions(model, *collate(micro_batch, pad_id))
            language_loss = F.cross_entropy(model.lm_head(hidden), targets, reduction="sum")
            predicted_left = count_head(hidden).squeeze(-1)
            count_loss = F.mse_loss(predicted_left, tokens_left / MAX_TRAIN_COUNT, reduction="sum")
            ((language_loss + args.count_loss_weight * count_loss) / answer_tokens).backward()
            language_loss_sum += language_loss.item()
            count_loss_sum += count_loss.item()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()

        language_loss_value = language_loss_sum / answer_tokens
        progress_bar.set_postfix(loss=f"{language_loss_value:.4f}", count_loss=f"{count_loss_sum / answer_tokens:.4f}")
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            rate = teacher_forced_exact_rate(model, validation, pad_id)
            logger.info("step %d: language loss %.5f, count loss %.5f, exact answers on %d random validation prompts %.1f%%",
                        step + 1, language_loss_value, count_loss_sum / answer_tokens, len(validation), 100 * rate)
    return language_loss_value


@torch.no_grad()
def probe_r2(model: LlamaForCausalLM, examples: list[Example], pad_id: int, held_out: int = 90,
             ridge: float = 1e-3) -> float:
    """Fit a ridge regression from final hidden states to tokens left to write; return R^2 on held-out prompts.

    The split is by prompt (a fixed shuffle), so no held-out token shares a
    conversation with a training token.
    """
    model.eval()
    features, labels, prompt_index = [], [], []
    for start in range(0, len(examples), 64):
        batch = examples[start : start + 64]
        input_ids, attention_mask, batch_labels = collate(batch, pad_id)
        hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1]
        predicting = batch_labels[:, 1:] != -100
        tokens_left = predicting.flip(1).cumsum(1).flip(1)
        rows = torch.arange(start, start + len(batch)).unsqueeze(1).expand_as(predicting)
        features.append(hidden[predicting].double())
        labels.append(tokens_left[predicting].double())
        prompt_index.append(rows[predicting])
    model.train()
    x = torch.cat(features)
    y = torch.cat(labels)
    prompts = torch.cat(prompt_index)

    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(0))
    test = torch.isin(prompts, order[:held_out])
    x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    x_train, y_train = x[~test], y[~test]
    gram = x_train.T @ x_train + ridge * torch.eye(x.shape[1], dtype=x.dtype)
    weights = torch.linalg.solve(gram, x_train.T @ y_train)
    residual = y[test] - x[test] @ weights
    return float(1 - residual.pow(2).sum() / (y[test] - y[test].mean()).pow(2).sum())


def save(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, output_dir: Path) -> int:
    """Write model, tokenizer and generation config; return the bytes written."""
    output_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids(EOT_TOKEN)],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)

    # transformers 5 writes its own class name, TokenizersBackend, which
    # transformers 4.x cannot resolve. Both major versions load the name that
    # Llama 3 checkpoints use.
    config_path = output_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return sum(path.stat().st_size for path in output_dir.iterdir() if path.is_file())


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    tokenizer = build_tokenizer()
    logger.info("tokenizer: %d tokens, bos=%d eot=%d pad=%d", len(tokenizer), tokenizer.bos_token_id,
                tokenizer.eos_token_id, tokenizer.pad_token_id)
    model = build_model(args, tokenizer)
    parameters = sum(p.numel() for p in model.parameters())
    logger.info("model: %d parameters", parameters)

    final_loss = train(model, tokenizer, args, rng)
    rate = greedy_exact_rate(model, tokenizer)
    r2 = probe_r2(model, dataset_examples(tokenizer), tokenizer.pad_token_id)
    bytes_written = save(model, tokenizer, args.output_dir)
    seconds = time.perf_counter() - started

    summary = [
        "demo model summary",
        f"  output dir         {args.output_dir}",
        f"  architecture       LlamaForCausalLM, {args.layers} layers, hidden {args.hidden_size}, "
        f"{args.heads} heads, MLP {args.intermediate_size}, vocab {len(tokenizer)}, {parameters} parameters",
        f"  steps              {args.steps} x {args.batch_size} conversations",
        f"  final loss         {final_loss:.5f} (answer-token cross-entropy, last step)",
        f"  exact-count rate   {100 * rate:.1f}% of {len(DATASET_WORDS) * len(DATASET_COUNTS)} dataset prompts (greedy)",
        f"  probe R^2          {r2:.3f} (ridge on final hidden states, tokens left to write, 90 held-out prompts)",
        f"  seconds            {seconds:.0f}",
        f"  bytes written      {bytes_written}",
    ]
    logger.info("\n".join(summary))


if __name__ == "__main__":
    main()
