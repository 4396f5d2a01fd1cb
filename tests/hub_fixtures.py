"""Pytest fixtures that run the Hub stand-in and start Hub clients in subprocesses.

huggingface_hub and datasets read HF_ENDPOINT into module constants when they are imported, so a
client must run in a child process whose environment points at the stand-in. Usage::

    from hub_fixtures import hub_server  # noqa: F401  (registers the fixture)

    def test_upload(hub_server):
        result = hub_server.run_python("from huggingface_hub import HfApi; print(HfApi().whoami()['name'])")
        assert result.stdout.strip() == hub_server.user

or ``subprocess.run([...], env=hub_server.child_env())`` for any other command.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hub_server import HubServer

TOKEN = "hf_stand_in_write_token"
USER = "tester"

# Time limit for one client subprocess, in seconds.
CHILD_TIMEOUT = 180

# datasets (3.6 and 5.2) requests http://datasets-server.<endpoint host>/info from the dataset viewer while
# loading a repository without a loading script. That host is not the stand-in, so a child that calls
# load_dataset() runs this first to keep every request on 127.0.0.1.
DATASETS_CHILD_PRELUDE = "import datasets.config\ndatasets.config.USE_PARQUET_EXPORT = False\n"

_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


@dataclasses.dataclass
class HubTestServer:
    """A running stand-in, the token it accepts and helpers to run clients against it."""

    server: HubServer
    token: str
    user: str
    homes_dir: Path
    _home_counter: Iterator[int] = dataclasses.field(default_factory=itertools.count)

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def repo_id(self, name: str) -> str:
        return f"{self.user}/{name}"

    def new_hf_home(self) -> Path:
        """Return a fresh, empty HF_HOME directory, so a child starts without cached files or tokens."""
        path = self.homes_dir / f"hf-home-{next(self._home_counter)}"
        path.mkdir(parents=True)
        return path

    def child_env(
        self, *, token: str | None = None, anonymous: bool = False, hf_home: Path | None = None
    ) -> dict[str, str]:
        """Build the environment of a client subprocess that talks to this stand-in only.

        token: the token to send, by default the fixture's valid token.
        anonymous: send no token at all.
        hf_home: HF_HOME of the child, by default a fresh directory per call.
        """
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("HF_", "HUGGING_FACE_")) and key not in _PROXY_VARIABLES
        }
        env.update(
            HF_ENDPOINT=self.endpoint,
            HF_HOME=str(hf_home or self.new_hf_home()),
            HF_HUB_DISABLE_TELEMETRY="1",
            # huggingface_hub 2.4 uploads through Xet whenever hf_xet is installed; the stand-in only speaks Git LFS.
            HF_HUB_DISABLE_XET="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            HF_DATASETS_DISABLE_PROGRESS_BARS="1",
            NO_PROXY="127.0.0.1,localhost",
            no_proxy="127.0.0.1,localhost",
        )
        if not anonymous:
            env["HF_TOKEN"] = token if token is not None else self.token
        return env

    def run_python(
        self,
        code: str,
        *args: str,
        python: str | os.PathLike[str] = sys.executable,
        check: bool = True,
        **env_options: Any,
    ) -> subprocess.CompletedProcess[str]:
        """Run `code` with `python -c` in a child process using child_env(**env_options).

        With check=True a non-zero exit fails the test and shows the child's output.
        """
        result = subprocess.run(
            [os.fspath(python), "-c", code, *args],
            env=self.child_env(**env_options),
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT,
        )
        if check and result.returncode != 0:
            pytest.fail(
                f"Client subprocess exited with {result.returncode}\n"
                f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-4000:]}",
                pytrace=False,
            )
        return result


@contextlib.contextmanager
def running_hub(root: Path, **server_options: Any) -> Iterator[HubTestServer]:
    """Start a stand-in that stores its repositories under `root`, and stop it on exit."""
    with HubServer(root / "store", {TOKEN: USER}, **server_options) as server:
        yield HubTestServer(server=server, token=TOKEN, user=USER, homes_dir=root / "clients")


@pytest.fixture
def hub_server(tmp_path: Path) -> Iterator[HubTestServer]:
    """A stand-in with empty storage for one test."""
    with running_hub(tmp_path / "hub") as hub:
        yield hub


@pytest.fixture(scope="module")
def module_hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubTestServer]:
    """A stand-in shared by the tests of one module, for flows too slow to repeat per test."""
    with running_hub(tmp_path_factory.mktemp("hub")) as hub:
        yield hub
