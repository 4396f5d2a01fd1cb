"""Run `python -m generation` commands in forked child processes, optionally signalling a child at a file operation.

Importing torch and transformers costs about 3.5 s of CPU time per process (measured on a 2-core x86
VM), which dominated the CLI tests when every command started a fresh interpreter. This launcher
imports them once and then serves requests. It reads one JSON object per line on stdin, forks a child
that runs `generation.cli.main` with the requested arguments, and writes one JSON line with the
child's exit status, stdout and stderr. Each child is a separate process, so its signals, exit status, resource limits and files are
real. The parent never runs a torch operation, so no thread pool exists at fork time.

Request fields:
    args             the command line after `python -m generation`
    interrupt        optional {"signal": "KILL"|"INT", "pattern": GLOB, "nth": N, "when": "before"|"after",
                     "function": "os.replace"|"shutil.rmtree"}: the child sends itself the signal at the
                     Nth call of the function (os.replace by default) whose target path has a name that
                     matches GLOB, before or after the call runs. The target is the destination of
                     os.replace and the directory of shutil.rmtree. The extraction writes every file
                     through os.replace and --overwrite deletes directories with shutil.rmtree, so this
                     reaches each interruption point without hooks in the library. A child in which the
                     chosen call never came exits with status 3.
    file_size_limit  optional RLIMIT_FSIZE in bytes for the child, like `ulimit -f`
    list_dir         optional directory whose files the response lists after the child exits, for
                     directories that only this process can see, such as a mount in a private namespace
    timeout          seconds before the child is killed (default 120)

Response fields: returncode (negative signal number when a signal ended the child, as in subprocess),
stdout, stderr, timed_out, files.
"""

from __future__ import annotations

import atexit
import fnmatch
import json
import os
import resource
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

# The imports that every extraction needs, done once here instead of in every child.
import torch  # noqa: F401
import transformers.generation.utils  # noqa: F401
import transformers.models.llama.modeling_llama  # noqa: F401
import transformers.models.qwen2.modeling_qwen2  # noqa: F401
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

import generation.cli
import generation.extract  # noqa: F401

EXIT_CALL_NOT_REACHED = 3
DEFAULT_TIMEOUT_SECONDS = 120.0
POLL_SECONDS = 0.02


# The functions a child can be interrupted in: module, attribute, and the position of the target path.
INTERRUPTIBLE = {"os.replace": (os, "replace", 1), "shutil.rmtree": (shutil, "rmtree", 0)}


def install_interrupt(signal_name: str, pattern: str, nth: int, when: str, function: str) -> dict:
    """Wrap `function` so that its chosen call raises the signal; return the wrapper's call counter."""
    signal_number = getattr(signal, f"SIG{signal_name}")
    module, attribute, target_position = INTERRUPTIBLE[function]
    real_function = getattr(module, attribute)
    counter = {"matched": 0}

    def interrupted(*args, **kwargs):
        chosen = False
        if fnmatch.fnmatch(Path(args[target_position]).name, pattern):
            counter["matched"] += 1
            chosen = counter["matched"] == nth
        # raise_signal delivers to the calling thread, so SIGINT becomes KeyboardInterrupt right here.
        if chosen and when == "before":
            signal.raise_signal(signal_number)
        result = real_function(*args, **kwargs)
        if chosen and when == "after":
            signal.raise_signal(signal_number)
        return result

    setattr(module, attribute, interrupted)
    return counter


def run_child(request: dict) -> int:
    """Run one command line in this (forked) process and return its exit status."""
    if request.get("file_size_limit") is not None:
        limit = int(request["file_size_limit"])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    counter = None
    if request.get("interrupt"):
        interrupt = request["interrupt"]
        counter = install_interrupt(
            interrupt["signal"],
            interrupt["pattern"],
            int(interrupt["nth"]),
            interrupt["when"],
            interrupt.get("function", "os.replace"),
        )

    try:
        status = generation.cli.main(request["args"])
    except SystemExit as exit_request:
        status = exit_request.code
    except BaseException:  # an uncaught error ends `python -m generation` with a traceback and status 1
        traceback.print_exc()
        status = 1
    if status is None:
        status = 0
    elif not isinstance(status, int):
        print(status, file=sys.stderr)
        status = 1

    if counter is not None and counter["matched"] < int(request["interrupt"]["nth"]):
        print(
            f"launcher: {counter['matched']} call(s) matched {request['interrupt']['pattern']!r}, "
            "so no signal was sent",
            file=sys.stderr,
        )
        status = EXIT_CALL_NOT_REACHED
    return status


def wait_for(pid: int, timeout: float) -> tuple[int, bool]:
    """Wait for a child and return its status in subprocess's convention, and whether it timed out."""
    deadline = time.monotonic() + timeout
    timed_out = False
    while True:
        finished, status = os.waitpid(pid, os.WNOHANG)
        if finished:
            break
        if time.monotonic() > deadline and not timed_out:
            os.kill(pid, signal.SIGKILL)
            timed_out = True
        time.sleep(POLL_SECONDS)
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status), timed_out
    return os.WEXITSTATUS(status), timed_out


def serve(request: dict) -> dict:
    """Run one request in a forked child and return the response."""
    # Plain temporary files rather than a TemporaryDirectory: the child runs the exit functions, and
    # those include the finalizer that would delete a TemporaryDirectory before the parent reads it.
    stdout_fd, stdout_name = tempfile.mkstemp(prefix="cli-launcher-stdout-")
    stderr_fd, stderr_name = tempfile.mkstemp(prefix="cli-launcher-stderr-")
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.dup2(stdout_fd, 1)
            os.dup2(stderr_fd, 2)
            status = run_child(request)
        except BaseException:
            traceback.print_exc()
        finally:
            # Run the exit functions as interpreter shutdown would, so that output printed at exit shows
            # up as it would from `python -m generation`. Then leave without unwinding into the server
            # loop. NOTE: objects still alive are not finalized, unlike at a real shutdown.
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)

    os.close(stdout_fd)
    os.close(stderr_fd)
    try:
        returncode, timed_out = wait_for(pid, float(request.get("timeout", DEFAULT_TIMEOUT_SECONDS)))
        files = None
        if request.get("list_dir"):
            root = Path(request["list_dir"])
            files = sorted(str(path.relative_to(root)) for path in root.rglob("*") if path.is_file())
        return {
            "returncode": returncode,
            "stdout": Path(stdout_name).read_text(encoding="utf-8", errors="replace"),
            "stderr": Path(stderr_name).read_text(encoding="utf-8", errors="replace"),
            "timed_out": timed_out,
            "files": files,
        }
    finally:
        os.unlink(stdout_name)
        os.unlink(stderr_name)


def main() -> int:
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip():
            print(json.dumps(serve(json.loads(line))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
