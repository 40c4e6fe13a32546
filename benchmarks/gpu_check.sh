#!/usr/bin/env bash
# One prepared run for a GPU machine: install, the GPU-marked tests (compiled Pallas kernels), then
# the paper-width table (d=4096, F=16384 and 32768, k=64, B=4096) for kernel = dense / xla / pallas
# in float32 and bfloat16 against the matmul floor, and the single-GPU mesh benchmark. Prints
# everything to stdout (and, where $OUT is set, to $OUT/gpu_check.log) for the README.
#   bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${OUT:-/tmp}/gpu_check.log
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  bash tools/install.sh >/dev/null && .venv/bin/pip install -q "jax[cuda12]==$(.venv/bin/python -c 'import jax; print(jax.__version__)')"
  .venv/bin/python -c 'import jax; print(jax.__version__, jax.devices())'
  .venv/bin/python -m pytest -q -m gpu tests/kernels 2>&1 | tail -5
  for F in 16384 32768; do
    .venv/bin/python benchmarks/bench.py --d 4096 --F "$F" --k 64 --batch 4096 --steps 10 \
      --kernels dense,xla,pallas --dtypes float32,bfloat16 --no-peers
  done
  .venv/bin/python benchmarks/bench_mesh.py --mesh 1x1 --d 4096 --F 16384 --k 64 --batch 4096 \
    --kernels auto,dense --dtype bfloat16
} 2>&1 | tee "$LOG"
