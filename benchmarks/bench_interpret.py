"""Throughput and peak memory of the feature-statistics pass (python -m jaxsae.interpret, stage 1).

    python benchmarks/bench_interpret.py [--tokens 1000000] [--d 1024] [--F 16384] [--k 32]

Writes (once, then reuses) a store of `tokens` random rows, builds a random SAE whose threshold
lets about k features fire per token, and times `jaxsae.interpret.stats.compute` over the whole
store, next to the floor: the encoder matmul alone over the same batches. Prints tokens/s, the
multiple of the floor, peak resident memory of the process and the size of the statistics tables.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxsae.config import default_config
from jaxsae.formats import store
from jaxsae.interpret import stats
from timing import timed


def make_store(path: str, tokens: int, d: int) -> store.ActivationStore:
  if store.exists(path) and store.open_store(path).rows == tokens and store.open_store(path).d == d:
    return store.open_store(path)
  shutil.rmtree(path, ignore_errors=True)
  rng = np.random.default_rng(0)
  w = store.StoreWriter(
      path, d, 'float32', {'bench': True}, rows_per_chunk=64, rows_per_shard=65536
  )
  per_study, done = 512, 0
  while done < tokens:
    n = min(65536, tokens - done)
    x = rng.standard_normal((n, d), np.float32)
    t = np.zeros((n, 6), np.int32)
    t[:, 0] = (done + np.arange(n)) // per_study
    t[:, 1] = (done + np.arange(n)) % per_study
    t[:, 3] = 3
    studies = sorted(set(t[:, 0].tolist()))
    recs = [
        {
            'study_id': f's{s}',
            'manifest_index': s,
            'row_start': int(np.searchsorted(t[:, 0], s)),
            'rows': int((t[:, 0] == s).sum()),
        }
        for s in studies
    ]
    w.append(x, t, recs)
    done += n
  w.close()
  return store.open_store(path)


def main() -> None:
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument('--tokens', type=int, default=1_000_000)
  p.add_argument('--d', type=int, default=1024)
  p.add_argument('--F', type=int, default=16384)
  p.add_argument('--k', type=int, default=32)
  p.add_argument('--batch', type=int, default=4096)
  p.add_argument('--store', default=os.path.join(tempfile.gettempdir(), 'jaxsae_bench_interpret'))
  a = p.parse_args()

  t0 = time.perf_counter()
  s = make_store(a.store, a.tokens, a.d)
  print(
      f'store: {s.rows:,} rows x d={s.d} at {a.store} ({time.perf_counter() - t0:.0f} s to '
      'open or write)'
  )
  rng = np.random.default_rng(1)
  W = rng.standard_normal((a.d, a.F), np.float32)
  W /= np.linalg.norm(W, axis=0, keepdims=True)
  params = {
      'W_enc': W,
      'b_enc': np.zeros(a.F, np.float32),
      'W_dec': W.T.copy(),
      'b_dec': np.zeros(a.d, np.float32),
      # pre ~ N(0, 1): P(pre > t) = k / F, so about k features fire per token
      'threshold': np.full(a.F, statistics.NormalDist().inv_cdf(1 - a.k / a.F), np.float32),
  }
  c = default_config()
  c.sae.d, c.sae.k, c.sae.dict_size = a.d, a.k, a.F
  c.interpret.batch_size = a.batch
  c.interpret.checkpoint_every = 10**9  # time the pass, not the (rare) checkpoints
  c.mesh.data = -1

  # The floor: the encoder matmul alone over the same number of batches.
  x = jnp.asarray(s.read_range(0, a.batch))
  mm = jax.jit(lambda x, W: x @ W)
  Wj = jnp.asarray(W)

  def floor() -> float:
    return a.batch / timed(mm, x, Wj, steps=5, stat=statistics.fmean)

  floor_before = floor()

  ckpt = tempfile.mkdtemp(prefix='bench_interpret_ckpt')
  rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  t0 = time.perf_counter()
  r = stats.compute(c, s, params, ckpt, progress=False)
  wall = time.perf_counter() - t0
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  floor_tps = max(floor_before, floor())  # before and after the pass: the less disturbed one
  shutil.rmtree(ckpt, ignore_errors=True)
  table_mb = sum(v.nbytes for v in r.tables.values()) / 2**20
  tps = r.tokens / wall
  print(
      f'device: {jax.devices()[0].device_kind} x {len(jax.devices())}; d={a.d}, F={a.F}, '
      f'k~{a.k}, batch {a.batch}'
  )
  print('| | tokens/s | x floor |\n|---|---|---|')
  print(f'| encoder matmul alone (floor) | {floor_tps:,.0f} | 1.00 |')
  print(f'| statistics pass (read + encode + tables) | {tps:,.0f} | {floor_tps / tps:.2f} |')
  print(
      f'{r.tokens:,} tokens in {wall:.1f} s (first batch compiles included); batches redone '
      f'for a full token: {r.redone_batches}'
  )
  print(
      f'peak resident memory: {rss:,.0f} MiB (before the pass: {rss0:,.0f} MiB); statistics '
      f'tables: {table_mb:,.0f} MiB'
  )
  fired = r.get('count').sum() / max(r.tokens, 1)
  print(f'mean firing features per token: {fired:.1f}')


if __name__ == '__main__':
  main()
