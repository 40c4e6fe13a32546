"""What every kernel backend shares: the step's static hyper-parameters, the types a backend
returns, the small pieces of Matryoshka bookkeeping each kernel family needs (loss coefficients,
group ids, b_dec's gradient), the AuxK term's wiring, and the default (optax) optimizer update.

Imports run one way: this module <- the backends <- `jaxsae.kernels` (which chooses one).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsae import model

GPU_BACKENDS = ('gpu', 'cuda', 'rocm')  # platform names the Pallas Triton kernels compile for


@dataclasses.dataclass(frozen=True)
class StepConfig(model.LossHyper):
  """The static hyper-parameters a compiled step closes over: the loss's, and the threshold EMA's,
  the backend's and the optimizer's (`train_step.StepConfig.from_config` makes one from a config).
  Construct it with keywords."""

  threshold_beta: float
  threshold_start_step: int
  skip_nonfinite: bool
  kernel: str = 'dense'  # a backend name, as `jaxsae.kernels.resolve` returns it
  # The optimizer's constants, for a backend's own update (the 'cpu' one; optax's otherwise).
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  grad_clip: float = 1.0
  # The device mesh the step runs on (data x model); several devices run the sparse backends per
  # shard (`kernels.sharded`). shard_optimizer: Adam's state and update split over `data` too.
  mesh_data: int = 1
  mesh_model: int = 1
  shard_optimizer: bool = False


class L2Result(NamedTuple):
  """The sparse kernels' result: the Matryoshka reconstruction loss and its gradients."""

  l2: jax.Array  # mean_i w_i * MSE_i
  sq_err: jax.Array  # [G] mean over tokens of ||x - x_hat_i||^2
  x_hat: jax.Array  # [B, d] full reconstruction (for the AuxK residual)
  grads: model.Params  # gradients of l2 w.r.t. W_enc, b_enc, W_dec, b_dec


class StepStats(NamedTuple):
  """What a loss evaluation reports besides the loss and gradients."""

  sq_err: jax.Array  # [G] mean ||x - x_hat_i||^2 per prefix
  l2_loss: jax.Array
  auxk_loss: jax.Array
  l0: jax.Array  # mean selected latents per token
  smallest: jax.Array  # smallest selected activation (inf if none), for the threshold EMA
  sparse_path: jax.Array  # 1.0 when a sparse kernel ran this step, 0.0 if the dense one did
  ties_dropped: jax.Array  # entries tied at the threshold beyond a kernel's capacity ('cpu')


class LossAndGrads(NamedTuple):
  """What a backend's `loss_and_grads` returns."""

  loss: jax.Array
  stats: StepStats
  tokens_since_fired: jax.Array  # the dead-latent counters, updated with this batch
  grads: model.Params


# --------------------------------------------------------------------------------------------------
# Matryoshka bookkeeping the kernels share
# --------------------------------------------------------------------------------------------------


def cdiv(a, b):
  """ceil(a / b) for a >= 0, b > 0 (Python or traced integers)."""
  return (a + b - 1) // b


def group_ends(group_sizes: Sequence[int]) -> tuple[int, ...]:
  """One past the last latent of each Matryoshka group."""
  return tuple(int(e) for e in np.cumsum(group_sizes))


def group_of(lat: jax.Array, ends: Sequence[int]) -> jax.Array:
  """The Matryoshka group of latent ids `lat`: how many group ends (but the last) are <= lat, so
  ids past F fall in the last group. Plain comparisons: usable inside Pallas kernels too."""
  g = jnp.zeros(lat.shape, jnp.int32)
  for e in ends[:-1]:
    g = g + (lat >= e).astype(jnp.int32)
  return g


def l2_coefficients(group_weights: Sequence[float], batch: int) -> np.ndarray:
  """coef_g = -2 w_g / (G B) in float64: l2 = mean_g w_g MSE_g, so dl2/dx_hat_g is
  coef_g (x - x_hat_g), and prefix g's upstream signal R_g = sum_{i >= g} coef_i (x - x_hat_i)."""
  w = np.asarray(group_weights, np.float64)
  return -2.0 * w / (len(w) * batch)


def b_dec_grad(
    W_enc: jax.Array, db_enc: jax.Array, decoder_sum: jax.Array | None = None
) -> jax.Array:
  """b_dec's gradient: through every decode (`decoder_sum`, the sum over tokens of R_0, when the
  loss decodes with b_dec) and, as -b_dec @ W_enc, through the encoder's selected values."""
  if decoder_sum is None:
    return -(W_enc @ db_enc)
  return decoder_sum - W_enc @ db_enc


def interpret_override() -> bool | None:
  """JAXSAE_PALLAS_INTERPRET: 1 runs the Pallas kernels interpreted, 0 compiles them, unset (None)
  leaves it to the backend (compiled only on the platform the kernels are for)."""
  env = os.environ.get('JAXSAE_PALLAS_INTERPRET', '').strip().lower()
  if not env:
    return None
  return env not in ('0', 'false', 'no')


# --------------------------------------------------------------------------------------------------
# AuxK on top of a sparse l2, and the default update
# --------------------------------------------------------------------------------------------------

AuxkFn = Callable[[jax.Array, jax.Array], tuple[jax.Array, model.Params]]  # (residual, dead)


def with_auxk(
    r: L2Result,
    x: jax.Array,
    fired: jax.Array,
    tokens_since_fired: jax.Array,
    sc: StepConfig,
    auxk: AuxkFn,
) -> tuple[jax.Array, model.Params, jax.Array]:
  """(AuxK loss, gradients of l2 + auxk_alpha * AuxK, updated counters) after a sparse l2.

  As in `model.loss_fn`, the dead set already counts this batch; AuxK, and its gradients from
  `auxk(residual, dead)`, are only computed when some latent is dead.
  """
  silence = model.count_silence(tokens_since_fired, fired, x.shape[0])
  dead = silence >= sc.dead_tokens_threshold
  residual = x - r.x_hat

  def add_auxk():
    aux, aux_grads = auxk(residual, dead)
    return aux, jax.tree.map(lambda g, a: g + sc.auxk_alpha * a, r.grads, aux_grads)

  aux, grads = jax.lax.cond(jnp.any(dead), add_auxk, lambda: (jnp.zeros((), x.dtype), r.grads))
  return aux, grads, silence


def project_and_norm(params: model.Params, grads: model.Params) -> tuple[model.Params, jax.Array]:
  """The decoder gradient off the decoder rows (`model.remove_parallel_component`), and the
  global gradient norm the clip uses."""
  grads = {**grads, 'W_dec': model.remove_parallel_component(params['W_dec'], grads['W_dec'])}
  return grads, optax.tree.norm(grads)


def optax_update(
    params: model.Params,
    opt_state: optax.OptState,
    grads: model.Params,
    grad_norm: jax.Array,
    finite: jax.Array,
    sc: StepConfig,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
) -> tuple[model.Params, optax.OptState]:
  """`optimizer`'s update, then unit decoder rows; nothing changes unless `finite`. A cond, not a
  select per array: the update then runs in place on the donated state."""
  del grad_norm, sc, schedule  # the optimizer computes its own

  def update():
    updates, new_opt_state = optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    new_params['W_dec'] = model.unit_norm_rows(new_params['W_dec'])
    return new_params, new_opt_state

  return jax.lax.cond(finite, update, lambda: (params, opt_state))
