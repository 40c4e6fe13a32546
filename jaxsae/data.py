"""Where training batches come from, checked before any compute.

A source gives batch i as an array [B, d] and is deterministic in i, so the data position saved in
a checkpoint (the number of batches consumed) is enough to resume exactly.
"""

from __future__ import annotations

import os
from typing import Protocol

import jax
import jax.numpy as jnp
import ml_collections

from jaxsae import synthetic
from jaxsae.config import ConfigError


class ActivationSource(Protocol):
  d: int
  batch_size: int

  def batch(self, index: int) -> jax.Array:
    ...


def open_source(c: ml_collections.ConfigDict) -> ActivationSource:
  """The configured source, after checking it exists and matches the config's width."""
  if c.data.source == 'synthetic':
    source = synthetic.SyntheticSource.from_config(c)
  else:
    path = c.data.store_path
    if '://' not in path and not os.path.exists(path):
      raise ConfigError(
          f'activation store not found: data.store_path={path!r} does not exist. Write it first '
          'with `python -m jaxsae.export_activations --config=<this experiment>` (it needs the '
          'model weights), or point --config.data.store_path at an existing store.')
    raise ConfigError(f'data.store_path={path!r}: reading an activation store needs the '
                      'activation-store reader, which this version of jaxsae does not have yet.')
  if source.d != c.sae.d:
    raise ConfigError(f'the data has width d={source.d} but the config says sae.d={c.sae.d}; '
                      'set --config.sae.d to the data width.')
  return source


def activation_scale(source: ActivationSource, n_batches: int) -> float:
  """s with E||x/s||^2 = d, measured on the first batches (dictionary_learning's norm factor up to
  the sqrt(d) target recommended by Anthropic's April 2024 update)."""
  sq = [jnp.mean(jnp.sum(source.batch(i) ** 2, axis=-1)) for i in range(n_batches)]
  mean_sq = float(jnp.mean(jnp.stack(sq)))
  if not mean_sq > 0 or not jnp.isfinite(mean_sq):
    raise ConfigError(f'cannot normalise the data: the mean squared norm of the first {n_batches} '
                      f'batches is {mean_sq}. Check the source for zeros or NaN/Inf.')
  return (mean_sq / source.d) ** 0.5
