"""Keep freed host memory for reuse, so XLA:CPU's per-step buffers stop page-faulting.

Why: on the CPU backend every executable allocates its temporaries and outputs (the [B, F]
pre-activations, gradients, optimizer intermediates: hundreds of MB per SAE step) with malloc, and
glibc serves blocks this large with fresh mmaps that it unmaps on free. Each step then touches
every page anew: ~60,000 minor page faults per step at d=1024, F=8192, B=2048, at several
microseconds each in a VM. `reuse_freed_memory()` makes glibc keep such blocks on its heap
(one arena, no mmap for large blocks, no trimming), so later steps reuse pages already mapped,
which makes CPU training steps markedly faster (figures in README's Performance section;
`python benchmarks/bench.py --no-reuse-host-memory` measures without it).

The cost: the process keeps its peak heap (nothing is returned to the OS until exit) and all
threads share one malloc arena. Training, interpretation and the benchmarks call it first thing;
set JAXSAE_REUSE_HOST_MEMORY=0 to leave glibc's defaults. Not glibc (macOS, musl): no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_applied = False


def reuse_freed_memory() -> bool:
  """Tune glibc's malloc as the module docstring says; returns whether it applied.

  Call it before JAX starts its thread pools (first thing in a program): threads that already
  have their own malloc arena keep it. Idempotent.
  """
  global _applied
  if _applied:
    return True
  if os.environ.get('JAXSAE_REUSE_HOST_MEMORY', '1').strip().lower() in ('0', 'false', 'no'):
    return False
  name = ctypes.util.find_library('c')
  try:
    libc = ctypes.CDLL(name or 'libc.so.6')
    mallopt = libc.mallopt
    libc.gnu_get_libc_version  # pylint: disable=pointless-statement (only glibc has it)
  except (OSError, AttributeError):
    return False
  ok = all(
      mallopt(param, value) == 1
      for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1))
  )
  if not ok:
    logging.warning('glibc refused a mallopt setting; host memory is tuned only in part')
  _applied = True
  return ok
