"""The 'cpu' backend: native CPU kernels for the exact BatchTopK selection, the sparse Matryoshka
loss and gradients, AuxK, and the optimizer's update of the weight matrices, as C++ handlers
(`csrc/cpu_kernels.cc`) called through XLA's FFI on XLA's own intra-op thread pool.

Why: on XLA:CPU the 'xla' path spends most of a step outside the encoder matmul, in TopK (a
per-row partial sort for the selection's candidates), in scatter-adds emitted as scalar loops,
and in optax's update, which XLA runs as several passes over the weights and moments.

  select         z = x @ W_enc and c = b_enc - b_dec @ W_enc in; relu(z + c) is never stored. The
                 exact (B*k)-th largest value tau: a histogram of a sample of rows estimates it,
                 one pass collects every entry above the estimate, and the budget-th largest of
                 those is tau whenever at least B*k were collected (else the estimate is loosened,
                 and at last a two-level radix select over the batch gives tau). Out: the entries
                 > tau and, up to the capacity, those == tau, as CSR by token.
  l2_grads       token pass: all G prefix reconstructions, their squared errors, the upstream
                 R_g = sum_{i>=g} coef_i (target - x_hat_i) and dv = <R_group(f), W_dec[f]> per
                 entry; latent pass (entries counting-sorted by latent): dW_dec, dW_enc (in its
                 [d, F] layout) and db_enc over the selected entries only.
  aux_select     per token, the top k_aux dead latents' pre-activations (AuxK), as CSR; AuxK's
                 loss and gradients then run through l2_grads with one group.
  project_rows,  the decoder-gradient projection, then clip + Adam (+ the decoder's row
  adam_update    renormalisation) in place: one pass per matrix. optax's maths and order.

Work after the matmul is O(B*k*d) and no [B, F] array besides z exists: the 'cpu' step has no
dense fallback (ties at tau beyond the capacity, which only degenerate batches have, are dropped
and counted in the step's `ties_dropped` metric). Every reduction has a fixed order, so results
do not depend on thread timing (bit-identical resumes).

The backend's hooks for `train_step`: `loss_and_grads`, `project_and_norm` (the projection in
place, with the global norm from its row norms) and `update` (the native optimizer step, on
optax's own state layout: `opt_state_parts` is the one place that knows it). Building and loading
the C++ is `kernels.cpu_build`. The references the tests compare against: `model.loss_fn` (dense
autodiff), `model.auxk_loss`, `selection.reference_threshold` and optax.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxsae import model
from jaxsae.kernels import common
from jaxsae.kernels.cpu_build import register as _register

# --------------------------------------------------------------------------------------------------
# The kernels as JAX functions
# --------------------------------------------------------------------------------------------------


class Entries(NamedTuple):
  """Selected entries as CSR by token: token b owns slots row_ptr[b]:row_ptr[b+1] of lat/val,
  latents ascending. Slots past the count hold latent 0, value 0."""

  row_ptr: jax.Array  # [B + 1] int32
  lat: jax.Array  # [capacity] int32
  val: jax.Array  # [capacity] float32

  @property
  def count(self) -> jax.Array:
    return self.row_ptr[-1]

  def valid(self) -> jax.Array:
    return jnp.arange(self.lat.shape[0]) < self.row_ptr[-1]


class Selection(NamedTuple):
  entries: Entries
  tau: jax.Array  # the exact (B*k)-th largest pre-activation (0: fewer are positive)
  ties_dropped: jax.Array  # entries == tau beyond the capacity (kept: the earliest rows')
  path: jax.Array  # 0: the sampled estimate sufficed; 1, 2: loosened; 3: radix select
  collected: jax.Array  # candidates gathered before the exact selection (diagnostics)


def capacity(batch: int, k: int) -> int:
  """Room for the B*k selected entries plus 1/16 for ties at the threshold."""
  return batch * k + max(batch * k // 16, 16)


def select(z: jax.Array, c: jax.Array, budget: int, cap: int) -> Selection:
  """BatchTopK of relu(z + c[None]) (z [B, F] float32), as CSR: every entry > 0 and > tau, the
  budget-th largest value, and the entries == tau that fit `cap` (earliest rows first). Without
  dropped ties this is `pre >= selection.reference_threshold(pre, budget)` (and > 0) exactly."""
  if not 1 <= budget <= cap:
    raise ValueError(
        f'select needs 1 <= budget <= capacity, got budget {budget}, ' f'capacity {cap}'
    )
  _register()
  B, _ = z.shape
  count = jax.ShapeDtypeStruct((), jnp.int32)  # ties_dropped, path, collected
  row_ptr, lat, val, tau, ties_dropped, path, collected = jax.ffi.ffi_call(
      'jaxsae_select',
      (
          jax.ShapeDtypeStruct((B + 1,), jnp.int32),
          jax.ShapeDtypeStruct((cap,), jnp.int32),
          jax.ShapeDtypeStruct((cap,), jnp.float32),
          jax.ShapeDtypeStruct((), jnp.float32),
          count,
          count,
          count,
      ),
  )(z.astype(jnp.float32), c.astype(jnp.float32), budget=np.int64(budget))
  return Selection(Entries(row_ptr, lat, val), tau, ties_dropped, path, collected)


def aux_select(z: jax.Array, c: jax.Array, dead: jax.Array, k_aux: int) -> Entries:
  """Per token, the k_aux largest positive relu(z + c) among `dead` latents (all of them when
  fewer; ties at the k_aux-th value broken towards lower latent ids), as CSR of capacity
  B * k_aux."""
  _register()
  B, _ = z.shape
  cap = B * k_aux
  return Entries(
      *jax.ffi.ffi_call(
          'jaxsae_aux_select',
          (
              jax.ShapeDtypeStruct((B + 1,), jnp.int32),
              jax.ShapeDtypeStruct((cap,), jnp.int32),
              jax.ShapeDtypeStruct((cap,), jnp.float32),
          ),
      )(z.astype(jnp.float32), c.astype(jnp.float32), dead.astype(jnp.int32), k_aux=np.int64(k_aux))
  )


class L2Grads(NamedTuple):
  resid: jax.Array  # [B, d] target - full reconstruction
  sq: jax.Array  # [B, G] ||target - x_hat_g||^2 per token
  up0: jax.Array  # [d] sum over tokens of R_0 (the decodes' share of b_dec's gradient)
  dW_dec: jax.Array  # [F, d]
  dW_enc: jax.Array  # [d, F]
  db_enc: jax.Array  # [F]


def l2_grads_kernel(
    target: jax.Array,
    xc: jax.Array,
    W_dec: jax.Array,
    e: Entries,
    group_ends: Sequence[int],
    coef: jax.Array,
) -> L2Grads:
  """Prefix reconstructions of `target` [B, d] from the entries (x_hat_g sums v * W_dec[f] over
  entries with latent < group_ends[g]), their squared errors, and the gradients of
  L = -sum_g coef_g / 2 * sum_b ||target_b - x_hat_g||^2 with respect to W_dec and, through the
  values v = xc[b] . W_enc[:, f] + b_enc[f], to W_enc and b_enc (R_g = sum_{i>=g} coef_i err_i).

  `target` may also be [G, B, d], one per prefix: on a shard of the latents, x minus the other
  shards' decodes of each prefix (`decode_groups`, summed over the shards). Equal group ends (a
  group this shard holds none of) are allowed."""
  _register()
  (B, d), G, F = target.shape[-2:], len(group_ends), int(group_ends[-1])
  f32 = jnp.float32
  return L2Grads(
      *jax.ffi.ffi_call(
          'jaxsae_l2_grads',
          (
              jax.ShapeDtypeStruct((B, d), f32),
              jax.ShapeDtypeStruct((B, G), f32),
              jax.ShapeDtypeStruct((d,), f32),
              jax.ShapeDtypeStruct((F, d), f32),
              jax.ShapeDtypeStruct((d, F), f32),
              jax.ShapeDtypeStruct((F,), f32),
          ),
      )(
          target,
          xc,
          W_dec,
          e.row_ptr,
          e.lat,
          e.val,
          coef.astype(f32),
          group_ends=np.asarray(group_ends, np.int64),
      )
  )


def decode_groups(W_dec: jax.Array, e: Entries, group_ends: Sequence[int]) -> jax.Array:
  """[G, B, d]: each token's decode v * W_dec[f] summed per Matryoshka group (no bias). On a shard
  of the latents, the shard's part of every prefix reconstruction."""
  _register()
  B, d = e.row_ptr.shape[0] - 1, W_dec.shape[1]
  return jax.ffi.ffi_call(
      'jaxsae_decode_groups', jax.ShapeDtypeStruct((len(group_ends), B, d), jnp.float32)
  )(W_dec, e.row_ptr, e.lat, e.val, group_ends=np.asarray(group_ends, np.int64))


# --------------------------------------------------------------------------------------------------
# The training step's pieces
# --------------------------------------------------------------------------------------------------


def encoder_parts(
    params: model.Params, x: jax.Array, dtype: str | None = None
) -> tuple[jax.Array, jax.Array]:
  """z = x @ W_enc (in `dtype`, float32 out) and c = b_enc - b_dec @ W_enc: pre_activations =
  relu(z + c)."""
  W_enc = params['W_enc']
  return model.encoder_matmul(x, W_enc, dtype), params['b_enc'] - params['b_dec'] @ W_enc


def l2_and_grads(
    params: model.Params,
    x: jax.Array,
    e: Entries,
    group_sizes: Sequence[int],
    group_weights: Sequence[float],
) -> common.L2Result:
  """`kernels.xla.l2_and_grads` (same result) from CSR entries of the selected values."""
  B = x.shape[0]
  xc = x - params['b_dec']
  coef = jnp.asarray(common.l2_coefficients(group_weights, B), jnp.float32)
  r = l2_grads_kernel(xc, xc, params['W_dec'], e, common.group_ends(group_sizes), coef)
  sq_err = jnp.sum(r.sq, axis=0) / B
  # W_enc's share of the b_dec path is already in the kernel's dW_enc (against x - b_dec).
  grads = {
      'W_enc': r.dW_enc,
      'b_enc': r.db_enc,
      'W_dec': r.dW_dec,
      'b_dec': common.b_dec_grad(params['W_enc'], r.db_enc, r.up0),
  }
  return common.L2Result(
      jnp.mean(sq_err * jnp.asarray(group_weights, jnp.float32)), sq_err, x - r.resid, grads
  )


def auxk_loss_and_grads(
    params: model.Params,
    z: jax.Array,
    c: jax.Array,
    x: jax.Array,
    residual: jax.Array,
    dead: jax.Array,
    top_k_aux: int,
) -> tuple[jax.Array, model.Params]:
  """AuxK (`model.auxk_loss`) and its gradients through the same sparse path: each token's top
  dead latents reconstruct the (constant) residual without the decoder bias."""
  B, F = z.shape
  e = aux_select(z, c, dead, min(top_k_aux, F))
  denom = jnp.mean(jnp.sum((residual - residual.mean(0)) ** 2, -1))
  # loss = mean_b ||r - r_hat||^2 / denom; nan_to_num as the reference (denom 0 -> loss 0).
  scale = jnp.where(denom > 0, 1.0 / denom, 0.0)
  coef = jnp.reshape(-2.0 * scale / B, (1,)).astype(jnp.float32)
  r = l2_grads_kernel(residual, x - params['b_dec'], params['W_dec'], e, (F,), coef)
  loss = jnp.nan_to_num(jnp.sum(r.sq) / B * scale)
  grads = {
      'W_enc': r.dW_enc,
      'b_enc': r.db_enc,
      'W_dec': r.dW_dec,
      'b_dec': common.b_dec_grad(params['W_enc'], r.db_enc),
  }  # no b_dec in AuxK's decode
  return loss, grads


# --------------------------------------------------------------------------------------------------
# The backend's hooks for `train_step`
# --------------------------------------------------------------------------------------------------


def loss_and_grads(
    params: model.Params, x: jax.Array, tokens_since_fired: jax.Array, sc: common.StepConfig
) -> common.LossAndGrads:
  """The encoder matmul, then selection, decode, gradients and AuxK over the selected entries
  only. relu(z + c) is never stored, and no other [B, F] array exists: there is no dense fallback
  (ties beyond the capacity, which only degenerate batches have, are dropped and counted
  instead, see `select`)."""
  B, F = x.shape[0], params['W_dec'].shape[0]
  z, c = encoder_parts(params, x, sc.compute_dtype)
  x = x.astype(jnp.float32)
  sel = select(z, c, B * sc.k, capacity(B, sc.k))
  e = sel.entries
  r = l2_and_grads(params, x, e, sc.group_sizes, sc.group_weights)
  valid = e.valid()
  fired = jnp.zeros((F,), bool).at[e.lat].max(valid)
  aux, grads, silence = common.with_auxk(
      r,
      x,
      fired,
      tokens_since_fired,
      sc,
      lambda residual, dead: auxk_loss_and_grads(params, z, c, x, residual, dead, sc.top_k_aux),
  )
  stats = common.StepStats(
      r.sq_err,
      r.l2,
      aux,
      e.count.astype(jnp.float32) / B,
      jnp.min(jnp.where(valid, e.val, jnp.inf)),
      jnp.ones((), jnp.float32),
      sel.ties_dropped.astype(jnp.float32),
  )
  return common.LossAndGrads(r.l2 + sc.auxk_alpha * aux, stats, silence, grads)


def project_and_norm(params: model.Params, grads: model.Params) -> tuple[model.Params, jax.Array]:
  """`common.project_and_norm` with the projection in place (`project_rows`), whose per-row
  squared norms give the decoder's share of the global norm."""
  g_dec, row_sq = project_rows(params['W_dec'], grads['W_dec'])
  grads = {**grads, 'W_dec': g_dec}
  grad_norm = jnp.sqrt(
      jnp.sum(row_sq) + sum(jnp.sum(grads[n] ** 2) for n in ('W_enc', 'b_enc', 'b_dec'))
  )
  return grads, grad_norm


def opt_state_parts(opt_state: optax.OptState):
  """(clip state, Adam state, schedule state) of `train_step.make_optimizer`'s state, i.e. optax's
  layout for chain(clip_by_global_norm, adam(schedule)): the one place that depends on it
  (tests/kernels/test_cpu.py pins it)."""
  clip_state, (adam, sched) = opt_state
  if not (
      isinstance(adam, optax.ScaleByAdamState) and isinstance(sched, optax.ScaleByScheduleState)
  ):
    raise TypeError(
        'the cpu backend updates chain(clip_by_global_norm, adam(schedule)) state, '
        f'got {type(adam).__name__}, {type(sched).__name__}'
    )
  return clip_state, adam, sched


def update(
    params: model.Params,
    opt_state: optax.OptState,
    grads: model.Params,
    grad_norm: jax.Array,
    finite: jax.Array,
    sc: common.StepConfig,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
) -> tuple[model.Params, optax.OptState]:
  """`train_step.make_optimizer`'s update (clip by global norm, Adam, learning-rate schedule, from
  the constants in `sc`) and the decoder renormalisation, natively and in place for the two
  weight matrices; the same state layout as optax's, so checkpoints move between backends.
  Nothing changes unless `finite` (a flag to the kernels, not a cond)."""
  del optimizer  # its maths, natively
  return leafwise_update(params, opt_state, grads, grad_norm, finite, sc, schedule)


def leafwise_update(
    params: model.Params,
    opt_state: optax.OptState,
    grads: model.Params,
    grad_norm: jax.Array,
    finite: jax.Array,
    sc: common.StepConfig,
    schedule: optax.Schedule,
    native: bool = True,
) -> tuple[model.Params, optax.OptState]:
  """`update`, leaf by leaf with the global `grad_norm` given: so it also runs on each device's
  slice of the parameters (a sharded optimizer, inside `jax.shard_map`). `native=False` does the
  weight matrices in jnp too (`adam_reference`, then unit decoder rows): for other platforms."""
  clip_state, adam, sched = opt_state_parts(opt_state)
  count = jnp.where(adam.count < jnp.iinfo(jnp.int32).max, adam.count + 1, adam.count)
  hyper = AdamHyper(
      lr=schedule(sched.count),
      b1=sc.b1,
      b2=sc.b2,
      eps=sc.eps,
      count=count,
      grad_norm=grad_norm,
      max_norm=sc.grad_clip,
      apply=finite,
  )
  new_params, mu, nu = {}, {}, {}
  for name in ('W_enc', 'W_dec'):
    if native:
      new_params[name], mu[name], nu[name] = adam_update(
          params[name], grads[name], adam.mu[name], adam.nu[name], hyper, unit_rows=name == 'W_dec'
      )
    else:
      new_params[name], mu[name], nu[name] = adam_reference(
          params[name], grads[name], adam.mu[name], adam.nu[name], hyper
      )
      if name == 'W_dec':
        rows = model.unit_norm_rows(new_params[name])
        new_params[name] = jnp.where(finite, rows, params[name])
  for name in ('b_enc', 'b_dec'):
    new_params[name], mu[name], nu[name] = adam_reference(
        params[name], grads[name], adam.mu[name], adam.nu[name], hyper
    )
  sched_count = jnp.where(sched.count < jnp.iinfo(jnp.int32).max, sched.count + 1, sched.count)
  return new_params, (
      clip_state,
      (
          adam._replace(count=jnp.where(finite, count, adam.count), mu=mu, nu=nu),
          sched._replace(count=jnp.where(finite, sched_count, sched.count)),
      ),
  )


# --------------------------------------------------------------------------------------------------
# The optimizer step for the weight matrices (in place)
# --------------------------------------------------------------------------------------------------


def project_rows(W: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(g minus each row's component along W's row, its squared norm per row):
  `model.remove_parallel_component`, in place of g."""
  _register()
  F, _ = W.shape
  return jax.ffi.ffi_call(
      'jaxsae_project_rows',
      (jax.ShapeDtypeStruct(g.shape, jnp.float32), jax.ShapeDtypeStruct((F,), jnp.float32)),
      input_output_aliases={1: 0},
  )(W, g)


class AdamHyper(NamedTuple):
  """One step's optimizer settings. b1, b2, eps and max_norm are static Python floats (the
  kernel takes them as attributes); lr, count, grad_norm and apply may be traced."""

  lr: jax.Array
  b1: float
  b2: float
  eps: float
  count: jax.Array  # the step's Adam count (after the increment)
  grad_norm: jax.Array
  max_norm: float
  apply: jax.Array  # False: leave everything unchanged (a non-finite step)

  def bias_corrections(self) -> tuple[jax.Array, jax.Array]:
    return 1 - self.b1**self.count, 1 - self.b2**self.count  # as optax computes them


def adam_reference(
    p: jax.Array, g: jax.Array, m: jax.Array, v: jax.Array, hyper: AdamHyper
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """What `adam_update` computes, in jnp with optax's order of operations (for small arrays
  and for tests)."""
  g = jnp.where(hyper.grad_norm < hyper.max_norm, g, (g / hyper.grad_norm) * hyper.max_norm)
  m_new = (1 - hyper.b1) * g + hyper.b1 * m
  v_new = (1 - hyper.b2) * (g**2) + hyper.b2 * v
  bc1, bc2 = hyper.bias_corrections()
  p_new = p + (-hyper.lr) * ((m_new / bc1) / (jnp.sqrt(v_new / bc2) + hyper.eps))
  keep = lambda new, old: jnp.where(hyper.apply, new, old)  # noqa: E731
  return keep(p_new, p), keep(m_new, m), keep(v_new, v)


def adam_update(
    p: jax.Array,
    g: jax.Array,
    m: jax.Array,
    v: jax.Array,
    hyper: AdamHyper,
    unit_rows: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """optax's clip_by_global_norm + adam + apply_updates on one array, in place of p, m and v;
  with unit_rows, then `model.unit_norm_rows` on the updated [F, d] p."""
  _register()
  like = jax.ShapeDtypeStruct(p.shape, jnp.float32)
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  bc1, bc2 = hyper.bias_corrections()
  # The static floats go as f64 attributes: the kernel forms 1 - b1 and 1 - b2 in double, as
  # optax's Python arithmetic does, before rounding to float32.
  return jax.ffi.ffi_call(
      'jaxsae_adam', (like, like, like), input_output_aliases={0: 0, 2: 1, 3: 2}
  )(
      p,
      g,
      m,
      v,
      f32(hyper.lr),
      f32(bc1),
      f32(bc2),
      f32(hyper.grad_norm),
      jnp.asarray(hyper.apply, jnp.bool_),
      b1=np.float64(hyper.b1),
      b2=np.float64(hyper.b2),
      eps=np.float64(hyper.eps),
      max_norm=np.float64(hyper.max_norm),
      unit_rows=np.int64(unit_rows),
  )
