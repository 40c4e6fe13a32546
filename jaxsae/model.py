"""The Matryoshka BatchTopK sparse autoencoder (Bussmann et al. 2025), as pure functions plus a
small Flax NNX module for users.

Math follows dictionary_learning's MatryoshkaBatchTopKTrainer, so weights and losses agree with it;
`tests/kernels/test_golden.py` checks that against a fixture it wrote. `loss_fn` below is the dense
training loss: the reference every kernel backend (`jaxsae.kernels`) is tested against. The training
step (`jaxsae.train_step`) uses the pure functions on a dict of parameters; the NNX module wraps the
same functions for inference and for loading exported weights.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxsae import selection

Params = dict[str, jax.Array]  # W_enc [d, F], b_enc [F], W_dec [F, d], b_dec [d]
COUNTER_CAP = 2**30  # tokens-since-fired saturate here instead of overflowing int32

# --------------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------------


def encoder_matmul(x: jax.Array, W_enc: jax.Array, dtype: str | None = None) -> jax.Array:
  """x @ W_enc, float32 out. With `dtype` (mixed precision: 'bfloat16') both operands are cast to
  it and the products accumulate in float32; the float32 master weights stay as they are."""
  if dtype is None or (dtype == 'float32' and x.dtype == jnp.float32):
    return x @ W_enc
  return jnp.matmul(x.astype(dtype), W_enc.astype(dtype), preferred_element_type=jnp.float32)


def pre_activations(params: Params, x: jax.Array, dtype: str | None = None) -> jax.Array:
  """relu((x - b_dec) @ W_enc + b_enc), written so b_dec's gradient is a vector-matrix product.

  (x - b_dec) @ W_enc = x @ W_enc - b_dec @ W_enc: same value, but autodiff no longer builds the
  B x d gradient of (x - b_dec) through a second B x F x d matmul. `dtype`: the matmul's
  (`encoder_matmul`).
  """
  W_enc = params['W_enc']
  return jax.nn.relu(encoder_matmul(x, W_enc, dtype) - params['b_dec'] @ W_enc + params['b_enc'])


def pre_activations_pullback(
    params: Params, x: jax.Array, pre: jax.Array, g_pre: jax.Array
) -> Params:
  """Gradients of `pre_activations` for an upstream g_pre, given its output `pre`.

  The same as jax.vjp, without re-running the B x d x F forward matmul or keeping a B x F relu
  mask: the mask is pre > 0 (relu's gradient at 0 is 0).
  """
  g = jnp.where(pre > 0, g_pre, 0.0)
  g_b = jnp.sum(g, axis=0)
  W_enc = params['W_enc']
  return {
      'W_enc': x.T @ g - jnp.outer(params['b_dec'], g_b),
      'b_enc': g_b,
      'W_dec': jnp.zeros_like(params['W_dec']),
      'b_dec': -(W_enc @ g_b),
  }


def batch_topk(pre: jax.Array, k: int, candidates_per_row: int = 4) -> jax.Array:
  """Keep the B*k largest entries of the whole batch (ties at exactly zero are dropped)."""
  tau = jax.lax.stop_gradient(selection.batch_topk_threshold(pre, k, candidates_per_row))
  return jnp.where((pre >= tau) & (pre > 0), pre, 0.0)


def jumprelu(pre: jax.Array, threshold: jax.Array) -> jax.Array:
  """Inference-time selection: keep activations above the learned threshold."""
  return jnp.where(pre > threshold, pre, 0.0)


def group_bounds(group_sizes: Sequence[int]) -> list[tuple[int, int]]:
  ends = np.cumsum(group_sizes).tolist()
  return list(zip([0] + ends[:-1], ends))


def prefix_reconstructions(
    params: Params, acts: jax.Array, group_sizes: Sequence[int]
) -> jax.Array:
  """x_hat for every Matryoshka prefix, [G, B, d]: b_dec + sum of the first i groups' decodes."""
  parts = [acts[:, a:b] @ params['W_dec'][a:b] for a, b in group_bounds(group_sizes)]
  return params['b_dec'] + jnp.cumsum(jnp.stack(parts), axis=0)


def decode(params: Params, acts: jax.Array) -> jax.Array:
  return acts @ params['W_dec'] + params['b_dec']


def geometric_median(points: jax.Array, max_iter: int = 100, tol: float = 1e-5) -> jax.Array:
  """Weiszfeld's algorithm from the mean, stopping when the update moves less than `tol`."""

  def cond(state):
    i, guess, prev = state
    return (i < max_iter) & ((i == 0) | (jnp.linalg.norm(guess - prev) >= tol))

  def body(state):
    i, guess, _ = state
    w = 1.0 / jnp.linalg.norm(points - guess, axis=1)
    w = w / w.sum()
    return i + 1, (w[:, None] * points).sum(0), guess

  guess = points.mean(0)
  return jax.lax.while_loop(cond, body, (0, guess, jnp.zeros_like(guess)))[1]


def unit_norm_rows(W: jax.Array) -> jax.Array:
  return W / (jnp.linalg.norm(W, axis=1, keepdims=True) + jnp.finfo(W.dtype).eps)


def init_params(key: jax.Array, d: int, F: int, dtype=jnp.float32) -> Params:
  """Unit-norm random decoder rows, W_enc = W_dec^T, zero biases (b_dec is set from data later)."""
  W_dec = unit_norm_rows(jax.random.normal(key, (F, d), dtype))
  return {
      'W_enc': W_dec.T,
      'b_enc': jnp.zeros((F,), dtype),
      'W_dec': W_dec,
      'b_dec': jnp.zeros((d,), dtype),
  }


class LossAux(NamedTuple):
  """What one loss evaluation learned besides the loss, for statistics and metrics."""

  acts: jax.Array  # [B, F] BatchTopK activations
  recon_sq_err: jax.Array  # [G] mean over the batch of ||x - x_hat_i||^2, per prefix
  l2_loss: jax.Array  # mean_i w_i * MSE_i
  auxk_loss: jax.Array


def auxk_loss(
    params: Params, pre: jax.Array, residual: jax.Array, dead: jax.Array, top_k_aux: int
) -> jax.Array:
  """Reconstruct the residual from each token's top dead latents (no decoder bias).

  Normalised by the residual's variance (OpenAI's formulation); zero when nothing is dead.
  """
  F = pre.shape[1]
  k_aux = min(top_k_aux, F)

  # Rematerialised: under autodiff a cond must otherwise hand its residuals (here [B, F] arrays)
  # out of *both* branches, zero-filling them on every step where nothing is dead.
  @jax.checkpoint
  def loss(params, pre, residual):
    # Each token's k_aux-th largest dead pre-activation (0 if fewer are dead: keep all dead).
    dead_bf = jnp.broadcast_to(dead[None], pre.shape)
    kth = selection.row_topk_threshold(pre, dead_bf, k_aux)[:, None]
    aux_acts = jnp.where(dead_bf & (pre >= kth), pre, 0.0)
    recon = aux_acts @ params['W_dec']
    l2 = jnp.mean(jnp.sum((residual - recon) ** 2, -1))
    denom = jnp.mean(jnp.sum((residual - residual.mean(0)) ** 2, -1))
    return jnp.nan_to_num(l2 / denom)

  return jax.lax.cond(
      jnp.any(dead), loss, lambda *_: jnp.zeros((), pre.dtype), params, pre, residual
  )


# --------------------------------------------------------------------------------------------------
# The dense training loss: the reference for every kernel backend
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LossHyper:
  """The hyper-parameters `loss_fn` reads; a step's full configuration
  (`jaxsae.kernels.common.StepConfig`) extends them."""

  k: int
  group_sizes: tuple[int, ...]
  group_weights: tuple[float, ...]
  auxk_alpha: float
  top_k_aux: int
  dead_tokens_threshold: int
  candidates_per_row: int
  # Mixed precision: the encoder matmul's operand dtype ('bfloat16'); parameters, Adam's state,
  # losses and gradients stay float32 (`sae.dtype`).
  compute_dtype: str = dataclasses.field(default='float32', kw_only=True)


def count_silence(tokens_since_fired: jax.Array, fired: jax.Array, tokens: int) -> jax.Array:
  """The dead-latent counters after a batch of `tokens`: reset where a latent fired."""
  return jnp.where(fired, 0, jnp.minimum(tokens_since_fired + tokens, COUNTER_CAP))


def loss_fn(
    params: Params, x: jax.Array, tokens_since_fired: jax.Array, sc: LossHyper
) -> tuple[jax.Array, tuple[LossAux, jax.Array]]:
  """dictionary_learning's loss: mean over prefixes of w_i * MSE_i, + auxk_alpha * AuxK.

  Also returns the tokens-since-fired counters updated with this batch: like the reference, the
  dead set that AuxK sees already counts this batch.
  """
  pre = pre_activations(params, x, sc.compute_dtype)
  x = x.astype(jnp.float32)
  acts = batch_topk(pre, sc.k, sc.candidates_per_row)
  x_hats = prefix_reconstructions(params, acts, sc.group_sizes)
  sq_err = jnp.mean(jnp.sum((x[None] - x_hats) ** 2, axis=-1), axis=-1)  # [G]
  l2 = jnp.mean(sq_err * jnp.asarray(sc.group_weights, sq_err.dtype))
  fired = jax.lax.stop_gradient(jnp.any(acts > 0, axis=0))
  tokens_since_fired = count_silence(tokens_since_fired, fired, x.shape[0])
  dead = tokens_since_fired >= sc.dead_tokens_threshold
  residual = jax.lax.stop_gradient(x - x_hats[-1])
  aux = auxk_loss(params, pre, residual, dead, sc.top_k_aux)
  return l2 + sc.auxk_alpha * aux, (LossAux(acts, sq_err, l2, aux), tokens_since_fired)


def remove_parallel_component(W_dec: jax.Array, grad: jax.Array) -> jax.Array:
  """Project each decoder row's gradient off the row, so the step keeps rows near unit norm."""
  unit = W_dec / (jnp.linalg.norm(W_dec, axis=1, keepdims=True) + 1e-6)
  return grad - jnp.sum(grad * unit, axis=1, keepdims=True) * unit


# --------------------------------------------------------------------------------------------------
# NNX module (inference, loading, users' code)
# --------------------------------------------------------------------------------------------------


class Threshold(nnx.Variable):
  """The inference threshold: not trained by gradients, an EMA of the smallest kept activation."""


class MatryoshkaSAE(nnx.Module):
  """A Matryoshka BatchTopK SAE with a learned JumpReLU inference threshold."""

  def __init__(
      self, d: int, F: int, k: int, group_sizes: Sequence[int], *, rngs: nnx.Rngs, dtype=jnp.float32
  ):
    if sum(group_sizes) != F:
      raise ValueError(f'group sizes {tuple(group_sizes)} sum to {sum(group_sizes)}, not F={F}.')
    p = init_params(rngs.params(), d, F, dtype)
    self.d, self.F, self.k = d, F, k
    self.group_sizes = tuple(int(s) for s in group_sizes)
    self.W_enc = nnx.Param(p['W_enc'])
    self.b_enc = nnx.Param(p['b_enc'])
    self.W_dec = nnx.Param(p['W_dec'])
    self.b_dec = nnx.Param(p['b_dec'])
    self.threshold = Threshold(jnp.array(-1.0, dtype))

  @classmethod
  def from_params(
      cls, params: Params, k: int, group_sizes: Sequence[int], threshold: float | jax.Array
  ) -> 'MatryoshkaSAE':
    d, F = params['W_enc'].shape
    sae = cls(d, F, k, group_sizes, rngs=nnx.Rngs(0), dtype=params['W_enc'].dtype)
    sae.load_params(params)
    sae.threshold.set_value(jnp.asarray(threshold, params['W_enc'].dtype))
    return sae

  def params(self) -> Params:
    return {n: getattr(self, n).get_value() for n in ('W_enc', 'b_enc', 'W_dec', 'b_dec')}

  def load_params(self, params: Params) -> None:
    for name, value in params.items():
      getattr(self, name).set_value(jnp.asarray(value))

  def encode(self, x: jax.Array, use_threshold: bool = True) -> jax.Array:
    """Sparse codes: JumpReLU with the learned threshold, or BatchTopK over this batch."""
    pre = pre_activations(self.params(), x)
    if use_threshold:
      return jumprelu(pre, self.threshold.get_value())
    return batch_topk(pre, self.k)

  def decode(self, acts: jax.Array) -> jax.Array:
    return decode(self.params(), acts)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.decode(self.encode(x))
