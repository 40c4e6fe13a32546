"""Sparse Matryoshka decode and gradients: O(B*k*d) work instead of dense B x F x d matmuls.

After BatchTopK only B*k entries of the [B, F] activations are non-zero, yet a dense step spends
four more B x d x F matmuls on them (decode, its two gradients, and the encoder-weight gradient).
Here the selected entries are compacted into flat (token, latent, value) lists; every prefix
reconstruction is a gather-weighted sum of W_dec rows split by group, and the gradients of W_dec,
W_enc, b_enc and b_dec are scatter-adds over the selected entries only. Entries are walked in
chunks so the gathered rows stay in cache and no [B*k, d] buffer is ever materialised.

Which implementation a step uses is `sae.kernel`:
  'dense'  the plain reference: autodiff of the dense training loss, `train_step.loss_fn` (the
           same maths as dictionary_learning). Every fast path is tested against it. Also the
           step on meshes of several devices (sharded by `jaxsae.sharding`).
  'xla'    this module's gathers and scatter-adds, on any backend.
  'pallas' the fused kernels of `jaxsae.kernels_pallas` (GPU, Triton; interpreted, slowly, on
           CPU) or, on a TPU, `jaxsae.kernels_pallas_tpu` (Mosaic: row gathers as DMAs).
  'cpu'    the native CPU kernels of `jaxsae.kernels_cpu` (selection, loss, gradients, AuxK and
           the optimizer update, through XLA's FFI).
  'auto'   the fastest measured path: 'pallas' on a single GPU, 'cpu' on a single CPU device
           ('xla' where the native kernels cannot be built), else 'dense'.
Measured (tools/bench.py, float32, default matmul precision), one step:
  2 CPU cores, d=1024 F=8192 k=32 B=2048:  dense 0.66 s, xla 0.36 s, cpu 0.123 s (floor 0.080 s)
  H100, d=1024 F=8192 k=32 B=2048:         dense 3.7-4.0 ms, xla 6.7-7.1 ms, pallas 3.3-3.7 ms
  H100, d=4096 F=16384 k=64 B=4096:        dense 17.0 ms, xla 78 ms, pallas 15.0 ms (of which the
                                           sparse l2 and gradients: 68 ms xla, 4.0 ms pallas)
(the H100 'xla' figures predate the chunked, compacted form below: re-measure before changing
'auto' there). On a GPU the XLA scatter-adds dominate; the Pallas kernels are bound by the bytes
of the gathered rows (kernels_pallas.py).
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
  """The implementation a step runs for `sae.kernel`: 'dense', 'xla', 'pallas' or 'cpu'.

  'auto' is the fastest measured path (see the module docstring): 'pallas' on a single GPU,
  'cpu' (the native kernels, `jaxsae.kernels_cpu`; 'xla' if they cannot be built here) on a
  single CPU device, 'dense' everywhere else — neither a pallas_call nor a native custom call is
  partitioned over a device mesh (XLA would replicate it), and the compaction of the 'xla' path
  is a global prefix sum over the batch. The sparse paths need each token's latents on one
  device, so latent sharding forces 'dense'. An explicit 'pallas' on CPU runs interpreted
  (exact, very slow: for tests); on TPU it runs the Mosaic kernels (`jaxsae.kernels_pallas_tpu`),
  so far tested only in interpret mode, which is why 'auto' does not pick them there; both say
  so in the log. An explicit 'cpu' off the CPU backend is an error; on several CPU
  devices it is 'dense', with a warning.
  """
  backend = backend or jax.default_backend()
  if mesh_model_axis > 1:
    return 'dense'
  if kernel == 'auto':
    num_devices = jax.device_count() if num_devices is None else num_devices
    if num_devices == 1 and backend == 'cpu':
      from jaxsae import kernels_cpu  # pylint: disable=import-outside-toplevel (imports us)
      return 'cpu' if kernels_cpu.available() else 'xla'
    fast = backend in GPU_BACKENDS and num_devices == 1 and _pallas_triton_available()
    return 'pallas' if fast else 'dense'
  if kernel == 'cpu':
    if backend != 'cpu':
      raise ValueError(f"sae.kernel='cpu' runs on the CPU backend only (this is {backend!r}); "
                       "use 'auto', 'pallas' or 'xla'.")
    num_devices = jax.device_count() if num_devices is None else num_devices
    if num_devices > 1:
      logging.warning("sae.kernel='cpu' runs on one device; with %d devices the step is the "
                      "sharded 'dense' one.", num_devices)
      return 'dense'
  if kernel == 'pallas':
    if backend == 'tpu':
      logging.warning("sae.kernel='pallas' on TPU runs the Mosaic kernels of "
                      "jaxsae.kernels_pallas_tpu, so far tested only in interpret mode.")
    if backend not in GPU_BACKENDS:
      logging.warning("sae.kernel='pallas' on %s runs the Pallas kernels in interpret mode: exact "
                      "but very slow, meant for tests. Use 'auto' or 'xla' to train here.",
                      backend)
  return kernel


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


def sparse_l2_and_grads(params: model.Params, x: jax.Array, vals: jax.Array, idx: jax.Array,
                        group_sizes: Sequence[int], group_weights: Sequence[float],
                        chunk: int = 256, kernel: str = 'xla',
                        capacity: int | None = None) -> L2Result:
  """Matryoshka reconstruction loss and its exact gradients from sparse codes.

  vals/idx [B, kc]: the selected activation values (0 where not selected) and their latent ids;
  they must hold every selected entry (the proven-candidates case of the BatchTopK selection).
  kernel: 'xla' (below) or 'pallas' (`jaxsae.kernels_pallas`).

  The 'xla' path first compacts the selected entries into `capacity` (default: room for every
  candidate) flat slots, which must hold them all, then walks them `chunk` entries at a time so
  that the gathered decoder rows stay in cache: never a [B*k, d] buffer, never a B x F x d matmul.
  Pass 1 scatter-adds v * W_dec[f] into per-(group, token) decodes; the prefix errors and their
  upstream gradients R_g = sum_{i>=g} dl2/dx_hat_i follow densely on [G, B, d]; pass 2 gathers
  W_dec[f] and R at each entry and scatter-adds the W_dec and W_enc gradients.
  """
  if kernel == 'pallas':   # the TPU (Mosaic) kernels on a TPU, else the Triton ones
    # pylint: disable=import-outside-toplevel (both import this module)
    if jax.default_backend() == 'tpu':
      from jaxsae import kernels_pallas_tpu
      return kernels_pallas_tpu.l2_and_grads(params, x, vals, idx, group_sizes, group_weights)
    from jaxsae import kernels_pallas
    return kernels_pallas.l2_and_grads(params, x, vals, idx, group_sizes, group_weights)
  if kernel != 'xla':
    raise ValueError(f"kernel must be 'xla' or 'pallas', got {kernel!r}")
  B, d = x.shape
  F = params['W_dec'].shape[0]
  G = len(group_sizes)
  capacity = vals.size if capacity is None else capacity
  chunk = min(chunk, capacity)
  capacity = -(-capacity // chunk) * chunk
  W_dec, b_dec = params['W_dec'], params['b_dec']
  tok, lat, val = compact(vals, idx, capacity)
  group = jnp.searchsorted(jnp.asarray(np.cumsum(group_sizes), jnp.int32), lat, side='right')
  slot = group.astype(jnp.int32) * B + tok                   # row of the [G*B, d] decodes
  blocks = tuple(a.reshape(capacity // chunk, chunk) for a in (slot, lat, val))

  def decode_chunk(parts, blk):
    s, f, v = blk
    return parts.at[s].add(v[:, None] * W_dec[f]), None

  parts, _ = jax.lax.scan(decode_chunk, jnp.zeros((G * B, d), x.dtype), blocks)
  parts = parts.reshape(G, B, d)
  # Unrolled over the few groups: a cumsum over a length-G axis is a slow reduce-window on CPU.
  errs, err = [], x - b_dec
  for g in range(G):
    err = err - parts[g]                                     # x - x_hat_g
    errs.append(err)
  sq_err = jnp.stack([jnp.sum(e ** 2) for e in errs]) / B
  # l2 is the mean over G prefixes of w_g * MSE_g: dl2/dx_hat_g = -2 w_g / (G B) (x - x_hat_g).
  coef = -2.0 * np.asarray(group_weights) / (G * B)
  upstream, acc = [], jnp.zeros_like(x)
  for g in reversed(range(G)):
    acc = acc + coef[g] * errs[g]
    upstream.append(acc)
  R = jnp.concatenate(upstream[::-1], axis=0)               # [G*B, d]: R_g, token-major
  xc = x - b_dec

  def grad_chunk(carry, blk):
    dW_dec, dW_encT, db_enc = carry
    s, f, v = blk
    R_e = R[s]
    dv = jnp.where(v > 0, jnp.sum(R_e * W_dec[f], axis=-1), 0.0)   # dl2/d(value), selected only
    return (dW_dec.at[f].add(v[:, None] * R_e), dW_encT.at[f].add(dv[:, None] * xc[s % B]),
            db_enc.at[f].add(dv)), None

  zeros = jnp.zeros((F, d), x.dtype)
  (dW_dec, dW_encT, db_enc), _ = jax.lax.scan(
      grad_chunk, (zeros, zeros, jnp.zeros((F,), x.dtype)), blocks)
  grads = {'W_enc': dW_encT.T, 'b_enc': db_enc, 'W_dec': dW_dec,
           # b_dec reaches the loss through every decode (sum of the upstream gradients, R_0)
           # and, as -b_dec @ W_enc, through the encoder.
           'b_dec': jnp.sum(upstream[-1], axis=0) - params['W_enc'] @ db_enc}
  return L2Result(jnp.mean(sq_err * jnp.asarray(group_weights, x.dtype)), sq_err, x - errs[-1],
                  grads)
