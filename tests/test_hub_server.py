"""Tests of the Hub stand-in over real HTTP.

Raw requests from the test process check the server's responses. The huggingface_hub and datasets
clients run in subprocesses, because they read HF_ENDPOINT when imported.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import textwrap
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from hub_fixtures import DATASETS_CHILD_PRELUDE, HubTestServer, hub_server, module_hub_server  # noqa: F401
from hub_server import LFS_SIZE_THRESHOLD, git_object_id, lfs_pointer

LATEST_PYTHON = Path(__file__).resolve().parents[1] / ".venv-latest" / "bin" / "python"
needs_latest = pytest.mark.skipif(
    not LATEST_PYTHON.exists(),
    reason=f"{LATEST_PYTHON} not found; create it with "
    "'python3 -m venv .venv-latest && .venv-latest/bin/pip install \"datasets==5.2.*\" pytest'",
)

# --- Raw HTTP helpers -----------------------------------------------------------------------------


class Response:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    hub: HubTestServer,
    method: str,
    path: str,
    *,
    body: bytes | None = None,
    token: str | None = "",
    headers: dict[str, str] | None = None,
) -> Response:
    """Send one request to the stand-in. Token "" sends the fixture's token and None sends no token."""
    all_headers = dict(headers or {})
    token = hub.token if token == "" else token
    if token is not None:
        all_headers["Authorization"] = f"Bearer {token}"
    if not path.startswith("/"):
        split = urlsplit(path)
        path = f"{split.path}?{split.query}" if split.query else split.path
    connection = http.client.HTTPConnection(urlsplit(hub.endpoint).netloc, timeout=30)
    try:
        connection.request(method, path, body=body, headers=all_headers)
        response = connection.getresponse()
        return Response(response.status, response.headers, response.read())
    finally:
        connection.close()


def post_json(hub: HubTestServer, path: str, payload: Any, **options: Any) -> Response:
    body = json.dumps(payload).encode()
    return request(hub, "POST", path, body=body, headers={"Content-Type": "application/json"}, **options)


def create_repo(hub: HubTestServer, name: str, **fields: Any) -> str:
    response = post_json(hub, "/api/repos/create", {"name": name, "type": "dataset", **fields})
    assert response.status == 200, response.body
    return hub.repo_id(name)


def commit(
    hub: HubTestServer, repo_id: str, files: dict[str, bytes], summary: str = "test commit", **header: Any
) -> Response:
    """Commit regular files through the NDJSON commit endpoint."""
    lines = [{"key": "header", "value": {"summary": summary, "description": "", **header}}]
    for path, content in files.items():
        encoded = base64.b64encode(content).decode()
        lines.append({"key": "file", "value": {"path": path, "content": encoded, "encoding": "base64"}})
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    headers = {"Content-Type": "application/x-ndjson"}
    return request(hub, "POST", f"/api/datasets/{repo_id}/commit/main", body=body, headers=headers)


def upload_lfs(hub: HubTestServer, repo_id: str, path: str, content: bytes) -> str:
    """Upload `content` through the LFS batch API, commit it as `path` and return its sha256."""
    oid = hashlib.sha256(content).hexdigest()
    payload = {"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": len(content)}]}
    batch = post_json(hub, f"/datasets/{repo_id}.git/info/lfs/objects/batch", payload).json()
    upload = request(hub, "PUT", batch["objects"][0]["actions"]["upload"]["href"], body=content, token=None)
    assert upload.status == 200, upload.body
    lines = [
        {"key": "header", "value": {"summary": f"Upload {path}"}},
        {"key": "lfsFile", "value": {"path": path, "algo": "sha256", "oid": oid, "size": len(content)}},
    ]
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    response = request(hub, "POST", f"/api/datasets/{repo_id}/commit/main", body=body)
    assert response.status == 200, response.body
    return oid


# --- Server behaviour over raw HTTP ----------------------------------------------------------------


def test_whoami_with_token(hub_server):
    response = request(hub_server, "GET", "/api/whoami-v2")

    assert response.status == 200
    assert response.json()["name"] == hub_server.user


def test_whoami_without_token_401(hub_server):
    response = request(hub_server, "GET", "/api/whoami-v2", token=None)

    assert response.status == 401


def test_invalid_token_rejected(hub_server):
    repo_id = create_repo(hub_server, "public")

    response = request(hub_server, "GET", f"/api/datasets/{repo_id}", token="hf_wrong")

    assert response.status == 401
    assert response.headers["X-Error-Message"] == "Invalid credentials in Authorization header"
    assert response.json() == {"error": "Invalid credentials in Authorization header"}


def test_write_without_token_401(hub_server):
    response = post_json(hub_server, "/api/repos/create", {"name": "anonymous", "type": "dataset"}, token=None)

    assert response.status == 401
    assert "error" in response.json()


def test_create_existing_repo_409(hub_server):
    repo_id = create_repo(hub_server, "twice")

    response = post_json(hub_server, "/api/repos/create", {"name": "twice", "type": "dataset"})

    assert response.status == 409
    assert response.json()["url"] == f"{hub_server.endpoint}/datasets/{repo_id}"


def test_create_in_foreign_namespace_403(hub_server):
    payload = {"name": "x", "organization": "someone-else", "type": "dataset"}

    response = post_json(hub_server, "/api/repos/create", payload)

    assert response.status == 403


def test_new_repo_has_initial_commit(hub_server):
    repo_id = create_repo(hub_server, "fresh")

    commits = hub_server.server.commits(repo_id)

    assert [record.title for record in commits] == ["initial commit"]
    assert commits[0].added == (".gitattributes",)


def test_missing_repo_404(hub_server):
    response = request(hub_server, "GET", f"/api/datasets/{hub_server.user}/absent")

    assert response.status == 404
    assert response.headers["X-Error-Code"] == "RepoNotFound"


def test_private_repo_hidden_from_anonymous(hub_server):
    repo_id = create_repo(hub_server, "secret", private=True)

    anonymous = request(hub_server, "GET", f"/api/datasets/{repo_id}", token=None)
    owner = request(hub_server, "GET", f"/api/datasets/{repo_id}")

    assert anonymous.status == 401
    assert anonymous.headers["X-Error-Code"] == "RepoNotFound"
    assert owner.status == 200
    assert owner.json()["private"] is True


def test_repo_info_lists_siblings(hub_server):
    repo_id = create_repo(hub_server, "info")
    commit(hub_server, repo_id, {"data/a.txt": b"a"})

    info = request(hub_server, "GET", f"/api/datasets/{repo_id}?blobs=true").json()

    assert info["sha"] == hub_server.server.commits(repo_id)[0].id
    assert {"rfilename": "data/a.txt", "size": 1, "blobId": git_object_id("blob", b"a")} in info["siblings"]


def test_encoded_revision_404(hub_server):
    repo_id = create_repo(hub_server, "parquet-ref")

    resolve = request(hub_server, "HEAD", f"/datasets/{repo_id}/resolve/refs%2Fconvert%2Fparquet/README.md")
    info = request(hub_server, "GET", f"/api/datasets/{repo_id}/revision/refs%2Fconvert%2Fparquet")

    assert resolve.status == 404
    assert resolve.headers["X-Error-Code"] == "RevisionNotFound"
    assert info.status == 404
    assert info.headers["X-Error-Code"] == "RevisionNotFound"


def test_missing_file_404(hub_server):
    repo_id = create_repo(hub_server, "no-file")
    head = hub_server.server.commits(repo_id)[0].id

    response = request(hub_server, "GET", f"/datasets/{repo_id}/resolve/main/absent.txt")

    assert response.status == 404
    assert response.headers["X-Error-Code"] == "EntryNotFound"
    assert response.headers["X-Repo-Commit"] == head


def test_resolve_headers(hub_server):
    repo_id = create_repo(hub_server, "headers")
    commit(hub_server, repo_id, {"a.txt": b"hello\n"})
    head = hub_server.server.commits(repo_id)[0].id

    blob_id = git_object_id("blob", b"hello\n")

    response = request(hub_server, "HEAD", f"/datasets/{repo_id}/resolve/main/a.txt")

    assert response.status == 200
    assert response.headers["X-Repo-Commit"] == head
    assert response.headers["ETag"] == f'"{blob_id}"'
    assert response.headers["Content-Length"] == "6"
    assert response.body == b""


def test_resolve_lfs_linked_headers(hub_server):
    repo_id = create_repo(hub_server, "linked")
    oid = upload_lfs(hub_server, repo_id, "weights.bin", b"\0" * 1000)

    response = request(hub_server, "HEAD", f"/datasets/{repo_id}/resolve/main/weights.bin")

    assert response.status == 200
    assert response.headers["X-Linked-Etag"] == f'"{oid}"'
    assert response.headers["X-Linked-Size"] == "1000"
    assert response.headers["ETag"] == f'"{git_object_id("blob", lfs_pointer(oid, 1000))}"'


def test_resolve_by_commit_id(hub_server):
    repo_id = create_repo(hub_server, "by-sha")
    commit(hub_server, repo_id, {"a.txt": b"old"})
    old_id = hub_server.server.commits(repo_id)[0].id
    commit(hub_server, repo_id, {"a.txt": b"new"})

    old = request(hub_server, "GET", f"/datasets/{repo_id}/resolve/{old_id}/a.txt")
    new = request(hub_server, "GET", f"/datasets/{repo_id}/resolve/main/a.txt")

    assert old.body == b"old"
    assert old.headers["X-Repo-Commit"] == old_id
    assert new.body == b"new"


def test_history_keeps_old_content(hub_server):
    repo_id = create_repo(hub_server, "history")
    commit(hub_server, repo_id, {"a.txt": b"first"}, summary="first")
    commit(hub_server, repo_id, {"a.txt": b"second"}, summary="second")
    first, second = hub_server.server.commits(repo_id)[1::-1]

    assert hub_server.server.read_file(repo_id, "a.txt", revision=first.id) == b"first"
    assert hub_server.server.read_file(repo_id, "a.txt", revision=second.id) == b"second"
    assert second.modified == ("a.txt",)


def test_range_request_206(hub_server):
    repo_id = create_repo(hub_server, "ranges")
    commit(hub_server, repo_id, {"a.bin.txt": b"0123456789"})

    response = request(hub_server, "GET", f"/datasets/{repo_id}/resolve/main/a.bin.txt", headers={"Range": "bytes=2-5"})

    assert response.status == 206
    assert response.body == b"2345"
    assert response.headers["Content-Range"] == "bytes 2-5/10"


def test_suffix_range_206(hub_server):
    repo_id = create_repo(hub_server, "suffix")
    commit(hub_server, repo_id, {"a.txt": b"0123456789"})

    response = request(hub_server, "GET", f"/datasets/{repo_id}/resolve/main/a.txt", headers={"Range": "bytes=-3"})

    assert response.status == 206
    assert response.body == b"789"


def test_range_beyond_end_416(hub_server):
    repo_id = create_repo(hub_server, "short")
    commit(hub_server, repo_id, {"a.txt": b"0123"})

    response = request(hub_server, "GET", f"/datasets/{repo_id}/resolve/main/a.txt", headers={"Range": "bytes=10-20"})

    assert response.status == 416
    assert response.headers["Content-Range"] == "bytes */4"


def test_tree_pagination_link(tmp_path):
    from hub_fixtures import running_hub

    with running_hub(tmp_path, tree_page_size=2) as hub:
        repo_id = create_repo(hub, "paged")
        commit(hub, repo_id, {f"f{i}.txt": b"x" for i in range(3)})

        first = request(hub, "GET", f"/api/datasets/{repo_id}/tree/main")
        second = request(hub, "GET", first.headers["Link"].split(">")[0].lstrip("<"))

    assert [entry["path"] for entry in first.json()] == [".gitattributes", "f0.txt"]
    assert [entry["path"] for entry in second.json()] == ["f1.txt", "f2.txt"]
    assert second.headers["Link"] is None


def test_tree_non_recursive_lists_folders(hub_server):
    repo_id = create_repo(hub_server, "folders")
    commit(hub_server, repo_id, {"a/b/c.txt": b"c", "a/d.txt": b"d"})

    entries = request(hub_server, "GET", f"/api/datasets/{repo_id}/tree/main/a").json()

    assert [(entry["type"], entry["path"]) for entry in entries] == [("directory", "a/b"), ("file", "a/d.txt")]


def test_tree_missing_folder_404(hub_server):
    repo_id = create_repo(hub_server, "no-folder")

    response = request(hub_server, "GET", f"/api/datasets/{repo_id}/tree/main/absent")

    assert response.status == 404
    assert response.headers["X-Error-Code"] == "EntryNotFound"


def test_preupload_chooses_upload_mode(hub_server):
    repo_id = create_repo(hub_server, "modes")
    text_sample = base64.b64encode(b"plain text").decode()
    files = [
        {"path": "notes.txt", "size": 10, "sample": text_sample},
        {"path": "data/train.parquet", "size": 10, "sample": text_sample},
        {"path": "big.txt", "size": LFS_SIZE_THRESHOLD + 1, "sample": text_sample},
        {"path": "blob.dat", "size": 10, "sample": base64.b64encode(b"\0\1\2").decode()},
    ]

    answer = post_json(hub_server, f"/api/datasets/{repo_id}/preupload/main", {"files": files}).json()

    modes = {item["path"]: item["uploadMode"] for item in answer["files"]}
    assert modes == {"notes.txt": "regular", "data/train.parquet": "lfs", "big.txt": "lfs", "blob.dat": "lfs"}


def test_preupload_returns_existing_oid(hub_server):
    repo_id = create_repo(hub_server, "oids")
    commit(hub_server, repo_id, {"a.txt": b"hello\n"})
    files = [{"path": "a.txt", "size": 6, "sample": base64.b64encode(b"hello\n").decode()}]

    answer = post_json(hub_server, f"/api/datasets/{repo_id}/preupload/main", {"files": files}).json()

    assert answer["files"][0]["oid"] == git_object_id("blob", b"hello\n")


def test_preupload_applies_gitignore(hub_server):
    repo_id = create_repo(hub_server, "ignored")
    files = [{"path": "logs/run.log", "size": 3, "sample": ""}, {"path": "keep.txt", "size": 3, "sample": ""}]

    payload = {"files": files, "gitIgnore": "*.log\n"}

    answer = post_json(hub_server, f"/api/datasets/{repo_id}/preupload/main", payload).json()

    assert {item["path"]: item["shouldIgnore"] for item in answer["files"]} == {"logs/run.log": True, "keep.txt": False}


def test_lfs_batch_offers_basic_only(hub_server):
    repo_id = create_repo(hub_server, "batch")
    objects = [{"oid": "a" * 64, "size": 3}]
    payload = {"operation": "upload", "transfers": ["basic", "multipart", "xet"], "objects": objects}

    answer = post_json(hub_server, f"/datasets/{repo_id}.git/info/lfs/objects/batch", payload).json()

    assert answer["transfer"] == "basic"
    assert answer["objects"][0]["actions"]["upload"]["href"].startswith(hub_server.endpoint)


def test_lfs_upload_bad_signature_403(hub_server):
    repo_id = create_repo(hub_server, "signed")
    objects = [{"oid": hashlib.sha256(b"abc").hexdigest(), "size": 3}]
    payload = {"operation": "upload", "transfers": ["basic"], "objects": objects}
    answer = post_json(hub_server, f"/datasets/{repo_id}.git/info/lfs/objects/batch", payload).json()
    href = answer["objects"][0]["actions"]["upload"]["href"]

    response = request(hub_server, "PUT", href.replace("signature=", "signature=0"), body=b"abc", token=None)

    assert response.status == 403


def test_lfs_upload_wrong_content_400(hub_server):
    repo_id = create_repo(hub_server, "mismatch")
    objects = [{"oid": hashlib.sha256(b"abc").hexdigest(), "size": 3}]
    payload = {"operation": "upload", "transfers": ["basic"], "objects": objects}
    answer = post_json(hub_server, f"/datasets/{repo_id}.git/info/lfs/objects/batch", payload).json()
    href = answer["objects"][0]["actions"]["upload"]["href"]

    response = request(hub_server, "PUT", href, body=b"xyz", token=None)

    assert response.status == 400


def test_commit_unknown_lfs_object_422(hub_server):
    repo_id = create_repo(hub_server, "no-object")
    lines = [
        {"key": "header", "value": {"summary": "add"}},
        {"key": "lfsFile", "value": {"path": "x.bin", "algo": "sha256", "oid": "b" * 64, "size": 1}},
    ]
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)

    response = request(hub_server, "POST", f"/api/datasets/{repo_id}/commit/main", body=body)

    assert response.status == 422


def test_commit_stale_parent_412(hub_server):
    repo_id = create_repo(hub_server, "stale")
    parent = hub_server.server.commits(repo_id)[0].id
    commit(hub_server, repo_id, {"a.txt": b"a"})

    response = commit(hub_server, repo_id, {"b.txt": b"b"}, parentCommit=parent)

    assert response.status == 412


def test_delete_missing_file_404(hub_server):
    repo_id = create_repo(hub_server, "delete-missing")
    lines = [{"key": "header", "value": {"summary": "delete"}}, {"key": "deletedFile", "value": {"path": "absent.txt"}}]
    body = b"".join(json.dumps(line).encode() + b"\n" for line in lines)

    response = request(hub_server, "POST", f"/api/datasets/{repo_id}/commit/main", body=body)

    assert response.status == 404
    assert response.headers["X-Error-Code"] == "EntryNotFound"


def test_unchanged_commit_recorded_empty(hub_server):
    # Like the Hub, the stand-in records a commit whose files are all unchanged, as an empty commit.
    repo_id = create_repo(hub_server, "empty-commit")
    commit(hub_server, repo_id, {"a.txt": b"same"})

    response = commit(hub_server, repo_id, {"a.txt": b"same"}, summary="again")

    commits = hub_server.server.commits(repo_id)
    assert response.status == 200
    assert response.json()["commitOid"] == commits[0].id
    assert commits[0].title == "again"
    assert commits[0].changed_paths == ()


def test_unknown_route_recorded(hub_server):
    response = request(hub_server, "GET", "/api/not-a-route")

    assert response.status == 404
    assert hub_server.server.unhandled_requests == [("GET", "/api/not-a-route")]


# --- huggingface_hub client in a subprocess ---------------------------------------------------------


def test_client_whoami(hub_server):
    result = hub_server.run_python("from huggingface_hub import HfApi; print(HfApi().whoami()['name'])")

    assert result.stdout.strip() == hub_server.user


def test_client_invalid_token_401(hub_server):
    code = "from huggingface_hub import HfApi; HfApi().create_repo('tester/x', repo_type='dataset', exist_ok=True)"

    result = hub_server.run_python(code, token="hf_invalid", check=False)

    assert result.returncode != 0
    assert "401" in result.stderr
    assert "Invalid credentials in Authorization header" in result.stderr


def test_client_upload_regular_file(hub_server):
    repo_id = hub_server.repo_id("regular")
    code = textwrap.dedent(
        f"""
        from huggingface_hub import HfApi
        api = HfApi()
        api.create_repo({repo_id!r}, repo_type="dataset")
        api.upload_file(
            path_or_fileobj=b"small file\\n", path_in_repo="notes/a.txt", repo_id={repo_id!r}, repo_type="dataset"
        )
        print(api.list_repo_files({repo_id!r}, repo_type="dataset"))
        """
    )

    result = hub_server.run_python(code)

    assert result.stdout.strip() == "['.gitattributes', 'notes/a.txt']"
    assert hub_server.server.read_file(repo_id, "notes/a.txt") == b"small file\n"
    assert not hub_server.server.file_entry(repo_id, "notes/a.txt").is_lfs


def test_client_upload_lfs_file(hub_server, tmp_path):
    repo_id = hub_server.repo_id("large")
    content = hashlib.sha256(b"seed").digest() * ((LFS_SIZE_THRESHOLD // 32) + 1024)
    source = tmp_path / "large.dat"
    source.write_bytes(content)
    code = textwrap.dedent(
        f"""
        import hashlib
        from huggingface_hub import HfApi, hf_hub_download
        api = HfApi()
        api.create_repo({repo_id!r}, repo_type="dataset")
        api.upload_file(
            path_or_fileobj={str(source)!r}, path_in_repo="large.dat", repo_id={repo_id!r}, repo_type="dataset"
        )
        path = hf_hub_download({repo_id!r}, "large.dat", repo_type="dataset")
        print(hashlib.sha256(open(path, "rb").read()).hexdigest())
        """
    )

    result = hub_server.run_python(code)

    entry = hub_server.server.file_entry(repo_id, "large.dat")
    uploads = [record for record in hub_server.server.requests if record.method == "PUT"]
    assert len(content) > LFS_SIZE_THRESHOLD
    assert entry.is_lfs
    assert entry.sha256 == hashlib.sha256(content).hexdigest()
    assert [record.status for record in uploads] == [200]
    assert result.stdout.strip() == entry.sha256


def test_client_download_regular_file(hub_server):
    repo_id = create_repo(hub_server, "download")
    commit(hub_server, repo_id, {"dir/a.txt": b"content"})
    code = textwrap.dedent(
        f"""
        from huggingface_hub import hf_hub_download
        print(open(hf_hub_download({repo_id!r}, "dir/a.txt", repo_type="dataset")).read())
        """
    )

    result = hub_server.run_python(code)

    assert result.stdout.strip() == "content"


def test_client_delete_file(hub_server):
    repo_id = create_repo(hub_server, "deletion")
    commit(hub_server, repo_id, {"a.txt": b"a", "b.txt": b"b"})
    code = textwrap.dedent(
        f"""
        from huggingface_hub import HfApi
        api = HfApi()
        api.delete_file("a.txt", {repo_id!r}, repo_type="dataset")
        print(api.list_repo_files({repo_id!r}, repo_type="dataset"))
        """
    )

    result = hub_server.run_python(code)

    assert result.stdout.strip() == "['.gitattributes', 'b.txt']"
    assert hub_server.server.commits(repo_id)[0].deleted == ("a.txt",)


def test_client_reupload_skips_commit(hub_server):
    repo_id = create_repo(hub_server, "reupload")
    commit(hub_server, repo_id, {"a.txt": b"same\n"})
    before = hub_server.server.commits(repo_id)
    code = textwrap.dedent(
        f"""
        from huggingface_hub import HfApi
        HfApi().upload_file(path_or_fileobj=b"same\\n", path_in_repo="a.txt", repo_id={repo_id!r}, repo_type="dataset")
        """
    )

    hub_server.run_python(code)

    assert hub_server.server.commits(repo_id) == before


def test_client_missing_revision_error(hub_server):
    repo_id = create_repo(hub_server, "revisions")
    code = textwrap.dedent(
        f"""
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RevisionNotFoundError
        try:
            HfApi().list_repo_files({repo_id!r}, repo_type="dataset", revision="refs/convert/parquet")
        except RevisionNotFoundError:
            print("RevisionNotFoundError")
        """
    )

    result = hub_server.run_python(code)

    assert result.stdout.strip() == "RevisionNotFoundError"


def test_client_filesystem_range_read(hub_server):
    repo_id = create_repo(hub_server, "fs")
    content = bytes(range(256)) * 64
    commit(hub_server, repo_id, {"blob.txt": content})
    code = textwrap.dedent(
        f"""
        from huggingface_hub import HfFileSystem
        with HfFileSystem().open("datasets/{repo_id}/blob.txt", "rb", block_size=1024) as handle:
            handle.seek(5000)
            print(handle.read(10).hex())
        """
    )

    result = hub_server.run_python(code)

    partial = [record for record in hub_server.server.requests if record.status == 206]
    assert result.stdout.strip() == content[5000:5010].hex()
    assert partial


def test_client_model_repo_roundtrip(hub_server):
    code = textwrap.dedent(
        """
        from huggingface_hub import HfApi, hf_hub_download
        api = HfApi()
        api.create_repo("tester/model")
        api.upload_file(path_or_fileobj=b'{"a": 1}', path_in_repo="config.json", repo_id="tester/model")
        print(open(hf_hub_download("tester/model", "config.json")).read())
        """
    )

    result = hub_server.run_python(code)

    assert result.stdout.strip() == '{"a": 1}'
    assert hub_server.server.list_files("tester/model", repo_type="model") == [".gitattributes", "config.json"]


def test_client_with_xet_enabled_fails(hub_server, tmp_path):
    # Shows why child_env() sets HF_HUB_DISABLE_XET=1. Without it, huggingface_hub 2.4 requests a Xet token.
    pytest.importorskip("hf_xet")
    repo_id = create_repo(hub_server, "xet")
    source = tmp_path / "x.parquet"
    source.write_bytes(b"PAR1 not really parquet")
    code = textwrap.dedent(
        f"""
        import os
        os.environ.pop("HF_HUB_DISABLE_XET")
        from huggingface_hub import HfApi
        HfApi().upload_file(
            path_or_fileobj={str(source)!r}, path_in_repo="x.parquet", repo_id={repo_id!r}, repo_type="dataset"
        )
        """
    )

    result = hub_server.run_python(code, check=False)

    assert result.returncode != 0
    assert "xet-write-token" in result.stderr


# --- datasets push_to_hub and load_dataset ----------------------------------------------------------


def config_rows(offset: int) -> dict[str, dict[str, list]]:
    """Rows shaped like the project's data: a token id, the remaining token count and a hidden state."""
    return {
        split: {
            "token_id": [offset + i for i in range(count)],
            "remaining": [count - i for i in range(count)],
            # Binary fractions survive float32 storage and JSON exactly.
            "hidden": [[offset + i + 0.5, -0.25 * i] for i in range(count)],
        }
        for split, count in (("train", 6), ("validation", 3))
    }


CONFIGS = {"a": config_rows(0), "b": config_rows(1000)}

PUSH_CODE = textwrap.dedent(
    """
    import json, sys
    from datasets import Dataset, DatasetDict, Features, Sequence, Value
    features = Features({"token_id": Value("int64"), "remaining": Value("int64"), "hidden": Sequence(Value("float32"))})
    repo_id, configs = sys.argv[1], json.loads(sys.argv[2])
    for name, splits in configs.items():
        dataset = DatasetDict({split: Dataset.from_dict(rows, features=features) for split, rows in splits.items()})
        dataset.push_to_hub(repo_id, config_name=name)
    """
)

LOAD_CODE = DATASETS_CHILD_PRELUDE + textwrap.dedent(
    """
    import json, sys
    from datasets import load_dataset
    result = {}
    for name in ("a", "b"):
        loaded = load_dataset(sys.argv[1], name)
        result[name] = {split: loaded[split].to_dict() for split in loaded}
    print(json.dumps(result))
    """
)


@pytest.fixture(scope="module")
def pushed_repo(module_hub_server: HubTestServer) -> str:
    """A dataset repository with configs "a" and "b", pushed by datasets from .venv."""
    repo_id = module_hub_server.repo_id("probe")
    module_hub_server.run_python(PUSH_CODE, repo_id, json.dumps(CONFIGS))
    return repo_id


@pytest.fixture(scope="module")
def loaded_current(module_hub_server: HubTestServer, pushed_repo: str) -> dict:
    result = module_hub_server.run_python(LOAD_CODE, pushed_repo)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def loaded_latest(module_hub_server: HubTestServer, pushed_repo: str) -> dict:
    result = module_hub_server.run_python(LOAD_CODE, pushed_repo, python=LATEST_PYTHON)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_push_stores_config_files(module_hub_server, pushed_repo):
    files = module_hub_server.server.list_files(pushed_repo)

    for config in ("a", "b"):
        for split in ("train", "validation"):
            assert f"{config}/{split}-00000-of-00001.parquet" in files


def test_push_stores_parquet_as_lfs(module_hub_server, pushed_repo):
    entry = module_hub_server.server.file_entry(pushed_repo, "a/train-00000-of-00001.parquet")

    assert entry.is_lfs


def test_push_card_lists_configs(module_hub_server, pushed_repo):
    card = module_hub_server.server.read_file(pushed_repo, "README.md").decode()

    assert "config_name: a" in card
    assert "config_name: b" in card


def test_push_routes_all_handled(module_hub_server, pushed_repo):
    assert module_hub_server.server.unhandled_requests == []


def test_load_config_a(loaded_current):
    assert loaded_current["a"] == CONFIGS["a"]


def test_load_config_b(loaded_current):
    assert loaded_current["b"] == CONFIGS["b"]


@needs_latest
def test_load_config_a_latest(loaded_latest):
    assert loaded_latest["a"] == CONFIGS["a"]


@needs_latest
def test_load_config_b_latest(loaded_latest):
    assert loaded_latest["b"] == CONFIGS["b"]


def test_repush_adds_no_change(module_hub_server, pushed_repo):
    before = module_hub_server.server.commits(pushed_repo)

    module_hub_server.run_python(PUSH_CODE, pushed_repo, json.dumps(CONFIGS))

    after = module_hub_server.server.commits(pushed_repo)
    new_commits = after[: len(after) - len(before)]
    assert after[len(new_commits) :] == before
    assert [record.changed_paths for record in new_commits if record.changed_paths] == []
