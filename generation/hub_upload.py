"""The part of `python -m generation push` that builds the configs and talks to the Hub.

It builds every config, uploads each with push_to_hub, deletes stale shards and writes README.md.
`generation.publish` calls it only after every argument has passed its checks.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

from datasets import DatasetDict
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, DatasetCard, HfApi
from huggingface_hub.errors import HfHubHTTPError, RemoteEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

from length_probe import build_dataset

from .hub_card import CardError, can_set_default, default_config, merge_card, parse_card
from .publish import README, SHARD_PATTERN, PublishError, PushRequest

try:
    # huggingface_hub 2.4 sends requests with httpx2 and exports it under this name, which its utils module keeps
    # across major versions. Its HTTPError is the base of both HfHubHTTPError and connection errors.
    from huggingface_hub.utils import httpx

    HTTP_ERRORS: tuple[type[Exception], ...] = (httpx.HTTPError,)
except ImportError:  # NOTE: assumes a huggingface_hub without that export sends requests with `requests`. Untested.
    import requests

    HTTP_ERRORS = (requests.RequestException,)

logger = logging.getLogger(__name__)

LIBRARY_LOGGERS = ("huggingface_hub", "datasets")
HTTP_CLIENT_LOGGERS = ("httpx", "httpx2", "httpcore")
REDACTED = "<TOKEN>"


class RedactFilter(logging.Filter):
    """A handler filter that replaces a secret in every formatted message."""

    def __init__(self, secret: str):
        super().__init__()
        self.secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self.secret in message:
            record.msg = message.replace(self.secret, REDACTED)
            record.args = ()
        return True


@contextlib.contextmanager
def library_logs(token: str, level: str) -> Iterator[None]:
    """Route huggingface_hub and datasets records at `level` through the root handlers, with the token masked.

    Both libraries log at WARNING through a handler of their own by default. Here their records go
    through the command line's handlers only, so --log-level DEBUG shows their requests once and in the
    command's format. The HTTP client logs every request URL at INFO, presigned upload URLs included, so
    it stays at WARNING unless the level is DEBUG. huggingface_hub masks the Authorization header itself.
    The filter masks the token anywhere else a message could contain it.
    """
    root = logging.getLogger()
    redact = RedactFilter(token)
    levels = {name: level for name in LIBRARY_LOGGERS}
    levels.update({name: level if level == "DEBUG" else "WARNING" for name in HTTP_CLIENT_LOGGERS})
    saved = {}
    for name, new_level in levels.items():
        library_logger = logging.getLogger(name)
        saved[name] = (library_logger.level, list(library_logger.handlers))
        if root.handlers:
            for handler in saved[name][1]:
                library_logger.removeHandler(handler)
        library_logger.setLevel(new_level)
    handlers = root.handlers + [handler for _, kept in saved.values() for handler in kept]
    for handler in handlers:
        handler.addFilter(redact)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(redact)
        for name, (saved_level, saved_handlers) in saved.items():
            library_logger = logging.getLogger(name)
            library_logger.setLevel(saved_level)
            for handler in saved_handlers:
                if handler not in library_logger.handlers:
                    library_logger.addHandler(handler)


def one_line(error: Exception, token: str) -> str:
    """Return the error's message on one line, without the token or a final period."""
    return " ".join(str(error).replace(token, REDACTED).split()).rstrip(".")


def check_token(api: HfApi, token: str) -> None:
    """Ask the Hub whose token it is, so a rejected token stops the push before the first upload."""
    try:
        identity = api.whoami()
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else None
        if status == 401:
            raise PublishError(
                f"the Hugging Face token was rejected by {api.endpoint} (401 Unauthorized); make a token with "
                "write access at https://huggingface.co/settings/tokens, then log in again with `hf auth login` "
                "or set HF_TOKEN"
            ) from error
        raise PublishError(f"token check at {api.endpoint} failed: {one_line(error, token)}") from error
    except HTTP_ERRORS as error:
        raise PublishError(
            f"connection to {api.endpoint} failed ({one_line(error, token)}); check the network and HF_ENDPOINT"
        ) from error
    logger.info("Pushing as %s to %s", identity.get("name", "an unnamed user"), api.endpoint)


def read_hub_readme(api: HfApi, repo_id: str, revision: str | None) -> str | None:
    """Return the text of the repository's README.md at `revision`, or None when the repository or README is missing.

    A branch that does not exist yet is read from the default branch, which push_to_hub copies into it.
    """
    try:
        path = api.hf_hub_download(repo_id, README, repo_type="dataset", revision=revision)
    except RevisionNotFoundError:
        if revision is None:
            return None
        return read_hub_readme(api, repo_id, None)
    except (RepositoryNotFoundError, RemoteEntryNotFoundError):
        return None
    return Path(path).read_text(encoding="utf-8")


def parse_hub_readme(text: str | None, repo_id: str) -> DatasetCard | None:
    if text is None:
        return None
    try:
        return parse_card(text, f"{README} of {repo_id}")
    except CardError as error:
        raise PublishError(f"{error}; fix or delete it on the Hub, then push again") from error


def push_order(request: PushRequest, card_default: str | None) -> list[str]:
    """Put the card's default config first, so push_to_hub can mark it before other configs are listed."""
    return sorted(request.config_names, key=lambda name: name != card_default)


def stale_shards(repo_files: list[str], pushed_splits: dict[str, list[str]]) -> list[str]:
    """List the Parquet shards of pushed configs whose split the new data no longer has.

    push_to_hub replaces the shards of the splits it pushes, but leaves a split it did not push.
    """
    stale = []
    for path in repo_files:
        match = SHARD_PATTERN.match(path)
        if match and match["config"] in pushed_splits and match["split"] not in pushed_splits[match["config"]]:
            stale.append(path)
    return stale


def build_configs(request: PushRequest) -> dict[str, DatasetDict]:
    built = {}
    for name in request.config_names:
        logger.info("Building %s from %s", name, request.data_dir)
        built[name] = build_dataset(
            name,
            request.data_dir,
            cache_dir=request.cache_dir,
            seed=request.seed,
            validation_fraction=request.validation_fraction,
        )
    return built


def upload_configs(api: HfApi, request: PushRequest, token: str, card: DatasetCard, built: dict[str, DatasetDict]) -> None:
    card_default = default_config(card)
    hub_card = parse_hub_readme(read_hub_readme(api, request.repo_id, request.revision), request.repo_id)
    may_set_default = can_set_default(hub_card)
    for name in push_order(request, card_default):
        dataset = built[name]
        sizes = ", ".join(f"{split}: {len(dataset[split])} rows" for split in dataset)
        logger.info("Pushing %s to %s (%s)", name, request.repo_id, sizes)
        dataset.push_to_hub(
            request.repo_id,
            config_name=name,
            set_default=(name == card_default and may_set_default) or None,
            commit_message=f"Upload {name}",
            private=request.private,
            token=token,
            revision=request.revision,
            max_shard_size=request.max_shard_size,
        )


def finish_repository(api: HfApi, request: PushRequest, card: DatasetCard, built: dict[str, DatasetDict]) -> None:
    """Delete shards of splits that are gone and write README.md, in one commit or none when nothing changed."""
    repo_files = api.list_repo_files(request.repo_id, repo_type="dataset", revision=request.revision)
    stale = stale_shards(repo_files, {name: list(dataset) for name, dataset in built.items()})
    hub_text = read_hub_readme(api, request.repo_id, request.revision)
    readme = merge_card(card, parse_hub_readme(hub_text, request.repo_id), request.repo_id)

    operations: list[CommitOperationAdd | CommitOperationDelete] = [CommitOperationDelete(path) for path in stale]
    if readme != hub_text:
        operations.append(CommitOperationAdd(README, readme.encode("utf-8")))
    if not operations:
        logger.info("%s is up to date; no commit needed", README)
        return
    for path in stale:
        logger.info("Deleting %s: its split is not in the new data", path)
    api.create_commit(
        request.repo_id,
        operations,
        commit_message="Update dataset card" if not stale else "Delete stale splits and update dataset card",
        repo_type="dataset",
        revision=request.revision,
    )


def push_dataset(request: PushRequest, token: str) -> None:
    """Build every requested config, push each, then delete stale shards and write README.md.

    Raises PublishError when the Hub rejects a request or cannot be reached.
    """
    card = parse_card(request.card_text, "dataset card")
    api = HfApi(token=token)
    check_token(api, token)
    # Built before the first upload, so a config that fails to build stops the push with nothing sent.
    built = build_configs(request)
    try:
        upload_configs(api, request, token, card, built)
        finish_repository(api, request, card, built)
    except HTTP_ERRORS as error:
        raise PublishError(
            f"push to {request.repo_id} failed: {one_line(error, token)}. Commits made before the failure stay; "
            "re-run the same command to finish"
        ) from error
    where = f"{api.endpoint}/datasets/{request.repo_id}" + (f" (branch {request.revision})" if request.revision else "")
    logger.info("Published %s to %s", ", ".join(request.config_names), where)
