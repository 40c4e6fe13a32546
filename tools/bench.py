"""Training-step throughput of jaxsae vs the one-matmul floor and the peer libraries, in one run.

    python tools/bench.py [--d 1024 --F 8192 --k 32 --batch 2048] [--peers-python .venv-peers/bin/python]

Prints a table: tokens/s and seconds per step of our compiled step, of one B x d x F float32 matmul
(the floor of a step, ../shared/DESIGN.md section 7) and our step as a multiple of it, and, when the
peer venv exists (see tools/bench_peers.py for how to create it), dictionary_learning's and
SAELens's Matryoshka BatchTopK steps on the same shapes. Machines are noisy: compare within a run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from jaxsae import config as config_lib  # pylint: disable=wrong-import-position
from jaxsae import model, train_step  # pylint: disable=wrong-import-position

GROUPS = (1 / 16, 1 / 16, 1 / 8, 1 / 4, 1 / 2)


def timed(fn, *args, steps: int, warmup: int = 1) -> float:
  """Median seconds of fn(*args) after warmup (compilation) calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return sorted(times)[len(times) // 2]


def bench_jaxsae(d: int, F: int, k: int, B: int, steps: int, kernel: str = 'auto') -> dict[str, float]:
  c = config_lib.default_config()
  c.sae.d, c.sae.dict_size, c.sae.k, c.sae.group_fractions = d, F, k, GROUPS
  c.sae.kernel = kernel
  c.data.batch_size, c.optim.warmup_steps, c.train.steps = B, 10, 10_000
  config_lib.validate(c)
  optimizer, schedule = train_step.make_optimizer(c), train_step.lr_schedule(c)
  sc = train_step.StepConfig.from_config(c)
  key_p, key_x = jax.random.split(jax.random.PRNGKey(0))
  state = train_step.init_state(model.init_params(key_p, d, F), optimizer)
  x = jax.random.normal(key_x, (B, d)) + 0.5
  step = jax.jit(lambda s, x: train_step.train_step(s, x, sc=sc, optimizer=optimizer,
                                                    schedule=schedule), donate_argnums=0)
  # Chain the state through the steps (donated buffers, as in training).
  holder = {'state': state, 'sparse': []}

  def run(x):
    holder['state'], m = step(holder['state'], x)
    holder['sparse'].append(m['sparse_path'])
    return m['loss']

  step_s = timed(run, x, steps=steps, warmup=2)
  sparse_fraction = float(sum(holder['sparse'][2:])) / steps
  W = jax.random.normal(key_p, (d, F)) / d**0.5
  matmul_s = timed(jax.jit(lambda a, b: a @ b), x, W, steps=steps)
  return {'step_s': step_s, 'matmul_s': matmul_s, 'sparse_fraction': sparse_fraction}


def bench_peers(python: str, d: int, F: int, k: int, B: int, steps: int) -> dict:
  cmd = [python, os.path.join(REPO, 'tools', 'bench_peers.py'), '--d', str(d), '--F', str(F),
         '--k', str(k), '--batch', str(B), '--groups', ','.join(str(g) for g in GROUPS),
         '--steps', str(steps), '--warmup', '1']
  r = subprocess.run(cmd, capture_output=True, text=True)
  if r.returncode != 0 or not r.stdout.strip():
    return {'error': (r.stderr or 'no output')[-500:]}
  return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--d', type=int, default=1024)
  p.add_argument('--F', type=int, default=8192)
  p.add_argument('--k', type=int, default=32)
  p.add_argument('--batch', type=int, default=2048)
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--kernels', default='dense,sparse', help="jaxsae kernels to time ('sae.kernel')")
  p.add_argument('--peers-python', default=os.path.join(REPO, '.venv-peers', 'bin', 'python'))
  args = p.parse_args()
  d, F, k, B = args.d, args.F, args.k, args.batch

  print(f'jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}; '
        f'd={d} F={F} k={k} B={B}, groups {len(GROUPS)}, float32', flush=True)
  rows, ours = [], None
  for kernel in args.kernels.split(','):
    res = bench_jaxsae(d, F, k, B, args.steps, kernel)
    ours = ours or res
    rows.append((f'jaxsae step, kernel={kernel}', res['step_s']))
    if kernel == 'sparse':
      print(f'(sparse kernel took the sparse path on {res["sparse_fraction"]:.0%} of timed steps)')
  rows.insert(0, ('one B x d x F matmul (floor)', ours['matmul_s']))
  if os.path.exists(args.peers_python):
    peers = bench_peers(args.peers_python, d, F, k, B, args.steps)
    for lib, res in peers.items():
      if 'error' in res:
        print(f'{lib}: failed: {res["error"]}')
      else:
        rows.append((f'{lib} step', res['step_s']))
  else:
    print(f'(peer libraries not timed: no interpreter at {args.peers_python}; '
          'see tools/bench_peers.py to create .venv-peers)')

  best = min(s for name, s in rows if name.startswith('jaxsae'))
  print(f'\n{"":34s} {"s/step":>8s} {"tokens/s":>10s} {"x floor":>8s} {"vs best jaxsae":>15s}')
  for name, s in rows:
    print(f'{name:34s} {s:8.4f} {B / s:10.0f} {s / ours["matmul_s"]:8.2f} {s / best:14.2f}x')


if __name__ == '__main__':
  main()
