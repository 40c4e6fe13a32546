"""One training step of the Matryoshka BatchTopK SAE, and the state it carries between steps.

The state is a plain dict of arrays (parameters, Adam state, inference threshold EMA, dead-latent
counters, step, non-finite bookkeeping), so Orbax saves it as-is and `jax.jit` shards it by the
rules in `jaxsae.sharding`. The update mirrors dictionary_learning's MatryoshkaBatchTopKTrainer:
loss -> remove the decoder-parallel gradient -> clip 1.0 -> Adam -> renormalise decoder rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxsae import config as config_lib
from jaxsae import kernels
from jaxsae.kernels import sparse, xla
from jaxsae.kernels import cpu as kernels_cpu
from jaxsae import model
from jaxsae import selection

TrainState = dict[str, Any]
_COUNTER_CAP = 2**30  # tokens-since-fired saturate here instead of overflowing int32


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The static hyper-parameters a compiled step closes over."""
  k: int
  group_sizes: tuple[int, ...]
  group_weights: tuple[float, ...]
  auxk_alpha: float
  top_k_aux: int
  dead_tokens_threshold: int
  threshold_beta: float
  threshold_start_step: int
  candidates_per_row: int
  skip_nonfinite: bool
  kernel: str = 'dense'   # resolved (kernels.resolve): 'dense' | 'xla' | 'pallas' | 'cpu'
  # The optimizer's constants, for the 'cpu' path's native update (`make_optimizer` otherwise).
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  grad_clip: float = 1.0

  @classmethod
  def from_config(cls, c: ml_collections.ConfigDict) -> 'StepConfig':
    return cls(kernel=kernels.resolve(c.sae.kernel, c.mesh.model), k=c.sae.k,
               group_sizes=config_lib.group_sizes(c), group_weights=config_lib.group_weights(c),
               auxk_alpha=c.sae.auxk_alpha, top_k_aux=config_lib.top_k_aux(c),
               dead_tokens_threshold=c.sae.dead_tokens_threshold,
               threshold_beta=c.sae.threshold_beta, threshold_start_step=c.sae.threshold_start_step,
               candidates_per_row=c.sae.candidates_per_row, skip_nonfinite=c.train.skip_nonfinite,
               b1=c.optim.b1, b2=c.optim.b2, eps=c.optim.eps, grad_clip=c.optim.grad_clip)


def lr_schedule(c: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0, constant, optional linear decay to 0 from optim.decay_start."""
  base, warmup, decay, total = (config_lib.learning_rate(c), c.optim.warmup_steps,
                                c.optim.decay_start, c.train.steps)

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    factor = jnp.where(count < warmup, count / max(warmup, 1), 1.0)
    if decay is not None:
      factor = jnp.where(count >= decay, (total - count) / (total - decay), factor)
    return base * factor

  return schedule


def make_optimizer(c: ml_collections.ConfigDict) -> optax.GradientTransformation:
  return optax.chain(optax.clip_by_global_norm(c.optim.grad_clip),
                     optax.adam(lr_schedule(c), b1=c.optim.b1, b2=c.optim.b2, eps=c.optim.eps))


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
  return jax.eval_shape(lambda: init_state(model.init_params(jax.random.PRNGKey(0), d, F),
                                           make_optimizer(c)))


def remove_parallel_component(W_dec: jax.Array, grad: jax.Array) -> jax.Array:
  """Project each decoder row's gradient off the row, so the step keeps rows near unit norm."""
  unit = W_dec / (jnp.linalg.norm(W_dec, axis=1, keepdims=True) + 1e-6)
  return grad - jnp.sum(grad * unit, axis=1, keepdims=True) * unit


def loss_fn(params: model.Params, x: jax.Array, tokens_since_fired: jax.Array,
            sc: StepConfig) -> tuple[jax.Array, tuple[model.LossAux, jax.Array]]:
  """dictionary_learning's loss: mean over prefixes of w_i * MSE_i, + auxk_alpha * AuxK.

  Also returns the tokens-since-fired counters updated with this batch: like the reference, the
  dead set that AuxK sees already counts this batch.
  """
  pre = model.pre_activations(params, x)
  acts = model.batch_topk(pre, sc.k, sc.candidates_per_row)
  x_hats = model.prefix_reconstructions(params, acts, sc.group_sizes)
  sq_err = jnp.mean(jnp.sum((x[None] - x_hats) ** 2, axis=-1), axis=-1)  # [G]
  l2 = jnp.mean(sq_err * jnp.asarray(sc.group_weights, sq_err.dtype))
  fired = jax.lax.stop_gradient(jnp.any(acts > 0, axis=0))
  tokens_since_fired = _count_silence(tokens_since_fired, fired, x.shape[0])
  dead = tokens_since_fired >= sc.dead_tokens_threshold
  residual = jax.lax.stop_gradient(x - x_hats[-1])
  aux = model.auxk_loss(params, pre, residual, dead, sc.top_k_aux)
  return l2 + sc.auxk_alpha * aux, (model.LossAux(acts, sq_err, l2, aux), tokens_since_fired)


def _count_silence(tokens_since_fired: jax.Array, fired: jax.Array, tokens: int) -> jax.Array:
  return jnp.where(fired, 0, jnp.minimum(tokens_since_fired + tokens, _COUNTER_CAP))


class StepStats(NamedTuple):
  """What a loss evaluation reports besides the loss and gradients."""
  sq_err: jax.Array     # [G] mean ||x - x_hat_i||^2 per prefix
  l2_loss: jax.Array
  auxk_loss: jax.Array
  l0: jax.Array         # mean selected latents per token
  smallest: jax.Array   # smallest selected activation (inf if none), for the threshold EMA
  sparse_path: jax.Array  # 1.0 when a sparse kernel (xla/pallas/cpu) ran this step, 0.0 if dense
  ties_dropped: jax.Array  # 'cpu' only: entries tied at the threshold beyond its capacity


def _dense_loss_and_grads(params, x, tokens_since_fired, sc: StepConfig):
  """Autodiff of `loss_fn` (the reference formulation)."""
  (loss, (aux, tokens_since_fired)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, x, tokens_since_fired, sc)
  acts = jax.lax.stop_gradient(aux.acts)
  stats = StepStats(aux.recon_sq_err, aux.l2_loss, aux.auxk_loss,
                    jnp.mean(jnp.sum(acts > 0, axis=-1).astype(jnp.float32)),
                    jnp.min(jnp.where(acts > 0, acts, jnp.inf)), jnp.zeros((), jnp.float32),
                    jnp.zeros((), jnp.float32))
  return loss, stats, tokens_since_fired, grads


def _sparse_loss_and_grads(params, x, tokens_since_fired, sc: StepConfig):
  """One dense matmul, then sparse decode and gradients (`jaxsae.kernels`, XLA or Pallas).

  When the candidate proof fails (some token holds more than candidates_per_row * k of the
  batch's budget), or ties overfill the sparse path's entry capacity, the step takes the dense
  path instead, so it is exact either way.
  """
  B, F = x.shape[0], params['W_dec'].shape[0]
  kc = min(F, sc.candidates_per_row * sc.k)
  pre = model.pre_activations(params, x)
  vals, idx, tau, proven = selection.candidates_and_threshold(pre, sc.k, kc)
  sel = (vals >= tau) & (vals > 0)
  capacity = sparse.entry_capacity(B, sc.k, kc) if sc.kernel == 'xla' else B * kc
  fits = jnp.sum(sel) <= capacity   # ties at the threshold may select more than B*k entries

  def run_sparse():
    sel_vals = jnp.where(sel, vals, 0.0)
    r = xla.sparse_l2_and_grads(params, x, sel_vals, idx, sc.group_sizes, sc.group_weights,
                                    kernel=sc.kernel, capacity=capacity)
    fired = jnp.zeros((F,), bool).at[idx.reshape(-1)].max(sel.reshape(-1))
    silence = _count_silence(tokens_since_fired, fired, x.shape[0])
    dead = silence >= sc.dead_tokens_threshold
    residual = x - r.x_hat

    aux, grads = jax.lax.cond(
        jnp.any(dead), lambda: _add_auxk(r.grads, *_dense_auxk(params, x, pre, residual, dead, sc),
                                         sc),
        lambda: (jnp.zeros((), x.dtype), r.grads))
    stats = StepStats(r.sq_err, r.l2, aux, jnp.sum(sel).astype(jnp.float32) / x.shape[0],
                      jnp.min(jnp.where(sel, vals, jnp.inf)), jnp.ones((), jnp.float32),
                      jnp.zeros((), jnp.float32))
    return r.l2 + sc.auxk_alpha * aux, stats, silence, grads

  return jax.lax.cond(proven & fits, run_sparse,
                      lambda: _dense_loss_and_grads(params, x, tokens_since_fired, sc))


def _dense_auxk(params, x, pre, residual, dead, sc: StepConfig):
  """AuxK and its gradients by autodiff, on pre-activations already computed."""
  aux, (g_direct, g_pre) = jax.value_and_grad(
      lambda p, pre: model.auxk_loss(p, pre, residual, dead, sc.top_k_aux),
      argnums=(0, 1))(params, pre)
  g_enc = model.pre_activations_pullback(params, x, pre, g_pre)
  return aux, jax.tree.map(jnp.add, g_direct, g_enc)


def _add_auxk(grads, aux, aux_grads, sc: StepConfig):
  return aux, jax.tree.map(lambda g, a: g + sc.auxk_alpha * a, grads, aux_grads)


def _cpu_loss_and_grads(params, x, tokens_since_fired, sc: StepConfig):
  """The native CPU kernels (`jaxsae.kernels_cpu`): the encoder matmul, then selection, decode,
  gradients and AuxK over the selected entries only. relu(z + c) is never stored, and no other
  [B, F] array exists: there is no dense fallback (ties beyond the capacity, which only
  degenerate batches have, are dropped and counted instead, see `kernels_cpu.select`)."""
  B, F = x.shape[0], params['W_dec'].shape[0]
  z, c = kernels_cpu.encoder_parts(params, x)
  sel = kernels_cpu.select(z, c, B * sc.k, kernels_cpu.capacity(B, sc.k))
  e = sel.entries
  r = kernels_cpu.l2_and_grads(params, x, e, sc.group_sizes, sc.group_weights)
  valid = e.valid()
  fired = jnp.zeros((F,), bool).at[e.lat].max(valid)
  silence = _count_silence(tokens_since_fired, fired, B)
  dead = silence >= sc.dead_tokens_threshold
  residual = x - r.x_hat
  aux, grads = jax.lax.cond(
      jnp.any(dead),
      lambda: _add_auxk(r.grads, *kernels_cpu.auxk_loss_and_grads(
          params, z, c, x, residual, dead, sc.top_k_aux), sc),
      lambda: (jnp.zeros((), x.dtype), r.grads))
  stats = StepStats(r.sq_err, r.l2, aux, e.count.astype(jnp.float32) / B,
                    jnp.min(jnp.where(valid, e.val, jnp.inf)), jnp.ones((), jnp.float32),
                    sel.ties_dropped.astype(jnp.float32))
  return r.l2 + sc.auxk_alpha * aux, stats, silence, grads


def _native_update(state: TrainState, grads: model.Params, grad_norm: jax.Array,
                   finite: jax.Array, sc: StepConfig, schedule: optax.Schedule):
  """`make_optimizer`'s update (clip by global norm, Adam, learning-rate schedule) and the
  decoder renormalisation, natively and in place for the two weight matrices; the same state
  layout as optax's, so checkpoints move between kernels. Nothing changes unless `finite`."""
  clip_state, (adam, sched) = state['opt_state']
  params = state['params']
  count = jnp.where(adam.count < jnp.iinfo(jnp.int32).max, adam.count + 1, adam.count)
  hyper = kernels_cpu.AdamHyper(lr=schedule(sched.count), b1=sc.b1, b2=sc.b2, eps=sc.eps,
                                count=count, grad_norm=grad_norm, max_norm=sc.grad_clip,
                                apply=finite)
  new_params, mu, nu = {}, {}, {}
  for name in ('W_enc', 'W_dec'):
    new_params[name], mu[name], nu[name] = kernels_cpu.adam_update(
        params[name], grads[name], adam.mu[name], adam.nu[name], hyper,
        unit_rows=name == 'W_dec')
  for name in ('b_enc', 'b_dec'):
    new_params[name], mu[name], nu[name] = kernels_cpu.adam_reference(
        params[name], grads[name], adam.mu[name], adam.nu[name], hyper)
  sched_count = jnp.where(sched.count < jnp.iinfo(jnp.int32).max, sched.count + 1, sched.count)
  opt_state = (clip_state, (adam._replace(count=jnp.where(finite, count, adam.count), mu=mu, nu=nu),
                            sched._replace(count=jnp.where(finite, sched_count, sched.count))))
  return new_params, opt_state


def train_step(state: TrainState, x: jax.Array, *, sc: StepConfig,
               optimizer: optax.GradientTransformation,
               schedule: optax.Schedule) -> tuple[TrainState, dict[str, jax.Array]]:
  """Loss, gradients and the optimizer update for one batch; returns the new state and metrics."""
  params, step = state['params'], state['step']
  loss_and_grads = {'dense': _dense_loss_and_grads, 'cpu': _cpu_loss_and_grads}.get(
      sc.kernel, _sparse_loss_and_grads)
  loss, stats, tokens_since_fired, grads = loss_and_grads(
      params, x, state['tokens_since_fired'], sc)
  if sc.kernel == 'cpu':   # in place, with each row's squared norm for the global norm
    grads['W_dec'], row_sq = kernels_cpu.project_rows(params['W_dec'], grads['W_dec'])
    grad_norm = jnp.sqrt(jnp.sum(row_sq) + sum(jnp.sum(grads[n] ** 2)
                                               for n in ('W_enc', 'b_enc', 'b_dec')))
  else:
    grads['W_dec'] = remove_parallel_component(params['W_dec'], grads['W_dec'])
    grad_norm = optax.tree.norm(grads)

  # Inference threshold: EMA of the smallest kept activation, from threshold_start_step on.
  smallest = jnp.where(jnp.isfinite(stats.smallest), stats.smallest, 0.0)
  ema = jnp.where(state['threshold'] < 0, smallest,
                  sc.threshold_beta * state['threshold'] + (1 - sc.threshold_beta) * smallest)
  threshold = jnp.where(step > sc.threshold_start_step, ema, state['threshold'])

  # A non-finite batch never reaches the weights: the update is dropped and counted, and the
  # training loop stops (or, with train.skip_nonfinite, carries on) when it next looks. A cond
  # (or, natively, a flag), not a select per array: the update then runs in place on the
  # donated state.
  finite = jnp.all(jnp.isfinite(x)) & jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  if sc.kernel == 'cpu':
    new_params, opt_state = _native_update(state, grads, grad_norm, finite, sc, schedule)
    new_state = {'params': new_params, 'opt_state': opt_state,
                 'threshold': jnp.where(finite, threshold, state['threshold']),
                 'tokens_since_fired': jnp.where(finite, tokens_since_fired,
                                                 state['tokens_since_fired'])}
  else:
    def update():
      updates, opt_state = optimizer.update(grads, state['opt_state'], params)
      new_params = optax.apply_updates(params, updates)
      new_params['W_dec'] = model.unit_norm_rows(new_params['W_dec'])
      return {'params': new_params, 'opt_state': opt_state, 'threshold': threshold,
              'tokens_since_fired': tokens_since_fired}

    new_state = jax.lax.cond(finite, update, lambda: {
        key: state[key] for key in ('params', 'opt_state', 'threshold', 'tokens_since_fired')})
  new_state.update(
      step=step + 1,
      nonfinite_count=state['nonfinite_count'] + (~finite).astype(jnp.int32),
      first_nonfinite_step=jnp.where((state['first_nonfinite_step'] < 0) & ~finite, step,
                                     state['first_nonfinite_step']))

  var = jnp.mean(jnp.sum((x - x.mean(0)) ** 2, axis=-1))
  metrics = {
      'loss': loss, 'l2_loss': stats.l2_loss, 'auxk_loss': stats.auxk_loss,
      'fvu': stats.sq_err / var,                                   # [G], one per prefix
      'l0': stats.l0,
      'dead_fraction': jnp.mean((tokens_since_fired >= sc.dead_tokens_threshold)
                                .astype(jnp.float32)),
      'threshold': threshold, 'lr': schedule(step), 'grad_norm': grad_norm,
      'finite': finite, 'sparse_path': stats.sparse_path, 'ties_dropped': stats.ties_dropped,
  }
  return new_state, metrics


def fvu_prefix_names(group_sizes: Sequence[int]) -> list[str]:
  ends = [int(e) for e in jnp.cumsum(jnp.asarray(group_sizes)).tolist()]
  return [f'fvu/prefix_{e}' for e in ends]
