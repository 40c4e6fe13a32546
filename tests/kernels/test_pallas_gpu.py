"""The Pallas GPU kernels (`jaxsae.kernels.pallas_gpu`) equal the 'xla' backend and the dense
reference — autodiff of `model.loss_fn` — in values and every gradient, and a training step with
sae.kernel='pallas' (the 'pallas_gpu' backend off a TPU) follows the dense one.

Without a GPU the kernels run in Pallas's interpret mode; on a GPU they compile (Triton), and
JAXSAE_PALLAS_INTERPRET=1 forces the interpreter there too.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsae import config as config_lib
from jaxsae import kernels, model, selection, train_step
from jaxsae.kernels import pallas_gpu as kernels_pallas
from jaxsae.kernels import xla

GROUPS = (32, 32, 64, 128)  # F = 256
WEIGHTS = (0.1, 0.2, 0.3, 0.4)
B, D, K, KC = 64, 32, 4, 32
ALWAYS, NEVER = 40, 200  # a latent every token selects, one no token does


def step_config(k=K, groups=GROUPS, weights=WEIGHTS, kernel='dense'):
  return train_step.StepConfig(
      k=k,
      group_sizes=groups,
      group_weights=weights,
      auxk_alpha=1 / 32,
      top_k_aux=12,
      dead_tokens_threshold=10**9,
      threshold_beta=0.999,
      threshold_start_step=0,
      candidates_per_row=KC // k,
      skip_nonfinite=False,
      kernel=kernel,
  )


def batchtopk_codes(seed=0):
  """A real BatchTopK selection as sparse codes, candidate slots shuffled per token (unsorted)."""
  kp, kx, kb, ks = jax.random.split(jax.random.PRNGKey(seed), 4)
  params = model.init_params(kp, D, sum(GROUPS))
  params['b_dec'] = 0.1 * jax.random.normal(kb, (D,))
  b_enc = 0.05 * jax.random.normal(kb, (sum(GROUPS),))
  params['b_enc'] = b_enc.at[ALWAYS].set(6.0).at[NEVER].set(-100.0)
  x = jax.random.normal(kx, (B, D))
  pre = model.pre_activations(params, x)
  vals, idx, tau, proven = selection.candidates_and_threshold(pre, K, KC)
  assert bool(proven)
  vals = jnp.where((vals >= tau) & (vals > 0), vals, 0.0)
  perm = jax.vmap(lambda key: jax.random.permutation(key, KC))(jax.random.split(ks, B))
  vals, idx = jnp.take_along_axis(vals, perm, 1), jnp.take_along_axis(idx, perm, 1)
  selected = np.asarray(idx)[np.asarray(vals) > 0]
  assert np.all(np.sum((np.asarray(idx) == ALWAYS) & (np.asarray(vals) > 0), axis=1) == 1)
  assert NEVER not in selected and np.sum(np.asarray(vals) == 0) > 0
  assert not np.all(np.diff(np.asarray(vals), axis=1) <= 0)  # not in top-k order
  return params, x, vals, idx


def random_codes(Bn=50, d=24, seed=1):
  """Arbitrary codes: distinct unsorted ids per token, about half the values zero; B and d that
  the kernels' blocks do not divide evenly."""
  kp, kx, kv, ki, kz = jax.random.split(jax.random.PRNGKey(seed), 5)
  F = sum(GROUPS)
  params = model.init_params(kp, d, F)
  params['b_dec'] = 0.1 * jax.random.normal(kp, (d,))
  x = jax.random.normal(kx, (Bn, d))
  idx = jax.vmap(lambda key: jax.random.permutation(key, F)[:KC])(jax.random.split(ki, Bn))
  idx = jnp.where(idx == NEVER, NEVER + 1, idx)
  vals = jax.random.uniform(kv, (Bn, KC), minval=0.1, maxval=2.0)
  vals = jnp.where(jax.random.bernoulli(kz, 0.5, (Bn, KC)), vals, 0.0)
  return params, x, vals, idx


def dense_reference(params, x):
  (loss, (aux, _)), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(
      params, x, jnp.zeros((sum(GROUPS),), jnp.int32), step_config()
  )
  assert float(aux.auxk_loss) == 0.0 and float(loss) == float(aux.l2_loss)  # nothing dead
  return aux, grads


def assert_same(result, ref_l2, ref_sq, ref_xhat, ref_grads, rtol=1e-4):
  np.testing.assert_allclose(result.l2, ref_l2, rtol=1e-5)
  np.testing.assert_allclose(result.sq_err, ref_sq, rtol=1e-5)
  np.testing.assert_allclose(result.x_hat, ref_xhat, rtol=1e-5, atol=1e-5)
  for name in ('W_enc', 'b_enc', 'W_dec', 'b_dec'):
    np.testing.assert_allclose(
        result.grads[name], ref_grads[name], rtol=rtol, atol=1e-7, err_msg=name
    )


def pallas_result(params, x, vals, idx, **blocks):
  decode_blocks = {k: v for k, v in blocks.items() if k in ('block_tokens', 'block_d')}
  backward_blocks = {k: v for k, v in blocks.items() if k in ('block_entries', 'block_d')}
  dec = kernels_pallas.decode(params, x, vals, idx, GROUPS, WEIGHTS, **decode_blocks)
  grads = kernels_pallas.backward(params, x, dec, GROUPS, **backward_blocks)
  return kernels.L2Result(dec.l2, dec.sq_err, dec.x_hat, grads)


@pytest.mark.parametrize(
    'blocks',
    [
        {},  # defaults: one d tile, whole chunks
        {'block_tokens': 8, 'block_d': 8, 'block_entries': 4},  # 4 d tiles, long segments chunked
    ],
)
@pytest.mark.slow
def test_kernels_match_xla_and_dense(blocks):
  params, x, vals, idx = batchtopk_codes()
  result = pallas_result(params, x, vals, idx, **blocks)
  ref = xla.l2_and_grads(params, x, vals, idx, GROUPS, WEIGHTS)
  assert_same(result, ref.l2, ref.sq_err, ref.x_hat, ref.grads)
  dense, grads = dense_reference(params, x)
  assert int(jnp.sum(vals > 0)) == int(jnp.sum(dense.acts > 0)) == B * K
  assert_same(result, dense.l2_loss, dense.recon_sq_err, model.decode(params, dense.acts), grads)
  # The latent nobody selected gets no decoder or encoder gradient; the one everybody did does.
  for name in ('W_dec', 'W_enc', 'b_enc'):
    g = np.asarray(result.grads[name])
    g = g.T if name == 'W_enc' else g
    assert not np.any(g[NEVER]) and np.any(g[ALWAYS]), name


@pytest.mark.slow
def test_kernels_match_xla_on_arbitrary_codes():
  params, x, vals, idx = random_codes()
  ref = xla.l2_and_grads(params, x, vals, idx, GROUPS, WEIGHTS)
  for blocks in ({}, {'block_tokens': 4, 'block_d': 16, 'block_entries': 2}):
    result = pallas_result(params, x, vals, idx, **blocks)
    assert_same(result, ref.l2, ref.sq_err, ref.x_hat, ref.grads)


def test_custom_vjp_gradient_is_the_dense_gradient():
  params, x, vals, idx = batchtopk_codes(seed=2)
  dense, grads = dense_reference(params, x)
  loss_of = jax.jit(lambda p: 3.0 * kernels_pallas.matryoshka_l2(p, x, vals, idx, GROUPS, WEIGHTS))
  loss, pallas_grads = jax.value_and_grad(loss_of)(params)
  np.testing.assert_allclose(loss, 3.0 * dense.l2_loss, rtol=1e-5)
  for name in ('W_enc', 'b_enc', 'W_dec', 'b_dec'):
    np.testing.assert_allclose(
        pallas_grads[name], 3.0 * grads[name], rtol=1e-4, atol=1e-7, err_msg=name
    )


@pytest.mark.slow
def test_training_steps_match_dense():
  c = config_lib.default_config()
  c.sae.d, c.sae.dict_size, c.sae.k = D, sum(GROUPS), K
  c.sae.group_sizes, c.sae.group_fractions = GROUPS, None
  c.sae.dead_tokens_threshold = 3 * B  # AuxK switches on after a few steps
  c.sae.candidates_per_row = KC // K  # wide enough that every step takes the sparse path
  c.data.batch_size, c.optim.lr, c.optim.warmup_steps, c.train.steps = B, 1e-3, 1, 100
  config_lib.validate(c)
  optimizer, schedule = train_step.make_optimizer(c), train_step.lr_schedule(c)
  params = model.init_params(jax.random.PRNGKey(3), D, sum(GROUPS))
  xs = jax.random.normal(jax.random.PRNGKey(4), (5, B, D)) + 0.3
  runs = {}
  for kernel in ('dense', 'pallas'):
    c.sae.kernel = kernel
    sc = train_step.StepConfig.from_config(c)
    assert sc.kernel == {'dense': 'dense', 'pallas': 'pallas_gpu'}[kernel]
    step = jax.jit(
        lambda s, x, sc=sc: train_step.train_step(
            s, x, sc=sc, optimizer=optimizer, schedule=schedule
        )
    )
    state, metrics = train_step.init_state(params, optimizer), []
    for x in xs:
      state, m = step(state, x)
      metrics.append(m)
    runs[kernel] = state, metrics
  (dense_state, dense_m), (pallas_state, pallas_m) = runs['dense'], runs['pallas']
  assert all(float(m['sparse_path']) == 1.0 for m in pallas_m)
  assert any(float(m['auxk_loss']) > 0 for m in pallas_m)
  for md, mp in zip(dense_m, pallas_m):
    for key in ('loss', 'l2_loss', 'auxk_loss', 'fvu', 'l0', 'grad_norm'):
      np.testing.assert_allclose(mp[key], md[key], rtol=2e-5, atol=1e-7, err_msg=key)
  # Adam divides by the gradient's scale, so a rounding-level difference in a ~0 gradient moves a
  # weight by up to ~lr: 1e-5 absolute is 1% of lr per step.
  for name in ('W_enc', 'b_enc', 'W_dec', 'b_dec'):
    np.testing.assert_allclose(
        pallas_state['params'][name],
        dense_state['params'][name],
        rtol=1e-4,
        atol=1e-5,
        err_msg=name,
    )
  np.testing.assert_array_equal(
      pallas_state['tokens_since_fired'], dense_state['tokens_since_fired']
  )


def test_interpret_mode_switch(monkeypatch):
  monkeypatch.setenv('JAXSAE_PALLAS_INTERPRET', '1')
  assert kernels_pallas.interpret_mode()
  monkeypatch.setenv('JAXSAE_PALLAS_INTERPRET', '0')
  assert not kernels_pallas.interpret_mode()
  monkeypatch.delenv('JAXSAE_PALLAS_INTERPRET')
  assert kernels_pallas.interpret_mode() == (jax.default_backend() not in kernels.GPU_BACKENDS)
