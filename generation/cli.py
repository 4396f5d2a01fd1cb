"""Make, check, report on and publish a dataset of per-token hidden states labelled with the tokens left to write.

Command line: `python -m generation {extract,verify,report,push}`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from length_probe import ALL_LAYERS, CONFIG_NAMES, LAST_LAYER, DatasetIntegrityError

from .config import COMPUTE_DTYPES, DEFAULT_MODEL, OVERFLOW_POLICIES, ExtractionConfig
from .errors import ExtractionError
from .prompts import DEFAULT_DATE_STRING, DEFAULT_MAX_COUNT, DEFAULT_MIN_COUNT, DEFAULT_WORDS

logger = logging.getLogger("generation")

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr, with exit status 2."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def config_names(value: str) -> tuple[str, ...]:
    return CONFIG_NAMES if value == "all" else (value,)


def add_extract_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "extract",
        help="generate completions and write per-token hidden states as Arrow shards",
        description="Generate greedy completions for the prompt set and write one row per generated token. "
        "Re-running the same command after an interruption resumes it.",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"Hub id or local directory of a causal LM with a chat template, or 'demo' "
                        f"for the small offline model in this repository (default: {DEFAULT_MODEL})")
    parser.add_argument("--config", default="all", choices=[*CONFIG_NAMES, "all"],
                        help=f"{LAST_LAYER}: the last layer; {ALL_LAYERS}: every decoder layer concatenated; "
                        "all: both from one generation pass (default: all)")
    parser.add_argument("--output-dir", type=Path, required=True, help="directory for shards, metadata and manifest")
    parser.add_argument("--batch-size", type=int, default=64, help="prompts generated together (default: 64)")
    parser.add_argument("--no-shared-prefix", dest="share_prompt_prefix", action="store_false",
                        help="run every prompt's tokens in full, instead of running the tokens that begin every "
                        "prompt of a batch once and reusing their key-value cache; the rows are the same either "
                        "way, to float rounding")
    parser.add_argument("--device", default="auto",
                        help="auto, cpu, cuda, cuda:N or mps (default: auto, which picks a GPU if present)")
    parser.add_argument("--device-map", choices=["auto"], default=None,
                        help="'auto' spreads a model that does not fit one GPU over all visible GPUs (needs accelerate)")
    parser.add_argument("--dtype", choices=COMPUTE_DTYPES, default="auto",
                        help="compute dtype; auto is bfloat16 on a GPU that supports it, else float32")
    parser.add_argument("--storage-dtype", choices=["float16", "float32"], default="float16",
                        help="dtype of stored hidden states; float16 halves the size (default: float16)")
    parser.add_argument("--float16-overflow", choices=OVERFLOW_POLICIES, default="error",
                        help="a value beyond ±65504 with float16 storage: 'error' stops with the sample and layer, "
                        "'clip' saturates it and counts it in the manifest (default: error)")
    parser.add_argument("--max-new-tokens", type=int, default=200,
                        help="token limit per completion; completions that reach it are truncated and their rows "
                        "left out unless --keep-truncated (default: 200)")
    parser.add_argument("--words", nargs="+", default=list(DEFAULT_WORDS),
                        help=f"words of the prompt set (default: {' '.join(DEFAULT_WORDS)})")
    parser.add_argument("--min-count", type=int, default=DEFAULT_MIN_COUNT,
                        help=f"smallest requested count (default: {DEFAULT_MIN_COUNT})")
    parser.add_argument("--max-count", type=int, default=DEFAULT_MAX_COUNT,
                        help=f"largest requested count, inclusive (default: {DEFAULT_MAX_COUNT})")
    parser.add_argument("--date-string", default=DEFAULT_DATE_STRING,
                        help=f"date passed to the chat template, so prompts do not change with the day "
                        f"(default: {DEFAULT_DATE_STRING!r})")
    parser.add_argument("--keep-truncated", action="store_true",
                        help="keep rows of completions that never ended, flagged is_truncated; their "
                        "remaining_tokens is then only a lower bound")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete an extraction already in --output-dir and start over")


def run_extract(args) -> int:
    config = ExtractionConfig(
        model=args.model,
        device=args.device,
        device_map=args.device_map,
        dtype=args.dtype,
        words=tuple(args.words),
        min_count=args.min_count,
        max_count=args.max_count,
        date_string=args.date_string,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        share_prompt_prefix=args.share_prompt_prefix,
        output_dir=args.output_dir,
        configs=config_names(args.config),
        storage_dtype=args.storage_dtype,
        float16_overflow=args.float16_overflow,
        keep_truncated=args.keep_truncated,
        overwrite=args.overwrite,
    )
    # Imported only after the settings pass their checks, so an invalid option is reported at once
    # rather than after the seconds that importing torch and transformers takes.
    from .extract import run_extraction

    run_extraction(config)
    return 0


def add_verify_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="check a dataset directory against its manifest",
        description="Check every shard's size, sha256, row count and schema, look for files unknown to the "
        "manifest and for NaN or infinite values, and report every problem found.",
    )
    parser.add_argument("data_dir", type=Path, help="a directory written by extract")
    parser.add_argument("--skip-values", action="store_true", help="skip the scan for NaN and infinite values")


def run_verify(args) -> int:
    from length_probe import find_problems

    problems = find_problems(args.data_dir, check_values=not args.skip_values)
    if problems:
        for problem in problems:
            print(f"problem: {problem}", file=sys.stderr)
        print(f"{args.data_dir}: {len(problems)} problem(s) found", file=sys.stderr)
        return EXIT_ERROR
    print(f"{args.data_dir}: OK")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m generation", description=__doc__)
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    subparsers = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    add_extract_parser(subparsers)
    add_verify_parser(subparsers)
    try:
        from .report import add_report_parser

        add_report_parser(subparsers)
    except ImportError:
        pass
    try:
        from .publish import add_push_parser

        add_push_parser(subparsers)
    except ImportError:
        pass
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers = {"extract": run_extract, "verify": run_verify}
    try:
        if args.command in handlers:
            return handlers[args.command](args)
        return args.handler(args)
    except (ExtractionError, DatasetIntegrityError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        if args.command == "extract":
            # Also printed when no batch had finished yet, for example during the model load.
            message = "interrupted; every batch finished so far is kept. Re-run the same command to resume"
            print(message, file=sys.stderr)
        else:
            print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
