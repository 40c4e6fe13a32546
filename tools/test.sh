#!/usr/bin/env bash
# Fresh machine -> .venv, install, the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
exec .venv/bin/python -m pytest -q "$@"
