"""A store written by several processes: the root claimed once, parts read as one store (training's
rows, token metadata, study records, worker pickling), verified, identified for checkpoints."""

import concurrent.futures
import json
import multiprocessing
import os
import pickle

import numpy as np
import pytest

from helpers import tiny_config, write_store
from jaxsae import checkpointing, verify_store
from jaxsae.errors import ConfigError
from jaxsae.formats import parts, store
from jaxsae.formats.tokens import TOKEN_COLUMNS

D, INFO = 16, {'test': True}


def _claim(path, count=2, studies=6, **kw):
  return parts.claim(str(path), count, studies, D, 'float32', kw.get('info', INFO), 8, 64)


def _write_part(path, index, count, sizes, first, seed):
  """Part `index`: studies first.. with `sizes` rows each; returns its rows."""
  rng = np.random.default_rng(seed)
  w = store.StoreWriter(store.part_path(str(path), index, count), D, 'float32', INFO, 8, 64)
  out = []
  for j, n in enumerate(sizes):
    x = rng.standard_normal((n, D)).astype(np.float32)
    t = np.zeros((n, len(TOKEN_COLUMNS)), np.int32)
    t[:, 0], t[:, 1] = first + j, np.arange(n)
    w.append(x, t, [{'study_id': f's{first + j}', 'manifest_index': first + j, 'row_start': 0,
                     'rows': n}])  # fmt: skip
    out.append(x)
  w.close()
  return np.concatenate(out)


def _claim_in_process(path):
  return _claim(path)


def test_processes_starting_together_claim_one_root(tmp_path):
  path = tmp_path / 'store'
  spawn = multiprocessing.get_context('spawn')  # no fork of a process that may run torch threads
  with concurrent.futures.ProcessPoolExecutor(4, mp_context=spawn) as pool:
    roots = list(pool.map(_claim_in_process, [path] * 8))
  assert all(r == roots[0] for r in roots)
  assert roots[0]['shares'] == [[0, 3], [3, 6]] and roots[0]['format'] == store.PARTS_FORMAT
  assert json.load(open(path / store.COMMIT)) == roots[0]


def test_settings_are_checked_and_one_process_stores_stay_apart(tmp_path):
  path = tmp_path / 'store'
  _claim(path)
  with pytest.raises(ConfigError, match=r'processes: store 2, now 3.*shares.*each share is fixed'):
    _claim(path, count=3)
  with pytest.raises(ConfigError, match=r"info: store \{'test': True\}, now \{'other': 1\}"):
    _claim(path, info={'other': 1})
  with pytest.raises(ConfigError, match='written by 2 processes.*one process cannot append'):
    store.StoreWriter(str(path), D, 'float32', INFO, 8, 64)
  write_store(tmp_path / 'single', [5, 5])
  before = json.load(open(tmp_path / 'single' / store.COMMIT))
  with pytest.raises(ConfigError, match='written by one process'):
    _claim(tmp_path / 'single')
  assert json.load(open(tmp_path / 'single' / store.COMMIT)) == before
  (tmp_path / 'other').mkdir()
  (tmp_path / 'other' / 'notes.txt').write_text('mine')
  with pytest.raises(ConfigError, match='not an activation store and not empty'):
    _claim(tmp_path / 'other')


def test_parts_read_as_one_store_in_manifest_order(tmp_path):
  path = tmp_path / 'store'
  _claim(path)
  x1 = _write_part(path, 1, 2, [7, 9, 4], 3, seed=1)  # the later share may finish first
  s = store.open_store(str(path))
  assert isinstance(s, store.PartedStore) and s.rows == 20
  assert s.incomplete() == ['parts/000-of-002 has 0 of its 3 studies (manifest rows 0-2)']
  x0 = _write_part(path, 0, 2, [5, 6, 8], 0, seed=0)
  s = store.open_store(str(path))
  x = np.concatenate([x0, x1])
  assert (s.rows, s.d, s.dtype, s.incomplete()) == (39, D, 'float32', [])
  assert s.scale == pytest.approx(np.sqrt(np.mean(np.sum(x.astype(np.float64) ** 2, 1)) / D))
  np.testing.assert_array_equal(s.read_range(0, 39), x)
  np.testing.assert_array_equal(s.read_range(10, 25), x[10:25])  # across the parts' boundary
  idx = np.random.default_rng(0).permutation(39)[:25]
  np.testing.assert_array_equal(s.read(idx), x[idx])
  np.testing.assert_array_equal(
      s.tokens_at(idx)[:, 0], np.repeat(np.arange(6), [5, 6, 8, 7, 9, 4])[idx]
  )
  np.testing.assert_array_equal(s.tokens()[:, 0], np.repeat(np.arange(6), [5, 6, 8, 7, 9, 4]))
  assert [(r['study_id'], r['row_start'], r['rows']) for r in s.studies()] == [
      ('s0', 0, 5), ('s1', 5, 6), ('s2', 11, 8), ('s3', 19, 7), ('s4', 26, 9), ('s5', 35, 4)
  ]  # fmt: skip
  assert s.meta['studies'] == 6 and s.meta['kind_counts']['image'] == 39
  np.testing.assert_array_equal(s[17], x[17])
  again = pickle.loads(pickle.dumps(s))  # what grain's worker processes receive
  np.testing.assert_array_equal(again.read(idx), x[idx])
  _write_part(path, 1, 2, [3], 6, seed=2)  # grows after the pickle: the copy keeps its rows
  assert pickle.loads(pickle.dumps(s)).rows == 39 and store.open_store(str(path)).rows == 42


def test_verify_checks_every_part(tmp_path):
  path = tmp_path / 'store'
  _claim(path)
  _write_part(path, 0, 2, [5, 6, 8], 0, seed=0)
  report = verify_store.verify(str(path))
  assert report.ok and report.notes == [
      f'part 1 ({path}/parts/001-of-002, manifest rows 3-5) has no committed study: its process '
      'has not run or was stopped before its first commit (rerun it with the same config to '
      'continue)'
  ]
  _write_part(path, 1, 2, [7, 9, 4], 3, seed=1)
  report = verify_store.verify(str(path))
  assert (
      report.ok
      and not report.notes
      and (report.rows, report.studies, report.verified) == (39, 6, 6)
  )
  shard = path / 'parts' / '001-of-002' / 'activations' / 'c' / '0' / '0'
  raw = bytearray(shard.read_bytes())
  raw[100] ^= 0xFF
  shard.write_bytes(bytes(raw))
  report = verify_store.verify(str(path))
  assert not report.ok and report.problems[0].startswith('part 1: ')
  assert 's3' in report.bad


def _config(path):
  return tiny_config(**{'data.source': 'store', 'data.store_path': str(path), 'data.batch_size': 8})


def test_checkpoints_identify_a_parted_store_and_see_it_grow(tmp_path):
  path = tmp_path / 'store'
  _claim(path)
  _write_part(path, 0, 2, [5, 6], 0, seed=0)
  saved = checkpointing.data_identity(_config(path))
  assert (saved['rows'], saved['studies']) == (11, 2) and saved['parts'][1] is None
  _write_part(path, 1, 2, [7], 3, seed=1)
  grown = checkpointing.data_identity(_config(path))
  assert checkpointing._data_change(saved, grown) == ('grew', '')  # pylint: disable=protected-access
  assert checkpointing._data_change(grown, grown) == ('same', '')  # pylint: disable=protected-access
  os.rename(path / 'parts' / '000-of-002', tmp_path / 'away')
  _write_part(path, 0, 2, [5, 6], 0, seed=3)  # part 0 rewritten with other rows
  kind, why = checkpointing._data_change(grown, checkpointing.data_identity(_config(path)))  # pylint: disable=protected-access
  assert kind == 'other' and why.startswith('part 0: ')
