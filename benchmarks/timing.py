"""What the benchmark scripts share: the Matryoshka groups they train with, timing and memory.

One module so every script times the same way (compile outside the clock, block on the result)
and trains the same groups. Imported as a sibling module (`from timing import ...`): running
`python benchmarks/X.py` puts this directory on sys.path.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import jax

# Bussmann et al.'s Matryoshka group widths, (1/16, 1/16, 1/8, 1/4, 1/2) x F, smallest first.
GROUPS = (1 / 16, 1 / 16, 1 / 8, 1 / 4, 1 / 2)


def timed(
    fn,
    *args,
    steps: int,
    warmup: int = 1,
    stat: Callable[[list[float]], float] = statistics.median_high,
) -> float:
  """Seconds of one fn(*args) call: `stat` (the median) of `steps` calls after `warmup` ones.

  The warmup calls compile; each call blocks until its outputs are ready, so asynchronous
  dispatch does not hide device time. Pass stat=statistics.fmean where a stall should count
  (a median hides the rare slow step).
  """
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return stat(times)


def memory_bytes(compiled) -> int:
  """Device bytes a compiled call holds at once: arguments + outputs (less donated aliases) + temps.

  From XLA's buffer assignment (`compile().memory_analysis()`), so it is the same on CPU and GPU
  and needs no allocator statistics; -1 where the backend gives none.
  """
  m = compiled.memory_analysis()
  if m is None:
    return -1
  return (
      m.argument_size_in_bytes
      + m.output_size_in_bytes
      - m.alias_size_in_bytes
      + m.temp_size_in_bytes
  )
