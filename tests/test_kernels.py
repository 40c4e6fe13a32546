"""The XLA sparse decode/gradient kernel equals the dense reference — autodiff of the training loss
`train_step.loss_fn` with AuxK off — in values and every gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsae import kernels, model, selection, train_step

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


def dense_reference(params, x, k):
  sc = train_step.StepConfig(k=k, group_sizes=GROUPS, group_weights=WEIGHTS, auxk_alpha=1 / 32,
                             top_k_aux=12, dead_tokens_threshold=10**9, threshold_beta=0.999,
                             threshold_start_step=0, candidates_per_row=8, skip_nonfinite=False)
  (loss, (aux, _)), grads = jax.value_and_grad(train_step.loss_fn, has_aux=True)(
      params, x, jnp.zeros((sum(GROUPS),), jnp.int32), sc)
  assert float(aux.auxk_loss) == 0.0 and float(loss) == float(aux.l2_loss)  # nothing dead
  return aux, grads


@pytest.mark.parametrize('chunk_rows', [64, 16, 7])
def test_sparse_matches_dense(chunk_rows):
  params, x, vals, idx, tau = setup()
  sparse = kernels.sparse_l2_and_grads(params, x, vals, idx, GROUPS, WEIGHTS, chunk_rows)
  dense, grads = dense_reference(params, x, k=4)
  assert int(jnp.sum(vals > 0)) == int(jnp.sum(dense.acts > 0)) == 64 * 4
  np.testing.assert_allclose(sparse.l2, dense.l2_loss, rtol=1e-5)
  np.testing.assert_allclose(sparse.sq_err, dense.recon_sq_err, rtol=1e-5)
  np.testing.assert_allclose(sparse.x_hat, model.decode(params, dense.acts), rtol=1e-5, atol=1e-6)
  for name in ('W_enc', 'b_enc', 'W_dec', 'b_dec'):
    np.testing.assert_allclose(sparse.grads[name], grads[name], rtol=1e-4, atol=1e-7,
                               err_msg=name)


def test_resolve():
  assert kernels.resolve('dense') == 'dense' and kernels.resolve('xla') == 'xla'
  # 'auto' is the measured fastest path (see kernels.py): Pallas on one GPU, else dense.
  assert kernels.resolve('auto', backend='cpu') == 'dense'
  assert kernels.resolve('auto', backend='gpu', num_devices=1) == 'pallas'
  assert kernels.resolve('auto', backend='gpu', num_devices=8) == 'dense'
  assert kernels.resolve('auto', backend='tpu', num_devices=1) == 'dense'
  assert kernels.resolve('auto', backend='gpu', mesh_model_axis=2) == 'dense'
  assert kernels.resolve('xla', mesh_model_axis=2) == 'dense'
  assert kernels.resolve('pallas', mesh_model_axis=2) == 'dense'
  assert kernels.resolve('pallas', backend='gpu') == 'pallas'
  assert kernels.resolve('pallas', backend='cpu') == 'pallas'   # interpreted, with a warning
  assert kernels.resolve('pallas', backend='tpu') == 'xla'      # no TPU kernels yet


def test_unknown_kernel_is_rejected():
  params, x, vals, idx, _ = setup()
  with pytest.raises(ValueError, match='kernel'):
    kernels.sparse_l2_and_grads(params, x, vals, idx, GROUPS, WEIGHTS, kernel='sparse')
