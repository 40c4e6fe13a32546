"""Training-step throughput of jaxsae vs the one-matmul floor and the peer libraries, in one run.

    python benchmarks/bench.py [--d 1024 --F 8192 --k 32 --batch 2048]
        [--kernels dense,xla,cpu,pallas] [--dtypes float32,bfloat16]
        [--paper [--paper-batch 4096]] [--peers-python .venv-peers/bin/python | --no-peers]
        [--no-reuse-host-memory]

Prints a table: tokens/s and seconds per step of our compiled step for each `sae.kernel`, of one
B x d x F float32 matmul and our step as a multiple of it (the floor of a step: the encoder
matmul is unavoidable, while after the batch top-k only B*k activations are non-zero, so decoding
and the gradients need only O(B*k*d) work), of that matmul plus the optimizer's clipped Adam
update in one call (work every exact step must do: with optax's update, and with the native
in-place one kernel=cpu uses, the lower bound of that step), the device memory each compiled call
holds (XLA's memory analysis: arguments + outputs - donated aliases + temporaries), and, when the
peer venv exists (benchmarks/peers/bench_peers.py says how to create it), dictionary_learning's
and SAELens's Matryoshka BatchTopK steps on the same shapes. --paper adds a second table at the
paper's width (d=4096, F=16384, k=64). kernel=pallas is timed only on a GPU (elsewhere it would
run interpreted), kernel=cpu only on the CPU backend.
Both this process and the peers' run with freed host memory kept for reuse
(`jaxsae/host_memory.py`, as `python -m jaxsae.train` does), unless --no-reuse-host-memory.
Machines are noisy: compare within a run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess

import jax
import jax.numpy as jnp
import optax

from jaxsae import config as config_lib
from jaxsae import host_memory
from jaxsae import kernels, model, train_step
from timing import GROUPS, memory_bytes, timed

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def bench_jaxsae(
    d: int, F: int, k: int, B: int, steps: int, kernel: str = 'auto', dtype: str = 'float32'
) -> dict[str, float]:
  c = config_lib.default_config()
  c.sae.d, c.sae.dict_size, c.sae.k, c.sae.group_fractions = d, F, k, GROUPS
  c.sae.kernel, c.sae.dtype = kernel, dtype
  c.data.batch_size, c.optim.warmup_steps, c.train.steps = B, 10, 10_000
  config_lib.validate(c)
  optimizer, schedule = train_step.make_optimizer(c), train_step.lr_schedule(c)
  sc = train_step.StepConfig.from_config(c)
  key_p, key_x = jax.random.split(jax.random.PRNGKey(0))
  state = train_step.init_state(model.init_params(key_p, d, F), optimizer)
  x = (jax.random.normal(key_x, (B, d)) + 0.5).astype(dtype)  # a bfloat16 store's batches
  step = jax.jit(
      lambda s, x: train_step.train_step(s, x, sc=sc, optimizer=optimizer, schedule=schedule),
      donate_argnums=0,
  )
  step = step.lower(state, x).compile()  # compiled once, for its memory analysis and the timing
  # Chain the state through the steps (donated buffers, as in training).
  holder = {'state': state, 'sparse': []}

  def run(x):
    holder['state'], m = step(holder['state'], x)
    holder['sparse'].append(m['sparse_path'])
    return m['loss']

  step_s = timed(run, x, steps=steps, warmup=2)
  sparse_fraction = float(sum(holder['sparse'][2:])) / steps
  W = (jax.random.normal(key_p, (d, F)) / d**0.5).astype(dtype)
  matmul = (
      jax.jit(lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32))
      .lower(x, W)
      .compile()
  )
  matmul_s = timed(matmul, x, W, steps=steps)
  return {
      'step_s': step_s,
      'matmul_s': matmul_s,
      'sparse_fraction': sparse_fraction,
      'step_bytes': memory_bytes(step),
      'matmul_bytes': memory_bytes(matmul),
      'resolved': sc.kernel,
      'bound_s': matmul_plus_adam(holder['state'], x, W, optimizer, steps),
      'native_bound_s': (
          matmul_plus_adam(holder['state'], x, W, optimizer, steps, sc, schedule)
          if sc.kernel == 'cpu'
          else None
      ),
  }


def matmul_plus_adam(
    state: dict,
    x: jax.Array,
    W: jax.Array,
    optimizer,
    steps: int,
    sc: train_step.StepConfig | None = None,
    schedule=None,
) -> float:
  """Seconds of the encoder matmul plus the clipped Adam update of all parameters, in one
  donated call: work every exact step of the method must do. With `sc`, the update is the
  'cpu' backend's native in-place one (`kernels.get('cpu').update`), else optax's."""
  grads = jax.tree.map(lambda p: 1e-3 * p, state['params'])

  def bound(params, opt_state, x, W):
    if sc is None:
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return x @ W, optax.apply_updates(params, updates), opt_state
    params, opt_state = kernels.get(sc.kernel).update(
        params, opt_state, grads, optax.tree.norm(grads), jnp.bool_(True), sc, optimizer, schedule
    )
    return x @ W, params, opt_state

  fn = (
      jax.jit(bound, donate_argnums=(0, 1))
      .lower(state['params'], state['opt_state'], x, W)
      .compile()
  )
  holder = {
      'p': jax.tree.map(jnp.copy, state['params']),
      'o': jax.tree.map(jnp.copy, state['opt_state']),
  }

  def run(x):
    out, holder['p'], holder['o'] = fn(holder['p'], holder['o'], x, W)
    return out

  return timed(run, x, steps=steps)


def bench_peers(
    python: str, d: int, F: int, k: int, B: int, steps: int, reuse_host_memory: bool
) -> dict:
  cmd = [
      python,
      os.path.join(HERE, 'peers', 'bench_peers.py'),
      '--d',
      str(d),
      '--F',
      str(F),
      '--k',
      str(k),
      '--batch',
      str(B),
      '--groups',
      ','.join(str(g) for g in GROUPS),
      '--steps',
      str(steps),
      '--warmup',
      '1',
  ]
  if reuse_host_memory:
    cmd.append('--reuse-host-memory')
  r = subprocess.run(cmd, capture_output=True, text=True)
  if r.returncode != 0 or not r.stdout.strip():
    return {'error': (r.stderr or 'no output')[-500:]}
  return json.loads(r.stdout.strip().splitlines()[-1])


def bench_block(d: int, F: int, k: int, B: int, args) -> None:
  """One table: the floor, each requested jaxsae kernel, and (if their venv exists) the peers."""
  print(
      f'\njax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}; '
      f'd={d} F={F} k={k} B={B}, groups {len(GROUPS)}, {args.dtypes}',
      flush=True,
  )
  on_gpu = jax.default_backend() in kernels.GPU_BACKENDS
  rows, ours, results = [], None, []
  for kernel, dtype in [(k_, t) for t in args.dtypes.split(',') for k_ in args.kernels.split(',')]:
    if kernel == 'pallas' and not on_gpu and not args.interpret_pallas:
      print(
          '(kernel=pallas skipped: no GPU, and interpreted it is very slow at these sizes; '
          '--interpret-pallas times it anyway)'
      )
      continue
    if kernel == 'cpu' and jax.default_backend() != 'cpu':
      print('(kernel=cpu skipped: it runs on the CPU backend only)')
      continue
    res = bench_jaxsae(d, F, k, B, args.steps, kernel, dtype)
    results.append(res)
    ours = ours or res
    if dtype != 'float32' and not any(r.get('dtype') == dtype for r in results[:-1]):
      rows.append((f'one matmul, {dtype} operands', res['matmul_s'], res['matmul_bytes']))
    res['dtype'] = dtype
    tag = '' if dtype == 'float32' else f', {dtype}'
    rows.append((f'jaxsae step, kernel={kernel}{tag}', res['step_s'], res['step_bytes']))
    if res['resolved'] != 'dense':
      print(
          f'(kernel={kernel} ran {res["resolved"]!r} and took the sparse path on '
          f'{res["sparse_fraction"]:.0%} of timed steps)',
          flush=True,
      )
  if ours is None:
    return
  rows.insert(0, ('one B x d x F matmul (floor)', ours['matmul_s'], ours['matmul_bytes']))
  rows.insert(1, ('floor + Adam (optax)', ours['bound_s'], -1))
  native = next((r['native_bound_s'] for r in results if r['native_bound_s']), None)
  if native:
    rows.insert(2, ('floor + Adam (native, in place)', native, -1))
  if args.peers and os.path.exists(args.peers_python):
    peers = bench_peers(args.peers_python, d, F, k, B, args.steps, args.reuse_host_memory)
    for lib, res in peers.items():
      if 'error' in res:
        print(f'{lib}: failed: {res["error"]}')
      else:
        rows.append((f'{lib} step', res['step_s'], -1))
  elif args.peers:
    print(
        f'(peer libraries not timed: no interpreter at {args.peers_python}; '
        'see benchmarks/peers/bench_peers.py to create .venv-peers)'
    )

  best = min(s for name, s, _ in rows if name.startswith('jaxsae step'))
  peer_s = {
      name.split()[0]: s
      for name, s, _ in rows
      if name.endswith(' step') and not name.startswith('jaxsae')
  }
  print(
      f'\n{"":34s} {"s/step":>8s} {"tokens/s":>10s} {"x floor":>8s} {"vs best jaxsae":>15s} '
      f'{"memory GB":>10s}'
  )
  for name, s, mem in rows:
    mem_s = f'{mem / 1e9:10.3f}' if mem >= 0 else f'{"-":>10s}'
    print(
        f'{name:34s} {s:8.4f} {B / s:10.0f} {s / ours["matmul_s"]:8.2f} {s / best:14.2f}x '
        f'{mem_s}',
        flush=True,
    )
  for lib, s in peer_s.items():
    print(f'best jaxsae step: {s / best:.2f}x the tokens/s of {lib}')


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--d', type=int, default=1024)
  p.add_argument('--F', type=int, default=8192)
  p.add_argument('--k', type=int, default=32)
  p.add_argument('--batch', type=int, default=2048)
  p.add_argument('--steps', type=int, default=5)
  p.add_argument(
      '--kernels',
      default='dense,xla,cpu,pallas',
      help="jaxsae kernels to time ('sae.kernel': auto, dense, xla, pallas, cpu; pallas "
      'is skipped without a GPU unless --interpret-pallas, cpu off the CPU backend)',
  )
  p.add_argument(
      '--dtypes',
      default='float32',
      help="sae.dtype values to time, e.g. 'float32,bfloat16' (the encoder matmul's operands; "
      "'x floor' stays relative to the first dtype's matmul)",
  )
  p.add_argument(
      '--interpret-pallas',
      action='store_true',
      help='time kernel=pallas without a GPU too (interpret mode: very slow)',
  )
  p.add_argument(
      '--paper',
      action='store_true',
      help="also time the paper's width, d=4096 F=16384 k=64, in the same run",
  )
  p.add_argument(
      '--paper-batch',
      type=int,
      default=None,
      help='batch for --paper (default 4096 on a GPU, 1024 elsewhere)',
  )
  p.add_argument(
      '--no-peers',
      dest='peers',
      action='store_false',
      help='skip dictionary_learning / SAELens even if .venv-peers exists',
  )
  p.add_argument('--peers-python', default=os.path.join(REPO, '.venv-peers', 'bin', 'python'))
  p.add_argument(
      '--no-reuse-host-memory',
      dest='reuse_host_memory',
      action='store_false',
      help="glibc's default malloc for both sides (see jaxsae/host_memory.py)",
  )
  args = p.parse_args()
  if args.reuse_host_memory:
    args.reuse_host_memory = host_memory.reuse_freed_memory()
  print(f'freed host memory kept for reuse: {args.reuse_host_memory}')

  bench_block(args.d, args.F, args.k, args.batch, args)
  if args.paper:
    on_gpu = jax.default_backend() in kernels.GPU_BACKENDS
    B = args.paper_batch or (4096 if on_gpu else 1024)
    bench_block(4096, 16384, 64, B, args)


if __name__ == '__main__':
  main()
