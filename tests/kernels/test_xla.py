"""The XLA sparse decode/gradient kernel equals the dense reference — autodiff of the training loss
`train_step.loss_fn` with AuxK off — in values and every gradient."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_sae, selected_candidates, step_config
from jaxsae import kernels, model, train_step
from jaxsae.kernels import cpu as kernels_cpu
from jaxsae.kernels import cpu_build, sparse, xla

GROUPS = (8, 8, 16, 32, 64)   # F = 128
WEIGHTS = (0.1, 0.2, 0.2, 0.2, 0.3)


def setup(B=64, d=24, k=4, kc=32, seed=0):
  params, x = random_sae(GROUPS, B, d, seed)
  return (params, x, *selected_candidates(params, x, k, kc))


def dense_reference(params, x, k):
  sc = step_config(GROUPS, WEIGHTS, k=k)
  (loss, (aux, _)), grads = jax.value_and_grad(train_step.loss_fn, has_aux=True)(
      params, x, jnp.zeros((sum(GROUPS),), jnp.int32), sc)
  assert float(aux.auxk_loss) == 0.0 and float(loss) == float(aux.l2_loss)  # nothing dead
  return aux, grads


@pytest.mark.parametrize('chunk,capacity', [(256, None), (64, 256), (7, 260), (1000, 300)])
def test_sparse_matches_dense(chunk, capacity):
  """Whole chunks, a partial last chunk, a chunk larger than the capacity: all exact."""
  params, x, vals, idx, tau = setup()
  sparse = xla.sparse_l2_and_grads(params, x, vals, idx, GROUPS, WEIGHTS, chunk,
                                       capacity=capacity)
  dense, grads = dense_reference(params, x, k=4)
  assert int(jnp.sum(vals > 0)) == int(jnp.sum(dense.acts > 0)) == 64 * 4
  np.testing.assert_allclose(sparse.l2, dense.l2_loss, rtol=1e-5)
  np.testing.assert_allclose(sparse.sq_err, dense.recon_sq_err, rtol=1e-5)
  np.testing.assert_allclose(sparse.x_hat, model.decode(params, dense.acts), rtol=1e-5, atol=1e-6)
  for name in ('W_enc', 'b_enc', 'W_dec', 'b_dec'):
    np.testing.assert_allclose(sparse.grads[name], grads[name], rtol=1e-4, atol=1e-7,
                               err_msg=name)


def test_compact_keeps_every_selected_entry_in_order():
  _, _, vals, idx, _ = setup()
  tok, lat, val = sparse.compact(vals, idx, 300)
  rows, cols = np.nonzero(np.asarray(vals))
  n = len(rows)
  np.testing.assert_array_equal(tok[:n], rows)
  np.testing.assert_array_equal(lat[:n], np.asarray(idx)[rows, cols])
  np.testing.assert_array_equal(val[:n], np.asarray(vals)[rows, cols])
  assert not np.any(np.asarray(val[n:]))
  assert sparse.entry_capacity(64, 4, 32, chunk=7) % 7 == 0
  assert 64 * 4 < sparse.entry_capacity(64, 4, 32, chunk=7) <= 64 * 32 + 6


def _tied_batch(tie_rows: int, ties: int):
  """64 tokens: the first `tie_rows` hold `ties` 1s each, the rest four 10s each; with k=4 the
  budget is 256, so tau = 1 whenever the 10s fall short of it. F = 128, d = 8."""
  F, d = sum(GROUPS), 8
  W_enc = -np.ones((d, F), np.float32)
  W_enc[1, :4] = 10.0
  W_enc[0, 4:4 + ties] = 1.0
  params = {'W_enc': jnp.asarray(W_enc), 'b_enc': jnp.zeros((F,)),
            'W_dec': model.unit_norm_rows(jax.random.normal(jax.random.PRNGKey(0), (F, d))),
            'b_dec': jnp.zeros((d,))}
  x = np.zeros((64, d), np.float32)
  x[:tie_rows, 0] = 1.0
  x[tie_rows:, 1] = 1.0
  return params, jnp.asarray(x)


@pytest.mark.parametrize('tie_rows,ties,sparse_ok', [
    # 252 tens + 4 ones = 256 selected: both sparse paths.
    (1, 4, {'xla': True, 'pallas': True}),
    # Token 0's 16 candidates all equal tau and a 17th 1 ties outside them: no sparse path may
    # run (the dense step keeps all 17).
    (1, 17, {'xla': False, 'pallas': False}),
    # 136 tens + 450 ones = 586 selected, each token's candidates complete (15 of 16 used): the
    # Pallas path has room for every candidate, the 'xla' path's 512 slots are overfilled.
    (30, 15, {'xla': False, 'pallas': True}),
])
def test_ties_at_the_threshold_stay_exact(tie_rows, ties, sparse_ok):
  params, x = _tied_batch(tie_rows, ties)
  assert sparse.entry_capacity(64, 4, 16) == 512
  sc = train_step.StepConfig(k=4, group_sizes=GROUPS, group_weights=WEIGHTS, auxk_alpha=1 / 32,
                             top_k_aux=12, dead_tokens_threshold=10**9, threshold_beta=0.999,
                             threshold_start_step=0, candidates_per_row=4, skip_nonfinite=False)
  tsf = jnp.zeros((sum(GROUPS),), jnp.int32)
  dense = train_step._dense_loss_and_grads(params, x, tsf, sc)  # pylint: disable=protected-access
  for kernel, ok in sparse_ok.items():
    fast = train_step._sparse_loss_and_grads(  # pylint: disable=protected-access
        params, x, tsf, dataclasses.replace(sc, kernel=kernel))
    assert float(fast[1].sparse_path) == float(ok), kernel
    np.testing.assert_allclose(fast[0], dense[0], rtol=1e-5, err_msg=kernel)
    np.testing.assert_allclose(fast[1].l0, dense[1].l0, err_msg=kernel)
    for name in ('W_enc', 'W_dec', 'b_enc', 'b_dec'):
      np.testing.assert_allclose(fast[3][name], dense[3][name], rtol=1e-4, atol=1e-6,
                                 err_msg=f'{kernel} {name}')


def test_resolve():
  assert kernels.resolve('dense') == 'dense' and kernels.resolve('xla') == 'xla'
  # 'auto' is the measured fastest path (see kernels.py): Pallas on one GPU, the native kernels
  # on one CPU device ('xla' where they cannot be built).
  native = 'cpu' if cpu_build.available() else 'xla'
  assert kernels.resolve('auto', backend='cpu', num_devices=1) == native
  assert kernels.resolve('auto', backend='cpu', num_devices=8) == 'dense'
  assert kernels.resolve('auto', backend='gpu', num_devices=1) == 'pallas'
  assert kernels.resolve('auto', backend='gpu', num_devices=8) == 'dense'
  assert kernels.resolve('auto', backend='tpu', num_devices=1) == 'dense'
  assert kernels.resolve('auto', backend='gpu', mesh_model_axis=2) == 'dense'
  assert kernels.resolve('xla', mesh_model_axis=2) == 'dense'
  assert kernels.resolve('pallas', mesh_model_axis=2) == 'dense'
  assert kernels.resolve('pallas', backend='gpu') == 'pallas'
  assert kernels.resolve('pallas', backend='cpu') == 'pallas'   # interpreted, with a warning
  assert kernels.resolve('pallas', backend='tpu') == 'pallas'   # Mosaic kernels, with a warning
  assert kernels.resolve('cpu', backend='cpu', num_devices=1) == 'cpu'
  assert kernels.resolve('cpu', backend='cpu', num_devices=8) == 'dense'   # with a warning
  assert kernels.resolve('cpu', mesh_model_axis=2) == 'dense'
  with pytest.raises(ValueError, match='CPU backend only'):
    kernels.resolve('cpu', backend='gpu')


def test_unknown_kernel_is_rejected():
  params, x, vals, idx, _ = setup()
  with pytest.raises(ValueError, match='kernel'):
    xla.sparse_l2_and_grads(params, x, vals, idx, GROUPS, WEIGHTS, kernel='sparse')


def test_pre_activations_pullback_equals_vjp():
  params, x, *_ = setup()
  pre, vjp = jax.vjp(lambda p: model.pre_activations(p, x), params)
  g_pre = jax.random.normal(jax.random.PRNGKey(7), pre.shape)
  (want,) = vjp(g_pre)
  got = model.pre_activations_pullback(params, x, pre, g_pre)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
