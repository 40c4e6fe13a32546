"""The native CPU kernels (`jaxsae.kernels.cpu`) against plain references: the BatchTopK and AuxK
selections against sorts, the sparse loss and gradients and AuxK against autodiff of the dense
formulation, the in-place Adam against optax (and the optax state layout it relies on), and whole
training steps against kernel='dense'."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import random_sae, step_config
from jaxsae import config as config_lib
from jaxsae import model, selection, train_step
from jaxsae.kernels import cpu as kernels_cpu
from jaxsae.kernels import cpu_build

pytestmark = pytest.mark.skipif(
    not cpu_build.available(), reason='no C++ compiler: the native kernels cannot be built'
)

GROUPS = (8, 8, 16, 32, 61)  # F = 125: not a multiple of the 16-latent tiles
WEIGHTS = (0.1, 0.2, 0.2, 0.2, 0.3)


def csr_of_mask(pre: np.ndarray, mask: np.ndarray):
  rows, cols = np.nonzero(mask)
  return np.concatenate([[0], np.cumsum(mask.sum(1))]), cols, pre[rows, cols]


def assert_entries(e: kernels_cpu.Entries, pre: np.ndarray, mask: np.ndarray):
  row_ptr, lat, val = csr_of_mask(pre, mask)
  n = len(lat)
  np.testing.assert_array_equal(e.row_ptr, row_ptr)
  np.testing.assert_array_equal(e.lat[:n], lat)
  np.testing.assert_array_equal(e.val[:n], val)
  assert not np.any(np.asarray(e.val[n:])) and not np.any(np.asarray(e.lat[n:]))


def reference_mask(z, c, budget):
  pre = jax.nn.relu(z + c)
  tau = selection.reference_threshold(pre, budget)
  return np.asarray(pre), np.asarray((pre >= tau) & (pre > 0)), float(tau)


@pytest.mark.parametrize('B, F, k', [(64, 125, 4), (37, 300, 7), (256, 64, 3)])
def test_select_equals_sorting_the_batch(B, F, k):
  kz, kc = jax.random.split(jax.random.PRNGKey(B + F))
  z = jax.random.normal(kz, (B, F))
  c = 0.3 * jax.random.normal(kc, (F,))
  sel = kernels_cpu.select(z, c, B * k, kernels_cpu.capacity(B, k))
  pre, mask, tau = reference_mask(z, c, B * k)
  assert float(sel.tau) == tau and int(sel.ties_dropped) == 0 and int(sel.path) == 0
  assert_entries(sel.entries, pre, mask)
  assert int(sel.entries.count) == B * k


def test_select_when_the_sampled_rows_mislead_the_estimate():
  """The estimate comes from every (B/32)-th row; make exactly those rows the largest, so the
  estimate is far too high: loosened estimates, then the radix select, stay exact."""
  B, F, k = 256, 128, 4
  z = np.array(jax.random.uniform(jax.random.PRNGKey(0), (B, F)), np.float32)
  z[:: B // 32] += 10.0
  sel = kernels_cpu.select(jnp.asarray(z), jnp.zeros(F), B * k, kernels_cpu.capacity(B, k))
  pre, mask, tau = reference_mask(jnp.asarray(z), jnp.zeros(F), B * k)
  assert int(sel.path) > 0 and float(sel.tau) == tau
  assert_entries(sel.entries, pre, mask)


def test_select_keeps_every_positive_entry_when_fewer_than_the_budget():
  B, F, k = 32, 64, 8
  z = -np.ones((B, F), np.float32)
  z[3, 5], z[9, 0], z[9, 63] = 2.0, 0.5, 1.5
  z[4, 7] = np.nan  # never selected, never fatal
  sel = kernels_cpu.select(jnp.asarray(z), jnp.zeros(F), B * k, kernels_cpu.capacity(B, k))
  assert float(sel.tau) == 0.0
  np.testing.assert_array_equal(sel.entries.lat[:3], [5, 0, 63])
  assert int(sel.entries.count) == 3


def test_select_ties_beyond_the_capacity_are_dropped_and_counted():
  """A constant batch: every entry ties at tau. The earliest rows' entries fill the capacity."""
  B, k = 64, 4
  cap = kernels_cpu.capacity(B, k)
  for F in (32, 128):  # collected at once; too many to collect (the radix select's path)
    sel = kernels_cpu.select(jnp.ones((B, F)), jnp.zeros(F), B * k, cap)
    assert float(sel.tau) == 1.0 and int(sel.path) == (3 if F == 128 else 0)
    assert int(sel.entries.count) == cap and int(sel.ties_dropped) == B * F - cap
    full = cap // F
    np.testing.assert_array_equal(sel.entries.row_ptr[: full + 1], np.arange(full + 1) * F)
    assert int(sel.entries.row_ptr[full + 1]) == cap and int(sel.entries.row_ptr[-1]) == cap
  F = 32
  # Ties that fit are all kept: a few duplicated tokens only.
  z = np.array(jax.random.normal(jax.random.PRNGKey(1), (B, F)), np.float32)
  z[1] = z[0]
  sel = kernels_cpu.select(jnp.asarray(z), jnp.zeros(F), B * k, cap)
  pre, mask, _ = reference_mask(jnp.asarray(z), jnp.zeros(F), B * k)
  assert int(sel.ties_dropped) == 0
  assert_entries(sel.entries, pre, mask)


def test_select_rejects_a_capacity_below_the_budget():
  with pytest.raises(ValueError, match='capacity'):
    kernels_cpu.select(jnp.ones((4, 8)), jnp.zeros(8), 16, 15)


def test_aux_select_is_each_tokens_top_dead_latents():
  B, F, k_aux = 48, 100, 6
  kz, kd = jax.random.split(jax.random.PRNGKey(3))
  z = np.array(jax.random.normal(kz, (B, F)), np.float32)
  dead = np.asarray(jax.random.bernoulli(kd, 0.3, (F,)))
  z[5] = -1.0  # a token with no positive dead latent
  z[6, dead] = np.where(np.arange(dead.sum()) < 3, 2.0, -1.0)  # one with 3 < k_aux of them
  e = kernels_cpu.aux_select(jnp.asarray(z), jnp.zeros(F), jnp.asarray(dead), k_aux)
  pre = np.maximum(z, 0)
  masked = np.where(dead[None], pre, -1.0)
  kth = np.maximum(np.sort(masked, axis=1)[:, -k_aux], 0)[:, None]
  assert_entries(e, pre, dead[None] & (pre >= kth) & (pre > 0))
  assert int(e.row_ptr[6] - e.row_ptr[5]) == 0 and int(e.row_ptr[7] - e.row_ptr[6]) == 3


def sparse_setup(B=40, d=20, k=4, seed=0):
  params, x = random_sae(GROUPS, B, d, seed)
  z, c = kernels_cpu.encoder_parts(params, x)
  return params, x, z, c, kernels_cpu.select(z, c, B * k, kernels_cpu.capacity(B, k))


def cpu_step_config(**overrides):
  return step_config(GROUPS, WEIGHTS, top_k_aux=6, **overrides)


@pytest.mark.slow
def test_sparse_loss_and_gradients_equal_autodiff_of_the_dense_loss():
  params, x, _, _, sel = sparse_setup()
  got = kernels_cpu.l2_and_grads(params, x, sel.entries, GROUPS, WEIGHTS)
  (loss, (aux, _)), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(
      params, x, jnp.zeros((sum(GROUPS),), jnp.int32), cpu_step_config()
  )
  assert float(aux.auxk_loss) == 0.0
  np.testing.assert_allclose(got.l2, loss, rtol=1e-5)
  np.testing.assert_allclose(got.sq_err, aux.recon_sq_err, rtol=1e-5)
  np.testing.assert_allclose(got.x_hat, model.decode(params, aux.acts), rtol=1e-5, atol=1e-6)
  for name in grads:
    np.testing.assert_allclose(got.grads[name], grads[name], rtol=1e-4, atol=1e-7, err_msg=name)


def test_sparse_auxk_equals_autodiff_of_the_dense_auxk():
  params, x, z, c, sel = sparse_setup()
  F = sum(GROUPS)
  dead = jax.random.bernoulli(jax.random.PRNGKey(9), 0.4, (F,))
  residual = x - kernels_cpu.l2_and_grads(params, x, sel.entries, GROUPS, WEIGHTS).x_hat
  loss, grads = kernels_cpu.auxk_loss_and_grads(params, z, c, x, residual, dead, 6)
  pre = model.pre_activations(params, x)
  want, (g_direct, g_pre) = jax.value_and_grad(
      lambda p, pre: model.auxk_loss(p, pre, residual, dead, 6), argnums=(0, 1)
  )(params, pre)
  g_enc = model.pre_activations_pullback(params, x, pre, g_pre)
  assert float(want) > 0
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  for name in grads:
    np.testing.assert_allclose(
        grads[name], g_direct[name] + g_enc[name], rtol=1e-4, atol=1e-7, err_msg=name
    )


def test_out_of_range_latents_are_rejected_with_their_entry():
  params, x, _, _, sel = sparse_setup()
  e = sel.entries._replace(lat=sel.entries.lat.at[3].set(999))
  with pytest.raises(Exception, match='latent id 999 at entry 3 is outside'):
    jax.block_until_ready(kernels_cpu.l2_and_grads(params, x, e, GROUPS, WEIGHTS).l2)


@pytest.mark.parametrize('norm', [0.5, 3.0])  # below and above the clip
@pytest.mark.parametrize('apply', [True, False])
def test_native_adam_equals_optax(norm, apply):
  F, d = 50, 24
  keys = jax.random.split(jax.random.PRNGKey(4), 4)
  params = {
      'W_dec': model.unit_norm_rows(jax.random.normal(keys[0], (F, d))),
      'W_enc': jax.random.normal(keys[1], (d, F)),
  }
  grads = jax.tree.map(lambda p: 0.01 * jax.random.normal(keys[2], p.shape), params)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3))
  state = optimizer.init(params)
  for _ in range(3):  # moments and count that are not zero
    _, state = optimizer.update(grads, state, params)
  adam = state[1][0]
  # Scale so that the global norm is `norm`; optax sees the same gradients.
  grads = jax.tree.map(lambda g: g * norm / optax.tree.norm(grads), grads)
  updates, new_state = optimizer.update(grads, state, params)
  want = optax.apply_updates(params, updates)
  want['W_dec'] = model.unit_norm_rows(want['W_dec'])
  hyper = kernels_cpu.AdamHyper(
      lr=jnp.float32(1e-3),
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      count=adam.count + 1,
      grad_norm=optax.tree.norm(grads),
      max_norm=1.0,
      apply=jnp.bool_(apply),
  )
  for name in ('W_dec', 'W_enc'):
    p, m, v = kernels_cpu.adam_update(
        params[name], grads[name], adam.mu[name], adam.nu[name], hyper, unit_rows=name == 'W_dec'
    )
    ref = kernels_cpu.adam_reference(params[name], grads[name], adam.mu[name], adam.nu[name], hyper)
    if not apply:
      for got, old in ((p, params[name]), (m, adam.mu[name]), (v, adam.nu[name])):
        np.testing.assert_array_equal(got, old)
      np.testing.assert_array_equal(ref[0], params[name])
      continue
    np.testing.assert_allclose(p, want[name], rtol=1e-5, atol=1e-7, err_msg=name)
    np.testing.assert_allclose(m, new_state[1][0].mu[name], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(v, new_state[1][0].nu[name], rtol=1e-6, atol=1e-12)
    if name == 'W_enc':
      np.testing.assert_allclose(ref[0], want[name], rtol=1e-6, atol=1e-8)


def test_the_optax_state_layout_the_native_update_reads():
  """`kernels.cpu.update` reads and writes `train_step.make_optimizer`'s state in optax's layout
  (chain(clip, adam(schedule))); if optax moves it, this fails before any checkpoint does."""
  c = config_lib.default_config()
  params = model.init_params(jax.random.PRNGKey(0), 8, 16)
  state = train_step.make_optimizer(c).init(params)
  clip_state, adam, sched = kernels_cpu.opt_state_parts(state)
  assert isinstance(adam, optax.ScaleByAdamState) and isinstance(sched, optax.ScaleByScheduleState)
  assert set(adam.mu) == set(adam.nu) == set(params)
  assert jax.tree.structure(state) == jax.tree.structure((clip_state, (adam, sched)))
  with pytest.raises(TypeError, match='chain'):
    kernels_cpu.opt_state_parts(
        optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1e-3)).init(params)
    )


def run_steps(kernel, steps=8, B=64, d=20, dead_after=128):
  """`steps` training steps from one start; AuxK engages once latents go `dead_after` tokens
  without firing."""
  sc = cpu_step_config(dead_tokens_threshold=dead_after, kernel=kernel)
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lambda _: 3e-3))
  params = model.init_params(jax.random.PRNGKey(5), d, sum(GROUPS))
  state = train_step.init_state(params, optimizer)
  step = jax.jit(
      lambda s, x: train_step.train_step(s, x, sc=sc, optimizer=optimizer, schedule=lambda _: 3e-3)
  )
  metrics = []
  for i in range(steps):
    x = jax.random.normal(jax.random.PRNGKey(100 + i), (B, d)) + 0.3
    state, m = step(state, x)
    metrics.append(m)
  return state, metrics


def test_cpu_training_steps_equal_dense_ones():
  cpu, cpu_m = run_steps('cpu')
  dense, dense_m = run_steps('dense')
  assert all(float(m['sparse_path']) == 1.0 for m in cpu_m)
  assert any(float(m['auxk_loss']) > 0 for m in cpu_m)  # AuxK ran on the sparse path
  for a, b in zip(cpu_m, dense_m):
    np.testing.assert_allclose(a['loss'], b['loss'], rtol=1e-4)
    np.testing.assert_allclose(a['auxk_loss'], b['auxk_loss'], rtol=1e-4, atol=1e-8)
  np.testing.assert_array_equal(cpu['tokens_since_fired'], dense['tokens_since_fired'])
  # Sums run in another order; Adam turns float32 rounding in near-zero gradients into steps of
  # up to ~lr on a few weights (as between device meshes, tests/test_sharding.py): lr/6 here.
  for name in cpu['params']:
    np.testing.assert_allclose(
        cpu['params'][name], dense['params'][name], rtol=1e-3, atol=5e-4, err_msg=name
    )
  for a, b in zip(jax.tree.leaves(cpu['opt_state']), jax.tree.leaves(dense['opt_state'])):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6)


def test_cpu_training_steps_are_bit_identical_run_to_run():
  """Threads split the work differently every run; no result may depend on it."""
  a, _ = run_steps('cpu', steps=4, B=512)
  b, _ = run_steps('cpu', steps=4, B=512)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_a_non_finite_batch_leaves_the_state_unchanged():
  sc = cpu_step_config(kernel='cpu')
  optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lambda _: 3e-3))
  state = train_step.init_state(
      model.init_params(jax.random.PRNGKey(5), 20, sum(GROUPS)), optimizer
  )
  x = jax.random.normal(jax.random.PRNGKey(1), (64, 20)).at[3, 4].set(jnp.nan)
  new, m = jax.jit(
      lambda s, x: train_step.train_step(s, x, sc=sc, optimizer=optimizer, schedule=lambda _: 3e-3)
  )(state, x)
  assert not bool(m['finite']) and int(new['nonfinite_count']) == 1
  for key in ('params', 'opt_state', 'threshold', 'tokens_since_fired'):
    for a, b in zip(jax.tree.leaves(new[key]), jax.tree.leaves(state[key])):
      np.testing.assert_array_equal(a, b, err_msg=key)


def test_a_missing_compiler_is_a_clear_error(monkeypatch):
  monkeypatch.setenv('CXX', '')
  monkeypatch.setenv('PATH', '')
  with pytest.raises(cpu_build.KernelBuildError, match='needs a C\\+\\+17 compiler'):
    cpu_build._compiler()  # pylint: disable=protected-access


def test_a_failing_build_names_the_source_and_the_error(monkeypatch, tmp_path):
  bad = tmp_path / 'bad.cc'
  bad.write_text('this is not C++\n')
  monkeypatch.setattr(cpu_build, 'SOURCE', str(bad))
  monkeypatch.setenv('JAXSAE_KERNEL_CACHE', str(tmp_path / 'cache'))
  with pytest.raises(cpu_build.KernelBuildError, match='bad.cc failed') as excinfo:
    cpu_build.build()
  assert 'error' in str(excinfo.value).split('\n', 1)[1]  # the compiler's own error lines
  assert not [f for f in os.listdir(tmp_path / 'cache' / 'kernels')]  # nothing half-written
