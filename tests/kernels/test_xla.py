"""The 'xla' backend's sparse decode/gradient kernel equals the dense reference — autodiff of the
training loss `model.loss_fn` with AuxK off — in values and every gradient; the sparse step stays
exact when ties overfill a kernel's room; `kernels.resolve` and `kernels.get` choose backends."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_sae, selected_candidates, step_config
from jaxsae import kernels, model
from jaxsae.kernels import cpu_build, sparse, xla

GROUPS = (8, 8, 16, 32, 64)  # F = 128
WEIGHTS = (0.1, 0.2, 0.2, 0.2, 0.3)


def setup(B=64, d=24, k=4, kc=32, seed=0):
  params, x = random_sae(GROUPS, B, d, seed)
  return (params, x, *selected_candidates(params, x, k, kc))


def dense_reference(params, x, k):
  sc = step_config(GROUPS, WEIGHTS, k=k)
  (loss, (aux, _)), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(
      params, x, jnp.zeros((sum(GROUPS),), jnp.int32), sc
  )
  assert float(aux.auxk_loss) == 0.0 and float(loss) == float(aux.l2_loss)  # nothing dead
  return aux, grads


@pytest.mark.slow
@pytest.mark.parametrize('chunk,capacity', [(256, None), (64, 256), (7, 260), (1000, 300)])
def test_sparse_matches_dense(chunk, capacity):
  """Whole chunks, a partial last chunk, a chunk larger than the capacity: all exact."""
  params, x, vals, idx, _ = setup()
  got = xla.l2_and_grads(params, x, vals, idx, GROUPS, WEIGHTS, chunk, capacity=capacity)
  dense, grads = dense_reference(params, x, k=4)
  assert int(jnp.sum(vals > 0)) == int(jnp.sum(dense.acts > 0)) == 64 * 4
  np.testing.assert_allclose(got.l2, dense.l2_loss, rtol=1e-5)
  np.testing.assert_allclose(got.sq_err, dense.recon_sq_err, rtol=1e-5)
  np.testing.assert_allclose(got.x_hat, model.decode(params, dense.acts), rtol=1e-5, atol=1e-6)
  for name in ('W_enc', 'b_enc', 'W_dec', 'b_dec'):
    np.testing.assert_allclose(got.grads[name], grads[name], rtol=1e-4, atol=1e-7, err_msg=name)


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
  W_enc[0, 4 : 4 + ties] = 1.0
  params = {
      'W_enc': jnp.asarray(W_enc),
      'b_enc': jnp.zeros((F,)),
      'W_dec': model.unit_norm_rows(jax.random.normal(jax.random.PRNGKey(0), (F, d))),
      'b_dec': jnp.zeros((d,)),
  }
  x = np.zeros((64, d), np.float32)
  x[:tie_rows, 0] = 1.0
  x[tie_rows:, 1] = 1.0
  return params, jnp.asarray(x)


@pytest.mark.parametrize(
    'tie_rows,ties,sparse_ok',
    [
        # 252 tens + 4 ones = 256 selected: both sparse paths.
        (1, 4, {'xla': True, 'pallas_gpu': True}),
        # Token 0's 16 candidates all equal tau and a 17th 1 ties outside them: no sparse path may
        # run (the dense step keeps all 17).
        (1, 17, {'xla': False, 'pallas_gpu': False}),
        # 136 tens + 450 ones = 586 selected, each token's candidates complete (15 of 16 used): the
        # Pallas kernels have room for every candidate, the 'xla' kernel's 512 slots are overfilled.
        (30, 15, {'xla': False, 'pallas_gpu': True}),
    ],
)
@pytest.mark.slow
def test_ties_at_the_threshold_stay_exact(tie_rows, ties, sparse_ok):
  params, x = _tied_batch(tie_rows, ties)
  assert sparse.entry_capacity(64, 4, 16) == 512
  sc = step_config(GROUPS, WEIGHTS, candidates_per_row=4)
  tsf = jnp.zeros((sum(GROUPS),), jnp.int32)
  dense = kernels.get('dense').loss_and_grads(params, x, tsf, sc)
  for kernel, ok in sparse_ok.items():
    fast = kernels.get(kernel).loss_and_grads(
        params, x, tsf, dataclasses.replace(sc, kernel=kernel)
    )
    assert float(fast.stats.sparse_path) == float(ok), kernel
    np.testing.assert_allclose(fast.loss, dense.loss, rtol=1e-5, err_msg=kernel)
    np.testing.assert_allclose(fast.stats.l0, dense.stats.l0, err_msg=kernel)
    for name in ('W_enc', 'W_dec', 'b_enc', 'b_dec'):
      np.testing.assert_allclose(
          fast.grads[name], dense.grads[name], rtol=1e-4, atol=1e-6, err_msg=f'{kernel} {name}'
      )


def test_resolve():
  assert kernels.resolve('dense') == 'dense' and kernels.resolve('xla') == 'xla'
  # 'auto' is the measured fastest path (README's Performance and Sharding sections): Pallas on
  # GPUs (per shard when latents are not split), the native kernels on CPU devices, one or many
  # ('xla' where they cannot be built).
  native = 'cpu' if cpu_build.available() else 'xla'
  assert kernels.resolve('auto', backend='cpu') == native
  assert kernels.resolve('auto', backend='cpu', mesh_model_axis=4) == native
  assert kernels.resolve('auto', backend='gpu') == 'pallas_gpu'
  assert kernels.resolve('auto', backend='gpu', mesh_model_axis=2) == 'dense'
  assert kernels.resolve('auto', backend='tpu') == 'dense'
  assert kernels.resolve('xla', mesh_model_axis=2) == 'xla'
  # 'pallas' names two kernel families: the resolved name says which runs.
  assert kernels.resolve('pallas', backend='gpu') == 'pallas_gpu'
  assert kernels.resolve('pallas', backend='cpu') == 'pallas_gpu'  # interpreted, with a warning
  assert kernels.resolve('pallas', backend='tpu') == 'pallas_tpu'  # Mosaic, with a warning
  assert kernels.resolve('cpu', backend='cpu') == 'cpu'
  assert kernels.resolve('cpu', backend='cpu', mesh_model_axis=2) == 'cpu'
  with pytest.raises(ValueError, match='CPU backend only'):
    kernels.resolve('cpu', backend='gpu')


def test_pallas_on_a_latent_split_mesh_is_refused_with_the_fix():
  sc = step_config((8, 8), (0.5, 0.5), kernel='pallas_gpu', mesh_data=1, mesh_model=2)
  with pytest.raises(ValueError, match="mesh.model must be 1.*sae.kernel='xla'"):
    kernels.for_step(sc)
  assert kernels.for_step(dataclasses.replace(sc, mesh_model=1)).name == 'pallas_gpu'
  assert kernels.for_step(dataclasses.replace(sc, mesh_data=2, mesh_model=1)).name == 'pallas_gpu'


def test_every_config_kernel_resolves_to_a_backend():
  from jaxsae import config as config_lib  # pylint: disable=import-outside-toplevel

  for kernel in config_lib.KERNELS:
    for backend in ('cpu', 'gpu', 'tpu'):
      if kernel == 'cpu' and backend != 'cpu':
        continue
      assert kernels.resolve(kernel, backend=backend) in kernels.BACKENDS


def test_unknown_backend_is_rejected():
  with pytest.raises(ValueError, match='unknown kernel backend'):
    kernels.get('pallas')  # a config value, not a backend: kernels.resolve first
  with pytest.raises(ValueError, match='unknown kernel backend'):
    kernels.get('sparse')


def test_pre_activations_pullback_equals_vjp():
  params, x, *_ = setup()
  pre, vjp = jax.vjp(lambda p: model.pre_activations(p, x), params)
  g_pre = jax.random.normal(jax.random.PRNGKey(7), pre.shape)
  (want,) = vjp(g_pre)
  got = model.pre_activations_pullback(params, x, pre, g_pre)
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6, err_msg=name)
