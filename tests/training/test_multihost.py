"""Two processes on loopback (gloo CPU collectives) train and checkpoint one SAE together, and get
what one process with the same four devices gets."""

import pytest
import os
import socket
import subprocess

import numpy as np

from helpers import REPO, cli_args, run_cli
from jaxsae import weights

pytestmark = pytest.mark.multidevice

OVERRIDES = {
    'train.steps': 20,
    'train.checkpoint_every': 10,
    'optim.decay_start': 15,
    'data.batch_size': 64,
}


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  port = free_port()
  env = {**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu'}
  procs = [
      subprocess.Popen(
          cli_args(
              'jaxsae.train',
              workdir=str(tmp_path / 'multi'),
              **OVERRIDES,
              **{
                  'distributed.enabled': True,
                  'distributed.coordinator_address': f'127.0.0.1:{port}',
                  'distributed.num_processes': 2,
                  'distributed.process_id': i,
                  'distributed.local_device_count': 2,
              },
          ),
          cwd=REPO,
          env=env,
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
      )
      for i in range(2)
  ]
  outputs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  r = run_cli(
      cli_args('jaxsae.train', workdir=str(tmp_path / 'single'), **OVERRIDES),
      env_extra={'XLA_FLAGS': '--xla_force_host_platform_device_count=4'},
  )
  assert r.returncode == 0, r.stderr[-3000:]

  assert sorted(os.listdir(tmp_path / 'multi' / 'checkpoints')) == ['10', '20']
  _, multi, _, _ = weights.load_checkpoint(str(tmp_path / 'multi'))
  _, single, _, _ = weights.load_checkpoint(str(tmp_path / 'single'))
  for name in single['params']:
    np.testing.assert_allclose(
        multi['params'][name], single['params'][name], rtol=1e-5, atol=1e-6, err_msg=name
    )
  assert (tmp_path / 'multi' / 'summary.json').exists()  # written once, by process 0
