"""Our training step against dictionary_learning's MatryoshkaBatchTopKTrainer.

The fixture is written by `tools/make_golden_fixture.py` running the reference (PyTorch) on tiny
sizes from fixed weights and batches; here the same start must give the same losses, thresholds,
dead counts and parameters, step by step, to float32 tolerance.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxsae import config as config_lib
from jaxsae import kernels
from jaxsae import model
from jaxsae import train_step
from jaxsae.kernels import cpu_build

FIXTURE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'fixtures', 'golden_matryoshka.npz'
)


@pytest.fixture(scope='module')
def golden():
  return dict(np.load(FIXTURE))


def config_from(g):
  c = config_lib.default_config()
  c.sae.d, c.sae.dict_size, c.sae.k = int(g['d']), int(g['F']), int(g['k'])
  c.sae.group_fractions = tuple(float(f) for f in g['group_fractions'])
  c.sae.auxk_alpha = float(g['auxk_alpha'])
  c.sae.dead_tokens_threshold = int(g['dead_tokens_threshold'])
  c.sae.threshold_beta = float(g['threshold_beta'])
  c.sae.threshold_start_step = int(g['threshold_start_step'])
  c.optim.lr = float(g['lr'])
  c.optim.warmup_steps = int(g['warmup_steps'])
  c.optim.decay_start = int(g['decay_start'])
  c.train.steps = int(g['steps'])
  c.data.batch_size = int(g['B'])
  config_lib.validate(c)
  return c


def test_derived_hyperparameters_match(golden):
  c = config_from(golden)
  assert config_lib.group_sizes(c) == tuple(golden['group_sizes'].tolist())
  np.testing.assert_allclose(config_lib.group_weights(c), golden['group_weights'], rtol=1e-6)
  assert config_lib.top_k_aux(c) == int(golden['top_k_aux'])
  schedule = train_step.lr_schedule(c)
  np.testing.assert_allclose(
      [schedule(s) for s in range(c.train.steps)], golden['lr_per_step'], rtol=1e-6, atol=1e-9
  )


def test_geometric_median_matches(golden):
  median = model.geometric_median(jnp.asarray(golden['batches'][0]))
  np.testing.assert_allclose(median, golden['b_dec_median'], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    'kernel',
    [
        'dense',
        'xla',
        'pallas',  # the config value: 'pallas_gpu' here (interpreted off a GPU), 'pallas_tpu' on a TPU
        pytest.param(
            'cpu',
            marks=pytest.mark.skipif(
                not cpu_build.available(), reason='the native kernels cannot be built'
            ),
        ),
    ],
)
def test_training_matches_reference_step_by_step(golden, kernel):
  c = config_from(golden)
  c.sae.kernel = kernel if kernel in config_lib.KERNELS else 'dense'
  sc = train_step.StepConfig.from_config(c)
  if kernel in kernels.BACKENDS:  # a backend by name, whatever `resolve` would choose here
    sc = dataclasses.replace(sc, kernel=kernel)
  optimizer, schedule = train_step.make_optimizer(c), train_step.lr_schedule(c)
  params = {n: jnp.asarray(golden[f'init_{n}']) for n in ('W_enc', 'b_enc', 'W_dec')}
  params['b_dec'] = model.geometric_median(jnp.asarray(golden['batches'][0]))
  state = train_step.init_state(params, optimizer)
  step = jax.jit(
      lambda s, x: train_step.train_step(s, x, sc=sc, optimizer=optimizer, schedule=schedule)
  )
  paths = []
  for i, x in enumerate(golden['batches']):
    state, m = step(state, jnp.asarray(x))
    paths.append(float(m['sparse_path']))
    np.testing.assert_allclose(m['loss'], golden['loss'][i], rtol=2e-5, err_msg=f'loss, step {i}')
    np.testing.assert_allclose(m['l2_loss'], golden['l2_loss'][i], rtol=2e-5)
    np.testing.assert_allclose(m['auxk_loss'], golden['auxk_loss'][i], rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(m['threshold'], golden['threshold'][i], rtol=1e-5)
    np.testing.assert_array_equal(state['tokens_since_fired'], golden['num_tokens_since_fired'][i])
    dead = int(jnp.sum(state['tokens_since_fired'] >= sc.dead_tokens_threshold))
    assert dead == golden['num_dead'][i]
  for name in ('W_enc', 'b_enc', 'W_dec', 'b_dec'):
    np.testing.assert_allclose(
        state['params'][name], golden[f'final_{name}'], rtol=1e-4, atol=2e-5, err_msg=name
    )
  np.testing.assert_allclose(state['threshold'], golden['final_threshold'], rtol=1e-5)
  if kernel == 'cpu':  # no dense fallback: every step sparse, AuxK on the sparse path too
    assert paths == [1.0] * len(paths)
    assert any(golden['num_dead'] > 0)
  elif kernel != 'dense':
    # Both branches ran: the sparse kernel (with AuxK active on one of its steps) and, when a
    # token held more than 4k of the budget, the exact dense fallback.
    sparse_steps = [i for i, p in enumerate(paths) if p == 1.0]
    assert 0 < len(sparse_steps) < len(paths), paths
    assert any(golden['num_dead'][i] > 0 for i in sparse_steps), (paths, golden['num_dead'])


def test_inference_encode_matches_reference(golden):
  params = {n: jnp.asarray(golden[f'final_{n}']) for n in ('W_enc', 'b_enc', 'W_dec', 'b_dec')}
  sae = model.MatryoshkaSAE.from_params(
      params, int(golden['k']), golden['group_sizes'].tolist(), golden['final_threshold']
  )
  x = jnp.asarray(golden['encode_x'])
  np.testing.assert_allclose(sae.encode(x), golden['final_encode_threshold'], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sae(x), golden['final_forward'], rtol=1e-5, atol=1e-5)
