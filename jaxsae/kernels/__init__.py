"""Interchangeable backends for the training step's loss, gradients and optimizer update; this
module is the one place a backend is chosen (`resolve`) and looked up (`get`).

After BatchTopK only B*k entries of the [B, F] activations are non-zero, yet a dense step spends
four more B x d x F matmuls on them (decode, its two gradients, and the encoder-weight gradient).
The sparse backends compute every prefix reconstruction from the selected entries only, and the
gradients of W_dec, W_enc, b_enc and b_dec over those entries: O(B*k*d) work after the encoder.

The backends (`resolve` gives the name that runs):
  dense       autodiff of the reference loss, `model.loss_fn` (dictionary_learning's maths). Every
              other backend is tested against it. On a mesh XLA partitions it (`jaxsae.sharding`).
  xla         gathers and scatter-adds in plain XLA over compacted entries, on any platform.
  pallas_gpu  fused Pallas kernels (Triton), no scatters; interpreted, slowly, off a GPU.
  pallas_tpu  the same for a TPU (Mosaic: row gathers as DMAs); tested in interpret mode only.
  cpu         native C++ kernels through XLA's FFI: selection, loss, gradients, AuxK and the
              optimizer update (`cpu_build` compiles them on first use).
The sparse three share `sparse.loss_and_grads` (candidates, the exactness proof, the dense
fallback); the shared types and helpers are in `common`. On a mesh of several devices every sparse
backend runs per shard inside `jax.shard_map` (`sharded`; `for_step` chooses). Which backend is fastest where, and by
how much, is measured in README's Performance section: 'auto' follows it.

Imports run one way: `common` <- the backend modules <- this package; backends never import
this module or `jaxsae.train_step`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from typing import Callable

import jax
import optax

from jaxsae import model
from jaxsae.kernels.common import GPU_BACKENDS, L2Result, LossAndGrads, StepConfig, StepStats
from jaxsae.kernels import common

__all__ = [
    'BACKENDS',
    'Backend',
    'GPU_BACKENDS',
    'L2Result',
    'LossAndGrads',
    'StepConfig',
    'StepStats',
    'get',
    'resolve',
]

BACKENDS = ('dense', 'xla', 'pallas_gpu', 'pallas_tpu', 'cpu')

LossAndGradsFn = Callable[[model.Params, jax.Array, jax.Array, StepConfig], LossAndGrads]
ProjectAndNormFn = Callable[[model.Params, model.Params], tuple[model.Params, jax.Array]]
UpdateFn = Callable[
    [
        model.Params,
        optax.OptState,
        model.Params,
        jax.Array,
        jax.Array,
        StepConfig,
        optax.GradientTransformation,
        optax.Schedule,
    ],
    tuple[model.Params, optax.OptState],
]


@dataclasses.dataclass(frozen=True)
class Backend:
  """What `train_step` runs, in order:

  loss_and_grads(params, x, tokens_since_fired, sc) -> LossAndGrads
      the loss, its statistics, the updated dead-latent counters, and the gradients;
  project_and_norm(params, grads) -> (grads, global norm)
      the decoder gradient projected off the decoder rows, and the norm the clip uses;
  update(params, opt_state, grads, grad_norm, finite, sc, optimizer, schedule)
      -> (params, opt_state): the optimizer step and unit decoder rows, a no-op unless `finite`.
  The last two default to the plain-JAX / optax ones; a backend with native versions (cpu) brings
  its own, on the same state layout, so checkpoints move between backends.
  """

  name: str
  loss_and_grads: LossAndGradsFn
  project_and_norm: ProjectAndNormFn = common.project_and_norm
  update: UpdateFn = common.optax_update


def get(name: str) -> Backend:
  """The backend called `name` (a `resolve` result). Imported on demand: the Pallas modules need
  their lowering (Triton, Mosaic) importable, which only the backends that use them may."""
  # pylint: disable=import-outside-toplevel
  if name == 'dense':
    from jaxsae.kernels import dense

    return Backend(name, dense.loss_and_grads)
  if name == 'xla':
    from jaxsae.kernels import xla

    return Backend(name, xla.loss_and_grads)
  if name == 'pallas_gpu':
    from jaxsae.kernels import pallas_gpu

    return Backend(name, pallas_gpu.loss_and_grads)
  if name == 'pallas_tpu':
    from jaxsae.kernels import pallas_tpu

    return Backend(name, pallas_tpu.loss_and_grads)
  if name == 'cpu':
    from jaxsae.kernels import cpu

    return Backend(name, cpu.loss_and_grads, cpu.project_and_norm, cpu.update)
  raise ValueError(
      f'unknown kernel backend {name!r}: one of {", ".join(BACKENDS)} '
      "(sae.kernel's 'auto' and 'pallas' go through kernels.resolve)"
  )


def for_step(sc: StepConfig) -> Backend:
  """The backend a compiled step runs: `get(sc.kernel)`, or on a mesh of several devices its
  per-shard form (`kernels.sharded`), which the step must trace under that mesh (`jax.set_mesh`)."""
  if sc.kernel == 'dense' or sc.mesh_data * sc.mesh_model == 1:
    return get(sc.kernel)
  from jaxsae.kernels import sharded  # pylint: disable=import-outside-toplevel

  if not sharded.supports(sc.kernel, sc.mesh_model):
    raise ValueError(
        f"kernel {sc.kernel!r} needs all of a token's latents on one device: mesh.model must be "
        f"1 (it is {sc.mesh_model}); use sae.kernel='xla' or 'auto'."
    )
  return Backend(
      sc.kernel,
      sharded.loss_and_grads,
      lambda params, grads: sharded.project_and_norm(params, grads, sc),
      sharded.update,
  )


def _pallas_triton_available() -> bool:
  """JAX marks Pallas's Triton lowering deprecated; 'auto' must not break once it is gone."""
  try:
    return importlib.util.find_spec('jax.experimental.pallas.triton') is not None
  except ImportError:
    return False


def resolve(
    kernel: str,
    mesh_model_axis: int = 1,
    backend: str | None = None,
) -> str:
  """The backend a step runs for `sae.kernel`: 'dense', 'xla', 'pallas_gpu', 'pallas_tpu' or 'cpu'.

  'auto' is the fastest measured path (README's Performance section): on the CPU backend 'cpu'
  (the native kernels, per shard on a mesh; 'xla' if they cannot be built here); on GPUs
  'pallas_gpu' (per shard on a mesh whose `model` axis is 1; with latents split, 'dense', which
  measured faster than 'xla' on a GPU); 'dense' on TPUs, where the Mosaic kernels are so far
  tested only in interpret mode. 'pallas' is the Mosaic kernels ('pallas_tpu') on a TPU and the
  Triton ones ('pallas_gpu') elsewhere: off a GPU they run interpreted (exact, very slow: for
  tests); both say so in the log. The Pallas kernels need each token's latents on one device: with
  mesh.model > 1 an explicit 'pallas' is an error (`for_step`). An explicit 'cpu' off the CPU
  backend is an error.
  """
  backend = backend or jax.default_backend()
  if kernel == 'auto':
    if backend == 'cpu':
      from jaxsae.kernels import cpu_build  # pylint: disable=import-outside-toplevel (compiles)

      return 'cpu' if cpu_build.available() else 'xla'
    fast = backend in GPU_BACKENDS and mesh_model_axis == 1 and _pallas_triton_available()
    return 'pallas_gpu' if fast else 'dense'
  if kernel == 'cpu' and backend != 'cpu':
    raise ValueError(
        f"sae.kernel='cpu' runs on the CPU backend only (this is {backend!r}); "
        "use 'auto', 'pallas' or 'xla'."
    )
  if kernel == 'pallas':
    if backend == 'tpu':
      logging.warning(
          "sae.kernel='pallas' on TPU runs the Mosaic kernels of "
          'jaxsae.kernels.pallas_tpu, so far tested only in interpret mode.'
      )
    elif backend not in GPU_BACKENDS:
      logging.warning(
          "sae.kernel='pallas' on %s runs the Pallas kernels in interpret mode: exact "
          "but very slow, meant for tests. Use 'auto' or 'xla' to train here.",
          backend,
      )
    return 'pallas_tpu' if backend == 'tpu' else 'pallas_gpu'
  return kernel
