"""The 'xla' backend: the sparse Matryoshka decode and gradients in plain XLA, on any platform.

After BatchTopK only B*k entries of the [B, F] activations are non-zero, yet a dense step spends
four more B x d x F matmuls on them (decode, its two gradients, and the encoder-weight gradient).
Here the selected entries are compacted into flat (token, latent, value) lists; every prefix
reconstruction is a gather-weighted sum of W_dec rows split by group, and the gradients of W_dec,
W_enc, b_enc and b_dec are scatter-adds over the selected entries only. Entries are walked in
chunks so the gathered rows stay in cache and no [B*k, d] buffer is ever materialised.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from jaxsae import model
from jaxsae.kernels import common, sparse
from jaxsae.kernels.common import L2Result


def l2_and_grads(
    params: model.Params,
    x: jax.Array,
    vals: jax.Array,
    idx: jax.Array,
    group_sizes: Sequence[int],
    group_weights: Sequence[float],
    chunk: int = 256,
    capacity: int | None = None,
    *,
    batch: int | None = None,
    latent_offset: jax.Array | int = 0,
    sum_model: Callable[[jax.Array], jax.Array] | None = None,
    b_dec_encoder_path: bool = True,
) -> L2Result:
  """Matryoshka reconstruction loss and its exact gradients from sparse codes.

  vals/idx [B, kc]: the selected activation values (0 where not selected) and their latent ids;
  they must hold every selected entry (the proven-candidates case of the BatchTopK selection).

  The selected entries are first compacted into `capacity` (default: room for every candidate)
  flat slots, which must hold them all, then walked `chunk` entries at a time so that the
  gathered decoder rows stay in cache: never a [B*k, d] buffer, never a B x F x d matmul.
  Pass 1 scatter-adds v * W_dec[f] into per-(group, token) decodes; the prefix errors and their
  upstream gradients R_g = sum_{i>=g} dl2/dx_hat_i follow densely on [G, B, d]; pass 2 gathers
  W_dec[f] and R at each entry and scatter-adds the W_dec and W_enc gradients.

  On one shard of a (data, model) mesh (`kernels.sharded`): `batch` is the whole mesh's token
  count (the loss is a mean over it, so the result is this shard's share of a sum), the latents
  are ids - `latent_offset` of the whole dictionary (their groups follow), and `sum_model` totals
  the per-group decodes, and W_enc's share of b_dec's gradient, over the latent shards; without
  `b_dec_encoder_path` b_dec's gradient is its decodes' share only (the caller adds the rest).
  """
  B, d = x.shape
  F = params['W_dec'].shape[0]
  G = len(group_sizes)
  capacity = vals.size if capacity is None else capacity
  chunk = min(chunk, capacity)
  capacity = common.cdiv(capacity, chunk) * chunk
  W_dec, b_dec = params['W_dec'], params['b_dec']
  tok, lat, val = sparse.compact(vals, idx, capacity)
  group = common.group_of(lat + latent_offset, common.group_ends(group_sizes))
  slot = group * B + tok  # row of the [G*B, d] decodes
  blocks = tuple(a.reshape(capacity // chunk, chunk) for a in (slot, lat, val))

  def decode_chunk(parts, blk):
    s, f, v = blk
    return parts.at[s].add(v[:, None] * W_dec[f]), None

  parts, _ = jax.lax.scan(decode_chunk, jnp.zeros((G * B, d), x.dtype), blocks)
  parts = parts.reshape(G, B, d)
  sum_model = sum_model or (lambda a: a)
  parts = sum_model(parts)
  norm = B if batch is None else batch
  # Unrolled over the few groups: a cumsum over a length-G axis is a slow reduce-window on CPU.
  errs, err = [], x - b_dec
  for g in range(G):
    err = err - parts[g]  # x - x_hat_g
    errs.append(err)
  sq_err = jnp.stack([jnp.sum(e**2) for e in errs]) / norm
  coef = common.l2_coefficients(group_weights, norm)
  upstream, acc = [], jnp.zeros_like(x)
  for g in reversed(range(G)):
    acc = acc + coef[g] * errs[g]
    upstream.append(acc)
  R = jnp.concatenate(upstream[::-1], axis=0)  # [G*B, d]: R_g, token-major
  xc = x - b_dec

  def grad_chunk(carry, blk):
    dW_dec, dW_encT, db_enc = carry
    s, f, v = blk
    R_e = R[s]
    dv = jnp.where(v > 0, jnp.sum(R_e * W_dec[f], axis=-1), 0.0)  # dl2/d(value), selected only
    return (
        dW_dec.at[f].add(v[:, None] * R_e),
        dW_encT.at[f].add(dv[:, None] * xc[s % B]),
        db_enc.at[f].add(dv),
    ), None

  zeros = jnp.zeros((F, d), x.dtype)
  (dW_dec, dW_encT, db_enc), _ = jax.lax.scan(
      grad_chunk, (zeros, zeros, jnp.zeros((F,), x.dtype)), blocks
  )
  grads = {
      'W_enc': dW_encT.T,
      'b_enc': db_enc,
      'W_dec': dW_dec,
      'b_dec': (
          jnp.sum(upstream[-1], axis=0) - sum_model(params['W_enc'] @ db_enc)
          if b_dec_encoder_path
          else jnp.sum(upstream[-1], axis=0)
      ),
  }
  return L2Result(
      jnp.mean(sq_err * jnp.asarray(group_weights, x.dtype)), sq_err, x - errs[-1], grads
  )


def loss_and_grads(
    params: model.Params, x: jax.Array, tokens_since_fired: jax.Array, sc: common.StepConfig
) -> common.LossAndGrads:
  """The sparse step (`sparse.loss_and_grads`) with this module's kernel, in `entry_capacity`
  compacted slots."""
  return sparse.loss_and_grads(
      params,
      x,
      tokens_since_fired,
      sc,
      lambda p, xs, vals, idx, sc, room: l2_and_grads(
          p, xs, vals, idx, sc.group_sizes, sc.group_weights, capacity=room
      ),
      sparse.entry_capacity,
  )
