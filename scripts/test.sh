#!/usr/bin/env bash
# Set up the environment (scripts/setup_env.sh) and run the checks: ruff, then the test suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
# shellcheck disable=SC1091
. "${VENV:-.venv}/bin/activate"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
ruff check .
ruff format --check .
python -m pytest -q "$@"
