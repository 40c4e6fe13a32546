"""The step the sparse kernel families share ('xla', 'pallas_gpu', 'pallas_tpu'): one dense encoder
matmul, each token's top candidates and the proof that they hold the whole BatchTopK selection
(`selection.candidates_and_threshold`), a kernel's sparse l2 and gradients over the selected
entries, AuxK by autodiff on the pre-activations, and the exact dense step whenever the proof fails
or the selection overfills the kernel's room. Also the 'xla' kernel's bookkeeping: how many
selected entries it makes room for, and their compaction into flat (token, latent, value) lists.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxsae import model
from jaxsae import selection
from jaxsae.kernels import common
from jaxsae.kernels import dense

# (params, x, vals [B, kc], idx [B, kc], sc, capacity) -> the l2 loss and gradients
SparseL2 = Callable[
    [model.Params, jax.Array, jax.Array, jax.Array, common.StepConfig, int], common.L2Result
]


def entry_capacity(batch: int, k: int, kc: int, chunk: int = 256) -> int:
  """How many selected entries the 'xla' kernel makes room for: B*k plus 1/16 for ties at the
  threshold, a whole number of chunks, at most every candidate. A batch with more selected
  entries must take the dense path (`loss_and_grads` checks)."""
  want = min(batch * kc, batch * k + max(batch * k // 16, 1))
  return common.cdiv(want, chunk) * chunk


def every_candidate(batch: int, k: int, kc: int) -> int:
  """Room for every candidate slot: the Pallas kernels walk the [B, kc] candidates in place."""
  del k
  return batch * kc


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


def loss_and_grads(
    params: model.Params,
    x: jax.Array,
    tokens_since_fired: jax.Array,
    sc: common.StepConfig,
    l2: SparseL2,
    capacity: Callable[[int, int, int], int] = every_candidate,
) -> common.LossAndGrads:
  """One dense matmul, then the sparse decode and gradients of `l2` (a backend's kernels).

  `capacity(B, k, kc)` is how many selected entries `l2` has room for. When the candidate proof
  fails (some token holds more than candidates_per_row * k of the batch's budget), or ties
  overfill that room, the step takes the dense path instead, so it is exact either way.
  """
  B, F = x.shape[0], params['W_dec'].shape[0]
  kc = min(F, sc.candidates_per_row * sc.k)
  pre = model.pre_activations(params, x, sc.compute_dtype)
  x = x.astype(jnp.float32)
  vals, idx, tau, proven = selection.candidates_and_threshold(pre, sc.k, kc)
  sel = (vals >= tau) & (vals > 0)
  room = capacity(B, sc.k, kc)
  fits = jnp.sum(sel) <= room  # ties at the threshold may select more than B*k entries

  def run_sparse():
    r = l2(params, x, jnp.where(sel, vals, 0.0), idx, sc, room)
    fired = jnp.zeros((F,), bool).at[idx.reshape(-1)].max(sel.reshape(-1))
    aux, grads, silence = common.with_auxk(
        r,
        x,
        fired,
        tokens_since_fired,
        sc,
        lambda residual, dead: dense.auxk_loss_and_grads(
            params, x, pre, residual, dead, sc.top_k_aux
        ),
    )
    stats = common.StepStats(
        r.sq_err,
        r.l2,
        aux,
        jnp.sum(sel).astype(jnp.float32) / B,
        jnp.min(jnp.where(sel, vals, jnp.inf)),
        jnp.ones((), jnp.float32),
        jnp.zeros((), jnp.float32),
    )
    return common.LossAndGrads(r.l2 + sc.auxk_alpha * aux, stats, silence, grads)

  return jax.lax.cond(
      proven & fits, run_sparse, lambda: dense.loss_and_grads(params, x, tokens_since_fired, sc)
  )


def in_place_backend(
    l2_and_grads: Callable[..., common.L2Result],
) -> Callable[..., common.LossAndGrads]:
  """The sparse step for kernels that walk the candidates in place, so they have room for all of
  them: `l2_and_grads(params, x, vals, idx, group_sizes, group_weights)`."""

  def step(params, x, tokens_since_fired, sc):
    return loss_and_grads(
        params,
        x,
        tokens_since_fired,
        sc,
        lambda p, xs, vals, idx, sc, room: l2_and_grads(
            p, xs, vals, idx, sc.group_sizes, sc.group_weights
        ),
        every_candidate,
    )

  return step
