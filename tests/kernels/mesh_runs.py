"""Runs the training step on simulated device meshes and prints what the tests compare, as JSON.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/kernels/mesh_runs.py RUNS

RUNS is a JSON list of [kernel, data, model, shard_optimizer] (data * model devices of the 8);
every run trains the same steps from the same initial state on the same batches, where every
third batch has a few tokens with much larger activations (one data shard then holds far more
than its share of the batch's top-k: the per-shard selection's second stage). Printed per run:
the losses, the final parameters' and state's summaries. A separate process, so the test suite
itself keeps one device.
"""

from __future__ import annotations

import json
import os
import sys

sys.path[:0] = [
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
]

# pylint: disable=wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

from helpers import tiny_config
from jaxsae import model, sharding, train_step

D, F, B, K, STEPS = 32, 256, 64, 4, 12
OVERRIDES = {
    'sae.d': D,
    'sae.expansion_factor': F // D,
    'sae.k': K,
    'data.batch_size': B,
    'sae.dead_tokens_threshold': 128,  # AuxK from step 2 on
    'sae.threshold_start_step': 2,
    'optim.warmup_steps': 2,
}


def batch(i: int) -> jax.Array:
  x = jax.random.normal(jax.random.PRNGKey(100 + i), (B, D)) * (1 + jnp.arange(D) / 8)
  if i % 3 == 2:
    x = x.at[:3].multiply(6.0)
  return x


def run(kernel: str, data: int, model_: int, shard_optimizer: bool) -> dict:
  c = tiny_config(
      **OVERRIDES,
      **{
          'mesh.data': data,
          'mesh.model': model_,
          'sae.kernel': kernel,
          'mesh.shard_optimizer': 'on' if shard_optimizer else 'off',
      },
  )
  mesh = sharding.make_mesh(c, jax.devices()[: data * model_])
  optimizer, schedule = train_step.make_optimizer(c), train_step.lr_schedule(c)
  sc = train_step.StepConfig.from_config(c)  # mesh.data is explicit: no device count read
  shardings = sharding.state_shardings(mesh, train_step.abstract_state(c), sc.shard_optimizer)
  state = jax.device_put(
      train_step.init_state(model.init_params(jax.random.PRNGKey(0), D, F), optimizer), shardings
  )
  step = jax.jit(
      lambda s, x: train_step.train_step(s, x, sc=sc, optimizer=optimizer, schedule=schedule),
      in_shardings=(shardings, sharding.batch_sharding(mesh)),
      out_shardings=(shardings, None),
  )
  losses, sparse = [], []
  with jax.set_mesh(mesh):
    for i in range(STEPS):
      state, m = step(state, jax.device_put(batch(i), sharding.batch_sharding(mesh)))
      losses.append(float(m['loss']))
      sparse.append(float(m['sparse_path']))
  state = jax.device_get(state)
  mu = state['opt_state'][1][0].mu
  return {
      'kernel': sc.kernel,
      'losses': losses,
      'sparse': sparse,
      'params': {n: np.asarray(v).tolist() for n, v in state['params'].items()},
      'mu_W_dec_sum': float(np.sum(mu['W_dec'])),
      'threshold': float(state['threshold']),
      'tokens_since_fired': np.asarray(state['tokens_since_fired']).tolist(),
  }


if __name__ == '__main__':
  print(json.dumps([run(*r) for r in json.loads(sys.argv[1])]))
