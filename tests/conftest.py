"""Shared helpers: tiny configs and running the real command-line entry points."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNTHETIC = os.path.join(REPO, 'experiments', 'synthetic.py')

# A few-second synthetic run: every code path (warmup, decay, threshold EMA, AuxK) within 40 steps.
TINY = {
    'sae.d': 16, 'sae.expansion_factor': 4, 'sae.k': 4, 'data.batch_size': 64,
    'data.synthetic.n_features': 32, 'data.synthetic.mean_active': 3.0,
    'data.synthetic.n_parents': 2, 'data.synthetic.children_per_parent': 2,
    'data.scale_estimate_batches': 2, 'sae.threshold_start_step': 10,
    'sae.dead_tokens_threshold': 256, 'optim.lr': 3e-3, 'optim.warmup_steps': 5,
    'optim.decay_start': 30, 'train.steps': 40, 'train.log_every': 10,
    'train.checkpoint_every': 5, 'train.progress_bar': False,
}


def tiny_config(**overrides):
  """The synthetic experiment shrunk to TINY, as a ConfigDict (for in-process tests)."""
  sys.path.insert(0, REPO)
  from experiments import synthetic  # pylint: disable=import-outside-toplevel
  c = synthetic.get_config()
  for key, value in {**TINY, **overrides}.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def cli_args(module, config=SYNTHETIC, workdir=None, **overrides):
  """argv for `python -m module --config=... --workdir=... --config.a.b=v` with TINY applied."""
  args = [sys.executable, '-m', module, f'--config={config}']
  if workdir is not None:
    args.append(f'--workdir={workdir}')
  args += [f'--config.{k}={v}' for k, v in {**TINY, **overrides}.items()]
  return args


def run_cli(args, env_extra=None, **kw):
  env = {**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu', **(env_extra or {})}
  return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture
def repo():
  return REPO
