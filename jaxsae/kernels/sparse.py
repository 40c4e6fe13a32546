"""The sparse path's bookkeeping: how many selected entries it makes room for, and their
compaction into flat (token, latent, value) lists."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def entry_capacity(batch: int, k: int, kc: int, chunk: int = 256) -> int:
  """How many selected entries the 'xla' path makes room for: B*k plus 1/16 for ties at the
  threshold, a whole number of chunks, at most every candidate. A batch with more selected
  entries must take the dense path (`train_step` checks)."""
  want = min(batch * kc, batch * k + max(batch * k // 16, 1))
  return -(-want // chunk) * chunk


def compact(vals: jax.Array, idx: jax.Array, capacity: int):
  """The non-zero entries of vals/idx [B, kc] as flat (token, latent, value) lists of length
  `capacity`, in row-major order (so tokens ascend); unused slots hold value 0. Entries beyond
  `capacity` are dropped: callers check the count first."""
  B, kc = vals.shape
  sel = vals.reshape(-1) > 0
  pos = jnp.where(sel, jnp.cumsum(sel) - 1, capacity)
  rows = jnp.repeat(jnp.arange(B, dtype=jnp.int32), kc)

  def put(src, dtype):
    return jnp.zeros((capacity,), dtype).at[pos].set(src.astype(dtype), mode='drop')

  return put(rows, jnp.int32), put(idx.reshape(-1), jnp.int32), put(vals.reshape(-1), vals.dtype)


