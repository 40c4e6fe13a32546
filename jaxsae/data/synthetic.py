"""Activations with planted ground-truth features, to check that training recovers a known dictionary.

Each token is a sparse non-negative combination of unit "true features" with power-law firing
frequencies, optionally hierarchical (a child fires only together with its parent, the structure
Matryoshka SAEs are meant to keep apart), plus Gaussian noise. Batch i is a pure function of
(seed, i), so a resumed run sees exactly the batches an uninterrupted one would.

Held out: the data is generated, so "held-out" rows are fresh draws from the same distribution,
batches from an index range training never reaches (from 2^31 on; training reads batch i at step
i), not a reserved part of a fixed data set.
"""

from __future__ import annotations

import functools
import itertools
from typing import Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

__all__ = ['SyntheticSource', 'recovery', 'HELD_OUT_START']

HELD_OUT_START = 2**31  # the first held-out batch index; training steps stay below it


class SyntheticSource:
  """Batch i of planted-feature activations, generated on the device."""

  def __init__(
      self,
      d: int,
      batch_size: int,
      n_features: int,
      mean_active: float,
      zipf_exponent: float,
      n_parents: int,
      children_per_parent: int,
      noise_std: float,
      seed: int,
  ):
    if n_parents * (1 + children_per_parent) > n_features:
      raise ValueError(
          f'{n_parents} parents with {children_per_parent} children each need '
          f'{n_parents * (1 + children_per_parent)} features; only {n_features}.'
      )
    self.d, self.batch_size, self.n_features = d, batch_size, n_features
    self.mean_active, self.noise_std = mean_active, noise_std
    self.scale = None  # unknown in advance: training measures it on the first batches
    self.held_out_rows = None  # unlimited: generated on demand
    self.held_out_note = (
        f'generated batches {HELD_OUT_START} and on (fresh draws; training reads batches from 0)'
    )
    key = jax.random.PRNGKey(seed)
    k_feat, self._key = jax.random.split(key)
    feats = jax.random.normal(k_feat, (n_features, d), jnp.float32)
    self.features = feats / jnp.linalg.norm(feats, axis=1, keepdims=True)
    rank = np.arange(1, n_features + 1, dtype=np.float64)
    probs = rank**-zipf_exponent / np.sum(rank**-zipf_exponent)
    self.probs = jnp.asarray(probs, jnp.float32)
    self._cdf = jnp.asarray(np.cumsum(probs), jnp.float32)
    # Feature layout: parents first, then each parent's children, then independent features.
    parent = np.full(n_features, -1, np.int32)
    for p in range(n_parents):
      start = n_parents + p * children_per_parent
      parent[start : start + children_per_parent] = p
    self.parent = jnp.asarray(parent)
    self.max_active = max(1, int(np.ceil(4 * mean_active)))

  @classmethod
  def from_config(cls, c: ml_collections.ConfigDict) -> 'SyntheticSource':
    s = c.data.synthetic
    return cls(
        d=c.sae.d,
        batch_size=c.data.batch_size,
        n_features=s.n_features,
        mean_active=s.mean_active,
        zipf_exponent=s.zipf_exponent,
        n_parents=s.n_parents,
        children_per_parent=s.children_per_parent,
        noise_std=s.noise_std,
        seed=s.seed,
    )

  def batch(self, index: int) -> jax.Array:
    return self._batch(jnp.asarray(index, jnp.uint32))

  def held_out(self, tokens: int) -> Iterator[jax.Array]:
    """`tokens` rows from batches no training step reads, in pieces of `batch_size` rows."""
    left = tokens
    for index in itertools.count(HELD_OUT_START):
      if left <= 0:
        return
      x = self.batch(index)
      yield x[:left] if left < len(x) else x
      left -= len(x)

  def iterator(self) -> None:
    """None: batches are cheap and pure in their index, so the plain in-order pipeline serves."""
    return None

  @functools.partial(jax.jit, static_argnums=0)
  def _batch(self, index: jax.Array) -> jax.Array:
    B, m = self.batch_size, self.max_active
    k_n, k_idx, k_mag, k_pmag, k_noise = jax.random.split(jax.random.fold_in(self._key, index), 5)
    n_active = jnp.minimum(jax.random.poisson(k_n, self.mean_active, (B, 1)), m)
    idx = jnp.searchsorted(self._cdf, jax.random.uniform(k_idx, (B, m)))  # inverse-CDF sampling
    idx = jnp.minimum(idx, self.n_features - 1)
    on = jnp.arange(m)[None] < n_active
    mag = jnp.where(on, 1.0 + 0.5 * jnp.abs(jax.random.normal(k_mag, (B, m))), 0.0)
    # A child brings its parent along, so parents fire at least as often as all their children.
    par = self.parent[idx]
    par_mag = jnp.where(
        on & (par >= 0), 1.0 + 0.5 * jnp.abs(jax.random.normal(k_pmag, (B, m))), 0.0
    )
    par = jnp.maximum(par, 0)

    # Slot by slot: one [B, d] gather at a time, never the [B, m, d] rows at once.
    def add_slot(j, x):
      x = x + mag[:, j, None] * self.features[idx[:, j]]
      return x + par_mag[:, j, None] * self.features[par[:, j]]

    x = jax.lax.fori_loop(0, m, add_slot, jnp.zeros((B, self.d), jnp.float32))
    x = x + self.noise_std * jax.random.normal(k_noise, x.shape)
    # Under a training mesh (`jax.set_mesh`), each device generates its own rows of the batch
    # (the values do not depend on the layout) instead of one device making them all.
    mesh = jax.sharding.get_abstract_mesh()
    if jax.process_count() == 1 and not mesh.empty and 'data' in mesh.axis_names:
      x = jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec('data', None))
    return x


def recovery(
    learned_W_dec: jax.Array, true_features: jax.Array, threshold: float = 0.9
) -> dict[str, float]:
  """Mean max cosine similarity (MMCS) of each true feature to its closest decoder row, and the
  fraction of true features with a match above `threshold`."""
  learned = learned_W_dec / jnp.linalg.norm(learned_W_dec, axis=1, keepdims=True)
  best = jnp.max(true_features @ learned.T, axis=1)
  return {
      'mmcs': float(best.mean()),
      f'frac_recovered_{threshold}': float((best > threshold).mean()),
  }
