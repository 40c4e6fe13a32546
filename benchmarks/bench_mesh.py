"""The training step on a (data x model) device mesh vs that mesh's sharded encoder matmul, in one run.

    python benchmarks/bench_mesh.py --mesh 2x4 [--d 1024 --F 8192 --k 32 --batch 2048]
        [--kernels auto,dense] [--shard-optimizer both|on|off] [--dtype float32|bfloat16]
        [--train]

On CPU the devices are simulated (`--xla_force_host_platform_device_count`, set here before JAX
starts: all of them share this machine's cores); elsewhere the mesh takes real devices. For each
kernel (and optimizer layout) it prints the compiled step's seconds and tokens/s, its multiple of
the floor (one B x d x F matmul split over the same mesh, x in P('data'), W_enc in P(None,
'model')), the per-device memory XLA's buffer assignment gives the compiled step, and the
per-device FLOPs and bytes of XLA's cost analysis. --train also runs `python -m jaxsae.train` on
synthetic data with the same shapes and mesh and reports its logged tokens/s against the floor.
Machines are noisy: compare rows within a run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def parse_args() -> argparse.Namespace:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  ap.add_argument('--mesh', default='2x4', help='DATAxMODEL, e.g. 2x4, 8x1')
  ap.add_argument('--d', type=int, default=1024)
  ap.add_argument('--F', type=int, default=8192)
  ap.add_argument('--k', type=int, default=32)
  ap.add_argument('--batch', type=int, default=2048)
  ap.add_argument('--steps', type=int, default=8)
  ap.add_argument('--kernels', default='auto,dense')
  ap.add_argument('--shard-optimizer', default='both', choices=('both', 'on', 'off'))
  ap.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
  ap.add_argument('--train', action='store_true', help='also time python -m jaxsae.train')
  return ap.parse_args()


ARGS = parse_args() if __name__ == '__main__' else None
if ARGS is not None:
  DATA, MODEL = (int(v) for v in ARGS.mesh.lower().split('x'))
  if os.environ.get('JAX_PLATFORMS', 'cpu') in ('', 'cpu') and 'device_count' not in os.environ.get(
      'XLA_FLAGS', ''
  ):
    os.environ['XLA_FLAGS'] = (
        os.environ.get('XLA_FLAGS', '') + f' --xla_force_host_platform_device_count={DATA * MODEL}'
    ).strip()

# pylint: disable=wrong-import-position (JAX must see XLA_FLAGS first)
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxsae import config as config_lib
from jaxsae import host_memory
from jaxsae import model, sharding, train_step
from timing import GROUPS, memory_bytes, timed


def make_config(args, data: int, model_: int, kernel: str, shard_optimizer: bool):
  c = config_lib.default_config()
  c.sae.d, c.sae.dict_size, c.sae.k, c.sae.group_fractions = args.d, args.F, args.k, GROUPS
  c.sae.kernel, c.sae.dtype = kernel, args.dtype
  c.data.batch_size, c.optim.warmup_steps, c.train.steps = args.batch, 10, 10_000
  c.mesh.data, c.mesh.model = data, model_
  c.mesh.shard_optimizer = 'on' if shard_optimizer else 'off'
  config_lib.validate(c, num_devices=data * model_)
  return c


def cost(compiled) -> tuple[float, float]:
  """Per-device FLOPs and bytes accessed, from XLA's cost analysis of the partitioned module."""
  ca = compiled.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  return float(ca.get('flops', -1)), float(ca.get('bytes accessed', -1))


def bench_step(args, mesh, c) -> dict:
  optimizer, schedule = train_step.make_optimizer(c), train_step.lr_schedule(c)
  sc = train_step.StepConfig.from_config(c)
  abstract = train_step.abstract_state(c)
  shardings = sharding.state_shardings(mesh, abstract, sc.shard_optimizer)
  batch_sharding = sharding.batch_sharding(mesh)
  key_p, key_x = jax.random.split(jax.random.PRNGKey(0))
  state = jax.jit(
      lambda: train_step.init_state(model.init_params(key_p, args.d, args.F), optimizer),
      out_shardings=shardings,
  )()
  x = jax.device_put(
      (jax.random.normal(key_x, (args.batch, args.d)) + 0.5).astype(args.dtype), batch_sharding
  )
  step = jax.jit(
      lambda s, x: train_step.train_step(s, x, sc=sc, optimizer=optimizer, schedule=schedule),
      in_shardings=(shardings, batch_sharding),
      out_shardings=(shardings, None),
      donate_argnums=0,
  )
  with jax.set_mesh(mesh):
    compiled = step.lower(state, x).compile()
    holder = {'state': state, 'sparse': []}

    def run(x):
      holder['state'], m = compiled(holder['state'], x)
      holder['sparse'].append(m['sparse_path'])
      return m['loss']

    seconds = timed(run, x, steps=args.steps, warmup=2)
  flops, nbytes = cost(compiled)
  return {
      'kernel': sc.kernel,
      'shard_optimizer': sc.shard_optimizer,
      'step_s': seconds,
      'sparse_fraction': float(sum(holder['sparse'][2:])) / args.steps,
      'memory': memory_bytes(compiled),
      'flops': flops,
      'bytes': nbytes,
  }


def bench_floor(args, mesh) -> dict:
  key_w, key_x = jax.random.split(jax.random.PRNGKey(1))
  x = jax.device_put(
      jax.random.normal(key_x, (args.batch, args.d)).astype(args.dtype),
      NamedSharding(mesh, P('data', None)),
  )
  W = jax.device_put(
      jax.random.normal(key_w, (args.d, args.F)).astype(args.dtype) / args.d**0.5,
      NamedSharding(mesh, P(None, 'model')),
  )
  matmul = (
      jax.jit(
          lambda a, b: jnp.matmul(a, b, preferred_element_type=jnp.float32),
          out_shardings=NamedSharding(mesh, P('data', 'model')),
      )
      .lower(x, W)
      .compile()
  )
  flops, nbytes = cost(matmul)
  return {
      'step_s': timed(matmul, x, W, steps=args.steps),
      'memory': memory_bytes(matmul),
      'flops': flops,
      'bytes': nbytes,
  }


def bench_train_cli(args, data: int, model_: int) -> float:
  """tokens/s that `python -m jaxsae.train` logs on synthetic data: the median of its 10-step
  windows after the first."""
  with tempfile.TemporaryDirectory() as workdir:
    steps = 60
    cmd = [
        sys.executable,
        '-m',
        'jaxsae.train',
        '--config=' + os.path.join(REPO, 'experiments', 'synthetic.py'),
        f'--workdir={workdir}',
        f'--config.sae.d={args.d}',
        f'--config.sae.dict_size={args.F}',
        f'--config.sae.expansion_factor={max(1, args.F // args.d)}',
        f'--config.sae.k={args.k}',
        f'--config.sae.dtype={args.dtype}',
        f'--config.data.batch_size={args.batch}',
        f'--config.mesh.data={data}',
        f'--config.mesh.model={model_}',
        f'--config.train.steps={steps}',
        '--config.train.log_every=10',
        '--config.optim.warmup_steps=10',
        '--config.optim.decay_start=None',
        f'--config.train.checkpoint_every={steps}',
        f'--config.train.eval_tokens={args.batch}',
        '--config.train.progress_bar=False',
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=dict(os.environ))
    if r.returncode != 0:
      print(r.stderr[-3000:], file=sys.stderr)
      return float('nan')
    rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
    rates = [row['tokens_per_s'] for row in rows if 'tokens_per_s' in row]
    return statistics.median(rates[1:])  # the first window holds the compilation


def main() -> None:
  args = ARGS
  host_memory.reuse_freed_memory()
  data, model_ = DATA, MODEL
  mesh = sharding.make_mesh(make_config(args, data, model_, 'dense', True), jax.devices())
  print(
      f'mesh {data}x{model_} on {jax.device_count()} {jax.default_backend()} devices; '
      f'd={args.d} F={args.F} k={args.k} B={args.batch} {args.dtype}'
  )
  floor = bench_floor(args, mesh)
  layouts = {'both': (True, False), 'on': (True,), 'off': (False,)}[args.shard_optimizer]
  rows = []
  for kernel in args.kernels.split(','):
    for zero in layouts if data > 1 else (False,):
      rows.append(bench_step(args, mesh, make_config(args, data, model_, kernel, zero)))
  B = args.batch
  print(
      f'\n| | s/step | tokens/s | x floor | memory MB/device | GFLOP/device | GB/device |\n'
      '|---|---|---|---|---|---|---|'
  )

  def line(name, r):
    print(
        f'| {name} | {r["step_s"]:.4f} | {B / r["step_s"]:,.0f} | '
        f'{r["step_s"] / floor["step_s"]:.2f} | {r["memory"] / 2**20:.0f} | '
        f'{r["flops"] / 1e9:.2f} | {r["bytes"] / 1e9:.3f} |'
    )

  line('sharded encoder matmul (floor)', floor)
  for r in rows:
    name = f'step, kernel={r["kernel"]}' + (', sharded optimizer' if r['shard_optimizer'] else '')
    if r['sparse_fraction'] < 1 and r['kernel'] != 'dense':
      name += f' (sparse path {r["sparse_fraction"]:.0%} of steps)'
    line(name, r)
  if args.train:
    tps = bench_train_cli(args, data, model_)
    floor_tps = B / floor['step_s']
    print(
        f'\npython -m jaxsae.train (auto kernel, synthetic data): {tps:,.0f} tokens/s = '
        f'{floor_tps / tps:.2f}x the floor'
    )


if __name__ == '__main__':
  main()
