#!/usr/bin/env bash
# Creates .venv (if missing) and installs jaxsae with its test, torch, wandb and findings extras.
# torch is pinned and installed first: anything unpinned would pull the multi-GB CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet torch==2.13.0
.venv/bin/python -m pip install --quiet -e '.[torch,test,wandb,findings]'
# The native CPU kernels (sae.kernel='cpu', what 'auto' picks on one CPU device): compiled now, for
# this machine, so the first training step does not wait for the compiler. Without a C++ compiler
# this says so and training uses the 'xla' path.
.venv/bin/python -c "from jaxsae.kernels import cpu_build; print('native CPU kernels:', cpu_build.build())" \
  || echo "native CPU kernels not built (no working C++ compiler?): sae.kernel='auto' uses 'xla'"
