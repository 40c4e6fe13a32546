#!/usr/bin/env bash
# Creates .venv-peers: the reference libraries the golden and interoperability tests run against
# (tools/make_golden_fixture.py, tests/formats/test_release_fixture.py), kept out of jaxsae's own
# .venv. torch is pinned and installed first, then dictionary_learning without its dependencies
# (nnsight, torchvision, ... would pull a newer torch with gigabytes of CUDA wheels); the few it
# needs to import are installed by name, and tools/make_golden_fixture.py stubs the rest.
# Idempotent: when everything is there already, it installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
PY=.venv-peers/bin/python
if [ -x "$PY" ] && "$PY" -c "import importlib.metadata as m
assert m.version('torch').startswith('2.13.0')
for name in ('dictionary-learning', 'einops', 'safetensors', 'numpy', 'tqdm'):
  m.version(name)" 2>/dev/null
then
  exit 0
fi
if [ ! -x "$PY" ]; then
  "$PYTHON" -m venv .venv-peers
fi
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" torch==2.13.0
"${PIP[@]}" --no-deps dictionary-learning einops safetensors numpy tqdm
"$PY" -c "import importlib.metadata as m; print('.venv-peers: torch', m.version('torch'), \
'dictionary_learning', m.version('dictionary-learning'))"
