"""Every sparse backend per shard (`kernels.sharded`) on meshes 8x1, 2x4 and 1x8 of simulated
devices, with and without the sharded optimizer, equals the same backend on one device and the
dense reference over several steps with AuxK active and an uneven batch (losses, parameters,
threshold, dead-latent counters); the compiled step holds no batch-by-latent array but the
encoder's output block. The runs are `mesh_runs.py` in a subprocess, so the suite keeps one
device."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO

pytestmark = [pytest.mark.multidevice, pytest.mark.slow]

HERE = os.path.dirname(os.path.abspath(__file__))
ENV = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
# (kernel, data, model, shard_optimizer); the references first.
REFERENCES = [('dense', 1, 1, False), ('cpu', 1, 1, False), ('xla', 1, 1, False)]
MESHES = [
    ('cpu', 8, 1, False),
    ('cpu', 8, 1, True),
    ('cpu', 2, 4, True),
    ('cpu', 2, 4, False),
    ('cpu', 1, 8, False),
    ('xla', 8, 1, True),
    ('xla', 2, 4, False),
    ('xla', 1, 8, False),
    ('pallas', 4, 1, True),  # the Triton kernels, interpreted on CPU
]
# Other meshes sum in another order, and Adam turns float32 rounding in near-zero gradients into
# differences up to ~lr/20 on a few weights; the selection must agree exactly (the dead-latent
# counters are compared bit for bit, the threshold to float rounding).
ATOL = 3e-4


@pytest.fixture(scope='module')
def runs():
  r = subprocess.run(
      [sys.executable, os.path.join(HERE, 'mesh_runs.py'), json.dumps(REFERENCES + MESHES)],
      capture_output=True,
      text=True,
      timeout=900,
      env=ENV,
      cwd=REPO,
  )
  assert r.returncode == 0, r.stderr[-4000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  return dict(zip(REFERENCES + MESHES, out))


def assert_same_training(got, ref, what):
  np.testing.assert_allclose(got['losses'], ref['losses'], rtol=1e-4, atol=1e-5, err_msg=what)
  for name, value in ref['params'].items():
    np.testing.assert_allclose(
        got['params'][name], value, rtol=1e-3, atol=ATOL, err_msg=f'{what} {name}'
    )
  np.testing.assert_allclose(got['threshold'], ref['threshold'], rtol=1e-5, err_msg=what)
  np.testing.assert_array_equal(got['tokens_since_fired'], ref['tokens_since_fired'], err_msg=what)


@pytest.mark.parametrize(
    'run', MESHES, ids=lambda r: f'{r[0]}-{r[1]}x{r[2]}{"-zero" if r[3] else ""}'
)
def test_sharded_step_equals_one_device_and_dense(runs, run):
  got = runs[run]
  kernel = got['kernel']
  assert kernel == {'pallas': 'pallas_gpu'}.get(run[0], run[0])
  assert_same_training(got, runs[('dense', 1, 1, False)], f'{run} vs dense')
  if (kernel, 1, 1, False) in runs:
    assert_same_training(got, runs[(kernel, 1, 1, False)], f'{run} vs one device')
  assert int(np.sum(np.asarray(got['tokens_since_fired']) >= 128)) > 0  # AuxK was exercised
  if kernel == 'cpu':
    assert all(s == 1.0 for s in got['sparse'])  # no dense fallback exists on this path
  else:
    assert sum(got['sparse']) > 0  # the sparse path ran (the dense one when a proof failed)


def test_sharded_step_holds_no_batch_by_latent_array_but_the_encoder_output():
  """On a 2x4 mesh (B/D=48 tokens, F/M=64 latents, d=32 per device, 5 groups) the only arrays as
  large as a [48, 64] block in the compiled step are the encoder matmul's output and the
  per-group partial decodes [5, 48, 32] the latent shards sum; nothing [B, F]-sized crosses
  devices."""
  code = f"""
import sys
sys.path[:0] = [{REPO!r}, {os.path.join(REPO, "tests")!r}]
import jax
from helpers import tiny_config
from jaxsae import sharding, train_step
c = tiny_config(**{{"sae.d": 32, "sae.expansion_factor": 8, "sae.k": 4, "data.batch_size": 96,
                    "mesh.data": 2, "mesh.model": 4, "sae.kernel": "cpu",
                    "sae.group_fractions": (1 / 16, 1 / 16, 1 / 8, 1 / 4, 1 / 2)}})
mesh = sharding.make_mesh(c)
opt, sch, sc = train_step.make_optimizer(c), train_step.lr_schedule(c), train_step.StepConfig.from_config(c)
abstract = train_step.abstract_state(c)
sh = sharding.state_shardings(mesh, abstract, sc.shard_optimizer)
step = jax.jit(lambda s, x: train_step.train_step(s, x, sc=sc, optimizer=opt, schedule=sch),
               in_shardings=(sh, sharding.batch_sharding(mesh)), out_shardings=(sh, None))
with jax.set_mesh(mesh):
  print(step.lower(abstract, jax.ShapeDtypeStruct((96, 32), jax.numpy.float32)).compile().as_text())
"""
  r = subprocess.run(
      [sys.executable, '-c', code], capture_output=True, text=True, timeout=300, env=ENV
  )
  assert r.returncode == 0, r.stderr[-3000:]
  hlo = r.stdout
  assert 'custom_call_target="jaxsae_select"' in hlo  # the native kernels run per shard
  arrays = re.findall(r'= [a-z0-9]+\[([0-9,]+)\]\{[^}]*\} ([a-z-]+)\(', hlo)
  large = [
      (shape, op) for shape, op in arrays if np.prod([int(v) for v in shape.split(',')]) >= 48 * 64
  ]
  assert {shape for shape, _ in large} == {'48,64', '5,48,32'}, large
  block_ops = [op for shape, op in large if shape == '48,64']
  assert block_ops.count('dot') == 1, block_ops  # one encoder matmul ...
  assert set(block_ops) <= {'dot', 'fusion', 'get-tuple-element', 'copy', 'bitcast'}, block_ops
  moved = re.findall(
      r'= f32\[([0-9,]+)\][^ ]* (?:all-gather|all-to-all|all-reduce|reduce-scatter)\(', hlo
  )
  sizes = [int(np.prod([int(v) for v in s.split(',')])) for s in moved]
  assert sizes and max(sizes) <= 5 * 48 * 32 < 96 * 256, sizes  # ... and no [B, F] collective
