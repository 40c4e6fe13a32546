"""A run killed with `kill -9` at any moment, mid-save included, and restarted, ends with exactly
the weights of a run that was never interrupted."""

import pytest
import os
import random
import signal
import subprocess
import time

import numpy as np

from helpers import REPO, cli_args, run_cli
from jaxsae import weights

STEPS = 60


def final_params(workdir):
  step, state, _, _ = weights.load_checkpoint(workdir)
  assert step == STEPS
  return {k: np.asarray(v) for k, v in state['params'].items()}, state


@pytest.mark.slow
def test_kill_minus_9_and_resume_is_bit_identical(tmp_path, faults):
  overrides = {'train.steps': STEPS, 'train.checkpoint_every': 2}
  clean = str(tmp_path / 'clean')
  r = run_cli(cli_args('jaxsae.train', workdir=clean, **overrides))
  assert r.returncode == 0, r.stderr[-3000:]

  killed = str(tmp_path / 'killed')
  env = {**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu'}
  rng = random.Random(0)
  kills = 0
  for attempt in range(8):
    proc = subprocess.Popen(
        cli_args('jaxsae.train', workdir=killed, **overrides),
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt_dir = os.path.join(killed, 'checkpoints')
    deadline = time.time() + 120
    # Wait until training is under way (a checkpoint directory is being written), then kill at a
    # random moment: with a save every 2 steps, many kills land inside a save.
    while (
        time.time() < deadline
        and proc.poll() is None
        and not (os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir))
    ):
      time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 0.6))
    if proc.poll() is not None:
      break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kills += 1
  print(f'killed {kills} times; checkpoints now {sorted(os.listdir(ckpt_dir))}')
  assert kills >= 2, 'the run finished before it could be killed twice; make it longer'
  faults.inject('kill -9 during training (checkpoint saves)', kills)
  r = run_cli(cli_args('jaxsae.train', workdir=killed, **overrides))
  assert r.returncode == 0, r.stderr[-3000:]

  a, state_a = final_params(clean)
  b, state_b = final_params(killed)
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)
  np.testing.assert_array_equal(state_a['threshold'], state_b['threshold'])
  np.testing.assert_array_equal(state_a['tokens_since_fired'], state_b['tokens_since_fired'])
  # metrics.jsonl reads as one run: every logged step exactly once.
  steps = [
      int(l.split('"step": ')[1].split(',')[0]) for l in open(os.path.join(killed, 'metrics.jsonl'))
  ]
  assert steps == sorted(set(steps))


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_stops_cleanly(tmp_path):
  workdir = str(tmp_path / 'run')
  env = {**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.Popen(
      cli_args(
          'jaxsae.train',
          workdir=workdir,
          **{'train.steps': 100000, 'train.checkpoint_every': 50000},
      ),
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )
  metrics = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 120
  while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics)):
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err[-2000:]
  assert 'checkpoint saved' in err and 'Rerun the same command to resume' in err
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, 'checkpoints')))
  assert len(steps) == 1 and 10 <= steps[0] < 50000  # saved where it stopped, not at a schedule
