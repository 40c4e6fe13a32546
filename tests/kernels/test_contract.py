"""The contract every kernel backend (`jaxsae.kernels.get`) keeps with `train_step`: its loss,
statistics, updated dead-latent counters and four gradients are those of autodiff of the reference
loss `model.loss_fn`, with AuxK idle and with dead latents present; its projection, global norm and
optimizer step are optax's. Also how the package is wired: imports run one way, and only
`jaxsae.kernels` names a backend.

Pallas backends run in their interpret modes off their own hardware (slow there).
"""

import ast
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import REPO, random_sae
from jaxsae import config as config_lib
from jaxsae import kernels, model, train_step
from jaxsae.kernels import cpu_build

GROUPS = (4, 4, 8, 16, 32)  # F = 64
WEIGHTS = (0.1, 0.2, 0.2, 0.2, 0.3)
B, D, K = 16, 16, 4
DEAD_AFTER = 1000


def _backends():
  on = jax.default_backend()
  slow_off = lambda platforms: () if on in platforms else (pytest.mark.slow,)  # noqa: E731
  no_native = pytest.mark.skipif(
      not cpu_build.available(), reason='the native kernels cannot be built'
  )
  return [
      pytest.param('dense'),
      pytest.param('xla'),
      pytest.param('pallas_gpu', marks=slow_off(kernels.GPU_BACKENDS)),
      pytest.param('pallas_tpu', marks=slow_off(('tpu',))),
      pytest.param(
          'cpu',
          marks=(no_native,)
          if on == 'cpu'
          else (pytest.mark.skip(reason='the native kernels run on the CPU backend only'),),
      ),
  ]


def test_every_backend_is_in_the_contract():
  assert {p.values[0] for p in _backends()} == set(kernels.BACKENDS)


def config():
  c = config_lib.default_config()
  c.sae.d, c.sae.dict_size, c.sae.k = D, sum(GROUPS), K
  c.sae.group_sizes, c.sae.group_fractions, c.sae.group_weights = GROUPS, None, WEIGHTS
  c.sae.top_k_aux, c.sae.dead_tokens_threshold = 8, DEAD_AFTER
  c.data.batch_size, c.optim.lr, c.optim.warmup_steps, c.train.steps = B, 1e-3, 2, 100
  config_lib.validate(c)
  return c


def step_config(kernel):
  return dataclasses.replace(train_step.StepConfig.from_config(config()), kernel=kernel)


def tokens_since_fired(with_dead: bool):
  """Zero counters (nothing can die this batch), or every other latent one batch from dead."""
  F = sum(GROUPS)
  if not with_dead:
    return jnp.zeros((F,), jnp.int32)
  return jnp.where(jnp.arange(F) % 2 == 1, DEAD_AFTER, 0).astype(jnp.int32)


@pytest.mark.parametrize('kernel', _backends())
@pytest.mark.parametrize('with_dead', [False, True], ids=['auxk_idle', 'auxk_active'])
def test_loss_and_gradients_are_the_reference(kernel, with_dead):
  params, x = random_sae(GROUPS, B, D, seed=3)
  sc = step_config(kernel)
  tsf = tokens_since_fired(with_dead)
  got = jax.jit(lambda p, x, t: kernels.get(kernel).loss_and_grads(p, x, t, sc))(params, x, tsf)
  (loss, (aux, want_tsf)), grads = jax.value_and_grad(model.loss_fn, has_aux=True)(
      params, x, tsf, sc
  )
  acts = np.asarray(aux.acts)

  assert float(got.stats.sparse_path) == (0.0 if kernel == 'dense' else 1.0)
  assert bool(jnp.any(want_tsf >= DEAD_AFTER)) == with_dead
  assert (float(aux.auxk_loss) > 0) == with_dead
  np.testing.assert_allclose(got.loss, loss, rtol=1e-5)
  np.testing.assert_allclose(got.stats.l2_loss, aux.l2_loss, rtol=1e-5)
  np.testing.assert_allclose(got.stats.auxk_loss, aux.auxk_loss, rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(got.stats.sq_err, aux.recon_sq_err, rtol=1e-5)  # every prefix
  assert float(got.stats.l0) == np.sum(acts > 0) / B == K
  np.testing.assert_allclose(got.stats.smallest, acts[acts > 0].min(), rtol=1e-5, atol=1e-6)
  assert float(got.stats.ties_dropped) == 0.0
  np.testing.assert_array_equal(got.tokens_since_fired, want_tsf)
  assert set(got.grads) == set(grads) == {'W_enc', 'b_enc', 'W_dec', 'b_dec'}
  for name in grads:
    np.testing.assert_allclose(got.grads[name], grads[name], rtol=1e-4, atol=1e-6, err_msg=name)


def optax_reference(params, opt_state, grads, optimizer):
  grads = {**grads, 'W_dec': model.remove_parallel_component(params['W_dec'], grads['W_dec'])}
  updates, opt_state = optimizer.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  new_params['W_dec'] = model.unit_norm_rows(new_params['W_dec'])
  return grads, optax.tree.norm(grads), new_params, opt_state


@pytest.mark.parametrize('kernel', _backends())
def test_optimizer_step_is_optax(kernel):
  """Projection and global norm, then one update from Adam moments that are not zero; with a
  non-finite flag, nothing moves."""
  c, sc = config(), step_config(kernel)
  optimizer, schedule = train_step.make_optimizer(c), train_step.lr_schedule(c)
  params, x = random_sae(GROUPS, B, D, seed=4)
  grads = jax.grad(lambda p: model.loss_fn(p, x, tokens_since_fired(True), sc)[0])(params)
  opt_state = optimizer.init(params)
  for _ in range(3):
    _, opt_state = optimizer.update(grads, opt_state, params)
  backend = kernels.get(kernel)
  want_grads, want_norm, want_params, want_state = optax_reference(
      params, opt_state, grads, optimizer
  )

  got_grads, got_norm = jax.jit(backend.project_and_norm)(params, grads)
  np.testing.assert_allclose(got_norm, want_norm, rtol=1e-5)
  for name in grads:
    np.testing.assert_allclose(
        got_grads[name], want_grads[name], rtol=1e-5, atol=1e-8, err_msg=name
    )

  # The update from the same projected gradients, so that only the update is compared.
  update = jax.jit(lambda p, o, g, n, ok: backend.update(p, o, g, n, ok, sc, optimizer, schedule))
  got_params, got_state = update(params, opt_state, want_grads, want_norm, jnp.bool_(True))
  for name in params:
    np.testing.assert_allclose(
        got_params[name], want_params[name], rtol=1e-5, atol=1e-7, err_msg=name
    )
  assert jax.tree.structure(got_state) == jax.tree.structure(want_state)
  for a, b in zip(jax.tree.leaves(got_state), jax.tree.leaves(want_state)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-12)

  kept_params, kept_state = update(params, opt_state, want_grads, want_norm, jnp.bool_(False))
  for a, b in zip(jax.tree.leaves((kept_params, kept_state)), jax.tree.leaves((params, opt_state))):
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------------------------------
# Wiring
# --------------------------------------------------------------------------------------------------

KERNELS_DIR = os.path.join(REPO, 'jaxsae', 'kernels')


def _imports(path):
  """(module, names) for every import statement of a source file."""
  with open(path, encoding='utf-8') as f:
    tree = ast.parse(f.read())
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name, ()
    elif isinstance(node, ast.ImportFrom):
      yield node.module or '', tuple(a.name for a in node.names)


def test_imports_run_one_way():
  """model <- common <- backends <- kernels <- train_step: a backend never imports the package's
  own names (`resolve`, `get`, `Backend`) or the training step, `common` no backend, and the
  reference maths nothing of the kernels."""
  submodules = {f[:-3] for f in os.listdir(KERNELS_DIR) if f.endswith('.py')} - {'__init__'}
  for name in submodules:
    for module, names in _imports(os.path.join(KERNELS_DIR, f'{name}.py')):
      assert not module.startswith(('jaxsae.train_step', 'jaxsae.trainer')), (name, module)
      assert module != 'jaxsae' or not {'train_step', 'trainer', 'kernels'} & set(names), name
      if module == 'jaxsae.kernels':
        assert set(names) <= submodules, (name, names)  # submodules only, never __init__'s
        if name == 'common':
          assert not names, names
  for name in ('model.py', 'selection.py'):
    for module, names in _imports(os.path.join(REPO, 'jaxsae', name)):
      assert 'kernels' not in module and 'kernels' not in names, (name, module)


@pytest.mark.parametrize('module', ['train_step.py', 'trainer.py', 'sharding.py'])
def test_only_the_kernels_package_names_a_backend(module):
  """The training step runs whatever `kernels.get(sc.kernel)` returns; no code outside the
  package picks a backend by name (config.py's option list aside)."""
  names = set(kernels.BACKENDS) | {'pallas'}
  with open(os.path.join(REPO, 'jaxsae', module), encoding='utf-8') as f:
    tree = ast.parse(f.read())
  literals = {
      n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
  }
  assert not literals & names, literals & names
