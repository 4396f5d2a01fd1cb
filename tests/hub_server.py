"""Local stand-in for the Hugging Face Hub HTTP API, for tests that cannot reach the Hub.

The server implements the routes that huggingface_hub (2.4) and datasets (3.6 and 5.2) call to
create repositories, upload files through the Git LFS batch API (basic transfer), commit,
list trees and download files. It stores every commit as a directory of real files, so tests
can inspect the history. Only the standard library is used.

Start it in-process with ``HubServer(root, tokens={"hf_token": "user"})`` as a context manager,
or by hand with ``python tests/hub_server.py --root DIR``.

Clients must run with ``HF_HUB_DISABLE_XET=1``, because huggingface_hub 2.4 uploads LFS files through
Xet whenever hf_xet is installed, without asking the server first. This stand-in has no Xet storage.

Routes, where {type}s is models, datasets or spaces and {prefix} is empty for models:

    GET    /api/whoami-v2
    POST   /api/repos/create, DELETE /api/repos/delete, POST /api/validate-yaml
    GET    /api/{type}s/{repo}[/revision/{rev}]          repository info
    GET    /api/{type}s/{repo}/tree/{rev}[/{path}]       ?recursive, ?expand, cursor pagination
    POST   /api/{type}s/{repo}/paths-info/{rev}
    GET    /api/{type}s/{repo}/refs, /commits/{rev}
    POST   /api/{type}s/{repo}/branch/{name}, and DELETE on the same URL
    PUT    /api/{type}s/{repo}/settings
    POST   /api/{type}s/{repo}/preupload/{rev}, /commit/{rev}
    POST   /{prefix}{repo}.git/info/lfs/objects/batch, /verify
    PUT    /-/lfs/upload/{sha256}?size=&expires=&signature=   upload URL handed out by the batch route
    GET    /{prefix}{repo}/resolve/{rev}/{path}          also HEAD, with Range support
    GET    /api/{type}s/{repo}/xet-(read|write)-token/{rev}   returns 501, because Xet is not supported

Any other route gets a 404 and is logged and recorded in HubServer.unhandled_requests.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import dataclasses
import fnmatch
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

logger = logging.getLogger(__name__)

REPO_TYPES = ("model", "dataset", "space")
# URL path segment in front of a repository id, as the Hub spells it: models have none.
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
API_COLLECTIONS = {"models": "model", "datasets": "dataset", "spaces": "space"}

DEFAULT_BRANCH = "main"
DEFAULT_USER = "stand-in-user"

# The Hub rejects files above 10 MiB that are not stored with LFS, so the stand-in stores them with LFS.
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024

# Page sizes of the Hub's tree listing, as the huggingface_hub 2.4 docstring of _iter_repo_tree_pages states.
TREE_PAGE_SIZE = 1000
TREE_PAGE_SIZE_EXPANDED = 50
COMMITS_PAGE_SIZE = 50

# Upload URLs handed out by the LFS batch endpoint stay valid this long, in seconds.
UPLOAD_URL_LIFETIME = 3600

# Paths under this prefix belong to the stand-in and never to a repository: no namespace starts with "-".
INTERNAL_PREFIX = "/-/"

COPY_CHUNK_SIZE = 1024 * 1024

# Extensions stored with LFS in a new repository, through the .gitattributes of its first commit.
INITIAL_LFS_PATTERNS = (
    "*.arrow",
    "*.bin",
    "*.gz",
    "*.h5",
    "*.npy",
    "*.npz",
    "*.onnx",
    "*.parquet",
    "*.pkl",
    "*.pt",
    "*.pth",
    "*.safetensors",
    "*.tar",
    "*.zip",
    "*.zst",
)

REPO_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
COMMIT_ID_PATTERN = re.compile(r"^[0-9a-f]{40}$")
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")


class HubError(Exception):
    """An error sent to the client as a Hub-style JSON body with X-Error-Code and X-Error-Message headers."""

    def __init__(
        self, status: int, message: str, error_code: str | None = None, headers: Mapping[str, str] | None = None
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = dict(headers or {})


def repo_not_found(repo_type: str, repo_id: str) -> HubError:
    return HubError(404, f"{repo_type.capitalize()} repository {repo_id!r} not found", "RepoNotFound")


def revision_not_found(revision: str) -> HubError:
    return HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


def utc_now_iso() -> str:
    """Return the current UTC time in the Hub's date format, e.g. 2024-01-31T12:00:00.000Z."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


# --- Git object ids -------------------------------------------------------------------------------
# The stand-in computes real git object ids, so they look and behave like the Hub's ids.
# A regular file's oid is its git blob sha1, which huggingface_hub compares with its own git_hash().


def git_object_id(kind: str, body: bytes) -> str:
    return hashlib.sha1(f"{kind} {len(body)}\0".encode() + body).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """Build the Git LFS pointer file that git stores in place of an LFS file."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def git_tree_id(files: Mapping[str, "FileEntry"], directory: str = "") -> str:
    """Compute the git tree id of `directory` (empty for the root) from a commit's file entries."""
    prefix = f"{directory}/" if directory else ""
    children: dict[str, tuple[str, str]] = {}
    for path, entry in files.items():
        if not path.startswith(prefix):
            continue
        name, slash, _ = path[len(prefix) :].partition("/")
        if slash:
            children[name] = ("40000", "")
        else:
            children[name] = ("100644", entry.oid)

    body = b""
    # Git sorts tree entries by name, with directory names compared as if they ended in "/".
    for name in sorted(children, key=lambda n: n + "/" if children[n][0] == "40000" else n):
        mode, oid = children[name]
        if mode == "40000":
            oid = git_tree_id(files, prefix + name)
        body += f"{mode} {name}\0".encode() + bytes.fromhex(oid)
    return git_object_id("tree", body)


# --- Storage --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FileEntry:
    """A file in a commit: its git blob oid, its size and, for LFS files, the sha256 of the content."""

    path: str
    size: int
    oid: str
    sha256: str | None = None
    pointer_size: int | None = None

    @property
    def is_lfs(self) -> bool:
        return self.sha256 is not None

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "oid": self.oid, "sha256": self.sha256, "pointerSize": self.pointer_size}

    @classmethod
    def from_json(cls, path: str, data: Mapping[str, Any]) -> FileEntry:
        return cls(path, data["size"], data["oid"], data.get("sha256"), data.get("pointerSize"))

    @classmethod
    def regular(cls, path: str, content: bytes) -> FileEntry:
        return cls(path, len(content), git_object_id("blob", content))

    @classmethod
    def lfs(cls, path: str, sha256: str, size: int) -> FileEntry:
        pointer = lfs_pointer(sha256, size)
        return cls(path, size, git_object_id("blob", pointer), sha256, len(pointer))


@dataclasses.dataclass(frozen=True)
class CommitRecord:
    """One commit of a repository, as the stand-in stored it."""

    id: str
    parents: tuple[str, ...]
    title: str
    message: str
    author: str
    date: str
    added: tuple[str, ...]
    modified: tuple[str, ...]
    deleted: tuple[str, ...]

    @property
    def changed_paths(self) -> tuple[str, ...]:
        return tuple(sorted(self.added + self.modified + self.deleted))


@dataclasses.dataclass(frozen=True)
class Operation:
    """One line of a commit request: kind is "file", "lfsFile", "deletedFile" or "deletedFolder"."""

    kind: str
    path: str
    content: bytes | None = None
    sha256: str | None = None
    size: int | None = None


class RepoStore:
    """Repositories on disk, one directory per commit.

    Layout under `root`::

        lfs/<sha256>                                   LFS objects uploaded through the batch API
        repos/<type>s/<namespace>/<name>/repo.json     owner, visibility, branches and tags
        repos/.../commits/<id>.json                    commit metadata and the list of its files
        repos/.../snapshots/<id>/<path>                the files of the commit (hard links where possible)

    The LFS store is shared by all repositories, unlike the Hub's, so an object uploaded to one
    repository counts as already uploaded for every other.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self._lock = threading.RLock()
        self._files_cache: dict[tuple[Path, str], dict[str, FileEntry]] = {}
        self._history_cache: dict[tuple[Path, str], list[CommitRecord]] = {}
        (self.root / "repos").mkdir(parents=True, exist_ok=True)
        (self.root / "lfs").mkdir(parents=True, exist_ok=True)

    # Repositories

    def repo_dir(self, repo_type: str, repo_id: str) -> Path:
        namespace, name = repo_id.split("/")
        return self.root / "repos" / f"{repo_type}s" / namespace / name

    def exists(self, repo_type: str, repo_id: str) -> bool:
        return (self.repo_dir(repo_type, repo_id) / "repo.json").is_file()

    def load_meta(self, repo_type: str, repo_id: str) -> dict[str, Any]:
        path = self.repo_dir(repo_type, repo_id) / "repo.json"
        try:
            with self._lock:
                return json.loads(path.read_text())
        except FileNotFoundError:
            raise repo_not_found(repo_type, repo_id) from None

    def _save_meta(self, repo_type: str, repo_id: str, meta: Mapping[str, Any]) -> None:
        write_atomic(self.repo_dir(repo_type, repo_id) / "repo.json", json.dumps(meta, indent=1).encode())

    def create(self, repo_type: str, repo_id: str, owner: str, private: bool) -> bool:
        """Create a repository whose first commit contains .gitattributes, or return False if it exists."""
        with self._lock:
            if self.exists(repo_type, repo_id):
                return False
            repo_dir = self.repo_dir(repo_type, repo_id)
            (repo_dir / "commits").mkdir(parents=True)
            (repo_dir / "snapshots").mkdir()
            meta = {"owner": owner, "private": private, "createdAt": utc_now_iso(), "branches": {}, "tags": {}}
            self._save_meta(repo_type, repo_id, meta)
            gitattributes = "".join(f"{glob} filter=lfs diff=lfs merge=lfs -text\n" for glob in INITIAL_LFS_PATTERNS)
            operations = [Operation("file", ".gitattributes", content=gitattributes.encode())]
            self._write_commit(repo_type, repo_id, DEFAULT_BRANCH, None, owner, "initial commit", "", operations)
            logger.info("Created %s repository %s (private=%s)", repo_type, repo_id, private)
            return True

    def delete(self, repo_type: str, repo_id: str) -> None:
        with self._lock:
            if not self.exists(repo_type, repo_id):
                raise repo_not_found(repo_type, repo_id)
            repo_dir = self.repo_dir(repo_type, repo_id)
            shutil.rmtree(repo_dir)
            # A repository created again under the same id may reuse commit ids, so drop its cached commits.
            for cache in (self._files_cache, self._history_cache):
                for key in [key for key in cache if key[0] == repo_dir]:
                    del cache[key]
            logger.info("Deleted %s repository %s", repo_type, repo_id)

    def set_private(self, repo_type: str, repo_id: str, private: bool) -> None:
        with self._lock:
            meta = self.load_meta(repo_type, repo_id)
            meta["private"] = private
            self._save_meta(repo_type, repo_id, meta)

    # Revisions

    def resolve(self, repo_type: str, repo_id: str, revision: str) -> str:
        """Return the commit id that a branch, tag, full ref name or commit id points to."""
        meta = self.load_meta(repo_type, repo_id)
        for prefix, refs in (("refs/heads/", meta["branches"]), ("refs/tags/", meta["tags"])):
            if revision.startswith(prefix) and revision[len(prefix) :] in refs:
                return refs[revision[len(prefix) :]]
        if revision in meta["branches"]:
            return meta["branches"][revision]
        if revision in meta["tags"]:
            return meta["tags"][revision]
        if COMMIT_ID_PATTERN.fullmatch(revision) and self._commit_path(repo_type, repo_id, revision).is_file():
            return revision
        raise revision_not_found(revision)

    def create_branch(self, repo_type: str, repo_id: str, branch: str, commit_id: str) -> None:
        with self._lock:
            meta = self.load_meta(repo_type, repo_id)
            if branch in meta["branches"]:
                raise HubError(409, f"Reference refs/heads/{branch} already exists")
            meta["branches"][branch] = commit_id
            self._save_meta(repo_type, repo_id, meta)

    def delete_branch(self, repo_type: str, repo_id: str, branch: str) -> None:
        with self._lock:
            meta = self.load_meta(repo_type, repo_id)
            if branch == DEFAULT_BRANCH:
                raise HubError(403, f"Cannot delete the default branch {branch!r}")
            if meta["branches"].pop(branch, None) is None:
                raise revision_not_found(branch)
            self._save_meta(repo_type, repo_id, meta)

    # Commits and files

    def _commit_path(self, repo_type: str, repo_id: str, commit_id: str) -> Path:
        return self.repo_dir(repo_type, repo_id) / "commits" / f"{commit_id}.json"

    def commit_data(self, repo_type: str, repo_id: str, commit_id: str) -> dict[str, Any]:
        return json.loads(self._commit_path(repo_type, repo_id, commit_id).read_text())

    def files(self, repo_type: str, repo_id: str, commit_id: str) -> dict[str, FileEntry]:
        """Return the files of a commit by path. A commit never changes, so the result is cached."""
        key = (self.repo_dir(repo_type, repo_id), commit_id)
        cached = self._files_cache.get(key)
        if cached is None:
            data = self.commit_data(repo_type, repo_id, commit_id)
            cached = {path: FileEntry.from_json(path, entry) for path, entry in data["files"].items()}
            self._files_cache[key] = cached
        return cached

    def history(self, repo_type: str, repo_id: str, commit_id: str) -> list[CommitRecord]:
        """Return the commits reachable from `commit_id` through first parents, newest first."""
        key = (self.repo_dir(repo_type, repo_id), commit_id)
        if key in self._history_cache:
            return list(self._history_cache[key])
        records = []
        current: str | None = commit_id
        while current is not None:
            data = self.commit_data(repo_type, repo_id, current)
            records.append(
                CommitRecord(
                    id=data["id"],
                    parents=tuple(data["parents"]),
                    title=data["title"],
                    message=data["message"],
                    author=data["author"],
                    date=data["date"],
                    added=tuple(data["added"]),
                    modified=tuple(data["modified"]),
                    deleted=tuple(data["deleted"]),
                )
            )
            current = data["parents"][0] if data["parents"] else None
        self._history_cache[key] = records
        return list(records)

    def snapshot_path(self, repo_type: str, repo_id: str, commit_id: str, path: str) -> Path:
        return self.repo_dir(repo_type, repo_id) / "snapshots" / commit_id / path

    def commit(
        self,
        repo_type: str,
        repo_id: str,
        branch: str,
        parent_commit: str | None,
        author: str,
        title: str,
        message: str,
        operations: list[Operation],
    ) -> str:
        """Apply `operations` on top of `branch` as one new commit and return its id."""
        with self._lock:
            return self._write_commit(repo_type, repo_id, branch, parent_commit, author, title, message, operations)

    def _write_commit(
        self,
        repo_type: str,
        repo_id: str,
        branch: str,
        parent_commit: str | None,
        author: str,
        title: str,
        message: str,
        operations: list[Operation],
    ) -> str:
        meta = self.load_meta(repo_type, repo_id)
        head = meta["branches"].get(branch)
        if head is None and meta["branches"]:
            raise revision_not_found(branch)
        if parent_commit is not None and parent_commit != head:
            # The Hub returns 412 when the branch moved since the client read `parentCommit`.
            raise HubError(
                412,
                f"Branch {branch} has moved past parent commit {parent_commit}. "
                f"Its head is now {head}, so read the branch again and retry the commit.",
            )

        old_files = self.files(repo_type, repo_id, head) if head else {}
        new_files = dict(old_files)
        new_contents: dict[str, bytes] = {}
        for operation in operations:
            self._apply(operation, new_files, new_contents)

        added = sorted(set(new_files) - set(old_files))
        deleted = sorted(set(old_files) - set(new_files))
        modified = sorted(path for path in set(new_files) & set(old_files) if new_files[path] != old_files[path])

        date = utc_now_iso()
        commit_id = self._commit_object_id(new_files, head, author, title, message)
        self._write_snapshot(repo_type, repo_id, commit_id, head, new_files, new_contents)
        data = {
            "id": commit_id,
            "parents": [head] if head else [],
            "title": title,
            "message": message,
            "author": author,
            "date": date,
            "added": added,
            "modified": modified,
            "deleted": deleted,
            "files": {path: entry.to_json() for path, entry in sorted(new_files.items())},
        }
        write_atomic(self._commit_path(repo_type, repo_id, commit_id), json.dumps(data, indent=1).encode())
        meta["branches"][branch] = commit_id
        self._save_meta(repo_type, repo_id, meta)
        if not (added or modified or deleted):
            logger.info("Commit %s on %s@%s changes no file", commit_id[:8], repo_id, branch)
        logger.info(
            "Committed %s on %s@%s: %d added, %d modified, %d deleted",
            commit_id[:8],
            repo_id,
            branch,
            len(added),
            len(modified),
            len(deleted),
        )
        return commit_id

    def _apply(self, operation: Operation, files: dict[str, FileEntry], contents: dict[str, bytes]) -> None:
        path = operation.path
        if operation.kind == "file":
            assert operation.content is not None
            files[path] = FileEntry.regular(path, operation.content)
            contents[path] = operation.content
        elif operation.kind == "lfsFile":
            assert operation.sha256 is not None
            size = self.lfs_object_size(operation.sha256)
            if size is None:
                raise HubError(422, f"LFS object {operation.sha256} of {path!r} was not uploaded before the commit")
            if operation.size is not None and operation.size != size:
                raise HubError(422, f"LFS object {operation.sha256} has {size} bytes, the commit says {operation.size}")
            files[path] = FileEntry.lfs(path, operation.sha256, size)
            contents.pop(path, None)
        elif operation.kind == "deletedFile":
            if files.pop(path, None) is None:
                # huggingface_hub 2.4 matches this sentence to add a hint about folder deletions.
                raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            contents.pop(path, None)
        elif operation.kind == "deletedFolder":
            prefix = path.rstrip("/") + "/"
            doomed = [existing for existing in files if existing.startswith(prefix)]
            if not doomed:
                raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
            for existing in doomed:
                del files[existing]
                contents.pop(existing, None)
        else:
            raise HubError(400, f"Unknown commit operation {operation.kind!r}")

    @staticmethod
    def _commit_object_id(
        files: Mapping[str, FileEntry], parent: str | None, author: str, title: str, message: str
    ) -> str:
        timestamp = int(time.time())
        lines = [f"tree {git_tree_id(files)}"]
        if parent:
            lines.append(f"parent {parent}")
        lines.append(f"author {author} <{author}@users.noreply.invalid> {timestamp} +0000")
        lines.append(f"committer {author} <{author}@users.noreply.invalid> {timestamp} +0000")
        text = "\n".join(lines) + f"\n\n{title}\n" + (f"\n{message}\n" if message else "")
        return git_object_id("commit", text.encode())

    def _write_snapshot(
        self,
        repo_type: str,
        repo_id: str,
        commit_id: str,
        parent: str | None,
        files: Mapping[str, FileEntry],
        contents: Mapping[str, bytes],
    ) -> None:
        snapshots = self.repo_dir(repo_type, repo_id) / "snapshots"
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=snapshots))
        for path, entry in files.items():
            target = staging / path
            target.parent.mkdir(parents=True, exist_ok=True)
            if path in contents:
                target.write_bytes(contents[path])
            elif entry.is_lfs and (parent is None or self.files(repo_type, repo_id, parent).get(path) != entry):
                link_or_copy(self.lfs_object_path(entry.sha256), target)
            else:
                assert parent is not None
                link_or_copy(snapshots / parent / path, target)
        staging.rename(snapshots / commit_id)

    # LFS objects

    def lfs_object_path(self, sha256: str | None) -> Path:
        assert sha256 is not None and SHA256_PATTERN.fullmatch(sha256)
        return self.root / "lfs" / sha256

    def lfs_object_size(self, sha256: str) -> int | None:
        try:
            return self.lfs_object_path(sha256).stat().st_size
        except FileNotFoundError:
            return None

    def store_lfs_object(self, sha256: str, size: int, chunks: Iterable[bytes]) -> None:
        """Write an uploaded LFS object after checking its size and sha256."""
        digest = hashlib.sha256()
        received = 0
        with tempfile.NamedTemporaryFile(dir=self.root / "lfs", prefix=".upload-", delete=False) as handle:
            temp_path = Path(handle.name)
            try:
                for chunk in chunks:
                    digest.update(chunk)
                    received += len(chunk)
                    handle.write(chunk)
            except BaseException:
                temp_path.unlink()
                raise
        if received != size or digest.hexdigest() != sha256:
            temp_path.unlink()
            raise HubError(
                400,
                f"Uploaded object does not match its URL: expected {size} bytes with sha256 {sha256}, "
                f"received {received} bytes with sha256 {digest.hexdigest()}",
            )
        os.replace(temp_path, self.lfs_object_path(sha256))
        logger.info("Stored LFS object %s (%d bytes)", sha256[:12], size)


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp_path = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    temp_path.write_bytes(data)
    os.replace(temp_path, path)


def link_or_copy(source: Path, target: Path) -> None:
    # Snapshots share file data through hard links, and a file system without them gets copies.
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def lfs_patterns(gitattributes: str) -> list[str]:
    """Return the patterns that a .gitattributes text marks with filter=lfs."""
    patterns = []
    for line in gitattributes.splitlines():
        fields = line.split()
        if len(fields) >= 2 and not fields[0].startswith("#") and "filter=lfs" in fields[1:]:
            patterns.append(fields[0])
    return patterns


def matches_any(path: str, patterns: Iterable[str]) -> bool:
    """Match `path` against gitattributes or gitignore style patterns.

    NOTE: only the common forms are covered. A pattern without "/" matches the file name at any
    depth, other patterns match the whole path with fnmatch, and "**" counts as "*".
    """
    name = path.rsplit("/", 1)[-1]
    for pattern in patterns:
        pattern = pattern.strip().lstrip("/").replace("**", "*")
        if not pattern or pattern.startswith("#") or pattern.startswith("!"):
            continue
        if pattern.endswith("/"):
            if path.startswith(pattern) or f"/{pattern}" in f"/{path}":
                return True
        elif "/" in pattern:
            if fnmatch.fnmatchcase(path, pattern):
                return True
        elif fnmatch.fnmatchcase(name, pattern):
            return True
    return False


# --- HTTP -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RequestRecord:
    """A request that the server handled: method, path with query, status code and authenticated user."""

    method: str
    path: str
    status: int
    user: str | None


@dataclasses.dataclass(frozen=True)
class RepoRef:
    repo_type: str
    repo_id: str


class HubHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer carrying the state that request handlers share."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], hub: HubServer):
        super().__init__(address, HubRequestHandler)
        self.store = hub.store
        self.tokens = hub.tokens
        self.page_sizes = hub.page_sizes
        self.records = hub.records
        self.unhandled = hub.unhandled
        self.records_lock = hub.records_lock
        self.signing_key = secrets.token_bytes(32)
        self.endpoint = f"http://{self.server_address[0]}:{self.server_address[1]}"

    def sign(self, message: str) -> str:
        return hmac.new(self.signing_key, message.encode(), hashlib.sha256).hexdigest()


class HubRequestHandler(BaseHTTPRequestHandler):
    """Route each request to a handler method and turn HubError into a Hub-style error response."""

    server: HubHTTPServer
    protocol_version = "HTTP/1.1"
    # Idle keep-alive connections are closed after this many seconds.
    timeout = 60

    # Entry points

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s - %s", self.address_string(), format % args)

    def _dispatch(self, method: str) -> None:
        self._status = 0
        self._user: str | None = None
        self._body_state = "unread"
        split = urlsplit(self.path)
        self.query = parse_qs(split.query, keep_blank_values=True)
        # Segments are decoded one by one, so an encoded "/" inside a revision stays inside its segment.
        self.segments = [unquote(segment) for segment in split.path.split("/")[1:]]
        try:
            self._user = self._authenticate()
            handler = self._route(method)
            if handler is None:
                self._record_unhandled(method)
                raise HubError(404, f"Route {method} {split.path} is not implemented by the Hub stand-in")
            handler()
        except HubError as error:
            self._drain_body()
            self._send_error(error)
        except (BrokenPipeError, ConnectionResetError):
            logger.info("Client closed the connection during %s %s", method, self.path)
            self.close_connection = True
        except Exception:
            logger.exception("Request %s %s failed", method, self.path)
            self._drain_body()
            self._send_error(HubError(500, "Internal error in the Hub stand-in. Its log contains the traceback."))
        finally:
            with self.server.records_lock:
                self.server.records.append(RequestRecord(method, self.path, self._status, self._user))

    def _record_unhandled(self, method: str) -> None:
        logger.warning("Unhandled route: %s %s", method, self.path)
        with self.server.records_lock:
            self.server.unhandled.append((method, self.path))

    def _route(self, method: str) -> Any:
        segments = self.segments
        if self.path.startswith(INTERNAL_PREFIX):
            if method == "PUT" and segments[:3] == ["-", "lfs", "upload"] and len(segments) == 4:
                return self._lfs_upload
            return None
        if segments[:1] == ["api"]:
            return self._route_api(method, segments[1:])
        return self._route_repo_files(method, segments)

    def _route_api(self, method: str, segments: list[str]) -> Any:
        simple_routes = {
            ("GET", ("whoami-v2",)): self._whoami,
            ("POST", ("repos", "create")): self._create_repo,
            ("DELETE", ("repos", "delete")): self._delete_repo,
            ("POST", ("validate-yaml",)): self._validate_yaml,
        }
        if (method, tuple(segments)) in simple_routes:
            return simple_routes[(method, tuple(segments))]
        if len(segments) < 3 or segments[0] not in API_COLLECTIONS:
            return None
        self.repo = RepoRef(API_COLLECTIONS[segments[0]], f"{segments[1]}/{segments[2]}")
        rest = segments[3:]
        action = rest[0] if rest else ""
        repo_routes = {
            ("GET", ""): self._repo_info,
            ("GET", "revision"): self._repo_info,
            ("GET", "tree"): self._tree,
            ("POST", "paths-info"): self._paths_info,
            ("GET", "refs"): self._refs,
            ("GET", "commits"): self._commits,
            ("POST", "branch"): self._create_branch,
            ("DELETE", "branch"): self._delete_branch,
            ("POST", "preupload"): self._preupload,
            ("POST", "commit"): self._commit,
            ("PUT", "settings"): self._settings,
            ("GET", "xet-write-token"): self._xet_token,
            ("GET", "xet-read-token"): self._xet_token,
        }
        handler = repo_routes.get((method, action))
        if handler is None:
            return None
        self.route_args = rest[1:]
        return handler

    def _route_repo_files(self, method: str, segments: list[str]) -> Any:
        repo_type = "model"
        if segments[:1] in (["datasets"], ["spaces"]):
            repo_type = API_COLLECTIONS[segments[0]]
            segments = segments[1:]
        if len(segments) < 3:
            return None
        namespace, name = segments[0], segments[1]
        if method in ("GET", "HEAD") and segments[2] == "resolve" and len(segments) >= 5:
            self.repo = RepoRef(repo_type, f"{namespace}/{name}")
            self.route_args = segments[3:]
            return self._resolve
        if name.endswith(".git") and segments[2:] == ["info", "lfs", "objects", "batch"] and method == "POST":
            self.repo = RepoRef(repo_type, f"{namespace}/{name[:-4]}")
            return self._lfs_batch
        if name.endswith(".git") and segments[2:] == ["info", "lfs", "objects", "verify"] and method == "POST":
            self.repo = RepoRef(repo_type, f"{namespace}/{name[:-4]}")
            return self._lfs_verify
        return None

    # Request helpers

    def _authenticate(self) -> str | None:
        header = self.headers.get("Authorization")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        user = self.server.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            # The Hub returns this for an unknown token on every route, public reads included.
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _require_user(self) -> str:
        if self._user is None:
            raise HubError(401, "Authentication required. Send a valid token as 'Authorization: Bearer <token>'.")
        return self._user

    def _meta_for_read(self) -> dict[str, Any]:
        """Load the repository's metadata, hiding a private repository from anyone but its owner."""
        store = self.server.store
        if not valid_repo_id(self.repo.repo_id):
            raise repo_not_found(self.repo.repo_type, self.repo.repo_id)
        meta = store.load_meta(self.repo.repo_type, self.repo.repo_id)
        if meta["private"] and self._user != meta["owner"]:
            error = repo_not_found(self.repo.repo_type, self.repo.repo_id)
            if self._user is None:
                error.status = 401
            raise error
        return meta

    def _meta_for_write(self) -> dict[str, Any]:
        user = self._require_user()
        meta = self._meta_for_read()
        if meta["owner"] != user:
            raise HubError(403, f"User {user!r} has no write access to {self.repo.repo_id!r}")
        return meta

    def _resolve_revision(self, revision: str) -> str:
        return self.server.store.resolve(self.repo.repo_type, self.repo.repo_id, revision)

    def _read_body(self) -> bytes:
        return b"".join(self._iter_body())

    def _iter_body(self) -> Iterator[bytes]:
        """Yield the request body, sent with Content-Length or with chunked transfer encoding."""
        self._body_state = "reading"
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size_line = self.rfile.readline(65537)
                size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    # Skip the trailer section, which ends with an empty line.
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    self._body_state = "read"
                    return
                remaining = size
                while remaining:
                    chunk = self.rfile.read(min(remaining, COPY_CHUNK_SIZE))
                    if not chunk:
                        raise HubError(400, "Request body ended inside a chunk")
                    remaining -= len(chunk)
                    yield chunk
                self.rfile.readline(3)
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining:
                chunk = self.rfile.read(min(remaining, COPY_CHUNK_SIZE))
                if not chunk:
                    raise HubError(400, "Request body is shorter than its Content-Length")
                remaining -= len(chunk)
                yield chunk
            self._body_state = "read"

    def _drain_body(self) -> None:
        # An unread body would be parsed as the next request on a keep-alive connection. The end of a
        # partly read body cannot be found, so that connection is closed after the response.
        if self._body_state == "reading":
            self.close_connection = True
            return
        if self._body_state == "unread":
            try:
                for _ in self._iter_body():
                    pass
            except (HubError, ValueError, OSError):
                self.close_connection = True

    def _read_json(self) -> Any:
        body = self._read_body()
        try:
            return json.loads(body or b"{}")
        except json.JSONDecodeError as error:
            raise HubError(400, f"Request body is not valid JSON: {error}") from None

    def _read_form_or_json(self) -> dict[str, Any]:
        """Read a body sent either as JSON or as application/x-www-form-urlencoded."""
        if "application/x-www-form-urlencoded" in self.headers.get("Content-Type", ""):
            form = parse_qs(self._read_body().decode(), keep_blank_values=True)
            return {key: values if key == "paths" else values[-1] for key, values in form.items()}
        return self._read_json()

    def _query_flag(self, name: str) -> bool:
        values = self.query.get(name) or self.query.get(f"{name}[]")
        return bool(values) and values[-1].lower() in ("1", "true", "yes")

    # Responses

    def _send_json(self, payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self._send_bytes(body, status, {"Content-Type": "application/json; charset=utf-8", **(headers or {})})

    def _send_bytes(self, body: bytes, status: int, headers: Mapping[str, str]) -> None:
        self._status = status
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_error(self, error: HubError) -> None:
        headers = {"X-Error-Message": error.message.encode("ascii", "replace").decode(), **error.headers}
        if error.error_code:
            headers["X-Error-Code"] = error.error_code
        if error.status == 500:
            logger.error("Responded %d to %s %s: %s", error.status, self.command, self.path, error.message)
        else:
            logger.info("Responded %d to %s %s: %s", error.status, self.command, self.path, error.message)
        self._send_json({"error": error.message}, error.status, headers)

    def _repo_url(self) -> str:
        return f"{self.server.endpoint}/{URL_PREFIXES[self.repo.repo_type]}{self.repo.repo_id}"

    # Account and repositories

    def _whoami(self) -> None:
        if self._user is None:
            raise HubError(401, "Invalid username or password.")
        self._send_json(
            {
                "type": "user",
                "id": hashlib.sha1(self._user.encode()).hexdigest()[:24],
                "name": self._user,
                "fullname": self._user,
                "email": None,
                "emailVerified": False,
                "canPay": False,
                "isPro": False,
                "periodEnd": None,
                "avatarUrl": "",
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "stand-in token", "role": "write"}},
            }
        )

    def _create_repo(self) -> None:
        user = self._require_user()
        payload = self._read_json()
        repo_type = payload.get("type") or "model"
        name = payload.get("name") or ""
        namespace = payload.get("organization") or user
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repository type {repo_type!r}. Expected one of {', '.join(REPO_TYPES)}.")
        repo_id = f"{namespace}/{name}"
        if not valid_repo_id(repo_id):
            raise HubError(400, f"Invalid repository id {repo_id!r}. Use letters, digits, '-', '_' and '.'.")
        if namespace != user:
            raise HubError(403, f"User {user!r} cannot create repositories in namespace {namespace!r}")
        private = bool(payload.get("private")) or payload.get("visibility") in ("private", "protected")
        self.repo = RepoRef(repo_type, repo_id)
        if not self.server.store.create(repo_type, repo_id, user, private):
            logger.info("Responded 409 to repository creation: %s %s exists", repo_type, repo_id)
            # huggingface_hub reads "url" from this 409 response when exist_ok=True.
            self._send_json({"error": f"You already created this {repo_type} repo", "url": self._repo_url()}, 409)
            return
        self._send_json({"url": self._repo_url(), "name": repo_id, "id": repo_id})

    def _delete_repo(self) -> None:
        user = self._require_user()
        payload = self._read_json()
        repo_type = payload.get("type") or "model"
        self.repo = RepoRef(repo_type, f"{payload.get('organization') or user}/{payload.get('name')}")
        self._meta_for_write()
        self.server.store.delete(repo_type, self.repo.repo_id)
        self._send_json({})

    def _settings(self) -> None:
        self._meta_for_write()
        payload = self._read_json()
        if "private" in payload:
            self.server.store.set_private(self.repo.repo_type, self.repo.repo_id, bool(payload["private"]))
        self._send_json({})

    def _validate_yaml(self) -> None:
        content = self._read_json().get("content", "")
        lines = content.splitlines()
        if lines and lines[0].strip() == "---" and "---" not in (line.strip() for line in lines[1:]):
            self._send_json({"errors": [{"message": "The YAML metadata block is not closed with '---'"}]}, 400)
            return
        # NOTE: the YAML itself is not parsed, because the stand-in uses only the standard library.
        self._send_json({"errors": [], "warnings": []})

    def _repo_info(self) -> None:
        meta = self._meta_for_read()
        revision = "/".join(self.route_args) or DEFAULT_BRANCH
        commit_id = self._resolve_revision(revision)
        store = self.server.store
        files = store.files(self.repo.repo_type, self.repo.repo_id, commit_id)
        head = store.commit_data(self.repo.repo_type, self.repo.repo_id, commit_id)

        with_blobs = self._query_flag("blobs")
        siblings = []
        for path, entry in sorted(files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if with_blobs:
                sibling.update(size=entry.size, blobId=entry.oid)
                if entry.is_lfs:
                    sibling["lfs"] = {"size": entry.size, "sha256": entry.sha256, "pointerSize": entry.pointer_size}
            siblings.append(sibling)

        namespace = self.repo.repo_id.split("/")[0]
        info = {
            "_id": hashlib.sha1(self.repo.repo_id.encode()).hexdigest()[:24],
            "id": self.repo.repo_id,
            "author": namespace,
            "sha": commit_id,
            "lastModified": head["date"],
            "createdAt": meta["createdAt"],
            "private": meta["private"],
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
        }
        if self.repo.repo_type == "model":
            info["modelId"] = self.repo.repo_id
        self._send_json(info)

    def _refs(self) -> None:
        meta = self._meta_for_read()

        def as_refs(refs: Mapping[str, str], kind: str) -> list[dict[str, str]]:
            return [
                {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": commit_id}
                for name, commit_id in sorted(refs.items())
            ]

        payload: dict[str, Any] = {
            "branches": as_refs(meta["branches"], "heads"),
            "converts": [],
            "tags": as_refs(meta["tags"], "tags"),
        }
        if self._query_flag("include_prs"):
            payload["pullRequests"] = []
        self._send_json(payload)

    def _create_branch(self) -> None:
        self._meta_for_write()
        branch = "/".join(self.route_args)
        if not branch or branch.startswith("refs/") or COMMIT_ID_PATTERN.fullmatch(branch):
            raise HubError(400, f"Invalid branch name {branch!r}")
        payload = self._read_json()
        start = self._resolve_revision(payload.get("startingPoint") or DEFAULT_BRANCH)
        self.server.store.create_branch(self.repo.repo_type, self.repo.repo_id, branch, start)
        self._send_json({})

    def _delete_branch(self) -> None:
        self._meta_for_write()
        self.server.store.delete_branch(self.repo.repo_type, self.repo.repo_id, "/".join(self.route_args))
        self._send_json({})

    def _xet_token(self) -> None:
        self._meta_for_read()
        logger.warning("Client requested a Xet token at %s. Set HF_HUB_DISABLE_XET=1 in its environment.", self.path)
        raise HubError(
            501,
            "The Hub stand-in has no Xet storage. "
            "Run the client with HF_HUB_DISABLE_XET=1 so it uploads through Git LFS.",
        )

    # Listings

    def _entry_json(self, entry: FileEntry, commit_id: str, expand: bool) -> dict[str, Any]:
        payload: dict[str, Any] = {"type": "file", "oid": entry.oid, "size": entry.size, "path": entry.path}
        if entry.is_lfs:
            payload["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
        if expand:
            payload["lastCommit"] = self._last_commit(commit_id, entry.path, is_directory=False)
        return payload

    def _directory_json(
        self, files: Mapping[str, FileEntry], path: str, commit_id: str, expand: bool
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {"type": "directory", "oid": git_tree_id(files, path), "size": 0, "path": path}
        if expand:
            payload["lastCommit"] = self._last_commit(commit_id, path, is_directory=True)
        return payload

    def _last_commit(self, commit_id: str, path: str, is_directory: bool) -> dict[str, str] | None:
        for record in self.server.store.history(self.repo.repo_type, self.repo.repo_id, commit_id):
            for changed in record.changed_paths:
                if changed == path or (is_directory and changed.startswith(path + "/")):
                    return {"id": record.id, "title": record.title, "date": record.date}
        return None

    def _tree(self) -> None:
        self._meta_for_read()
        if not self.route_args:
            raise HubError(400, "Missing revision in tree URL")
        revision, base = self.route_args[0], "/".join(self.route_args[1:]).strip("/")
        commit_id = self._resolve_revision(revision)
        files = self.server.store.files(self.repo.repo_type, self.repo.repo_id, commit_id)
        recursive = self._query_flag("recursive")
        expand = self._query_flag("expand")

        prefix = f"{base}/" if base else ""
        if base and not any(path.startswith(prefix) for path in files):
            # NOTE: a file path gets the same 404 as a missing folder. The Hub's response to it was not checked.
            raise HubError(404, f"Folder {base!r} not found at revision {revision}", "EntryNotFound")
        directories: set[str] = set()
        listed_files: list[FileEntry] = []
        for path, entry in files.items():
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts)):
                if recursive or depth == 1:
                    directories.add(prefix + "/".join(parts[:depth]))
            if recursive or len(parts) == 1:
                listed_files.append(entry)

        entries: list[tuple[str, Any]] = [(path, None) for path in directories]
        entries += [(entry.path, entry) for entry in listed_files]
        entries.sort(key=lambda item: item[0])
        page_size = self.server.page_sizes["tree_expanded" if expand else "tree"]
        start = self._cursor_offset()
        page = entries[start : start + page_size]
        payload = []
        for path, entry in page:
            if entry is None:
                payload.append(self._directory_json(files, path, commit_id, expand))
            else:
                payload.append(self._entry_json(entry, commit_id, expand))
        headers = {}
        if start + page_size < len(entries):
            headers["Link"] = self._next_link({"cursor": encode_cursor(start + page_size)})
        self._send_json(payload, headers=headers)

    def _cursor_offset(self) -> int:
        cursor = (self.query.get("cursor") or [""])[-1]
        if not cursor:
            return 0
        try:
            return int(base64.urlsafe_b64decode(cursor.encode()).decode())
        except (ValueError, binascii.Error):
            raise HubError(400, f"Invalid pagination cursor {cursor!r}") from None

    def _next_link(self, updates: Mapping[str, str]) -> str:
        split = urlsplit(self.path)
        query = {key: values[-1] for key, values in self.query.items()}
        query.update(updates)
        return f'<{self.server.endpoint}{split.path}?{urlencode(query)}>; rel="next"'

    def _paths_info(self) -> None:
        self._meta_for_read()
        commit_id = self._resolve_revision("/".join(self.route_args) or DEFAULT_BRANCH)
        payload = self._read_form_or_json()
        paths = payload.get("paths") or []
        paths = [paths] if isinstance(paths, str) else list(paths)
        expand = str(payload.get("expand", "")).lower() in ("1", "true")
        files = self.server.store.files(self.repo.repo_type, self.repo.repo_id, commit_id)
        results = []
        for path in paths:
            path = path.strip("/")
            if path in files:
                results.append(self._entry_json(files[path], commit_id, expand))
            elif any(existing.startswith(path + "/") for existing in files):
                results.append(self._directory_json(files, path, commit_id, expand))
        self._send_json(results)

    def _commits(self) -> None:
        self._meta_for_read()
        commit_id = self._resolve_revision("/".join(self.route_args) or DEFAULT_BRANCH)
        records = self.server.store.history(self.repo.repo_type, self.repo.repo_id, commit_id)
        try:
            page_number = int((self.query.get("p") or ["0"])[-1])
        except ValueError:
            raise HubError(400, f"Invalid page number {self.query.get('p')!r}") from None
        page_size = self.server.page_sizes["commits"]
        page = records[page_number * page_size : (page_number + 1) * page_size]
        payload = [
            {
                "id": record.id,
                "title": record.title,
                "message": record.message,
                "authors": [{"user": record.author, "avatar": ""}],
                "date": record.date,
            }
            for record in page
        ]
        headers = {}
        if (page_number + 1) * page_size < len(records):
            headers["Link"] = self._next_link({"p": str(page_number + 1)})
        self._send_json(payload, headers=headers)

    # Downloads

    def _resolve(self) -> None:
        self._meta_for_read()
        revision, path = self.route_args[0], "/".join(self.route_args[1:])
        commit_id = self._resolve_revision(revision)
        store = self.server.store
        entry = store.files(self.repo.repo_type, self.repo.repo_id, commit_id).get(path)
        if entry is None:
            # huggingface_hub caches the absence of the file under the commit id sent along.
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit_id})

        headers = {
            "X-Repo-Commit": commit_id,
            "ETag": f'"{entry.oid}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if entry.is_lfs:
            # The Hub sends these with LFS files so the client can check the content against its sha256.
            headers["X-Linked-Etag"] = f'"{entry.sha256}"'
            headers["X-Linked-Size"] = str(entry.size)
        # NOTE: the Hub redirects LFS downloads to a CDN host; the stand-in serves them from the resolve URL.
        start, end, partial = self._requested_range(entry.size)
        status = 206 if partial else 200
        if partial:
            headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
        length = end - start + 1
        self._status = status
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        if self.command == "HEAD" or length == 0:
            return
        with open(store.snapshot_path(self.repo.repo_type, self.repo.repo_id, commit_id, path), "rb") as handle:
            handle.seek(start)
            copy_stream(handle, self.wfile, length)

    def _requested_range(self, size: int) -> tuple[int, int, bool]:
        """Return the first and last byte that a single-range Range header requests, and whether it is partial."""
        header = self.headers.get("Range")
        if not header:
            return 0, size - 1, False
        unit, _, spec = header.partition("=")
        if unit.strip() != "bytes" or "," in spec:
            # A server may ignore a Range header it does not support and send the whole file.
            logger.info("Ignoring unsupported Range header %r on %s", header, self.path)
            return 0, size - 1, False
        first, _, last = spec.strip().partition("-")
        try:
            if first == "":
                start, end = max(size - int(last), 0), size - 1
            else:
                start = int(first)
                end = min(int(last), size - 1) if last else size - 1
        except ValueError:
            raise HubError(400, f"Invalid Range header {header!r}") from None
        if start >= size or start > end:
            content_range = {"Content-Range": f"bytes */{size}"}
            raise HubError(416, f"Range {header!r} is outside the file of {size} bytes", headers=content_range)
        return start, end, True

    # Uploads

    def _preupload(self) -> None:
        self._meta_for_write()
        if self._query_flag("create_pr"):
            raise HubError(400, "Pull requests are not supported by the Hub stand-in")
        revision = "/".join(self.route_args) or DEFAULT_BRANCH
        commit_id = self._resolve_revision(revision)
        store = self.server.store
        files = store.files(self.repo.repo_type, self.repo.repo_id, commit_id)
        payload = self._read_json()
        requested = payload.get("files")
        if not isinstance(requested, list):
            raise HubError(400, "Preupload body must contain a 'files' list")

        lfs_globs = self._repo_text_patterns(commit_id, ".gitattributes", lfs_patterns)
        ignore_text = payload.get("gitIgnore")
        if ignore_text is None:
            ignore_globs = self._repo_text_patterns(commit_id, ".gitignore", str.splitlines)
        else:
            ignore_globs = ignore_text.splitlines()

        answers = []
        for item in requested:
            path, size = item.get("path"), item.get("size")
            if not isinstance(path, str) or not isinstance(size, int):
                raise HubError(400, f"Preupload entry needs a string 'path' and an integer 'size': {item!r}")
            try:
                sample = base64.b64decode(item.get("sample") or "", validate=True)
            except binascii.Error:
                raise HubError(400, f"Preupload sample of {path!r} is not valid base64") from None
            answer: dict[str, Any] = {
                "path": path,
                "uploadMode": upload_mode(path, size, sample, lfs_globs),
                "shouldIgnore": matches_any(path, ignore_globs),
            }
            existing = files.get(path)
            if existing is not None:
                # huggingface_hub 2.4 drops an added file whose local oid equals this one, so that
                # re-uploading unchanged content makes no commit: sha256 for LFS files, git blob sha1 otherwise.
                answer["oid"] = existing.sha256 if existing.is_lfs else existing.oid
            answers.append(answer)
        self._send_json({"files": answers, "commitOid": commit_id})

    def _repo_text_patterns(self, commit_id: str, path: str, parse: Any) -> list[str]:
        store = self.server.store
        if path not in store.files(self.repo.repo_type, self.repo.repo_id, commit_id):
            return []
        text = store.snapshot_path(self.repo.repo_type, self.repo.repo_id, commit_id, path).read_text(errors="replace")
        return list(parse(text))

    def _lfs_batch(self) -> None:
        self._meta_for_write()
        payload = self._read_json()
        if payload.get("operation") != "upload":
            raise HubError(400, f"LFS batch operation {payload.get('operation')!r} is not supported. Use 'upload'.")
        transfers = payload.get("transfers") or ["basic"]
        if "basic" not in transfers:
            raise HubError(422, f"LFS transfers {transfers!r} are not supported. Offer 'basic'.")

        objects = []
        for item in payload.get("objects") or []:
            oid, size = item.get("oid"), item.get("size")
            if not isinstance(oid, str) or not SHA256_PATTERN.fullmatch(oid) or not isinstance(size, int) or size < 0:
                error = {"code": 422, "message": "Invalid oid or size"}
                objects.append({"oid": str(oid), "size": size if isinstance(size, int) else 0, "error": error})
                continue
            if self.server.store.lfs_object_size(oid) == size:
                # No actions: the client skips the upload of an object the server already has.
                objects.append({"oid": oid, "size": size})
                continue
            expires = int(time.time()) + UPLOAD_URL_LIFETIME
            signature = self.server.sign(f"{oid}:{size}:{expires}")
            upload_query = urlencode({"size": size, "expires": expires, "signature": signature})
            upload_url = f"{self.server.endpoint}/-/lfs/upload/{oid}?{upload_query}"
            verify_url = f"{self._repo_url()}.git/info/lfs/objects/verify"
            objects.append(
                {
                    "oid": oid,
                    "size": size,
                    "authenticated": True,
                    "actions": {
                        "upload": {"href": upload_url, "expires_in": UPLOAD_URL_LIFETIME},
                        "verify": {"href": verify_url, "expires_in": UPLOAD_URL_LIFETIME},
                    },
                }
            )
        # Only "basic" is offered, never "xet" or "multipart", so clients send each object with one PUT.
        self._send_json(
            {"transfer": "basic", "objects": objects}, headers={"Content-Type": "application/vnd.git-lfs+json"}
        )

    def _lfs_upload(self) -> None:
        # Like a pre-signed storage URL, the upload URL carries its own signature instead of a token.
        oid = self.segments[3]
        try:
            size = int(self.query["size"][-1])
            expires = int(self.query["expires"][-1])
            signature = self.query["signature"][-1]
        except (KeyError, ValueError):
            raise HubError(400, "Upload URL is missing its size, expires or signature parameter") from None
        if not hmac.compare_digest(signature, self.server.sign(f"{oid}:{size}:{expires}")):
            raise HubError(403, "Upload URL signature is invalid")
        if expires < time.time():
            raise HubError(403, "Upload URL has expired. Request a new one from the LFS batch endpoint.")
        if not SHA256_PATTERN.fullmatch(oid):
            raise HubError(400, f"Invalid LFS oid {oid!r}")
        self.server.store.store_lfs_object(oid, size, self._iter_body())
        self._send_bytes(b"", 200, {"ETag": f'"{oid}"'})

    def _lfs_verify(self) -> None:
        self._meta_for_write()
        payload = self._read_json()
        oid, size = payload.get("oid"), payload.get("size")
        if not isinstance(oid, str) or not SHA256_PATTERN.fullmatch(oid):
            raise HubError(422, f"Invalid LFS oid {oid!r}")
        stored = self.server.store.lfs_object_size(oid)
        if stored is None:
            raise HubError(404, f"LFS object {oid} was not uploaded")
        if stored != size:
            raise HubError(422, f"LFS object {oid} has {stored} bytes, not {size}")
        self._send_json({"success": True}, headers={"Content-Type": "application/vnd.git-lfs+json"})

    def _commit(self) -> None:
        user = self._require_user()
        self._meta_for_write()
        if self._query_flag("create_pr"):
            raise HubError(400, "Pull requests are not supported by the Hub stand-in")
        branch = "/".join(self.route_args) or DEFAULT_BRANCH
        if branch.startswith("refs/heads/"):
            branch = branch[len("refs/heads/") :]
        meta = self.server.store.load_meta(self.repo.repo_type, self.repo.repo_id)
        if branch not in meta["branches"]:
            if COMMIT_ID_PATTERN.fullmatch(branch) or branch in meta["tags"]:
                raise HubError(400, f"Cannot commit to {branch!r} because it is not a branch. Commit to a branch name.")
            raise revision_not_found(branch)

        header, operations = parse_commit_body(self._read_body())
        title = header.get("summary") or ""
        if not title.strip():
            raise HubError(400, "The commit summary is missing. Set 'summary' in the header line.")
        # The Hub accepts a commit whose operations leave every file unchanged and records it as an empty
        # commit. Older huggingface_hub releases, which lacked the oid check on /preupload, created such
        # commits on huggingface.co. The stand-in records them too. huggingface_hub 2.4 drops unchanged
        # files itself and sends no commit when nothing is left.
        commit_id = self.server.store.commit(
            self.repo.repo_type,
            self.repo.repo_id,
            branch,
            header.get("parentCommit"),
            user,
            title,
            header.get("description") or "",
            operations,
        )
        self._send_json(
            {
                "success": True,
                "commitOid": commit_id,
                "commitUrl": f"{self._repo_url()}/commit/{commit_id}",
                "hookOutput": "",
            }
        )


def parse_commit_body(body: bytes) -> tuple[dict[str, Any], list[Operation]]:
    """Parse the NDJSON body of a commit request into its header and its operations."""
    header: dict[str, Any] | None = None
    operations: list[Operation] = []
    for number, line in enumerate(body.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            key, value = item["key"], item["value"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise HubError(400, f"Commit body line {number} is not a JSON object with 'key' and 'value'") from None
        if key == "header":
            header = value
            continue
        path = value.get("path")
        if not isinstance(path, str) or not valid_repo_path(path.rstrip("/") if key == "deletedFolder" else path):
            raise HubError(400, f"Invalid path {path!r} on commit body line {number}")
        if key == "file":
            if value.get("encoding", "base64") != "base64":
                raise HubError(400, f"Unsupported encoding {value.get('encoding')!r} on commit body line {number}")
            try:
                content = base64.b64decode(value.get("content") or "", validate=True)
            except binascii.Error:
                raise HubError(400, f"Invalid base64 content on commit body line {number}") from None
            operations.append(Operation("file", path, content=content))
        elif key == "lfsFile":
            oid = value.get("oid")
            if value.get("algo", "sha256") != "sha256" or not isinstance(oid, str) or not SHA256_PATTERN.fullmatch(oid):
                raise HubError(400, f"Invalid LFS oid {oid!r} on commit body line {number}")
            operations.append(Operation("lfsFile", path, sha256=oid, size=value.get("size")))
        elif key in ("deletedFile", "deletedFolder"):
            operations.append(Operation(key, path))
        else:
            raise HubError(400, f"Unknown commit operation {key!r} on commit body line {number}")
    if header is None:
        raise HubError(400, "Commit body has no header line")
    return header, operations


def upload_mode(path: str, size: int, sample: bytes, lfs_globs: Iterable[str]) -> str:
    """Choose "lfs" or "regular" for a file about to be uploaded.

    Empty files are regular. LFS takes files that .gitattributes marks with filter=lfs, files above
    10 MiB, and files whose first 512 bytes contain a NUL byte.
    NOTE: the Hub's exact binary detection is not documented; the NUL byte test is an assumption.
    """
    if size == 0:
        return "regular"
    if matches_any(path, lfs_globs) or size > LFS_SIZE_THRESHOLD or b"\0" in sample:
        return "lfs"
    return "regular"


def valid_repo_id(repo_id: str) -> bool:
    parts = repo_id.split("/")
    return len(parts) == 2 and all(
        REPO_NAME_PATTERN.fullmatch(part) and "--" not in part and ".." not in part and not part.endswith(".git")
        for part in parts
    )


def valid_repo_path(path: str) -> bool:
    parts = path.split("/")
    return bool(path) and all(part not in ("", ".", "..") for part in parts) and parts[0] != ".git"


def encode_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(str(offset).encode()).decode()


def copy_stream(source: BinaryIO, target: Any, length: int) -> None:
    remaining = length
    while remaining:
        chunk = source.read(min(remaining, COPY_CHUNK_SIZE))
        if not chunk:
            raise OSError(f"File ended {remaining} bytes early")
        target.write(chunk)
        remaining -= len(chunk)


# --- Server ---------------------------------------------------------------------------------------


class HubServer:
    """Hub stand-in on 127.0.0.1, served from a background thread.

    `tokens` maps each valid token to its user name. A plain collection of tokens maps them all
    to DEFAULT_USER. A user may write only to repositories in its own namespace.

    Use it as a context manager, or call start() and stop().
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        tokens: Mapping[str, str] | Iterable[str] = (),
        *,
        port: int = 0,
        tree_page_size: int = TREE_PAGE_SIZE,
        tree_page_size_expanded: int = TREE_PAGE_SIZE_EXPANDED,
        commits_page_size: int = COMMITS_PAGE_SIZE,
    ):
        self.root = Path(root)
        self.tokens = dict(tokens) if isinstance(tokens, Mapping) else dict.fromkeys(tokens, DEFAULT_USER)
        self.port = port
        self.page_sizes = {
            "tree": tree_page_size,
            "tree_expanded": tree_page_size_expanded,
            "commits": commits_page_size,
        }
        self.store = RepoStore(self.root)
        self.records: list[RequestRecord] = []
        self.unhandled: list[tuple[str, str]] = []
        self.records_lock = threading.Lock()
        self._httpd: HubHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> HubServer:
        self.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def start(self) -> None:
        if self._httpd is not None:
            raise RuntimeError(f"Hub stand-in is already running at {self.endpoint}")
        self._httpd = HubHTTPServer(("127.0.0.1", self.port), self)
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hub-stand-in", daemon=True)
        self._thread.start()
        logger.info("Hub stand-in listening at %s with storage in %s", self.endpoint, self.root)

    def stop(self) -> None:
        if self._httpd is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        assert self._thread is not None
        self._thread.join(timeout=10)
        logger.info("Hub stand-in at %s stopped", self.endpoint)
        self._httpd = None
        self._thread = None

    @property
    def endpoint(self) -> str:
        """Base URL such as http://127.0.0.1:PORT, the value for HF_ENDPOINT."""
        if self._httpd is None:
            raise RuntimeError("Hub stand-in is not running. Call start() or use it as a context manager.")
        return self._httpd.endpoint

    # Inspection

    @property
    def requests(self) -> list[RequestRecord]:
        """Requests handled so far, oldest first."""
        with self.records_lock:
            return list(self.records)

    @property
    def unhandled_requests(self) -> list[tuple[str, str]]:
        """(method, path) of requests to routes the stand-in does not implement."""
        with self.records_lock:
            return list(self.unhandled)

    def commits(
        self, repo_id: str, *, repo_type: str = "dataset", revision: str = DEFAULT_BRANCH
    ) -> list[CommitRecord]:
        """Return the commits of a repository reachable from `revision`, newest first."""
        commit_id = self.store.resolve(repo_type, repo_id, revision)
        return self.store.history(repo_type, repo_id, commit_id)

    def list_files(self, repo_id: str, *, repo_type: str = "dataset", revision: str = DEFAULT_BRANCH) -> list[str]:
        commit_id = self.store.resolve(repo_type, repo_id, revision)
        return sorted(self.store.files(repo_type, repo_id, commit_id))

    def file_entry(
        self, repo_id: str, path: str, *, repo_type: str = "dataset", revision: str = DEFAULT_BRANCH
    ) -> FileEntry:
        commit_id = self.store.resolve(repo_type, repo_id, revision)
        try:
            return self.store.files(repo_type, repo_id, commit_id)[path]
        except KeyError:
            raise FileNotFoundError(f"{path!r} not found in {repo_type} {repo_id} at {revision}") from None

    def read_file(
        self, repo_id: str, path: str, *, repo_type: str = "dataset", revision: str = DEFAULT_BRANCH
    ) -> bytes:
        """Return the content of a file at a branch, tag or commit id."""
        commit_id = self.store.resolve(repo_type, repo_id, revision)
        self.file_entry(repo_id, path, repo_type=repo_type, revision=commit_id)
        return self.store.snapshot_path(repo_type, repo_id, commit_id, path).read_bytes()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a local stand-in for the Hugging Face Hub HTTP API.")
    parser.add_argument("--root", required=True, type=Path, help="directory that stores the repositories")
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1, or 0 to pick a free port")
    parser.add_argument(
        "--token",
        action="append",
        default=[],
        help="valid token, given as TOKEN or TOKEN=USER. Repeat the option for more tokens. "
        "Without it, a random token is generated and printed",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level, e.g. DEBUG to log every request")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    tokens = {}
    for item in args.token:
        token, _, user = item.partition("=")
        tokens[token] = user or DEFAULT_USER
    if not tokens:
        tokens = {f"hf_{secrets.token_hex(16)}": DEFAULT_USER}
    with HubServer(args.root, tokens, port=args.port) as server:
        print(f"HF_ENDPOINT={server.endpoint}", flush=True)
        for token, user in tokens.items():
            print(f"token for {user}: {token}", flush=True)
        print("Clients also need HF_HUB_DISABLE_XET=1. Press Ctrl-C or send SIGTERM to stop.", flush=True)
        stop_requested = threading.Event()
        signal.signal(signal.SIGTERM, lambda signum, frame: stop_requested.set())
        with contextlib.suppress(KeyboardInterrupt):
            stop_requested.wait()


if __name__ == "__main__":
    main()
