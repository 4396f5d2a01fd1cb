#!/usr/bin/env bash
# Set up both test environments from scratch if they are missing, then run the whole test suite.
#   .venv         the project with datasets 3.x, torch and the test extras
#   .venv-latest  the newest datasets 5.x without torch: the tests run the published-copy and
#                 builder-class checks in it as a child interpreter
# TORCH_SPEC picks the torch build: the default is the CPU wheel this project's machines keep on disk;
# on a GPU machine set e.g. TORCH_SPEC="torch" to take the CUDA build instead.
set -euo pipefail
cd "$(dirname "$0")/.."

TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check "$TORCH_SPEC"
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[test]"

if [ ! -x .venv-latest/bin/python ]; then
  "$PYTHON" -m venv .venv-latest
fi
.venv-latest/bin/pip install --quiet --disable-pip-version-check "datasets>=5,<6" pyarrow numpy
if .venv-latest/bin/python -c "import torch" 2>/dev/null; then
  echo "error: .venv-latest must not contain torch; delete .venv-latest and run this script again" >&2
  exit 1
fi

exec .venv/bin/python -m pytest "$@"
