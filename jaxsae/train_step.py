"""One training step of the Matryoshka BatchTopK SAE, and the state it carries between steps.

The state is a plain dict of arrays (parameters, Adam state, inference threshold EMA, dead-latent
counters, step, non-finite bookkeeping), so Orbax saves it as-is and `jax.jit` shards it by the
rules in `jaxsae.sharding`. The update mirrors dictionary_learning's MatryoshkaBatchTopKTrainer:
loss -> remove the decoder-parallel gradient -> clip 1.0 -> Adam -> renormalise decoder rows. Each
stage is the chosen kernel backend's (`jaxsae.kernels.get(sc.kernel)`); the reference maths is
`model.loss_fn`.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxsae import config as config_lib
from jaxsae import kernels
from jaxsae import model

TrainState = dict[str, Any]


class StepConfig(kernels.StepConfig):
  """The static hyper-parameters a compiled step closes over (`kernels.StepConfig`), and how a
  config makes them: `kernel` is the backend `kernels.resolve` chooses for `sae.kernel`."""

  @classmethod
  def from_config(cls, c: ml_collections.ConfigDict) -> 'StepConfig':
    return cls(
        kernel=kernels.resolve(c.sae.kernel, c.mesh.model),
        mesh_data=config_lib.mesh_shape(c)[0],
        mesh_model=c.mesh.model,
        shard_optimizer=config_lib.shard_optimizer(c),
        compute_dtype=c.sae.dtype,
        k=c.sae.k,
        group_sizes=config_lib.group_sizes(c),
        group_weights=config_lib.group_weights(c),
        auxk_alpha=c.sae.auxk_alpha,
        top_k_aux=config_lib.top_k_aux(c),
        dead_tokens_threshold=c.sae.dead_tokens_threshold,
        threshold_beta=c.sae.threshold_beta,
        threshold_start_step=c.sae.threshold_start_step,
        candidates_per_row=c.sae.candidates_per_row,
        skip_nonfinite=c.train.skip_nonfinite,
        b1=c.optim.b1,
        b2=c.optim.b2,
        eps=c.optim.eps,
        grad_clip=c.optim.grad_clip,
    )


def lr_schedule(c: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0, constant, optional linear decay to 0 from optim.decay_start."""
  base, warmup, decay, total = (
      config_lib.learning_rate(c),
      c.optim.warmup_steps,
      c.optim.decay_start,
      c.train.steps,
  )

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    factor = jnp.where(count < warmup, count / max(warmup, 1), 1.0)
    if decay is not None:
      factor = jnp.where(count >= decay, (total - count) / (total - decay), factor)
    return base * factor

  return schedule


def make_optimizer(c: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Clip by global norm, then Adam on the schedule (a backend with its own update computes the
  same on this state layout)."""
  return optax.chain(
      optax.clip_by_global_norm(c.optim.grad_clip),
      optax.adam(lr_schedule(c), b1=c.optim.b1, b2=c.optim.b2, eps=c.optim.eps),
  )


def init_state(params: model.Params, optimizer: optax.GradientTransformation) -> TrainState:
  F = params['W_enc'].shape[1]
  return {
      'params': params,
      'opt_state': optimizer.init(params),
      'threshold': jnp.array(-1.0, jnp.float32),
      'tokens_since_fired': jnp.zeros((F,), jnp.int32),
      'step': jnp.array(0, jnp.int32),
      'nonfinite_count': jnp.array(0, jnp.int32),
      'first_nonfinite_step': jnp.array(-1, jnp.int32),
  }


def abstract_state(c: ml_collections.ConfigDict) -> TrainState:
  """Shapes and dtypes of the training state for config `c`, without allocating it."""
  d, F = c.sae.d, config_lib.dict_size(c)
  return jax.eval_shape(
      lambda: init_state(model.init_params(jax.random.PRNGKey(0), d, F), make_optimizer(c))
  )


def train_step(
    state: TrainState,
    x: jax.Array,
    *,
    sc: kernels.StepConfig,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """Loss, gradients and the optimizer update for one batch; returns the new state and metrics."""
  backend = kernels.for_step(sc)
  params, step = state['params'], state['step']
  loss, stats, tokens_since_fired, grads = backend.loss_and_grads(
      params, x, state['tokens_since_fired'], sc
  )
  grads, grad_norm = backend.project_and_norm(params, grads)

  # Inference threshold: EMA of the smallest kept activation, from threshold_start_step on.
  smallest = jnp.where(jnp.isfinite(stats.smallest), stats.smallest, 0.0)
  ema = jnp.where(
      state['threshold'] < 0,
      smallest,
      sc.threshold_beta * state['threshold'] + (1 - sc.threshold_beta) * smallest,
  )
  threshold = jnp.where(step > sc.threshold_start_step, ema, state['threshold'])

  # A non-finite batch never reaches the weights: the update is dropped and counted, and the
  # training loop stops (or, with train.skip_nonfinite, carries on) when it next looks.
  finite = jnp.all(jnp.isfinite(x)) & jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  new_params, opt_state = backend.update(
      params, state['opt_state'], grads, grad_norm, finite, sc, optimizer, schedule
  )
  new_state = {
      'params': new_params,
      'opt_state': opt_state,
      'threshold': jnp.where(finite, threshold, state['threshold']),
      'tokens_since_fired': jnp.where(finite, tokens_since_fired, state['tokens_since_fired']),
      'step': step + 1,
      'nonfinite_count': state['nonfinite_count'] + (~finite).astype(jnp.int32),
      'first_nonfinite_step': jnp.where(
          (state['first_nonfinite_step'] < 0) & ~finite, step, state['first_nonfinite_step']
      ),
  }

  x32 = x.astype(jnp.float32)  # fused into the reduction: no float32 copy of a bfloat16 batch
  var = jnp.mean(jnp.sum((x32 - x32.mean(0)) ** 2, axis=-1))
  metrics = {
      'loss': loss,
      'l2_loss': stats.l2_loss,
      'auxk_loss': stats.auxk_loss,
      'fvu': stats.sq_err / var,  # [G], one per prefix
      'l0': stats.l0,
      'dead_fraction': jnp.mean(
          (tokens_since_fired >= sc.dead_tokens_threshold).astype(jnp.float32)
      ),
      'threshold': threshold,
      'lr': schedule(step),
      'grad_norm': grad_norm,
      'finite': finite,
      'sparse_path': stats.sparse_path,
      'ties_dropped': stats.ties_dropped,
  }
  return new_state, metrics


def fvu_prefix_names(group_sizes: Sequence[int]) -> list[str]:
  ends = [int(e) for e in jnp.cumsum(jnp.asarray(group_sizes)).tolist()]
  return [f'fvu/prefix_{e}' for e in ends]
