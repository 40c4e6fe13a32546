"""Training on 8 simulated devices, on any (data x model) mesh, matches one device (the default
kernel: the native kernels per shard); checkpoints move between meshes, kernels and optimizer
layouts. Each run is its own process, so the rest of the suite keeps one device."""

import json
import os
import shutil

import numpy as np
import pytest

from helpers import REPO, cli_args, run_cli
from jaxsae import weights

pytestmark = pytest.mark.multidevice

# AuxK, the threshold EMA and warmup/decay all happen within these steps.
# Tolerance: other meshes sum in another order; Adam turns float32 rounding in near-zero gradients
# into differences up to ~lr/20 on a few weights after 24 steps. The selection itself must agree
# exactly (the dead-latent counters are compared bit for bit).
ATOL = 3e-4
OVERRIDES = {
    'sae.d': 32,
    'sae.expansion_factor': 8,
    'sae.k': 4,
    'data.batch_size': 64,
    'train.steps': 24,
    'train.checkpoint_every': 12,
    'optim.decay_start': 20,
    'sae.threshold_start_step': 8,
    'sae.dead_tokens_threshold': 192,
    'data.synthetic.n_features': 64,
}


def train(workdir, devices, data=-1, model=1, **extra):
  env = {'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
  r = run_cli(
      cli_args(
          'jaxsae.train',
          workdir=str(workdir),
          **{**OVERRIDES, 'mesh.data': data, 'mesh.model': model, **extra},
      ),
      env_extra=env,
  )
  assert r.returncode == 0, r.stderr[-3000:]


def params(workdir, step=None):
  s, state, _, _ = weights.load_checkpoint(str(workdir), step)
  return {k: np.asarray(v) for k, v in state['params'].items()}, state


@pytest.fixture(scope='module')
def single(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('single')
  train(workdir, devices=1)
  return workdir


@pytest.mark.slow
# Every backend on 8x1, 2x4 and 1x8 at the step level: tests/kernels/test_sharded.py.
@pytest.mark.parametrize('data, model', [(8, 1), (2, 4)])
def test_mesh_matches_one_device(single, tmp_path, data, model):
  train(tmp_path, devices=8, data=data, model=model)
  ref, ref_state = params(single)
  got, got_state = params(tmp_path)
  for name in ref:
    np.testing.assert_allclose(got[name], ref[name], rtol=1e-3, atol=ATOL, err_msg=name)
  np.testing.assert_allclose(got_state['threshold'], ref_state['threshold'], rtol=1e-5)
  np.testing.assert_array_equal(got_state['tokens_since_fired'], ref_state['tokens_since_fired'])
  assert int(np.sum(got_state['tokens_since_fired'] >= 192)) > 0  # AuxK was exercised


@pytest.mark.slow
def test_checkpoint_moves_between_meshes_kernels_and_optimizer_layouts(single, tmp_path):
  """Saved by the native kernels per shard on 2x4 with the optimizer sharded over data; resumed
  by the 'xla' kernel per shard on 8x1 with a replicated optimizer, and on one device."""
  train(tmp_path / 'a', devices=8, data=2, model=4, **{'mesh.shard_optimizer': 'on'})
  for name, devices, data, model, extra in (
      ('to8x1', 8, 8, 1, {'sae.kernel': 'xla', 'mesh.shard_optimizer': 'off'}),
      ('to1', 1, -1, 1, {}),
  ):
    shutil.copytree(tmp_path / 'a' / 'checkpoints', tmp_path / name / 'checkpoints')
    shutil.rmtree(tmp_path / name / 'checkpoints' / '24')  # as if the 2x4 run died after step 12
    train(tmp_path / name, devices=devices, data=data, model=model, **extra)  # 12 -> 24
    logged = [json.loads(l)['step'] for l in open(tmp_path / name / 'metrics.jsonl')]
    assert logged == [20, 24], logged  # really resumed: nothing logged before step 12
    ref, _ = params(single)
    got, _ = params(tmp_path / name)
    for key in ref:
      np.testing.assert_allclose(got[key], ref[key], rtol=1e-3, atol=ATOL, err_msg=f'{name} {key}')


@pytest.mark.slow
def test_latent_sharded_step_never_gathers_the_batch_by_latent_matrix():
  """On a 1x8 mesh no collective moves a [B, F]-sized array (only its 1/8 shards and scalars)."""
  code = f"""
import re, sys
sys.path[:0] = [{REPO!r}, {os.path.join(REPO, "tests")!r}]
import jax
from helpers import tiny_config
from jaxsae import sharding, train_step

c = tiny_config(**{{"sae.d": 32, "sae.expansion_factor": 8, "sae.k": 4, "data.batch_size": 64,
                    "mesh.data": 1, "mesh.model": 8}})
mesh = sharding.make_mesh(c)
opt, sch, sc = train_step.make_optimizer(c), train_step.lr_schedule(c), train_step.StepConfig.from_config(c)
abstract = train_step.abstract_state(c)
sh = sharding.state_shardings(mesh, abstract)
step = jax.jit(lambda s, x: train_step.train_step(s, x, sc=sc, optimizer=opt, schedule=sch),
               in_shardings=(sh, sharding.batch_sharding(mesh)), out_shardings=(sh, None))
with jax.set_mesh(mesh):
  hlo = step.lower(abstract, jax.ShapeDtypeStruct((64, 32), jax.numpy.float32)).compile().as_text()
shapes = re.findall(r"= f32\\[([0-9,]+)\\][^ ]* (?:all-gather|all-to-all|all-reduce)\\(", hlo)
sizes = [eval("*".join(s.split(","))) for s in shapes]
print("collective sizes", sorted(sizes))
assert sizes and max(sizes) < 64 * 256, sizes
print("ok")
"""
  import subprocess, sys

  r = subprocess.run(
      [sys.executable, '-c', code],
      capture_output=True,
      text=True,
      timeout=300,
      env={**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'},
  )
  assert r.returncode == 0 and 'ok' in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
