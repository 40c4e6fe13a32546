"""Sparse Matryoshka decode and gradients: O(B*kc*d) work instead of dense B x F x d matmuls.

After BatchTopK only B*k entries of the [B, F] activations are non-zero, yet a dense step spends
four more B x d x F matmuls on them (decode, its two gradients, and the encoder-weight gradient).
Here each token keeps its top-kc candidates (values and latent ids); every prefix reconstruction
is a gather-weighted sum of W_dec rows split by group, and the gradients of W_dec, W_enc, b_enc
and b_dec are scatter-adds over the selected entries only. Rows are processed in chunks so no
[B, kc, d] buffer is ever materialised whole.

Which implementation a step uses is `sae.kernel`:
  'dense'  the plain reference: autodiff of the dense training loss, `train_step.loss_fn` (the
           same maths as dictionary_learning). Every fast path is tested against it.
  'xla'    this module's gathers and scatter-adds, on any backend.
  'pallas' the fused kernels of `jaxsae.kernels_pallas` (GPU; interpreted, slowly, on CPU; TPU
           falls back to 'xla').
  'auto'   the fastest measured path: 'pallas' on a single GPU, else 'dense'.
Measured (tools/bench.py, float32, default matmul precision), one step, dense / xla / pallas:
  H100, d=1024 F=8192 k=32 B=2048:     3.7-4.0 ms / 6.7-7.1 ms / 3.3-3.7 ms
  H100, d=4096 F=16384 k=64 B=4096:    17.0 ms / 78 ms / 15.0 ms (of which the sparse l2 and
                                       gradients: 68 ms xla, 4.0 ms pallas; tools/profile_step.py)
  2 CPU cores, d=1024 F=8192 B=2048:   1.21 s / 1.11 s / (interpreted: not a contender)
So 'auto' is 'pallas' on one GPU and 'dense' elsewhere. On the XLA path the scatter-adds
dominate; the Pallas kernels are bound by the bytes of the gathered rows (kernels_pallas.py).
"""

from __future__ import annotations

import importlib.util
import logging
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


GPU_BACKENDS = ('gpu', 'cuda', 'rocm')  # platform names the Pallas Triton kernels compile for


def _pallas_triton_available() -> bool:
  """JAX marks Pallas's Triton lowering deprecated; 'auto' must not break once it is gone."""
  try:
    return importlib.util.find_spec('jax.experimental.pallas.triton') is not None
  except ImportError:
    return False


def resolve(kernel: str, mesh_model_axis: int = 1, backend: str | None = None,
            num_devices: int | None = None) -> str:
  """The implementation a step runs for `sae.kernel`: 'dense', 'xla' or 'pallas'.

  'auto' is the fastest measured path (see the module docstring): 'pallas' on a single GPU,
  'dense' everywhere else — a pallas_call is not partitioned over a device mesh (XLA would
  replicate it), and on CPU the dense matmuls win. The sparse paths need each token's latents on
  one device, so latent sharding forces 'dense'. An explicit 'pallas' on CPU runs interpreted
  (exact, very slow: for tests); on TPU, which has no Pallas kernels yet, it falls back to 'xla';
  both say so in the log.
  """
  backend = backend or jax.default_backend()
  if mesh_model_axis > 1:
    return 'dense'
  if kernel == 'auto':
    num_devices = jax.device_count() if num_devices is None else num_devices
    fast = backend in GPU_BACKENDS and num_devices == 1 and _pallas_triton_available()
    return 'pallas' if fast else 'dense'
  if kernel == 'pallas':
    if backend == 'tpu':
      logging.warning("sae.kernel='pallas' has no TPU kernels yet; using the 'xla' sparse path.")
      return 'xla'
    if backend not in GPU_BACKENDS:
      logging.warning("sae.kernel='pallas' on %s runs the Pallas kernels in interpret mode: exact "
                      "but very slow, meant for tests. Use 'auto' or 'xla' to train here.",
                      backend)
  return kernel


def sparse_l2_and_grads(params: model.Params, x: jax.Array, vals: jax.Array, idx: jax.Array,
                        group_sizes: Sequence[int], group_weights: Sequence[float],
                        chunk_rows: int = 256, kernel: str = 'xla') -> L2Result:
  """Matryoshka reconstruction loss and its exact gradients from sparse codes.

  vals/idx [B, kc]: the selected activation values (0 where not selected) and their latent ids;
  they must hold every selected entry (the proven-candidates case of the BatchTopK selection).
  kernel: 'xla' (chunked gathers and scatter-adds, below) or 'pallas' (`jaxsae.kernels_pallas`).
  """
  if kernel == 'pallas':
    from jaxsae import kernels_pallas  # pylint: disable=import-outside-toplevel (imports us)
    return kernels_pallas.l2_and_grads(params, x, vals, idx, group_sizes, group_weights)
  if kernel != 'xla':
    raise ValueError(f"kernel must be 'xla' or 'pallas', got {kernel!r}")
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

