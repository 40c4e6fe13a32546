"""Multi-process (multi-host) start-up: one JAX runtime across processes, before any JAX use.

On a cluster, `jax.distributed.initialize()` finds the coordinator itself (SLURM, Open MPI, GKE,
Cloud TPU); elsewhere the config names it. On CPU, cross-process collectives go through gloo.
"""

from __future__ import annotations

import jax
import ml_collections


def maybe_initialize(c: ml_collections.ConfigDict) -> None:
  """Join the process group when the config asks for it (idempotent)."""
  dist = c.distributed
  if not dist.enabled:
    return
  if jax.distributed.is_initialized():
    return
  jax.config.update('jax_cpu_collectives_implementation', dist.cpu_collectives)
  kwargs = {}
  if dist.coordinator_address:
    kwargs = dict(
        coordinator_address=dist.coordinator_address,
        num_processes=dist.num_processes,
        process_id=dist.process_id,
    )
  if dist.local_device_count > 0:
    jax.config.update('jax_num_cpu_devices', dist.local_device_count)
  jax.distributed.initialize(**kwargs)


def is_primary() -> bool:
  """The process that writes metrics, plots and summaries (Orbax coordinates checkpoints)."""
  return jax.process_index() == 0
