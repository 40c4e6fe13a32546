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

import jax

from jaxsae.kernels.common import GPU_BACKENDS, L2Result


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
      from jaxsae.kernels import cpu_build  # pylint: disable=import-outside-toplevel (compiles)
      return 'cpu' if cpu_build.available() else 'xla'
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


