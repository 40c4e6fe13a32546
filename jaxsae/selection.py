"""Exact BatchTopK selection: the B*k-th largest pre-activation of a batch, without a full sort.

`lax.top_k` over the flattened B x F matrix is the obvious way and it is ~10x slower than the
encoder matmul on CPU. The selection only needs one value, the global B*k-th largest: we take each
row's top c*k candidates (cheap), find the B*k-th largest candidate by bisection over that small
set, and *prove* it is the global answer — it is whenever no row has all of its candidates strictly
above it (then nothing outside the candidates can beat it). When the proof fails (a few rows hold
more than c*k of the batch's budget) we fall back to an exact bisection on the float bit patterns
of the whole matrix. Under a device mesh the same runs per shard, with only counts crossing
devices. Every path gives the value of `reference_threshold`, the plain sort tests compare against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P


def reference_threshold(pre: jax.Array, budget: int) -> jax.Array:
  """The budget-th largest entry of `pre`, by a full top-k of the flattened matrix (slow)."""
  return jax.lax.top_k(pre.reshape(-1), budget)[0][-1]


def bisect_threshold(pre: jax.Array, budget: int, psum=lambda n: n) -> jax.Array:
  """Exact budget-th largest of a non-negative array by bisection on its int32 bit patterns.

  Non-negative float32 values order like their bit patterns, so 31 counting passes pin the value.
  `psum` totals the counts over devices when `pre` is one shard of a larger matrix.
  """
  bits = jax.lax.bitcast_convert_type(pre.astype(jnp.float32), jnp.int32)

  def body(_, lohi):
    lo, hi = lohi  # invariant: count(bits >= lo) >= budget > count(bits >= hi)
    mid = lo + (hi - lo) // 2
    enough = psum(jnp.sum(bits >= mid)) >= budget
    return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

  lo, _ = jax.lax.fori_loop(0, 31, body, (jnp.int32(0), jnp.int32(0x7F800001)))
  return jax.lax.bitcast_convert_type(lo, jnp.float32).astype(pre.dtype)


def _candidates(pre: jax.Array, budget: int, kc: int, psum=lambda n: n):
  """Each row's top-kc (values, latent ids), the budget-th largest candidate, and whether that is
  proven to be the budget-th largest of all of `pre`.

  Every element outside a row's candidates is <= that row's smallest candidate; if that is <= tau
  everywhere, nothing outside the candidates exceeds tau. (min, not vals[:, -1]: a slice of the
  sorted output makes XLA:CPU sort the whole row.) `psum` totals counts over a mesh.
  """
  vals, idx = jax.lax.top_k(pre, kc)  # [rows, kc], each row descending
  tau = bisect_threshold(vals, budget, psum)
  proven = psum(jnp.sum(vals.min(axis=1) > tau)) == 0
  return vals, idx, tau, proven


def _threshold(pre: jax.Array, budget: int, kc: int, psum) -> jax.Array:
  """Candidates, the exactness proof, and the full-bisection fallback.

  On one device `psum` is the identity; inside shard_map it sums over the mesh, so each device
  works on its own [B/D, F/M] block and only scalars cross devices.
  """
  if kc >= pre.shape[1]:
    return bisect_threshold(pre, budget, psum)
  _, _, tau, proven = _candidates(pre, budget, kc, psum)
  return jax.lax.cond(proven, lambda: tau, lambda: bisect_threshold(pre, budget, psum))


def batch_topk_threshold(pre: jax.Array, k: int, candidates_per_row: int = 4) -> jax.Array:
  """The (B*k)-th largest value of the non-negative [B, F] matrix `pre` (exact).

  Keeping `pre >= threshold` (and > 0) selects the BatchTopK entries. Under a device mesh (set with
  `jax.set_mesh`, axes 'data' for tokens and 'model' for latents) the selection runs per shard
  with scalar collectives: the B x F matrix is never gathered.
  """
  B, F = pre.shape
  budget = B * k
  if budget >= B * F:
    return jnp.zeros((), pre.dtype)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return _threshold(pre, budget, min(F, candidates_per_row * k), lambda n: n)
  axes = tuple(mesh.axis_names)
  F_local = F // mesh.shape.get('model', 1)
  return jax.shard_map(
      lambda blk: _threshold(
          blk, budget, min(F_local, candidates_per_row * k), lambda n: jax.lax.psum(n, axes)
      ),
      in_specs=P('data', 'model'),
      out_specs=P(),
  )(pre)


def _row_bisect(pre: jax.Array, valid: jax.Array, k: int, psum) -> jax.Array:
  """Per row, the k-th largest valid entry (0 if a row has fewer than k): 31 counting passes."""
  bits = jnp.where(valid, jax.lax.bitcast_convert_type(pre.astype(jnp.float32), jnp.int32), -1)

  def body(_, lohi):
    lo, hi = lohi
    mid = lo + (hi - lo) // 2
    enough = psum(jnp.sum(bits >= mid[:, None], axis=1)) >= k
    return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

  # Built through psum so that, inside shard_map, the carry varies over the same axes as the
  # loop's output (rows: 'data'), as the loop's type check requires.
  zero = psum(jnp.zeros_like(bits[:, 0]))
  lo, _ = jax.lax.fori_loop(0, 31, body, (zero, zero + 0x7F800001))
  return jax.lax.bitcast_convert_type(lo, jnp.float32).astype(pre.dtype)


def row_topk_threshold(pre: jax.Array, valid: jax.Array, k: int) -> jax.Array:
  """[B] per-row k-th largest of the non-negative `pre` among `valid` entries (0 when a row has
  fewer than k valid ones, so `pre >= t` keeps them all). Used by AuxK over dead latents; under a
  mesh it runs per shard and only [B] counts cross the model axis."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    kth = jnp.min(jax.lax.top_k(jnp.where(valid, pre, -1.0), k)[0], axis=1)
    return jnp.maximum(kth, 0.0)
  return jax.shard_map(
      lambda blk, ok: _row_bisect(blk, ok, k, lambda n: jax.lax.psum(n, 'model')),
      in_specs=(P('data', 'model'), P('data', 'model')),
      out_specs=P('data'),
  )(pre, valid)


def candidates_and_threshold(pre: jax.Array, k: int, kc: int):
  """Each row's top-kc (values, latent ids), the B*k-th largest candidate, and whether it is
  proven exact *and* every selected entry (pre >= tau, > 0) is among the candidates. Single
  device; the sparse kernels build on it.

  Completeness needs more than the threshold proof: a row whose smallest candidate *equals* tau
  may hold further entries equal to tau outside its candidates, which the selection keeps.
  """
  vals, idx, tau, proven = _candidates(pre, pre.shape[0] * k, kc)
  low = vals.min(axis=1)
  complete = proven & ~jnp.any((low >= tau) & (low > 0))
  return vals, idx, tau, complete | (kc >= pre.shape[1])
