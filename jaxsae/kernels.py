"""Sparse Matryoshka decode and gradients: O(B*kc*d) work instead of dense B x F x d matmuls.

After BatchTopK only B*k entries of the [B, F] activations are non-zero, yet a dense step spends
four more B x d x F matmuls on them (decode, its two gradients, and the encoder-weight gradient).
Here each token keeps its top-kc candidates (values and latent ids); every prefix reconstruction
is a gather-weighted sum of W_dec rows split by group, and the gradients of W_dec, W_enc, b_enc
and b_dec are scatter-adds over the selected entries only. Rows are processed in chunks so no
[B, kc, d] buffer is ever materialised whole.

The plain reference that tests compare against is autodiff of the dense training loss,
`train_step.loss_fn` (the same maths as dictionary_learning). Which one a step uses is `sae.kernel`:
'dense', 'sparse', or 'auto'. Measured (tools/bench.py, tools/profile_step.py), these XLA
gathers and scatter-adds do not yet beat the dense matmuls: on 2 CPU cores the sparse step is
about as fast (1.11 s vs 1.21 s at d=1024, F=8192, B=2048; 1.5x slower at d=256), on an H100
1.7x (d=1024, F=8192) to 4.6x (d=4096, F=16384) slower, the scatter-adds dominating. So 'auto'
means 'dense' until a fused (Pallas) implementation lands.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsae import model


class L2Result(NamedTuple):
  l2: jax.Array          # mean_i w_i * MSE_i
  sq_err: jax.Array      # [G] mean over tokens of ||x - x_hat_i||^2
  x_hat: jax.Array       # [B, d] full reconstruction (for the AuxK residual)
  grads: model.Params    # gradients of l2 w.r.t. W_enc, b_enc, W_dec, b_dec


def resolve(kernel: str, mesh_model_axis: int = 1) -> str:
  """'auto' -> the fastest measured path everywhere so far: 'dense' (see the module docstring).

  The sparse kernel needs each token's latents on one device, so latent sharding forces 'dense'.
  """
  if kernel == 'auto' or mesh_model_axis > 1:
    return 'dense'
  return kernel


def sparse_l2_and_grads(params: model.Params, x: jax.Array, vals: jax.Array, idx: jax.Array,
                        group_sizes: Sequence[int], group_weights: Sequence[float],
                        chunk_rows: int = 256) -> L2Result:
  """Matryoshka reconstruction loss and its exact gradients from sparse codes.

  vals/idx [B, kc]: the selected activation values (0 where not selected) and their latent ids;
  they must hold every selected entry (the proven-candidates case of the BatchTopK selection).
  """
  B, d = x.shape
  F = params['W_dec'].shape[0]
  G = len(group_sizes)
  ends = jnp.asarray(np.cumsum(group_sizes), jnp.int32)
  w = jnp.asarray(group_weights, x.dtype)
  r = min(chunk_rows, B)
  while B % r:
    r -= 1
  # dl2/dx_hat_i = -2 w_i / (G B) (x - x_hat_i): l2 is the mean over G groups of w_i * MSE_i.
  coef = (-2.0 * w / (G * B))[:, None, None]
  W_dec, b_dec = params['W_dec'], params['b_dec']

  def chunk(carry, blk):
    dW_dec, dW_encT, db_enc, db_dec, sq = carry
    xb, vb, ib = blk                                           # [r, d], [r, kc], [r, kc]
    onehot = (jnp.searchsorted(ends, ib, side='right')[..., None] ==
              jnp.arange(G)).astype(x.dtype)                   # [r, kc, G]
    rows = W_dec[ib]                                           # [r, kc, d]
    parts = jnp.einsum('bj,bjg,bjd->gbd', vb, onehot, rows)    # per-group decodes [G, r, d]
    err = xb[None] - (b_dec + jnp.cumsum(parts, axis=0))       # x - x_hat_i
    D = coef * err
    R = jnp.cumsum(D[::-1], axis=0)[::-1]                      # sum over prefixes i >= g
    R_e = jnp.einsum('bjg,gbd->bjd', onehot, R)                # [r, kc, d] upstream per entry
    dv = jnp.sum(R_e * rows, axis=-1) * (vb > 0)               # d l2 / d vals (selected only)
    flat = ib.reshape(-1)
    dW_dec = dW_dec.at[flat].add((vb[..., None] * R_e).reshape(-1, d))
    dW_encT = dW_encT.at[flat].add((dv[..., None] * (xb - b_dec)[:, None, :]).reshape(-1, d))
    db_enc = db_enc.at[flat].add(dv.reshape(-1))
    return ((dW_dec, dW_encT, db_enc, db_dec + D.sum((0, 1)), sq + jnp.sum(err ** 2, (1, 2))),
            err[-1])

  zeros = (jnp.zeros((F, d), x.dtype), jnp.zeros((F, d), x.dtype), jnp.zeros((F,), x.dtype),
           jnp.zeros((d,), x.dtype), jnp.zeros((G,), x.dtype))
  blocks = tuple(a.reshape(B // r, r, *a.shape[1:]) for a in (x, vals, idx))
  (dW_dec, dW_encT, db_enc, db_dec, sq), err_last = jax.lax.scan(chunk, zeros, blocks)
  sq_err = sq / B
  grads = {'W_enc': dW_encT.T, 'b_enc': db_enc, 'W_dec': dW_dec,
           # b_dec reaches the loss through the decoder and, as -b_dec @ W_enc, the encoder.
           'b_dec': db_dec - params['W_enc'] @ db_enc}
  return L2Result(jnp.mean(sq_err * w), sq_err, x - err_last.reshape(B, d), grads)

