"""Where training batches come from, checked before any compute.

A source gives batch i as an array [B, d] and is deterministic in i, and, for the evaluation, rows
that no batch holds (`held_out`). Training reads it through a grain iterator (`batches`) whose
state, a position, is saved in every checkpoint, so a resumed run continues at the exact batch:
the activation store's own pipeline (jaxsae.data.store_source), or for other sources a plain
in-order one.
"""

from __future__ import annotations

import sys
from typing import Iterator, Protocol

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxsae.data import store_source
from jaxsae.data import synthetic
from jaxsae.config import ConfigError

__all__ = ['ActivationSource', 'open_source', 'batches', 'to_device', 'activation_scale']


class ActivationSource(Protocol):
  """What training reads. Every member is declared, the optional ones as None-able, so that
  callers ask `is None` of a member that is always there instead of probing for it."""

  d: int
  batch_size: int  # rows of one batch (this process's rows, for the store)
  scale: float | None  # the activation scale if the data knows it (the store's); None: measure
  features: jax.Array | None  # planted ground-truth features [n, d] (synthetic data); else None
  held_out_rows: int | None  # rows `held_out` can give; None: unlimited (generated data)
  held_out_note: str  # where the held-out rows come from, for the summary

  def batch(self, index: int) -> jax.Array | np.ndarray:
    """Batch `index`, deterministic in `index`."""
    ...

  def held_out(self, tokens: int) -> Iterator[jax.Array | np.ndarray]:
    """The first `tokens` rows (fewer if there are fewer) that no training batch holds, in a fixed
    order, as pieces [n <= batch_size, d]: what the end-of-training evaluation reads."""
    ...

  def iterator(self) -> grain.DatasetIterator | None:
    """The source's own checkpointable pipeline over batches 0, 1, ...; None for the plain
    in-order one over `batch` (see `batches`)."""
    ...


def open_source(c: ml_collections.ConfigDict) -> ActivationSource:
  """The configured source, after checking it exists and matches the config's width."""
  if c.data.source == 'synthetic':
    source = synthetic.SyntheticSource.from_config(c)
  else:
    source = store_source.StoreSource.from_config(c)  # checks path, width, dtype, size
  if source.d != c.sae.d:
    raise ConfigError(
        f'the data has width d={source.d} but the config says sae.d={c.sae.d}; '
        'set --config.sae.d to the data width.'
    )
  return source


def batches(source: ActivationSource) -> grain.DatasetIterator:
  """The source's batches 0, 1, 2, ... as a grain iterator (get_state / set_state)."""
  own = source.iterator()
  if own is not None:
    return own
  ds = grain.MapDataset.range(sys.maxsize).map(source.batch)  # generated on demand, in order
  return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


def to_device(batch: np.ndarray | jax.Array, sharding: jax.sharding.Sharding) -> jax.Array:
  """The global batch: host arrays are this process's rows (the store's per-process slice);
  device arrays (synthetic) are the whole batch, which every process generates alike and from
  which each contributes the rows of its own devices."""
  if isinstance(batch, np.ndarray):
    return jax.make_array_from_process_local_data(sharding, batch)
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  host = np.asarray(batch)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def activation_scale(source: ActivationSource, n_batches: int) -> float:
  """s with E||x/s||^2 = d (dictionary_learning's norm factor up to the sqrt(d) target recommended
  by Anthropic's April 2024 update): the activation store's, measured over all its rows at export,
  or else measured on the first batches."""
  if source.scale is not None:
    return float(source.scale)
  sq = [jnp.mean(jnp.sum(source.batch(i) ** 2, axis=-1)) for i in range(n_batches)]
  mean_sq = float(jnp.mean(jnp.stack(sq)))
  if not mean_sq > 0 or not jnp.isfinite(mean_sq):
    raise ConfigError(
        f'cannot normalise the data: the mean squared norm of the first {n_batches} '
        f'batches is {mean_sq}. Check the source for zeros or NaN/Inf.'
    )
  return (mean_sq / source.d) ** 0.5
