"""The sparse decode/gradient kernel equals the dense reference (values and every gradient)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsae import kernels, model, selection

GROUPS = (8, 8, 16, 32, 64)   # F = 128
WEIGHTS = (0.1, 0.2, 0.2, 0.2, 0.3)


def setup(B=64, d=24, k=4, kc=32, seed=0):
  kp, kx, kb = jax.random.split(jax.random.PRNGKey(seed), 3)
  params = model.init_params(kp, d, sum(GROUPS))
  params['b_dec'] = 0.1 * jax.random.normal(kb, (d,))
  params['b_enc'] = 0.05 * jax.random.normal(kb, (sum(GROUPS),))
  x = jax.random.normal(kx, (B, d))
  pre = model.pre_activations(params, x)
  vals, idx, tau, proven = selection.candidates_and_threshold(pre, k, kc)
  assert bool(proven)
  sel_vals = jnp.where((vals >= tau) & (vals > 0), vals, 0.0)
  return params, x, sel_vals, idx, tau


@pytest.mark.parametrize('chunk_rows', [64, 16, 7])
def test_sparse_matches_dense(chunk_rows):
  params, x, vals, idx, tau = setup()
  sparse = kernels.sparse_l2_and_grads(params, x, vals, idx, GROUPS, WEIGHTS, chunk_rows)
  dense, acts = kernels.dense_l2_and_grads(
      params, x, lambda pre: jnp.where((pre >= tau) & (pre > 0), pre, 0.0), GROUPS, WEIGHTS)
  assert int(jnp.sum(vals > 0)) == int(jnp.sum(acts > 0)) == 64 * 4
  np.testing.assert_allclose(sparse.l2, dense.l2, rtol=1e-5)
  np.testing.assert_allclose(sparse.sq_err, dense.sq_err, rtol=1e-5)
  np.testing.assert_allclose(sparse.x_hat, dense.x_hat, rtol=1e-5, atol=1e-6)
  for name in ('W_enc', 'b_enc', 'W_dec', 'b_dec'):
    np.testing.assert_allclose(sparse.grads[name], dense.grads[name], rtol=1e-4, atol=1e-7,
                               err_msg=name)


def test_resolve():
  assert kernels.resolve('dense') == 'dense' and kernels.resolve('sparse') == 'sparse'
  assert kernels.resolve('auto') == 'dense'   # the measured faster path (see kernels.py)
  assert kernels.resolve('sparse', mesh_model_axis=2) == 'dense'
