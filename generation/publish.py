"""`python -m generation push`: publish an extracted dataset to the Hugging Face Hub as Parquet.

Each config is built through `length_probe.build_dataset` and uploaded with the datasets library's own
`DatasetDict.push_to_hub`, one commit per config, so `load_dataset(repo_id, config)` reads it with
any datasets version and without a loading script. A last commit deletes the shards of splits that the
new data no longer has and writes README.md from dataset_card.md (see `generation.hub_card`). Every input
is checked before the first request that changes the repository.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
from pathlib import Path

from length_probe import (
    CONFIG_NAMES,
    DEFAULT_SPLIT_SEED,
    DEFAULT_VALIDATION_FRACTION,
    EXTRACT_HINT,
    DatasetIntegrityError,
    find_problems,
    load_manifest,
)

from .errors import ExtractionError

logger = logging.getLogger(__name__)

DEFAULT_CARD = Path(__file__).resolve().parent.parent / "dataset_card.md"
README = "README.md"
DEFAULT_MAX_SHARD_SIZE = "500MB"
BYTES_PER_ALL_LAYERS_ROW = 86_016 * 2  # 28 layers x 3,072 values of the default model, as float16

# Shard names that push_to_hub writes: <config>/<split>-00000-of-00003.parquet.
SHARD_PATTERN = re.compile(r"^(?P<config>[^/]+)/(?P<split>\w+)-\d{5}-of-\d{5}\.parquet$")
SIZE_PATTERN = re.compile(r"^\s*(\d+)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class PublishError(ExtractionError):
    """A push that cannot start or that the Hub rejected. The message names the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class PushRequest:
    """The checked settings of one push."""

    repo_id: str
    data_dir: Path
    config_names: tuple[str, ...]
    card_text: str
    max_shard_size: int
    private: bool = False
    revision: str | None = None
    cache_dir: str | None = None
    seed: int = DEFAULT_SPLIT_SEED
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION


# ---------------------------------------------------------------- command line


def shard_size(value: str) -> int:
    """Parse a size such as 500MB, 1GiB or 2000000 into bytes, for argparse."""
    match = SIZE_PATTERN.match(value)
    if not match or int(match.group(1)) == 0:
        raise argparse.ArgumentTypeError(
            f"invalid size {value!r}: expected a positive number of bytes, optionally with a unit, e.g. 500MB or 1GiB"
        )
    unit = (match.group(2) or "B").upper()
    return int(match.group(1)) * SIZE_UNITS[unit]


def fraction(value: str) -> float:
    """Parse a validation fraction strictly between 0 and 1, for argparse."""
    try:
        number = float(value)
    except ValueError:
        number = None
    if number is None or not 0.0 < number < 1.0:
        raise argparse.ArgumentTypeError(f"invalid fraction {value!r}: expected a number between 0 and 1, e.g. 0.1")
    return number


def add_push_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "push",
        help="publish an extracted dataset to the Hugging Face Hub as Parquet",
        description="Build each config from a dataset directory, upload it with datasets' push_to_hub "
        "(Parquet shards, splits train and validation), and write the repository's README.md from the "
        "dataset card. Pushing the same data again changes nothing. The token comes from --token, the "
        "HF_TOKEN environment variable or `hf auth login`, and is never printed.",
    )

    parser.add_argument("--repo-id", required=True, help="dataset repository to push to, as user/name or org/name")
    parser.add_argument("--data-dir", type=Path, default=Path("data"),
                        help="a directory written by `python -m generation extract` (default: data)")
    parser.add_argument("--config", default="all", choices=[*CONFIG_NAMES, "all"],
                        help="config to push; all pushes every config the directory has (default: all)")

    parser.add_argument("--private", action="store_true",
                        help="create the repository as private; an existing repository keeps its visibility")
    parser.add_argument("--revision", default=None,
                        help="branch to push to, created from the default branch if missing (default: main)")

    parser.add_argument("--max-shard-size", type=shard_size, default=shard_size(DEFAULT_MAX_SHARD_SIZE),
                        help="largest size of one Parquet shard, measured on the Arrow data before compression, "
                        f"in bytes or with a unit such as MB or GiB (default: {DEFAULT_MAX_SHARD_SIZE}, the datasets "
                        f"default). An all-layers row of 86,016 float16 values is {BYTES_PER_ALL_LAYERS_ROW:,} bytes, "
                        f"so a {DEFAULT_MAX_SHARD_SIZE} shard holds about "
                        f"{shard_size(DEFAULT_MAX_SHARD_SIZE) // BYTES_PER_ALL_LAYERS_ROW:,} rows: a handful of files "
                        "per split for the default prompt set, each small enough to download on its own")
    parser.add_argument("--cache-dir", default=None,
                        help="datasets cache for the built splits (default: the datasets cache, ~/.cache/huggingface/datasets)")

    parser.add_argument("--seed", type=int, default=DEFAULT_SPLIT_SEED,
                        help=f"seed of the train/validation split by sample (default: {DEFAULT_SPLIT_SEED})")
    parser.add_argument("--validation-fraction", type=fraction, default=DEFAULT_VALIDATION_FRACTION,
                        help=f"share of samples that go to validation (default: {DEFAULT_VALIDATION_FRACTION})")

    parser.add_argument("--card", type=Path, default=DEFAULT_CARD,
                        help="dataset card whose prose and YAML keys go into README.md (default: dataset_card.md "
                        "of this repository)")
    parser.add_argument("--token", default=None,
                        help="Hugging Face token with write access (default: HF_TOKEN, then the token that "
                        "`hf auth login` saved). It shows in the process list, so prefer HF_TOKEN")

    parser.set_defaults(handler=run_push)


def run_push(args) -> int:
    """Check the arguments and push. The command line prints a PublishError or DatasetIntegrityError as one line."""
    # Arguments are checked first, then the token, then every shard's sha256, which takes seconds for gigabytes.
    request = check_request(args)
    token = resolve_token(args.token)
    check_shards(request.data_dir, request.config_names)

    from .hub_upload import library_logs, push_dataset

    with library_logs(token, args.log_level):
        push_dataset(request, token)
    return 0


# ---------------------------------------------------------------- checks made before any request


def resolve_token(explicit: str | None) -> str:
    """Return the token from --token, HF_TOKEN or the saved login, or raise PublishError saying how to set one."""
    from huggingface_hub import get_token

    token = explicit or get_token()
    if not token:
        raise PublishError(
            "no Hugging Face token found: log in with `hf auth login` (`huggingface-cli login` with an "
            "older huggingface_hub), set HF_TOKEN, or pass --token"
        )
    return token


def check_repo_id(repo_id: str) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise PublishError(f"invalid --repo-id {repo_id!r}: expected user/name or org/name ({error})") from error
    if "/" not in repo_id:
        raise PublishError(
            f"invalid --repo-id {repo_id!r}: expected user/name or org/name, e.g. your-user/{repo_id}"
        )
    return repo_id


def selected_configs(data_dir: Path, requested: str) -> tuple[str, ...]:
    """Return the configs to push: the requested one, or with "all" every config of the extraction."""
    extracted = load_manifest(data_dir)["configs"]
    if requested == "all":
        names = tuple(name for name in CONFIG_NAMES if name in extracted)
        if not names:
            raise DatasetIntegrityError(
                f"{data_dir} has no length-probe config (found {sorted(extracted)}); make one with `{EXTRACT_HINT}`"
            )
        if names != CONFIG_NAMES:
            logger.info("%s contains only %s, so only that is pushed", data_dir, ", ".join(names))
        return names
    if requested not in extracted:
        raise DatasetIntegrityError(
            f"config {requested!r} not found in {data_dir} (it has {sorted(extracted)}); extract it with "
            f"`{EXTRACT_HINT.replace('all', requested)}` or push one of the configs it has"
        )
    return (requested,)


def check_shards(data_dir: Path, config_names: tuple[str, ...]) -> None:
    """Raise a one-line DatasetIntegrityError on the first problem that `verify` would report."""
    problems = find_problems(data_dir, config_names)
    if problems:
        raise DatasetIntegrityError(
            f"{len(problems)} problem(s) in {data_dir}, nothing was uploaded; the first: {problems[0]}. "
            f"Run `python -m generation verify {data_dir}` for all of them"
        )


def check_card(card_path: Path) -> str:
    """Return the text of the dataset card after checking that its YAML header parses."""
    from .hub_card import CardError, parse_card

    try:
        text = card_path.read_text(encoding="utf-8")
    except OSError as error:
        raise PublishError(f"dataset card {str(card_path)!r} unreadable ({error}); pass an existing file with --card") from error
    try:
        parse_card(text, str(card_path))
    except CardError as error:
        raise PublishError(str(error)) from error
    return text


def check_request(args) -> PushRequest:
    """Check every argument that needs no network, cheapest first, and return the push settings.

    The shards' checksums are left to `check_shards`.
    """
    repo_id = check_repo_id(args.repo_id)
    data_dir = Path(args.data_dir)
    config_names = selected_configs(data_dir, args.config)
    card_text = check_card(args.card)
    return PushRequest(
        repo_id=repo_id,
        data_dir=data_dir,
        config_names=config_names,
        card_text=card_text,
        private=args.private,
        revision=args.revision,
        max_shard_size=args.max_shard_size,
        cache_dir=args.cache_dir,
        seed=args.seed,
        validation_fraction=args.validation_fraction,
    )

