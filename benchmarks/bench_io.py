"""Activation-store I/O, in one run: the store vs raw disk, the grain loader vs the training step,
and the export's cost on the model's forward pass.

    python benchmarks/bench_io.py [--rows 1000000 --d 1024] [--dir /tmp/jaxsae_bench_io]
        [--skip-export]

1. Store write and read (sequential, and random rows as training reads them) of a rows x d
   float32 array, next to raw disk for the same bytes (one flat file, fsync'd as the store is).
   Files are evicted from the page cache (posix_fadvise DONTNEED) before each read, so reads come
   from the disk, not from memory.
2. The grain loader (seeded global shuffle, B rows per batch, threads + prefetch, as training runs
   it) in rows/s, as a multiple of what the training step consumes at d=1024, F=8192, k=32,
   B=2048 (the step timed here by benchmarks/bench.py's bench_jaxsae), and the step's time when the
   loader feeds it vs a batch already in memory.
3. The export: its forward pass with and without the hook and the store writes (a random LLaVA
   of width --export-hidden on the demo studies; all token kinds kept, so the most rows are
   written), then benchmarks/bench_export.py on --export-studies realistic studies (2500 x 3000
   JPEGs, a tiny MAIRA-2): studies/s and input wait of the pipelined export with 0, 1, 2
   preparation workers and with 1 vs 2 exporting processes, and what that predicts for a GPU.
   `--export-only` runs this section alone; `--skip-export` leaves it out.
Needs about 2 x rows x d x 4 bytes of free disk in --dir, which is deleted afterwards (the export
benchmark's generated studies are kept, for reuse, in its own --dir: bench_export.py --help).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from jaxsae.data import store_source
from jaxsae.formats import store

BLOCK = 16384  # rows per write call (an exporter's buffered commit)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tools_script(name: str):
  """A script of the repository's tools/ (not part of the installed package), imported by path."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, 'tools', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _evict(path: str) -> None:
  """Drop `path`'s (a file's, or every file's below a directory) pages from the page cache."""
  files = (
      [path]
      if os.path.isfile(path)
      else [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs]
  )
  for f in files:
    fd = os.open(f, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def _data(rows: int, d: int):
  """Blocks of distinct float32 rows without generating rows x d random numbers."""
  base = np.random.default_rng(0).standard_normal((BLOCK, d), dtype=np.float32)
  for start in range(0, rows, BLOCK):
    n = min(BLOCK, rows - start)
    yield base[:n] + np.float32(start / rows)


def bench_store(root: str, rows: int, d: int, batch: int) -> dict[str, float]:
  out = {}
  nbytes = rows * d * 4
  raw_path, store_path = os.path.join(root, 'raw.f32'), os.path.join(root, 'store')
  # Raw disk: append blocks to one file, fsync (TensorStore's file driver fsyncs its writes).
  t = time.perf_counter()
  with open(raw_path, 'wb') as f:
    for x in _data(rows, d):
      f.write(x.tobytes())
    f.flush()
    os.fsync(f.fileno())
  out['raw write'] = time.perf_counter() - t
  # The store, as the exporter writes it: buffered blocks, committed in a background thread.
  t = time.perf_counter()
  w = store.StoreWriter(
      store_path, d, 'float32', {'bench': True}, rows_per_chunk=4, rows_per_shard=4096
  )
  tokens = np.zeros((BLOCK, len(store.TOKEN_COLUMNS)), np.int32)
  for i, x in enumerate(_data(rows, d)):
    w.append(
        x,
        tokens[: len(x)],
        [{'study_id': str(i), 'manifest_index': i, 'row_start': 0, 'rows': len(x)}],
    )
  w.close()
  out['store write'] = time.perf_counter() - t
  # Sequential reads, from disk.
  _evict(raw_path)
  t = time.perf_counter()
  with open(raw_path, 'rb') as f:
    while f.read(BLOCK * d * 4):
      pass
  out['raw read'] = time.perf_counter() - t
  _evict(store_path)
  s = store.open_store(store_path)
  t = time.perf_counter()
  for start in range(0, rows, BLOCK):
    s.read_range(start, min(rows, start + BLOCK))
  out['store read'] = time.perf_counter() - t
  # Random rows (what a shuffled batch reads), from disk: pread per row vs one store read.
  rng = np.random.default_rng(1)
  n_random = 20 * batch
  _evict(raw_path)
  fd = os.open(raw_path, os.O_RDONLY)
  t = time.perf_counter()
  for _ in range(n_random // batch):
    for i in np.sort(rng.integers(0, rows, batch)):
      os.pread(fd, d * 4, int(i) * d * 4)
  out['raw random'] = time.perf_counter() - t
  os.close(fd)
  _evict(store_path)
  s = store.open_store(store_path)
  t = time.perf_counter()
  for _ in range(n_random // batch):
    s.read(rng.integers(0, rows, batch))
  out['store random'] = time.perf_counter() - t
  out['n_random'] = n_random
  out['nbytes'] = nbytes
  return out


def bench_loader(store_path: str, batch: int, threads: int, prefetch: int, n: int) -> float:
  """Rows/s of the training input pipeline (shuffled), from disk."""
  _evict(store_path)
  src = store_source.StoreSource(
      store.open_store(store_path), batch, seed=0, num_threads=threads, prefetch=prefetch
  )
  it = src.iterator()
  next(it)  # start-up (threads, first read) is not throughput
  t = time.perf_counter()
  for _ in range(n):
    next(it)
  rate = n * batch / (time.perf_counter() - t)
  it.close()
  return rate


def bench_fed_step(
    store_path: str, d: int, F: int, k: int, B: int, steps: int, threads: int, prefetch: int
) -> tuple[float, float]:
  """Seconds per training step fed from memory, and fed by the loader (both compete for cores)."""
  # pylint: disable=import-outside-toplevel
  import jax
  from jaxsae import config as config_lib, model, train_step
  from timing import GROUPS, timed

  c = config_lib.default_config()
  c.sae.d, c.sae.dict_size, c.sae.k, c.sae.group_fractions = d, F, k, GROUPS
  c.data.batch_size, c.optim.warmup_steps, c.train.steps = B, 10, 10_000
  optimizer, schedule = train_step.make_optimizer(c), train_step.lr_schedule(c)
  sc = train_step.StepConfig.from_config(c)
  state = train_step.init_state(model.init_params(jax.random.PRNGKey(0), d, F), optimizer)
  step = jax.jit(
      lambda s, x: train_step.train_step(s, x, sc=sc, optimizer=optimizer, schedule=schedule),
      donate_argnums=0,
  )
  src = store_source.StoreSource(
      store.open_store(store_path), B, seed=0, num_threads=threads, prefetch=prefetch
  )
  holder = {'state': state}

  def run(x):
    holder['state'], m = step(holder['state'], x)
    return m

  # Means, not medians: a step left waiting for the loader must count.
  mem = timed(run, src.batch(0), steps=steps, stat=statistics.fmean)  # warmup call compiles
  it = src.iterator()
  next(it)
  fed = timed(lambda: run(next(it)), steps=steps, warmup=0, stat=statistics.fmean)
  it.close()
  return mem, fed


def bench_export(
    root: str, hidden: int, layers: int, studies: int, batch: int, repeats: int
) -> dict[str, float]:
  """Median seconds per forward batch: plain, with hook + store writes, and stopping at layer L."""
  import torch  # pylint: disable=import-outside-toplevel

  make_demo_data = _tools_script('make_demo_data')
  from jaxsae.bridge import export, loading, manifest, prompt, tiny_model  # noqa
  from jaxsae.config import default_config  # pylint: disable=import-outside-toplevel

  data = os.path.join(root, 'demo')
  rows = make_demo_data.make_studies(data, studies)
  tiny_model.build(
      os.path.join(data, 'model'),
      tiny_model.words(make_demo_data.vocabulary_texts(rows)),
      hidden=hidden,
      layers=layers,
      heads=8,
  )
  c = default_config()
  c.model.name, c.model.layer, c.model.hook_name = os.path.join(data, 'model'), layers // 2, ''
  model, processor = loading.load(c)
  _, module = loading.find_layer(model, '', layers // 2)
  image_id = model.config.image_token_id
  prepared = [
      prompt.prepare(processor, s, dict(s.images()), True, image_id)
      for s in manifest.read(os.path.join(data, 'manifest.jsonl'), True)
  ]
  batches = [
      export.collate(prepared[i : i + batch], 0, torch.device('cpu'), torch.float32)
      for i in range(0, len(prepared), batch)
  ]
  keep = np.arange(4)  # every token kind
  writer = store.StoreWriter(
      os.path.join(root, 'export_store'),
      hidden,
      'float32',
      {},
      rows_per_chunk=4,
      rows_per_shard=4096,
  )

  def plain(i, inputs):
    with torch.inference_mode():
      model(**inputs, use_cache=False)

  def hooked(capture):
    def run(i, inputs):
      hidden_states = capture.run(model, inputs)
      group = prepared[i * batch : (i + 1) * batch]
      got = export.Rows(group, hidden_states, keep).per_study()  # what the export does
      xs = [got[p.study.index][0] for p in group]
      ts = [export.token_rows(p, got[p.study.index][1]) for p in group]
      writer.append(
          np.concatenate(xs),
          np.concatenate(ts),
          [
              {
                  'study_id': p.study.study_id,
                  'manifest_index': p.study.index,
                  'row_start': 0,
                  'rows': 0,
              }
              for p in group
          ],
      )

    return run

  def per_batch(fn):
    """Mean seconds per batch of one pass over all batches, the last store commit included."""
    t = time.perf_counter()
    for i, inputs in enumerate(batches):
      fn(i, inputs)
    writer.flush()  # the writes count: wait for the last commit
    writer._wait()  # pylint: disable=protected-access
    return (time.perf_counter() - t) / len(batches)

  times = {'plain': [], 'hook + write': [], 'hook + write, stop at L': []}
  for _ in range(repeats):  # interleaved, so drift hits all three alike
    times['plain'].append(per_batch(plain))  # no hook attached
    for name, stop in (('hook + write', False), ('hook + write, stop at L', True)):
      capture = export.Capture(module, stop=stop)
      times[name].append(per_batch(hooked(capture)))
      capture.remove()
  writer.close()
  tokens = sum(len(p.input_ids) for p in prepared) / len(batches)
  return {k: float(np.median(v)) for k, v in times.items()} | {'tokens_per_batch': tokens}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--rows', type=int, default=1_000_000)
  p.add_argument('--d', type=int, default=1024)
  p.add_argument('--F', type=int, default=8192)
  p.add_argument('--k', type=int, default=32)
  p.add_argument('--batch', type=int, default=2048)
  p.add_argument('--threads', type=int, default=4)
  p.add_argument('--prefetch', type=int, default=8)
  p.add_argument('--steps', type=int, default=4)
  p.add_argument('--dir', default=None)
  p.add_argument('--export-hidden', type=int, default=512)
  p.add_argument('--export-layers', type=int, default=8)
  p.add_argument('--export-studies', type=int, default=24)
  p.add_argument('--skip-export', action='store_true')
  p.add_argument('--export-only', action='store_true', help='only section 3, the export')
  args = p.parse_args()
  root = args.dir or tempfile.mkdtemp(prefix='jaxsae_bench_io_')
  os.makedirs(root, exist_ok=True)
  try:
    run(args, root)
  finally:
    shutil.rmtree(root, ignore_errors=True)


def run(args, root: str) -> None:
  if not args.export_only:
    run_io(args, root)
  if args.export_only or not args.skip_export:
    run_export(args, root)


def run_io(args, root: str) -> None:
  """Sections 1 and 2: the store vs raw disk, the loader vs the training step."""
  from bench import bench_jaxsae  # pylint: disable=import-outside-toplevel

  rows, d, B = args.rows, args.d, args.batch
  print(
      f'store: {rows} x {d} float32 ({rows * d * 4 / 1e9:.2f} GB) in {root}; '
      f'{os.cpu_count()} CPU cores',
      flush=True,
  )
  io = bench_store(root, rows, d, B)
  mb = lambda n, s: n / s / 1e6  # noqa: E731
  print(f'\n{"":34s} {"rows/s":>12s} {"MB/s":>9s}')
  for name, n in (
      ('raw disk write (fsync)', rows),
      ('store write (commits, fsync)', rows),
      ('raw disk sequential read', rows),
      ('store sequential read', rows),
      ('raw disk random rows (pread each)', io['n_random']),
      ('store random rows (1 read/batch)', io['n_random']),
  ):
    key = {
        'raw disk write (fsync)': 'raw write',
        'store write (commits, fsync)': 'store write',
        'raw disk sequential read': 'raw read',
        'store sequential read': 'store read',
        'raw disk random rows (pread each)': 'raw random',
        'store random rows (1 read/batch)': 'store random',
    }[name]
    print(f'{name:34s} {n / io[key]:12,.0f} {mb(n * d * 4, io[key]):9.0f}')

  store_path = os.path.join(root, 'store')
  loader = bench_loader(store_path, B, args.threads, args.prefetch, n=30)
  step = bench_jaxsae(d, args.F, args.k, B, steps=args.steps)['step_s']
  need = B / step
  print(
      f'\ngrain loader, shuffled, B={B}, {args.threads} threads, prefetch {args.prefetch}: '
      f'{loader:,.0f} rows/s ({mb(loader * d * 4, 1):.0f} MB/s)'
  )
  print(
      f'training step (d={d} F={args.F} k={args.k} B={B}): {step:.3f} s -> consumes '
      f'{need:,.0f} rows/s; loader delivers {loader / need:.1f}x that (needed: >= 5x)'
  )
  mem, fed = bench_fed_step(
      store_path, d, args.F, args.k, B, args.steps, args.threads, args.prefetch
  )
  print(
      f'step fed from memory {mem:.3f} s, fed by the loader {fed:.3f} s '
      f'({100 * (fed / mem - 1):+.1f}%)'
  )


def run_export(args, root: str) -> None:
  """Section 3: the hook's and the store writes' cost, then the pipelined export end to end."""
  ex = bench_export(root, args.export_hidden, args.export_layers, studies=32, batch=4, repeats=5)
  base = ex['plain']
  print(
      f'\nexport, random LLaVA width {args.export_hidden}, {args.export_layers} layers, '
      f'hook at layer {args.export_layers // 2}, 4 studies '
      f'({ex["tokens_per_batch"]:.0f} tokens) per batch, every token kept:'
  )
  for name in ('plain', 'hook + write', 'hook + write, stop at L'):
    print(f'  {name:28s} {ex[name] * 1e3:8.1f} ms/batch  {100 * (ex[name] / base - 1):+6.1f}%')
  print(f'\nthe pipelined export on {args.export_studies} realistic studies (bench_export.py):')
  # Its own process: this one has started JAX's threads, and the export forks worker processes.
  script = os.path.join(REPO, 'benchmarks', 'bench_export.py')
  subprocess.run([sys.executable, script, '--studies', str(args.export_studies)], check=True)


if __name__ == '__main__':
  main()
