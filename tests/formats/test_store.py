"""The activation store: round trip, commit-last semantics, statistics, and clear errors."""

import json
import os

import ml_dtypes
import numpy as np
import pytest

from helpers import tiny_config, write_store
from jaxsae import data
from jaxsae.data import store_source
from jaxsae.formats import store
from jaxsae.config import ConfigError


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_round_trip_rows_tokens_studies_and_statistics(tmp_path, dtype):
  sizes = [5, 0, 40, 7, 90, 3]  # crosses shards (64 rows) and chunks (8), one empty study
  x = write_store(tmp_path / 's', sizes, dtype=dtype)
  s = store.open_store(str(tmp_path / 's'))
  assert (s.rows, s.d, s.dtype) == (sum(sizes), 16, dtype)
  np.testing.assert_array_equal(s.read_range(0, s.rows), x)
  idx = np.random.default_rng(0).integers(0, s.rows, 50)  # any order, with repeats
  np.testing.assert_array_equal(s.read(idx), x[idx])
  tokens = s.tokens()
  np.testing.assert_array_equal(tokens[:, 0], np.repeat(np.arange(len(sizes)), sizes))
  studies = s.studies()
  assert [r['study_id'] for r in studies] == [f's{i}' for i in range(len(sizes))]
  assert [r['row_start'] for r in studies] == list(np.cumsum([0] + sizes[:-1]))
  # Normalisation statistics of exactly what training reads (after bfloat16 rounding).
  mean_sq = np.mean(np.sum(x.astype(np.float64) ** 2, axis=1))
  assert s.mean_sq_norm == pytest.approx(mean_sq, rel=1e-6)
  assert np.mean(np.sum((x / s.scale) ** 2, axis=1)) == pytest.approx(16, rel=1e-5)
  raw = s._acts.dtype.numpy_dtype  # pylint: disable=protected-access
  assert raw == (np.float32 if dtype == 'float32' else ml_dtypes.bfloat16)


class _CrashAtCommit:
  """The store's kvstore, except that writing store.json fails (as if killed right before)."""

  def __init__(self, kv):
    self.kv = kv

  def write(self, key, value):
    if key == store.COMMIT:
      raise RuntimeError('killed before the commit')
    return self.kv.write(key, value)

  def read(self, key):
    return self.kv.read(key)


def test_rows_written_but_not_committed_are_invisible_and_resume_continues(tmp_path):
  """A writer that dies between writing rows and rewriting store.json leaves the old store; the
  next writer continues after the last committed study, overwriting the orphaned rows."""
  path = str(tmp_path / 's')
  first = write_store(path, [10, 20])
  w = store.StoreWriter(path, 16, 'float32', {'test': True}, rows_per_chunk=8, rows_per_shard=64)
  w._kv = _CrashAtCommit(w._kv)  # pylint: disable=protected-access
  w.append(
      np.full((30, 16), 7, np.float32),
      np.zeros((30, 6), np.int32),
      [{'study_id': 'orphan', 'manifest_index': 2, 'row_start': 0, 'rows': 30}],
  )
  with pytest.raises(RuntimeError, match='before the commit'):
    w.close()
  s = store.open_store(path)
  assert s.rows == 30 and [r['study_id'] for r in s.studies()] == ['s0', 's1']
  np.testing.assert_array_equal(s.read_range(0, 30), first)
  # The array does hold the orphaned rows; readers never see them.
  w = store.StoreWriter(path, 16, 'float32', {'test': True}, rows_per_chunk=8, rows_per_shard=64)
  assert w.studies_done == 2 and w.last_study_id == 's1'
  w.append(
      np.ones((4, 16), np.float32),
      np.zeros((4, 6), np.int32),
      [{'study_id': 's2', 'manifest_index': 2, 'row_start': 0, 'rows': 4}],
  )
  w.close()
  s = store.open_store(path)
  assert s.rows == 34 and [r['study_id'] for r in s.studies()] == ['s0', 's1', 's2']
  np.testing.assert_array_equal(s.read_range(30, 34), np.ones((4, 16)))


def test_resume_after_a_kill_between_the_two_resizes(tmp_path):
  """A run killed after growing the activations but before growing the tokens (CI saw this under
  kill -9) leaves arrays of different lengths; the next writer grows each one as it needs."""
  path = str(tmp_path / 's')
  write_store(path, [10, 20])
  w = store.StoreWriter(path, 16, 'float32', {'test': True}, rows_per_chunk=8, rows_per_shard=64)
  w._acts.resize(exclusive_max=[80, 16], expand_only=True).result()  # pylint: disable=protected-access
  w = store.StoreWriter(path, 16, 'float32', {'test': True}, rows_per_chunk=8, rows_per_shard=64)
  assert w._acts.shape[0] == 80 and w._tokens.shape[0] == 30  # pylint: disable=protected-access
  w.append(
      np.ones((40, 16), np.float32),
      np.full((40, 6), 2, np.int32),
      [{'study_id': 's2', 'manifest_index': 2, 'row_start': 0, 'rows': 40}],
  )
  w.close()
  s = store.open_store(path)
  assert s.rows == 70 and [r['study_id'] for r in s.studies()] == ['s0', 's1', 's2']
  np.testing.assert_array_equal(s.read_range(30, 70), np.ones((40, 16)))
  np.testing.assert_array_equal(s.tokens(30, 70), np.full((40, 6), 2))


def test_resume_with_other_settings_is_refused(tmp_path):
  write_store(tmp_path / 's', [5], info={'model': 'a', 'layer': 3})
  with pytest.raises(ConfigError, match=r'info.layer: store 3, config 4.*nothing was changed'):
    store.StoreWriter(str(tmp_path / 's'), 16, 'float32', {'model': 'a', 'layer': 4})
  with pytest.raises(ConfigError, match="dtype: store 'float32', config 'bfloat16'"):
    store.StoreWriter(str(tmp_path / 's'), 16, 'bfloat16', {'model': 'a', 'layer': 3})


def test_url_passes_through_to_tensorstore(tmp_path):
  """A kvstore URL is handed to TensorStore as is (memory:// here; gs:// and s3:// alike)."""
  assert store.url('gs://bucket/acts') == 'gs://bucket/acts/'
  assert store.url('s3://bucket/acts/') == 's3://bucket/acts/'
  assert store.url(str(tmp_path)) == f'file://{tmp_path}/'
  x = write_store('memory://test_store', [30, 40])
  c = tiny_config(
      **{'data.source': 'store', 'data.store_path': 'memory://test_store', 'data.batch_size': 10}
  )
  source = data.open_source(c)
  got = np.concatenate([source.batch(i) for i in range(7)])
  np.testing.assert_array_equal(np.sort(got, axis=0), np.sort(x, axis=0))  # one epoch, every row


def _store_config(path, **kw):
  return tiny_config(**{'data.source': 'store', 'data.store_path': str(path), **kw})


def test_bad_stores_fail_before_compute_with_what_to_do(tmp_path):
  with pytest.raises(
      ConfigError,
      match=r"activation store not found: data.store_path='.*nope' "
      r'does not exist.*export_activations',
  ):
    data.open_source(_store_config(tmp_path / 'nope'))
  os.makedirs(tmp_path / 'not_a_store')
  with pytest.raises(
      ConfigError,
      match=r'not a committed activation store: it has no store.json.*'
      'rerun `python -m jaxsae.export_activations`',
  ):
    data.open_source(_store_config(tmp_path / 'not_a_store'))
  write_store(tmp_path / 'd16', [100])
  with pytest.raises(
      ConfigError, match=r'has width d=16 but the config says sae.d=32; set ' r'--config.sae.d=16'
  ):
    data.open_source(_store_config(tmp_path / 'd16', **{'sae.d': 32}))
  with pytest.raises(
      ConfigError,
      match=r'holds float32 but the config says '
      r"data.store_dtype='bfloat16'.*store_dtype=float32",
  ):
    data.open_source(_store_config(tmp_path / 'd16', **{'data.store_dtype': 'bfloat16'}))
  with pytest.raises(
      ConfigError, match=r'has 100 (training )?rows, fewer than one batch \(data.batch_size=128\)'
  ):
    data.open_source(_store_config(tmp_path / 'd16', **{'data.batch_size': 128}))
  # Empty: every study committed so far was skipped (or kept no tokens).
  w = store.StoreWriter(str(tmp_path / 'empty'), 16, 'float32', {'keep_kinds': ['report']})
  w.append(
      np.zeros((0, 16), np.float32),
      np.zeros((0, 6), np.int32),
      [{'study_id': 'a', 'manifest_index': 0, 'skipped': {'field': 'frontal'}}],
  )
  w.close()
  with pytest.raises(
      ConfigError,
      match=r"store at '.*empty' is empty: 0 rows committed \(1 "
      r"studies processed, token kinds kept \['report'\]\)",
  ):
    data.open_source(_store_config(tmp_path / 'empty'))
  report = json.load(open(tmp_path / 'empty' / store.REPORT))
  assert report == [{'study_id': 'a', 'manifest_index': 0, 'skipped': {'field': 'frontal'}}]


def test_store_is_a_grain_random_access_source(tmp_path):
  import grain

  x = write_store(tmp_path / 's', [12, 9])
  s = store.open_store(str(tmp_path / 's'))
  ds = grain.MapDataset.source(s)
  assert len(ds) == 21
  np.testing.assert_array_equal(ds[13], x[13])
  import pickle  # worker processes get the store by pickle: the same committed rows

  s2 = pickle.loads(pickle.dumps(s))
  np.testing.assert_array_equal(s2.read(np.arange(21)), x)
  assert store_source.StoreSource(s2, 4, seed=0).batch(0).shape == (4, 16)
