"""Native CPU kernels (`sae.kernel = 'cpu'`): the exact BatchTopK selection, the sparse Matryoshka
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

Building and loading the C++ is `kernels.cpu_build`. The references the tests compare
against: `train_step.loss_fn` (dense autodiff), `model.auxk_loss`, `selection.reference_threshold`
and optax.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxsae import model
from jaxsae.kernels import common
from jaxsae.kernels.cpu_build import register as _register

# --------------------------------------------------------------------------------------------------
# The kernels as JAX functions
# --------------------------------------------------------------------------------------------------


class Entries(NamedTuple):
  """Selected entries as CSR by token: token b owns slots row_ptr[b]:row_ptr[b+1] of lat/val,
  latents ascending. Slots past the count hold latent 0, value 0."""
  row_ptr: jax.Array   # [B + 1] int32
  lat: jax.Array       # [capacity] int32
  val: jax.Array       # [capacity] float32

  @property
  def count(self) -> jax.Array:
    return self.row_ptr[-1]

  def valid(self) -> jax.Array:
    return jnp.arange(self.lat.shape[0]) < self.row_ptr[-1]


class Selection(NamedTuple):
  entries: Entries
  tau: jax.Array          # the exact (B*k)-th largest pre-activation (0: fewer are positive)
  ties_dropped: jax.Array  # entries == tau beyond the capacity (kept: the earliest rows')
  path: jax.Array         # 0: the sampled estimate sufficed; 1, 2: loosened; 3: radix select
  collected: jax.Array    # candidates gathered before the exact selection (diagnostics)


def capacity(batch: int, k: int) -> int:
  """Room for the B*k selected entries plus 1/16 for ties at the threshold."""
  return batch * k + max(batch * k // 16, 16)


def select(z: jax.Array, c: jax.Array, budget: int, cap: int) -> Selection:
  """BatchTopK of relu(z + c[None]) (z [B, F] float32), as CSR: every entry > 0 and > tau, the
  budget-th largest value, and the entries == tau that fit `cap` (earliest rows first). Without
  dropped ties this is `pre >= selection.reference_threshold(pre, budget)` (and > 0) exactly."""
  if not 1 <= budget <= cap:
    raise ValueError(f'select needs 1 <= budget <= capacity, got budget {budget}, '
                     f'capacity {cap}')
  _register()
  B, _ = z.shape
  row_ptr, lat, val, tau, status = jax.ffi.ffi_call('jaxsae_select', (
      jax.ShapeDtypeStruct((B + 1,), jnp.int32), jax.ShapeDtypeStruct((cap,), jnp.int32),
      jax.ShapeDtypeStruct((cap,), jnp.float32), jax.ShapeDtypeStruct((), jnp.float32),
      jax.ShapeDtypeStruct((4,), jnp.int32)))(z.astype(jnp.float32), c.astype(jnp.float32),
                                              budget=np.int64(budget))
  return Selection(Entries(row_ptr, lat, val), tau, status[1], status[2], status[3])


def aux_select(z: jax.Array, c: jax.Array, dead: jax.Array, k_aux: int) -> Entries:
  """Per token, the k_aux largest positive relu(z + c) among `dead` latents (all of them when
  fewer; ties at the k_aux-th value broken towards lower latent ids), as CSR of capacity
  B * k_aux."""
  _register()
  B, _ = z.shape
  cap = B * k_aux
  row_ptr, lat, val, _ = jax.ffi.ffi_call('jaxsae_aux_select', (
      jax.ShapeDtypeStruct((B + 1,), jnp.int32), jax.ShapeDtypeStruct((cap,), jnp.int32),
      jax.ShapeDtypeStruct((cap,), jnp.float32), jax.ShapeDtypeStruct((2,), jnp.int32)))(
          z.astype(jnp.float32), c.astype(jnp.float32), dead.astype(jnp.int32),
          k_aux=np.int64(k_aux))
  return Entries(row_ptr, lat, val)


class L2Grads(NamedTuple):
  resid: jax.Array     # [B, d] target - full reconstruction
  sq: jax.Array        # [B, G] ||target - x_hat_g||^2 per token
  up0: jax.Array       # [d] sum over tokens of R_0 (the decodes' share of b_dec's gradient)
  dW_dec: jax.Array    # [F, d]
  dW_enc: jax.Array    # [d, F]
  db_enc: jax.Array    # [F]


def l2_grads_kernel(target: jax.Array, xc: jax.Array, W_dec: jax.Array, e: Entries,
                    group_ends: Sequence[int], coef: jax.Array) -> L2Grads:
  """Prefix reconstructions of `target` [B, d] from the entries (x_hat_g sums v * W_dec[f] over
  entries with latent < group_ends[g]), their squared errors, and the gradients of
  L = -sum_g coef_g / 2 * sum_b ||target_b - x_hat_g||^2 with respect to W_dec and, through the
  values v = xc[b] . W_enc[:, f] + b_enc[f], to W_enc and b_enc (R_g = sum_{i>=g} coef_i err_i)."""
  _register()
  (B, d), G, F = target.shape, len(group_ends), int(group_ends[-1])
  f32 = jnp.float32
  return L2Grads(*jax.ffi.ffi_call('jaxsae_l2_grads', (
      jax.ShapeDtypeStruct((B, d), f32), jax.ShapeDtypeStruct((B, G), f32),
      jax.ShapeDtypeStruct((d,), f32), jax.ShapeDtypeStruct((F, d), f32),
      jax.ShapeDtypeStruct((d, F), f32), jax.ShapeDtypeStruct((F,), f32)))(
          target, xc, W_dec, e.row_ptr, e.lat, e.val, coef.astype(f32),
          group_ends=np.asarray(group_ends, np.int64)))


# --------------------------------------------------------------------------------------------------
# The training step's pieces
# --------------------------------------------------------------------------------------------------


def encoder_parts(params: model.Params, x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """z = x @ W_enc and c = b_enc - b_dec @ W_enc: pre_activations = relu(z + c)."""
  W_enc = params['W_enc']
  return x @ W_enc, params['b_enc'] - params['b_dec'] @ W_enc


def _encoder_grads(params: model.Params, db_enc: jax.Array) -> jax.Array:
  # b_dec enters the selected values as -b_dec @ W_enc (W_enc's own share is already in the
  # kernel's dW_enc, computed against x - b_dec).
  return -(params['W_enc'] @ db_enc)


def l2_and_grads(params: model.Params, x: jax.Array, e: Entries, group_sizes: Sequence[int],
                 group_weights: Sequence[float]) -> common.L2Result:
  """`kernels.sparse_l2_and_grads` (same result) from CSR entries of the selected values."""
  B = x.shape[0]
  G = len(group_sizes)
  ends = np.cumsum(group_sizes)
  xc = x - params['b_dec']
  # l2 = mean_g w_g MSE_g: dl2/dx_hat_g = -2 w_g / (G B) (x - x_hat_g), so coef_g = -2 w_g/(G B).
  coef = jnp.asarray(-2.0 * np.asarray(group_weights) / (G * B), jnp.float32)
  r = l2_grads_kernel(xc, xc, params['W_dec'], e, ends, coef)
  sq_err = jnp.sum(r.sq, axis=0) / B
  grads = {'W_enc': r.dW_enc, 'b_enc': r.db_enc, 'W_dec': r.dW_dec,
           'b_dec': r.up0 + _encoder_grads(params, r.db_enc)}
  return common.L2Result(jnp.mean(sq_err * jnp.asarray(group_weights, jnp.float32)), sq_err,
                          x - r.resid, grads)


def auxk_loss_and_grads(params: model.Params, z: jax.Array, c: jax.Array, x: jax.Array,
                        residual: jax.Array, dead: jax.Array,
                        top_k_aux: int) -> tuple[jax.Array, model.Params]:
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
  grads = {'W_enc': r.dW_enc, 'b_enc': r.db_enc, 'W_dec': r.dW_dec,
           'b_dec': _encoder_grads(params, r.db_enc)}
  return loss, grads


# --------------------------------------------------------------------------------------------------
# The optimizer step for the weight matrices (in place)
# --------------------------------------------------------------------------------------------------


def project_rows(W: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(g minus each row's component along W's row, its squared norm per row):
  `train_step.remove_parallel_component`, in place of g."""
  _register()
  F, _ = W.shape
  return jax.ffi.ffi_call('jaxsae_project_rows', (
      jax.ShapeDtypeStruct(g.shape, jnp.float32), jax.ShapeDtypeStruct((F,), jnp.float32)),
      input_output_aliases={1: 0})(W, g)


class AdamHyper(NamedTuple):
  lr: jax.Array
  b1: float
  b2: float
  eps: float
  count: jax.Array      # the step's Adam count (after the increment)
  grad_norm: jax.Array
  max_norm: float
  apply: jax.Array      # False: leave everything unchanged (a non-finite step)

  def bias_corrections(self) -> tuple[jax.Array, jax.Array]:
    return 1 - self.b1 ** self.count, 1 - self.b2 ** self.count   # as optax computes them

  def array(self) -> jax.Array:
    bc1, bc2 = self.bias_corrections()
    return jnp.stack([jnp.asarray(v, jnp.float32) for v in (
        self.lr, self.b1, self.b2, 1 - self.b1, 1 - self.b2, self.eps, bc1, bc2, self.grad_norm,
        self.max_norm, self.apply)])


def adam_reference(p: jax.Array, g: jax.Array, m: jax.Array, v: jax.Array,
                   hyper: AdamHyper) -> tuple[jax.Array, jax.Array, jax.Array]:
  """What `adam_update` computes, in jnp with optax's order of operations (for small arrays
  and for tests)."""
  g = jnp.where(hyper.grad_norm < hyper.max_norm, g, (g / hyper.grad_norm) * hyper.max_norm)
  m_new = (1 - hyper.b1) * g + hyper.b1 * m
  v_new = (1 - hyper.b2) * (g ** 2) + hyper.b2 * v
  bc1, bc2 = hyper.bias_corrections()
  p_new = p + (-hyper.lr) * ((m_new / bc1) / (jnp.sqrt(v_new / bc2) + hyper.eps))
  keep = lambda new, old: jnp.where(hyper.apply, new, old)  # noqa: E731
  return keep(p_new, p), keep(m_new, m), keep(v_new, v)


def adam_update(p: jax.Array, g: jax.Array, m: jax.Array, v: jax.Array, hyper: AdamHyper,
                unit_rows: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """optax's clip_by_global_norm + adam + apply_updates on one array, in place of p, m and v;
  with unit_rows, then `model.unit_norm_rows` on the updated [F, d] p."""
  _register()
  like = jax.ShapeDtypeStruct(p.shape, jnp.float32)
  return jax.ffi.ffi_call('jaxsae_adam', (like, like, like),
                          input_output_aliases={0: 0, 2: 1, 3: 2})(
                              p, g, m, v, hyper.array(), unit_rows=np.int64(unit_rows))
