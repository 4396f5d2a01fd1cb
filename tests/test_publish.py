"""Tests of `python -m generation push` against the Hub stand-in, over real HTTP.

Every push runs the real command line in a subprocess, because huggingface_hub and datasets read
HF_ENDPOINT when they are imported. The published copy is read back with `load_dataset` in children
running datasets 3.6 (.venv) and the newest datasets (.venv-latest), and compared with the builder's
output row by row.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from hub_fixtures import CHILD_TIMEOUT, DATASETS_CHILD_PRELUDE, HubTestServer, hub_server, module_hub_server  # noqa: F401
from length_probe import ALL_LAYERS, CONFIG_NAMES, LAST_LAYER, MANIFEST_FILE, assign_splits, build_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]
LATEST_PYTHON = REPO_ROOT / ".venv-latest" / "bin" / "python"
needs_latest = pytest.mark.skipif(
    not LATEST_PYTHON.exists(),
    reason=f"{LATEST_PYTHON} not found; create it with "
    "'python3 -m venv .venv-latest && .venv-latest/bin/pip install \"datasets==5.2.*\" pytest'",
)
CARD_HEADING = "# Length probe: does a model know how many tokens it has left?"

# Prints, for each config named on the command line, every split as {"type": Arrow type, "rows": columns}.
LOAD_CODE = DATASETS_CHILD_PRELUDE + textwrap.dedent(
    """
    import json, sys
    from datasets import load_dataset
    result = {}
    for name in sys.argv[2:]:
        loaded = load_dataset(sys.argv[1], name)
        result[name] = {split: {"type": str(loaded[split].features.type), "rows": loaded[split].to_dict()} for split in loaded}
    print(json.dumps(result))
    """
)

# The same output from length_probe.build_dataset, for a data directory and a cache directory.
BUILD_CODE = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[3])
    import datasets
    from length_probe import CONFIG_NAMES, build_dataset
    result = {"version": datasets.__version__}
    for name in CONFIG_NAMES:
        built = build_dataset(name, sys.argv[1], cache_dir=sys.argv[2])
        result[name] = {split: {"type": str(built[split].features.type), "rows": built[split].to_dict()} for split in built}
    print(json.dumps(result))
    """
)


# --- helpers ----------------------------------------------------------------------------------------


def push(hub: HubTestServer, *args: str, cache_dir: Path, log_level: str = "INFO", **env_options) -> subprocess.CompletedProcess:
    """Run `python -m generation push ARGS` in a child process that talks to the stand-in."""
    command = [sys.executable, "-m", "generation", "--log-level", log_level, "push", *args, "--cache-dir", str(cache_dir)]
    return subprocess.run(
        command, cwd=REPO_ROOT, env=hub.child_env(**env_options), capture_output=True, text=True, timeout=CHILD_TIMEOUT
    )


def push_ok(hub: HubTestServer, *args: str, **options) -> subprocess.CompletedProcess:
    result = push(hub, *args, **options)
    if result.returncode != 0:
        pytest.fail(f"push exited with {result.returncode}\n--- stderr ---\n{result.stderr[-4000:]}", pytrace=False)
    return result


def expected_rows(data_dir: Path, cache_dir: Path, config_names: tuple[str, ...] = CONFIG_NAMES) -> dict:
    """Build configs in this process (datasets 3.6) in the shape that LOAD_CODE prints."""
    expected = {}
    for name in config_names:
        built = build_dataset(name, data_dir, cache_dir=str(cache_dir))
        expected[name] = {split: {"type": str(built[split].features.type), "rows": built[split].to_dict()} for split in built}
    # A JSON round trip, so both sides hold the same Python types.
    return json.loads(json.dumps(expected))


def readme_yaml(hub: HubTestServer, repo_id: str) -> dict:
    text = hub.server.read_file(repo_id, "README.md").decode()
    return yaml.safe_load(text.split("---\n")[1])


def entry(entries: list[dict] | dict, config_name: str) -> dict:
    """Return one config's entry of a README `configs` or `dataset_info` list."""
    if isinstance(entries, dict):
        entries = [entries]
    return next(item for item in entries if item["config_name"] == config_name)


def write_requests(hub: HubTestServer) -> list:
    return [record for record in hub.server.requests if record.method in ("POST", "PUT", "DELETE")]


def seed_without_validation_rows(data_dir: Path) -> int:
    """Return a split seed whose validation samples all were truncated, so the validation split is empty."""
    manifest = json.loads((data_dir / MANIFEST_FILE).read_text())
    stored = {sample["sample_id"] for sample in manifest["samples"] if sample["rows"]}
    for seed in range(1000):
        split_of = assign_splits([sample["sample_id"] for sample in manifest["samples"]], seed, 0.1)
        if not any(split == "validation" and sample_id in stored for sample_id, split in split_of.items()):
            return seed
    pytest.fail(f"no seed below 1000 leaves the validation split of {data_dir} empty")


# --- one push of both configs, shared by the tests that only read it ----------------------------------


@pytest.fixture(scope="module")
def published(module_hub_server: HubTestServer, llama_dataset_dir: Path, tmp_path_factory) -> dict:
    """Both configs of the small extraction pushed once through the CLI, logging at DEBUG."""
    repo_id = module_hub_server.repo_id("length-probe")
    cache_dir = tmp_path_factory.mktemp("push-cache")
    result = push_ok(module_hub_server, "--repo-id", repo_id, "--data-dir", str(llama_dataset_dir),
                     cache_dir=cache_dir, log_level="DEBUG")
    expected = expected_rows(llama_dataset_dir, tmp_path_factory.mktemp("expected-cache"))
    return {"repo_id": repo_id, "result": result, "expected": expected, "cache_dir": cache_dir}


def test_push_writes_parquet_per_split(module_hub_server, published):
    files = module_hub_server.server.list_files(published["repo_id"])

    for name in CONFIG_NAMES:
        for split in ("train", "validation"):
            assert f"{name}/{split}-00000-of-00001.parquet" in files


def test_load_matches_builder(module_hub_server, published):
    result = module_hub_server.run_python(LOAD_CODE, published["repo_id"], *CONFIG_NAMES)
    loaded = json.loads(result.stdout.strip().splitlines()[-1])

    for name in CONFIG_NAMES:
        expected = published["expected"][name]
        assert sorted(loaded[name]) == sorted(expected)
        for split in expected:
            assert loaded[name][split]["type"] == expected[split]["type"], (name, split)
            assert len(loaded[name][split]["rows"]["remaining_tokens"]) == len(expected[split]["rows"]["remaining_tokens"])
            assert loaded[name][split]["rows"] == expected[split]["rows"], (name, split)


@needs_latest
def test_load_latest_matches_builder(module_hub_server, published):
    result = module_hub_server.run_python(LOAD_CODE, published["repo_id"], *CONFIG_NAMES, python=LATEST_PYTHON)
    loaded = json.loads(result.stdout.strip().splitlines()[-1])

    for name in CONFIG_NAMES:
        expected = published["expected"][name]
        assert sorted(loaded[name]) == sorted(expected)
        for split in expected:
            assert loaded[name][split]["type"] == expected[split]["type"], (name, split)
            assert len(loaded[name][split]["rows"]["remaining_tokens"]) == len(expected[split]["rows"]["remaining_tokens"])
            assert loaded[name][split]["rows"] == expected[split]["rows"], (name, split)


def test_readme_has_card_prose(module_hub_server, published):
    text = module_hub_server.server.read_file(published["repo_id"], "README.md").decode()

    assert CARD_HEADING in text
    assert f'load_dataset("{published["repo_id"]}", "single_prompt_all_layers")' in text


def test_readme_lists_configs(module_hub_server, published):
    header = readme_yaml(module_hub_server, published["repo_id"])

    assert [item["config_name"] for item in header["configs"]] == sorted(CONFIG_NAMES)
    for name in CONFIG_NAMES:
        assert entry(header["configs"], name)["data_files"] == [
            {"split": "train", "path": f"{name}/train-*"},
            {"split": "validation", "path": f"{name}/validation-*"},
        ]
        features = [feature["name"] for feature in entry(header["dataset_info"], name)["features"]]
        assert "hidden_states" in features
        assert "remaining_tokens" in features
    assert entry(header["configs"], ALL_LAYERS).get("default") is True
    assert "default" not in entry(header["configs"], LAST_LAYER)


def test_readme_keeps_card_keys(module_hub_server, published):
    header = readme_yaml(module_hub_server, published["repo_id"])
    card = yaml.safe_load((REPO_ROOT / "dataset_card.md").read_text().split("---\n")[1])

    for key in card.keys() - {"configs"}:
        assert header[key] == card[key], key


def test_token_not_in_output(module_hub_server, published):
    result = published["result"]

    assert "DEBUG" in result.stderr  # the run logged at DEBUG, so the check below saw real log output
    assert module_hub_server.token not in result.stdout
    assert module_hub_server.token not in result.stderr


def test_repush_adds_no_commit(module_hub_server, published, llama_dataset_dir):
    before_commits = module_hub_server.server.commits(published["repo_id"])
    before_files = module_hub_server.server.list_files(published["repo_id"])

    push_ok(module_hub_server, "--repo-id", published["repo_id"], "--data-dir", str(llama_dataset_dir),
            cache_dir=published["cache_dir"])

    after_commits = module_hub_server.server.commits(published["repo_id"])
    new_commits = after_commits[: len(after_commits) - len(before_commits)]
    assert after_commits[len(new_commits):] == before_commits
    assert [record.changed_paths for record in new_commits if record.changed_paths] == []
    assert module_hub_server.server.list_files(published["repo_id"]) == before_files


# --- pushes that change a repository ------------------------------------------------------------------


def test_one_config_keeps_other(hub_server, llama_dataset_dir, tmp_path):
    repo_id = hub_server.repo_id("one-config")
    push_ok(hub_server, "--repo-id", repo_id, "--data-dir", str(llama_dataset_dir), "--config", LAST_LAYER,
            cache_dir=tmp_path)
    last_layer_files = {path: hub_server.server.file_entry(repo_id, path) for path in hub_server.server.list_files(repo_id)
                        if path.startswith(f"{LAST_LAYER}/")}
    before = readme_yaml(hub_server, repo_id)

    # The repository lists one config without a default; the card marks all-layers as the default.
    push_ok(hub_server, "--repo-id", repo_id, "--data-dir", str(llama_dataset_dir), "--config", ALL_LAYERS,
            cache_dir=tmp_path)

    after = readme_yaml(hub_server, repo_id)
    for path, file_entry in last_layer_files.items():
        assert hub_server.server.file_entry(repo_id, path) == file_entry, path
    assert entry(after["configs"], LAST_LAYER) == entry(before["configs"], LAST_LAYER)
    assert entry(after["dataset_info"], LAST_LAYER) == entry(before["dataset_info"], LAST_LAYER)
    assert entry(after["configs"], ALL_LAYERS).get("default") is True


def test_stale_split_removed(hub_server, llama_dataset_dir, tmp_path):
    repo_id = hub_server.repo_id("stale-split")
    push_ok(hub_server, "--repo-id", repo_id, "--data-dir", str(llama_dataset_dir), "--config", LAST_LAYER,
            cache_dir=tmp_path)
    assert f"{LAST_LAYER}/validation-00000-of-00001.parquet" in hub_server.server.list_files(repo_id)
    seed = seed_without_validation_rows(llama_dataset_dir)

    push_ok(hub_server, "--repo-id", repo_id, "--data-dir", str(llama_dataset_dir), "--config", LAST_LAYER,
            "--seed", str(seed), cache_dir=tmp_path)

    files = hub_server.server.list_files(repo_id)
    header = readme_yaml(hub_server, repo_id)
    assert [path for path in files if "/validation-" in path] == []
    assert f"{LAST_LAYER}/train-00000-of-00001.parquet" in files
    assert entry(header["configs"], LAST_LAYER)["data_files"] == [{"split": "train", "path": f"{LAST_LAYER}/train-*"}]
    assert [split["name"] for split in entry(header["dataset_info"], LAST_LAYER)["splits"]] == ["train"]


def test_revision_pushes_to_branch(hub_server, llama_dataset_dir, tmp_path):
    repo_id = hub_server.repo_id("branch")

    push_ok(hub_server, "--repo-id", repo_id, "--data-dir", str(llama_dataset_dir), "--config", LAST_LAYER,
            "--revision", "dev", cache_dir=tmp_path)

    branch_files = hub_server.server.list_files(repo_id, revision="dev")
    assert f"{LAST_LAYER}/train-00000-of-00001.parquet" in branch_files
    assert CARD_HEADING in hub_server.server.read_file(repo_id, "README.md", revision="dev").decode()
    assert [path for path in hub_server.server.list_files(repo_id) if path.endswith(".parquet")] == []


def test_saved_login_token_used(hub_server, llama_dataset_dir, tmp_path):
    hf_home = hub_server.new_hf_home()
    (hf_home / "token").write_text(hub_server.token)  # where `hf auth login` saves it
    repo_id = hub_server.repo_id("saved-login")

    push_ok(hub_server, "--repo-id", repo_id, "--data-dir", str(llama_dataset_dir), "--config", LAST_LAYER,
            cache_dir=tmp_path, anonymous=True, hf_home=hf_home)

    assert {record.author for record in hub_server.server.commits(repo_id)[:-1]} == {hub_server.user}


def test_hub_error_one_line(hub_server, llama_dataset_dir, tmp_path):
    result = push(hub_server, "--repo-id", "someone-else/length-probe", "--data-dir", str(llama_dataset_dir),
                  "--config", LAST_LAYER, cache_dir=tmp_path)

    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1
    assert lines[-1].startswith("error: push to someone-else/length-probe failed:")
    assert "403" in lines[-1]
    assert [record for record in write_requests(hub_server) if "/commit/" in record.path] == []


# --- float16 storage, as the extractor writes by default ----------------------------------------------


@pytest.fixture(scope="module")
def published_float16(module_hub_server: HubTestServer, llama_dir: Path, tmp_path_factory) -> dict:
    """A last-layer-only extraction in float16, pushed with --config all."""
    from conftest import extract

    data_dir = tmp_path_factory.mktemp("float16") / "data"
    extract(llama_dir, data_dir, storage_dtype="float16", configs=(LAST_LAYER,))
    repo_id = module_hub_server.repo_id("length-probe-float16")
    push_ok(module_hub_server, "--repo-id", repo_id, "--data-dir", str(data_dir),
            cache_dir=tmp_path_factory.mktemp("float16-push-cache"))
    expected = expected_rows(data_dir, tmp_path_factory.mktemp("float16-cache"), (LAST_LAYER,))
    return {"repo_id": repo_id, "expected": expected}


def test_float16_push_has_one_config(module_hub_server, published_float16):
    header = readme_yaml(module_hub_server, published_float16["repo_id"])

    assert [item["config_name"] for item in header["configs"]] == [LAST_LAYER]
    assert "halffloat" in published_float16["expected"][LAST_LAYER]["train"]["type"]


def test_float16_load_matches_builder(module_hub_server, published_float16):
    result = module_hub_server.run_python(LOAD_CODE, published_float16["repo_id"], LAST_LAYER)
    loaded = json.loads(result.stdout.strip().splitlines()[-1])[LAST_LAYER]

    expected = published_float16["expected"][LAST_LAYER]
    assert sorted(loaded) == sorted(expected)
    for split in expected:
        assert loaded[split]["type"] == expected[split]["type"], split
        assert loaded[split]["rows"] == expected[split]["rows"], split


@needs_latest
def test_float16_load_latest_matches_builder(module_hub_server, published_float16):
    result = module_hub_server.run_python(LOAD_CODE, published_float16["repo_id"], LAST_LAYER, python=LATEST_PYTHON)
    loaded = json.loads(result.stdout.strip().splitlines()[-1])[LAST_LAYER]

    expected = published_float16["expected"][LAST_LAYER]
    assert sorted(loaded) == sorted(expected)
    for split in expected:
        assert loaded[split]["type"] == expected[split]["type"], split
        assert loaded[split]["rows"] == expected[split]["rows"], split


# --- bad input: one line on stderr, a non-zero exit status and no write request ---------------------


def assert_rejected(hub: HubTestServer, result: subprocess.CompletedProcess, *fragments: str, status: int = 1) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == status
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert write_requests(hub) == []


def test_missing_token_rejected(hub_server, llama_dataset_dir, tmp_path):
    result = push(hub_server, "--repo-id", hub_server.repo_id("no-token"), "--data-dir", str(llama_dataset_dir),
                  cache_dir=tmp_path, anonymous=True)

    assert_rejected(hub_server, result, "no Hugging Face token", "hf auth login", "HF_TOKEN")


def test_missing_data_dir_named_before_token(hub_server, tmp_path):
    result = push(hub_server, "--repo-id", hub_server.repo_id("no-token-no-data"), "--data-dir", str(tmp_path / "missing"),
                  cache_dir=tmp_path, anonymous=True)

    assert_rejected(hub_server, result, "data directory", "not found")


def test_wrong_token_rejected(hub_server, llama_dataset_dir, tmp_path):
    wrong_token = "hf_not_a_valid_token"
    result = push(hub_server, "--repo-id", hub_server.repo_id("wrong-token"), "--data-dir", str(llama_dataset_dir),
                  cache_dir=tmp_path, token=wrong_token)

    assert_rejected(hub_server, result, "token was rejected", "401")
    assert wrong_token not in result.stderr + result.stdout


@pytest.mark.parametrize("repo_id", ["tester/bad name", "tester/a/b", "no-namespace"])
def test_invalid_repo_id_rejected(hub_server, llama_dataset_dir, tmp_path, repo_id):
    result = push(hub_server, "--repo-id", repo_id, "--data-dir", str(llama_dataset_dir), cache_dir=tmp_path)

    assert_rejected(hub_server, result, repr(repo_id), "user/name")


def test_missing_data_dir_rejected(hub_server, tmp_path):
    result = push(hub_server, "--repo-id", hub_server.repo_id("no-data"), "--data-dir", str(tmp_path / "absent"),
                  cache_dir=tmp_path)

    assert_rejected(hub_server, result, "not found", "python -m generation extract")


def test_missing_shard_rejected(hub_server, llama_dataset_dir, tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(llama_dataset_dir, data_dir)
    shard = next((data_dir / LAST_LAYER).glob("*.arrow"))
    shard.unlink()

    result = push(hub_server, "--repo-id", hub_server.repo_id("missing-shard"), "--data-dir", str(data_dir),
                  cache_dir=tmp_path)

    assert_rejected(hub_server, result, str(shard), "shard missing", "nothing was uploaded")


def test_unextracted_config_rejected(hub_server, llama_dataset_dir, tmp_path):
    data_dir = tmp_path / "data"
    shutil.copytree(llama_dataset_dir, data_dir)
    manifest = json.loads((data_dir / MANIFEST_FILE).read_text())
    del manifest["configs"][ALL_LAYERS]
    (data_dir / MANIFEST_FILE).write_text(json.dumps(manifest))
    shutil.rmtree(data_dir / ALL_LAYERS)

    result = push(hub_server, "--repo-id", hub_server.repo_id("one-extracted"), "--data-dir", str(data_dir),
                  "--config", ALL_LAYERS, cache_dir=tmp_path)

    assert_rejected(hub_server, result, f"config {ALL_LAYERS!r} not found", "python -m generation extract")


def test_unknown_config_rejected(hub_server, llama_dataset_dir, tmp_path):
    result = push(hub_server, "--repo-id", hub_server.repo_id("bad-config"), "--data-dir", str(llama_dataset_dir),
                  "--config", "middle_layers", cache_dir=tmp_path)

    assert_rejected(hub_server, result, "invalid choice: 'middle_layers'", status=2)


# --- in-process units ---------------------------------------------------------------------------------


def test_library_logs_mask_token(caplog):
    from generation.hub_upload import library_logs

    with caplog.at_level(logging.DEBUG), library_logs("hf_secret_value", "DEBUG"):
        logging.getLogger("huggingface_hub.test").debug("header %s", "Bearer hf_secret_value")

    assert "hf_secret_value" not in caplog.text
    assert "Bearer <TOKEN>" in caplog.text


# --- length_probe.build_dataset on the newest datasets ------------------------------------------------


@needs_latest
def test_build_latest_matches_current(llama_dataset_dir, tmp_path):
    result = subprocess.run(
        [str(LATEST_PYTHON), "-c", BUILD_CODE, str(llama_dataset_dir), str(tmp_path / "latest-cache"), str(REPO_ROOT)],
        capture_output=True, text=True, timeout=CHILD_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    latest = json.loads(result.stdout.strip().splitlines()[-1])
    expected = expected_rows(llama_dataset_dir, tmp_path / "current-cache")

    assert latest.pop("version").split(".")[0] not in ("2", "3")
    for name in CONFIG_NAMES:
        assert sorted(latest[name]) == sorted(expected[name])
        for split in expected[name]:
            assert latest[name][split]["type"] == expected[name][split]["type"], (name, split)
            assert latest[name][split]["rows"] == expected[name][split]["rows"], (name, split)
