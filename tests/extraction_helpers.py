"""Running the real `python -m generation` command line and reading what it wrote, for the CLI tests."""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc

from length_probe import CONFIG_NAMES, MANIFEST_FILE

REPO_ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = Path(__file__).resolve().parent / "cli_launcher.py"

# 12 samples with --batch-size 5 make three parts of 4, since the extractor evens out batch sizes. With
# the tiny models' end_bias of 2.0 some completions end and others hit the 12-token limit;
# --keep-truncated keeps the rows of both.
SMALL_RUN = (
    "--words", "hello", "cat",
    "--min-count", "5", "--max-count", "10",
    "--max-new-tokens", "12",
    "--batch-size", "5",
    "--device", "cpu",
    "--keep-truncated",
)
SMALL_RUN_PARTS = 3
CLI_TIMEOUT_SECONDS = 120


def extract_args(model_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    """Return the arguments of the small extraction that most tests run, with `extra` appended."""
    return ["extract", "--model", str(model_dir), "--output-dir", str(output_dir), *SMALL_RUN, *extra]


def cli_environment() -> dict[str, str]:
    # Offline, so that a test never waits on the Hub. Unbuffered, so that a process killed mid-run still
    # delivers what it printed. One thread, because the tiny models gain nothing from more.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run_cli(args: list[str], *, prefix: tuple[str, ...] = (), **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m generation ARGS` in a child process, after the `prefix` command if one is given."""
    return subprocess.run(
        [*prefix, sys.executable, "-m", "generation", *args],
        cwd=REPO_ROOT,
        env=cli_environment(),
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_SECONDS,
        **kwargs,
    )


@dataclasses.dataclass
class CliResult:
    """The outcome of one command run by the launcher; `files` is set when the request named a list_dir."""

    returncode: int
    stdout: str
    stderr: str
    timed_out: bool
    files: list[str] | None


class CliLauncher:
    """A `tests/cli_launcher.py` process that runs each command line in a forked child.

    `prefix` runs the launcher under another command, e.g. `unshare`, so that its children share a
    private mount namespace.
    """

    def __init__(self, prefix: tuple[str, ...] = ()):
        self.process = subprocess.Popen(
            [*prefix, sys.executable, str(LAUNCHER)],
            cwd=REPO_ROOT,
            env=cli_environment(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._read_line()  # the launcher prints a line once its imports are done

    def _read_line(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            status = self.process.wait(timeout=CLI_TIMEOUT_SECONDS)
            raise RuntimeError(f"the CLI launcher exited with status {status}; its stderr is in the test output")
        return json.loads(line)

    def run(
        self,
        args: list[str],
        *,
        interrupt: tuple[str, str, int, str] | tuple[str, str, int, str, str] | None = None,
        file_size_limit: int | None = None,
        list_dir: Path | None = None,
    ) -> CliResult:
        """Run `python -m generation ARGS` in a child process.

        `interrupt` is (signal, name glob, nth call, "before" or "after"), optionally followed by the
        function to interrupt, "os.replace" (the default) or "shutil.rmtree"; see tests/cli_launcher.py.
        """
        request = {"args": [str(arg) for arg in args], "timeout": CLI_TIMEOUT_SECONDS}
        if interrupt is not None:
            signal_name, pattern, nth, when, *function = interrupt
            request["interrupt"] = {"signal": signal_name, "pattern": pattern, "nth": nth, "when": when}
            if function:
                request["interrupt"]["function"] = function[0]
        if file_size_limit is not None:
            request["file_size_limit"] = file_size_limit
        if list_dir is not None:
            request["list_dir"] = str(list_dir)
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return CliResult(**self._read_line())

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=CLI_TIMEOUT_SECONDS)


_shared_launcher: CliLauncher | None = None


def shared_launcher() -> CliLauncher:
    """Return one launcher for every test module of this pytest process, started on first use.

    Test modules cannot share a session fixture without a conftest.py, and each launcher start costs
    the imports that it exists to save (about 3.5 s of CPU time on a 2-core x86 VM). Closing stdin at
    exit ends the launcher.
    """
    global _shared_launcher
    if _shared_launcher is None:
        _shared_launcher = CliLauncher()
        atexit.register(_shared_launcher.close)
    return _shared_launcher


def error_lines(stderr: str) -> list[str]:
    """Return the lines of stderr that the command line prints for an error."""
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def read_manifest(data_dir: Path) -> dict:
    return json.loads((Path(data_dir) / MANIFEST_FILE).read_text(encoding="utf-8"))


def read_arrow(path: Path) -> pa.Table:
    with pa.memory_map(str(path)) as source:
        return ipc.open_file(source).read_all()


def read_rows(data_dir: Path, config_name: str) -> pa.Table:
    """Read one config's rows in the manifest's sample order, whatever part each sample landed in."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    location = {}
    tables = {}
    for shard in manifest["configs"][config_name]["shards"]:
        tables[shard["file"]] = read_arrow(data_dir / shard["file"])
        for sample_id, start, rows in shard["samples"]:
            location[sample_id] = (shard["file"], start, rows)
    pieces = []
    for sample in manifest["samples"]:
        if sample["sample_id"] in location:
            file_name, start, rows = location[sample["sample_id"]]
            pieces.append(tables[file_name].slice(start, rows))
    return pa.concat_tables(pieces)


def files_under(data_dir: Path) -> dict[str, bytes]:
    """Map the relative path of every file below `data_dir` to its content."""
    data_dir = Path(data_dir)
    return {str(path.relative_to(data_dir)): path.read_bytes() for path in sorted(data_dir.rglob("*")) if path.is_file()}


def shard_paths(data_dir: Path) -> list[Path]:
    """List every file in the config directories except metadata.json, listed in the manifest or not."""
    data_dir = Path(data_dir)
    return sorted(
        path
        for name in CONFIG_NAMES
        if (data_dir / name).is_dir()
        for path in (data_dir / name).iterdir()
        if path.name != "metadata.json"
    )
