"""The 'dense' backend: autodiff of the reference loss, `model.loss_fn` (dictionary_learning's
maths, with B x F activations and dense matmuls). Every other backend is tested against it, the
sparse ones fall back to it when their selection cannot be proven complete, and it is the step on
meshes of several devices (sharded by `jaxsae.sharding`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxsae import model
from jaxsae.kernels import common


def loss_and_grads(
    params: model.Params, x: jax.Array, tokens_since_fired: jax.Array, sc: common.StepConfig
) -> common.LossAndGrads:
  """Autodiff of `model.loss_fn`."""
  (loss, (aux, tokens_since_fired)), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(
      params, x, tokens_since_fired, sc
  )
  acts = jax.lax.stop_gradient(aux.acts)
  stats = common.StepStats(
      aux.recon_sq_err,
      aux.l2_loss,
      aux.auxk_loss,
      jnp.mean(jnp.sum(acts > 0, axis=-1).astype(jnp.float32)),
      jnp.min(jnp.where(acts > 0, acts, jnp.inf)),
      jnp.zeros((), jnp.float32),
      jnp.zeros((), jnp.float32),
  )
  return common.LossAndGrads(loss, stats, tokens_since_fired, grads)


def auxk_loss_and_grads(
    params: model.Params,
    x: jax.Array,
    pre: jax.Array,
    residual: jax.Array,
    dead: jax.Array,
    top_k_aux: int,
) -> tuple[jax.Array, model.Params]:
  """`model.auxk_loss` and its gradients by autodiff, on pre-activations already computed (the
  sparse backends' AuxK: it needs the [B, F] pre-activations they keep anyway)."""
  aux, (g_direct, g_pre) = jax.value_and_grad(
      lambda p, pre: model.auxk_loss(p, pre, residual, dead, top_k_aux), argnums=(0, 1)
  )(params, pre)
  g_enc = model.pre_activations_pullback(params, x, pre, g_pre)
  return aux, jax.tree.map(jnp.add, g_direct, g_enc)
