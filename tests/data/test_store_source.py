"""The grain pipeline over the store: shuffling, sharding, iterator state, scale, exact resume."""

import json
import os
import random
import resource
import sys

import grain
import numpy as np
import pytest

from helpers import (
    REPO,
    check_iterator_resumes,
    cli_args,
    kill_repeatedly,
    run_cli,
    tiny_config,
    write_parted_store,
    write_store,
)
from jaxsae.data import store_source
from jaxsae import trainer, weights
from jaxsae.formats import store


@pytest.fixture
def small_store(tmp_path):
  x = write_store(tmp_path / 's', [37] * 27)  # 999 rows
  return store.open_store(str(tmp_path / 's')), x


def _ids(batch, x):
  """Which stored rows a batch holds (rows are distinct random vectors)."""
  lookup = {row.tobytes(): i for i, row in enumerate(x)}
  return [lookup[row.tobytes()] for row in batch]


def test_batches_are_a_seeded_global_shuffle_reshuffled_each_epoch(small_store):
  s, x = small_store
  src = store_source.StoreSource(s, 100, seed=3)
  epoch0 = [_ids(src.batch(i), x) for i in range(9)]  # 999 // 100 = 9 batches per epoch
  flat = sum(epoch0, [])
  assert len(set(flat)) == 900 and all(0 <= i < 999 for i in flat)  # no repeats within an epoch
  assert flat != sorted(flat) and max(flat[:100]) > 900  # global, not within-shard, shuffle
  epoch1 = sum([_ids(src.batch(i), x) for i in range(9, 18)], [])
  assert len(set(epoch1)) == 900 and epoch1 != flat  # a new permutation each epoch
  assert _ids(store_source.StoreSource(s, 100, seed=3).batch(4), x) == epoch0[4]  # seeded
  assert _ids(store_source.StoreSource(s, 100, seed=4).batch(4), x) != epoch0[4]


def test_iterator_matches_random_access_and_resumes_at_the_exact_batch(small_store):
  s, _ = small_store
  src = store_source.StoreSource(s, 64, seed=0, num_threads=3, prefetch=4)
  # past the epoch boundary (15 batches)
  check_iterator_resumes(src, 5, 20)


def test_processes_read_disjoint_slices_of_the_same_global_batch(small_store):
  s, _ = small_store
  whole = store_source.StoreSource(s, 64, seed=0)
  halves = [
      store_source.StoreSource(s, 64, seed=0, shard=grain.sharding.ShardOptions(p, 2))
      for p in range(2)
  ]
  assert halves[0].batch_size == 32
  for i in (0, 7, 20):
    np.testing.assert_array_equal(np.concatenate([h.batch(i) for h in halves]), whole.batch(i))
  with pytest.raises(Exception, match='not divisible by the 3 JAX processes'):
    store_source.StoreSource(s, 64, seed=0, shard=grain.sharding.ShardOptions(0, 3))


def test_worker_processes_read_the_same_batches(small_store):
  s, _ = small_store
  src = store_source.StoreSource(s, 64, seed=0, worker_processes=2)
  it = src.iterator()
  for i in range(4):
    np.testing.assert_array_equal(next(it), src.batch(i))
  it.close()


def test_a_store_of_100M_rows_of_d4096_is_never_loaded(tmp_path):
  """Shuffling and reading 100M x 4096 (800 GB as bfloat16) touches only the rows read."""
  path = str(tmp_path / 'big')
  write_store(path, [10], d=4096, dtype='bfloat16', rows_per_shard=65536, rows_per_chunk=16)
  # Grow it to 100M committed rows without writing them (unwritten chunks read as zeros).
  n = 100_000_000
  w = store.StoreWriter(path, 4096, 'bfloat16', {'test': True})
  acts = w._acts  # pylint: disable=protected-access
  acts.resize(exclusive_max=[n, 4096], expand_only=True).result()
  w.close()
  meta = json.load(open(os.path.join(path, store.COMMIT)))
  meta['rows'] = n
  with open(os.path.join(path, store.COMMIT), 'w') as f:
    json.dump(meta, f)
  before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  big = store.open_store(path, fill_missing=True)  # the unwritten chunks read as zeros here
  src = store_source.StoreSource(big, 4096, seed=0, num_threads=2, prefetch=2)
  it = src.iterator()
  batches = [next(it) for _ in range(3)]
  it.close()
  grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
  assert batches[0].shape == (4096, 4096) and batches[0].dtype == np.float32
  assert grown_mb < 1000, f'peak memory grew by {grown_mb:.0f} MB'  # a permutation alone: 800 MB


def test_training_divides_by_the_store_scale(tmp_path):
  path = tmp_path / 'acts'
  write_store(path, [200] * 10)
  s = store.open_store(str(path))
  c = tiny_config(
      **{
          'data.source': 'store',
          'data.store_path': str(path),
          'data.held_out_fraction': 0.2,  # holds out study s6
          'train.steps': 10,
          'optim.decay_start': 8,
      }
  )
  summary = trainer.train_and_evaluate(c, str(tmp_path / 'run'))
  _, _, meta, _ = weights.load_checkpoint(str(tmp_path / 'run'))
  assert meta['scale'] == s.scale and s.scale > 2  # rows are ~3 x N(0,1) + 1
  assert summary['step'] == 10 and np.isfinite(summary['eval_fvu'])
  assert summary['eval_tokens'] == 200 and '1 of 10 studies' in summary['eval_on']
  saved = json.load(open(tmp_path / 'run' / 'checkpoints' / '10' / 'data' / 'process_0-of-1.json'))
  assert saved == {'next_index': 10}  # the grain iterator's position, saved with the state


@pytest.mark.slow
def test_kill_minus_9_and_resume_from_store_is_bit_identical(tmp_path, faults):
  steps = 60
  path = tmp_path / 'acts'
  write_store(path, [300] * 10)  # 3000 rows: 46 batches of 64 per epoch, so resumes cross epochs
  overrides = {
      'train.steps': steps,
      'train.checkpoint_every': 2,
      'data.source': 'store',
      'data.store_path': str(path),
  }
  clean = str(tmp_path / 'clean')
  r = run_cli(cli_args('jaxsae.train', workdir=clean, **overrides))
  assert r.returncode == 0, r.stderr[-3000:]
  killed = str(tmp_path / 'killed')
  ckpt_dir = os.path.join(killed, 'checkpoints')
  kills = kill_repeatedly(
      cli_args('jaxsae.train', workdir=killed, **overrides),
      lambda: os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir),
      6,
      random.Random(0),
  )
  assert kills >= 2, 'the run finished before it could be killed twice; make it longer'
  faults.inject('kill -9 during training on a store', kills)
  r = run_cli(cli_args('jaxsae.train', workdir=killed, **overrides))
  assert r.returncode == 0, r.stderr[-3000:]
  (sa, a, _, _), (sb, b, _, _) = weights.load_checkpoint(clean), weights.load_checkpoint(killed)
  assert sa == sb == steps
  for name in a['params']:
    np.testing.assert_array_equal(
        np.asarray(a['params'][name]), np.asarray(b['params'][name]), err_msg=name
    )
  np.testing.assert_array_equal(a['threshold'], b['threshold'])
  np.testing.assert_array_equal(a['tokens_since_fired'], b['tokens_since_fired'])


def test_reading_a_store_never_imports_torch(tmp_path):
  """The store, its grain pipeline and checkpointed position are JAX-core: no torch."""
  write_store(tmp_path / 'acts', [100] * 3)
  code = f"""
import sys
sys.path.insert(0, {os.path.join(REPO, 'tests')!r})
from helpers import tiny_config
from jaxsae import checkpointing, data, trainer
c = tiny_config(**{{'data.source': 'store', 'data.store_path': {str(tmp_path / 'acts')!r}}})
batches = data.batches(data.open_source(c))
next(batches)
ckpt = checkpointing.Checkpointer({str(tmp_path / 'run')!r}, 1, 1, False)
ckpt.save(1, {{'x': 1}}, {{'shape': {{}}}}, force=True, data_iterator=batches)
assert "torch" not in sys.modules, [m for m in sys.modules if m.startswith("torch")][:5]
print("ok")
"""
  r = run_cli([sys.executable, '-c', code])
  assert r.returncode == 0 and 'ok' in r.stdout, r.stderr[-3000:]


def test_a_store_of_parts_trains_as_the_same_rows_in_one_store(tmp_path):
  """Training reads a store written by two processes as it reads one store of the same rows: the
  same batches, held-out split and scale, so the same trained SAE."""
  x = write_parted_store(tmp_path / 'parts', [[200] * 5, [150] * 5])
  one = store.StoreWriter(str(tmp_path / 'one'), 16, 'float32', {'test': True}, 8, 64)
  two = store.open_store(str(tmp_path / 'parts'))
  for r in two.studies():
    n, i = r['rows'], r['manifest_index']
    one.append(x[r['row_start'] : r['row_start'] + n], two.tokens(r['row_start'], r['row_start'] + n),
               [{'study_id': r['study_id'], 'manifest_index': i, 'row_start': 0, 'rows': n}])  # fmt: skip
  one.close()
  runs = {}
  for name in ('one', 'parts'):
    c = tiny_config(
        **{
            'data.source': 'store',
            'data.store_path': str(tmp_path / name),
            'data.held_out_fraction': 0.2,
            'train.steps': 10,
            'optim.decay_start': 8,
        }
    )
    summary = trainer.train_and_evaluate(c, str(tmp_path / f'run_{name}'))
    runs[name] = (summary, weights.load_checkpoint(str(tmp_path / f'run_{name}'))[1])
  (s1, a), (s2, b) = runs['one'], runs['parts']
  held = lambda s: s['eval_on'].split(': ', 1)[1]  # noqa: E731  (after the store's path)
  assert held(s1) == held(s2) and s1['eval_tokens'] == s2['eval_tokens']
  assert s2['eval_fvu'] == pytest.approx(s1['eval_fvu'], rel=1e-4)
  for name in a['params']:
    np.testing.assert_allclose(
        np.asarray(a['params'][name]), np.asarray(b['params'][name]), rtol=1e-4, atol=1e-5
    )
