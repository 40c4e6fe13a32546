#!/usr/bin/env bash
# Fresh machine -> .venv, install (and the headless Chromium the browser test drives, and the peer
# libraries in .venv-peers that the interoperability tests run), the test suite. Extra arguments go
# to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
bash tools/install_browser.sh  # Debian chromium + chromedriver for tests/interpret/test_browser.py
bash tools/install_peers.sh  # .venv-peers: dictionary_learning for the interoperability tests
exec .venv/bin/python -m pytest -q "$@"
