"""Stores never lose or invent data: paths that are not a store of the same config are refused and
left untouched, and a missing, truncated or altered shard is a clear error naming the file and the
studies it holds (in reads, training, interpretation and `python -m jaxsae.verify_store`)."""

import hashlib
import json
import os
import sys

import numpy as np
import pytest
import tensorstore as ts

from helpers import REPO, cli_args, run_cli, tiny_config, write_store
from jaxsae.config import ConfigError
from jaxsae.data import store_source
from jaxsae.formats import store
from jaxsae import verify_store

# 150 rows in shards of 64: shard 1 (rows 64-127) holds rows of s2 (40-89) and s3 (90-129).
SIZES = [10, 30, 50, 40, 20]
SHARD1 = os.path.join('activations', 'c', '1', '0')
JUNK = os.urandom(4096)


def snapshot(root) -> dict[str, str]:
  """Every file under `root` and the sha256 of its bytes: equal before and after = untouched."""
  out = {}
  for parent, _, files in os.walk(root):
    for f in files:
      p = os.path.join(parent, f)
      out[os.path.relpath(p, root)] = hashlib.sha256(open(p, 'rb').read()).hexdigest()
  return out


def writer(path, d=16, dtype='float32', **info):
  return store.StoreWriter(str(path), d, dtype, info or {'test': True}, 8, 64)


def damaged_read(s, match):
  """Every way of reading the damaged rows fails the same way, naming the file and studies."""
  for read in (
      lambda: s.read(np.arange(s.rows)),
      lambda: s.read_range(60, 70),
      lambda: s.read(np.array([100, 3])),
  ):
    with pytest.raises(ConfigError, match=match) as e:
      read()
    assert 'verify_store' in str(e.value) and 'export_activations' in str(e.value)


# --------------------------------------------------------------------------------------------------
# Refusals: nothing is deleted
# --------------------------------------------------------------------------------------------------


def test_a_mistyped_parent_path_is_refused_and_the_store_inside_is_intact(tmp_path, faults):
  """`--config.data.store_path=outputs/demo`, the parent of a store, used to delete it."""
  faults.inject('store: mistyped store path')
  demo = tmp_path / 'outputs' / 'demo'
  x = write_store(demo / 'acts', SIZES)
  (demo / 'summary.json').write_text('{}')
  before = snapshot(demo)
  with pytest.raises(
      ConfigError,
      match=r"store_path='.*demo' is not an activation store and not empty: it holds "
      r'acts/, summary.json\. Nothing was changed',
  ):
    writer(demo)
  assert snapshot(demo) == before and len(before) > 8
  np.testing.assert_array_equal(store.open_store(str(demo / 'acts')).read_range(0, 150), x)


def test_a_store_that_lost_store_json_is_refused_never_overwritten(tmp_path, faults):
  faults.inject('store: store.json lost')
  path = tmp_path / 's'
  write_store(path, SIZES)
  os.remove(path / store.COMMIT)
  before = snapshot(path)
  with pytest.raises(
      ConfigError,
      match=r'looks like an activation store whose commit record \(store.json\) is '
      r'missing: it holds activations/, studies/, tokens/.*not touched.*Restore .*store.json',
  ):
    writer(path)
  with pytest.raises(ConfigError, match='not a committed activation store: it has no store.json'):
    store.open_store(str(path))
  with pytest.raises(ConfigError, match='commit record'):
    verify_store.verify(str(path))
  assert snapshot(path) == before


def test_a_file_or_a_store_of_other_settings_is_refused(tmp_path):
  (tmp_path / 'f').write_text('x')
  with pytest.raises(ConfigError, match=r"store_path='.*f' is a file, not an activation store"):
    writer(tmp_path / 'f')
  write_store(tmp_path / 's', [5])
  before = snapshot(tmp_path / 's')
  with pytest.raises(ConfigError, match=r'd: store 16, config 32.*nothing was changed'):
    writer(tmp_path / 's', d=32)
  assert snapshot(tmp_path / 's') == before


def test_new_stores_go_in_a_new_path_or_an_empty_directory(tmp_path):
  """An empty directory is fine, and so is one holding only what a kill during the very first
  write of store.json leaves (TensorStore's temporary file)."""
  os.makedirs(tmp_path / 'empty')
  os.makedirs(tmp_path / 'killed')
  (tmp_path / 'killed' / 'store.json.__lock').write_text('{"form')
  for p in ('new/deeper', 'empty', 'killed'):
    x = write_store(tmp_path / p, [7])
    np.testing.assert_array_equal(store.open_store(str(tmp_path / p)).read_range(0, 7), x)


def test_an_export_killed_right_after_claiming_its_path_continues(tmp_path, faults):
  """store.json is written before the arrays: a kill in between leaves a store of 0 commits that
  says so, and that the next writer completes."""
  faults.inject('store: killed before the first commit')
  path = tmp_path / 's'
  writer(path)  # claims the path; the "kill": its arrays are lost, nothing was committed
  for name in store.ARRAYS:
    for parent, _, files in os.walk(path / name, topdown=False):
      for f in files:
        os.remove(os.path.join(parent, f))
      os.rmdir(parent)
  with pytest.raises(ConfigError, match='no committed study yet.*Rerun'):
    store.open_store(str(path))
  assert verify_store.verify(str(path)).ok  # not damaged: unfinished
  x = write_store(path, SIZES)
  np.testing.assert_array_equal(store.open_store(str(path)).read_range(0, 150), x)


def test_a_failed_write_keeps_the_last_commit_and_says_so(tmp_path, faults):
  """A full disk (simulated: TensorStore's error for ENOSPC) is a ConfigError, not a traceback;
  the store keeps its last commit and the next run continues after it."""
  faults.inject('store: disk full (simulated ENOSPC)')
  path = tmp_path / 's'
  x = write_store(path, [10, 20])

  class Full:

    def __init__(self, kv):
      self.kv = kv

    def write(self, key, value):
      raise ValueError(f'RESOURCE_EXHAUSTED: Error writing {key}: No space left on device')

  w = writer(path)
  w._kv = Full(w._kv)  # pylint: disable=protected-access
  w.append(np.ones((70, 16), np.float32), np.zeros((70, 6), np.int32), [_record('s2', 2, 70)])
  with pytest.raises(
      ConfigError,
      match=r'failed: RESOURCE_EXHAUSTED.*No space left.*last commit \(2 studies, 30 '
      r'rows\) is intact.*rerun the same command',
  ):
    w.close()
  s = store.open_store(str(path))
  assert s.rows == 30
  np.testing.assert_array_equal(s.read_range(0, 30), x)
  w = writer(path)
  w.append(np.ones((70, 16), np.float32), np.zeros((70, 6), np.int32), [_record('s2', 2, 70)])
  w.close()
  assert verify_store.verify(str(path)).ok


def _record(study_id, index, rows):
  return {'study_id': study_id, 'manifest_index': index, 'row_start': 0, 'rows': rows}


def test_continuing_a_store_whose_last_shard_is_gone_is_refused(tmp_path, faults):
  """Appending rewrites the last shard: with it gone, its committed rows would become zeros."""
  faults.inject('store: deleted shard')
  path = tmp_path / 's'
  write_store(path, SIZES)
  os.remove(path / 'activations' / 'c' / '2' / '0')
  before = snapshot(path)
  with pytest.raises(
      ConfigError,
      match=r'activations/c/2/0 holding its last committed rows \(128-149\) is '
      'missing, and appending would fill them with zeros. Nothing was changed',
  ):
    writer(path)
  assert snapshot(path) == before


# --------------------------------------------------------------------------------------------------
# Missing or altered data is an error, never zeros or garbage
# --------------------------------------------------------------------------------------------------


def test_a_deleted_shard_names_the_file_and_its_studies(tmp_path, faults):
  faults.inject('store: deleted shard')
  path = tmp_path / 's'
  write_store(path, SIZES)
  os.remove(path / SHARD1)
  s = store.open_store(str(path))
  damaged_read(
      s,
      r'store at .* is damaged: .*activations/c/1/0 \(rows 64-127\) is missing .*'
      r'It holds rows of 2 '
      r'studies \(s2, s3; manifest rows 2-3\)',
  )
  np.testing.assert_array_equal(s.read_range(0, 64), s.read(np.arange(64)))  # the rest reads
  report = verify_store.verify(str(path))
  assert report.problems == [
      f'{path / SHARD1} (rows 64-127) is missing: 2 studies (s2, s3; manifest rows 2-3)'
  ]
  assert list(report.bad) == ['s2', 's3'] and report.verified == 3


def test_reads_in_grain_threads_raise_the_same_error(tmp_path):
  """Training reads batches in grain's reader threads: the error reaches the caller intact."""
  path = tmp_path / 's'
  write_store(path, SIZES)
  os.remove(path / SHARD1)
  it = store_source.StoreSource(store.open_store(str(path)), 50, seed=0, num_threads=2).iterator()
  with pytest.raises(ConfigError, match=r'activations/c/1/0 \(rows 64-127\) is missing'):
    for _ in range(4):
      next(it)


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_an_altered_shard_is_detected_at_read_and_by_verify(tmp_path, dtype, faults):
  """4 KB of junk over a shard's data (its index intact) used to read as garbage."""
  faults.inject('store: altered shard')
  path = tmp_path / 's'
  write_store(path, SIZES, dtype=dtype)
  with open(path / SHARD1, 'r+b') as f:
    f.write(JUNK[: os.path.getsize(path / SHARD1) - (8 * 16 + 4)])  # all but the index
  damaged_read(
      store.open_store(str(path)),
      r'activations/c/1/0 \(rows 64-127\) is corrupt \(its bytes fail their checksum.*DATA_LOSS.*'
      r'Digest mismatch.*It holds rows of 2 studies \(s2, s3',
  )
  report = verify_store.verify(str(path))
  assert len(report.problems) == 1 and 'rows 64-127 cannot be read' in report.problems[0]
  assert list(report.bad) == ['s2', 's3']


def test_a_truncated_shard_names_the_file(tmp_path, faults):
  faults.inject('store: truncated shard')
  path = tmp_path / 's'
  write_store(path, SIZES)
  os.truncate(path / SHARD1, os.path.getsize(path / SHARD1) // 2)
  damaged_read(store.open_store(str(path)), r'activations/c/1/0 \(rows 64-127\) is .*DATA_LOSS')
  assert list(verify_store.verify(str(path)).bad) == ['s2', 's3']


def test_store_json_claiming_rows_beyond_the_arrays_is_refused_at_open(tmp_path, faults):
  faults.inject('store: store.json beyond the arrays')
  path = tmp_path / 's'
  write_store(path, SIZES)
  meta = json.loads((path / store.COMMIT).read_text())
  meta['rows'] = 190
  (path / store.COMMIT).write_text(json.dumps(meta))
  with pytest.raises(
      ConfigError,
      match=r'store.json commits 190 rows but the activations array holds only 150.*'
      'Nothing was read.*verify_store',
  ):
    store.open_store(str(path))
  report = verify_store.verify(str(path))
  assert any('rows 150-189 are beyond it' in p for p in report.problems)
  assert any('study records end at row 150' in p for p in report.problems)


@pytest.mark.parametrize('text', ['{"format": "jaxsae-activ', '', '[1, 2]', '{"format": 1}'])
def test_a_damaged_store_json_is_a_clear_error_and_nothing_is_written(tmp_path, text, faults):
  faults.inject('store: damaged store.json')
  path = tmp_path / 's'
  write_store(path, SIZES)
  (path / store.COMMIT).write_text(text)
  before = snapshot(path)
  match = (
      r'store.json (is not valid JSON \(.*\)|lacks [a-z_, ]+): '
      r'the commit record .* damaged.*Restore'
  )
  for call in (lambda: store.open_store(str(path)), lambda: writer(path)):
    with pytest.raises(ConfigError, match=match):
      call()
  with pytest.raises(ConfigError, match=match):
    verify_store.verify(str(path))
  assert snapshot(path) == before


def test_an_altered_shard_without_chunk_checksums_is_caught_by_the_study_checksums(
    tmp_path, monkeypatch, faults
):
  """A store without chunk checksums reads junk as numbers; verify_store still catches it, from
  the crc32 each study recorded of the rows it wrote."""
  faults.inject('store: altered shard')
  monkeypatch.setattr(store, '_sharded_metadata', _old_metadata)
  path = tmp_path / 's'
  write_store(path, SIZES)
  with open(path / SHARD1, 'r+b') as f:
    f.write(JUNK[:1000])
  store.open_store(str(path)).read_range(0, 150)  # garbage, unseen
  report = verify_store.verify(str(path))
  assert report.problems == [
      'the activations of rows 40-89 differ from what was written (their checksum recorded at '
      'export does not match): the data was altered: 1 study (s2; manifest rows 2-2)'
  ]


def _old_metadata(*args):
  """The array metadata jaxsae wrote before chunk checksums."""
  meta = _new_metadata(*args)
  inner = meta['codecs'][0]['configuration']
  inner['codecs'] = [c for c in inner['codecs'] if c['name'] != 'crc32c']
  return meta


_new_metadata = store._sharded_metadata  # pylint: disable=protected-access


def test_stores_written_before_checksums_stay_readable(tmp_path, monkeypatch):
  """No chunk checksums, no study checksums, and all-zero chunks left out of their shard files:
  they read as zeros (as written), verify says there is nothing to compare, and a deleted shard
  is still an error."""
  with monkeypatch.context() as m:
    m.setattr(store, '_sharded_metadata', _old_metadata)
    path = tmp_path / 's'
    x = write_store(path, SIZES)
  for f in (path / 'studies').iterdir():
    records = [{k: v for k, v in r.items() if k != 'checksums'} for r in json.loads(f.read_text())]
    f.write_text(json.dumps(records))
  old = ts.open({'driver': 'zarr3', 'kvstore': store.url(str(path)) + 'activations/'}).result()
  old[72:80].write(np.zeros((8, 16), np.float32)).result()  # the old writer omitted such chunks
  x[72:80] = 0
  s = store.open_store(str(path))
  np.testing.assert_array_equal(s.read_range(0, 150), x)
  np.testing.assert_array_equal(s.read(np.arange(149, -1, -1)), x[::-1])
  report = verify_store.verify(str(path))
  assert report.ok and report.with_checksums == 0
  assert 'study checksums: none recorded' in '\n'.join(verify_store.summary(report, False))
  os.remove(path / SHARD1)
  damaged_read(store.open_store(str(path)), r'activations/c/1/0 \(rows 64-127\) is missing')


# --------------------------------------------------------------------------------------------------
# The commands
# --------------------------------------------------------------------------------------------------


def test_verify_store_command(tmp_path):
  path = tmp_path / 's'
  write_store(path, SIZES)
  r = run_cli([sys.executable, '-m', 'jaxsae.verify_store', str(path)])
  assert r.returncode == 0, r.stderr
  assert 'study checksums: 5 of 5 studies' in r.stdout and 'OK: no problem found' in r.stdout
  os.remove(path / 'tokens' / 'c' / '2' / '0')
  r = run_cli([sys.executable, '-m', 'jaxsae.verify_store', str(path), '--quick'])
  assert r.returncode == 1 and 'Traceback' not in r.stderr
  assert f'problem: {path}/tokens/c/2/0 (rows 128-149) is missing: 2 studies (s3, s4' in r.stdout
  assert 'DAMAGED: 1 problem(s); 2 damaged studies: s3, s4' in r.stdout
  assert 'export_activations' in r.stdout
  with pytest.raises(ConfigError, match='no activation store at .*nope'):  # the command: exit 2
    verify_store.verify(str(tmp_path / 'nope'))


@pytest.mark.slow
def test_training_on_a_store_with_a_deleted_shard_fails_cleanly(tmp_path, faults):
  """The reproduction: training used to read the missing rows as zeros and exit 0."""
  faults.inject('store: deleted shard')
  path = tmp_path / 's'
  write_store(path, [30] * 20)
  os.remove(path / SHARD1)
  args = cli_args(
      'jaxsae.train',
      workdir=tmp_path / 'w',
      **{'data.source': 'store', 'data.store_path': path},
  )
  r = run_cli(args)
  assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-3000:]
  assert r.stderr.startswith('error: the activation store at') or '\nerror: the activation' in (
      r.stderr
  ), r.stderr[-3000:]
  assert 'activations/c/1/0 (rows 64-127) is missing' in r.stderr
  assert 'It holds rows of 3 studies (s2, s3, s4; manifest rows 2-4)' in r.stderr


@pytest.mark.slow
def test_interpretation_statistics_stop_at_a_damaged_shard(tmp_path, faults):
  faults.inject('store: altered shard')
  from jaxsae.interpret import stats  # pylint: disable=import-outside-toplevel

  path = tmp_path / 's'
  write_store(path, [40] * 5)
  with open(path / SHARD1, 'r+b') as f:
    f.write(JUNK[:2000])
  c = tiny_config(**{'sae.k': 2})
  c.interpret.batch_size = 32
  c.data.num_threads = 2
  rng = np.random.default_rng(0)
  params = {
      'W_enc': rng.standard_normal((16, 64)).astype(np.float32),
      'b_enc': np.zeros(64, np.float32),
      'W_dec': rng.standard_normal((64, 16)).astype(np.float32),
      'b_dec': np.zeros(16, np.float32),
      'threshold': np.ones(64, np.float32),
  }
  with pytest.raises(ConfigError, match=r'activations/c/1/0 \(rows 64-127\) is corrupt'):
    stats.compute(c, store.open_store(str(path)), params, str(tmp_path / 'ckpt'), progress=False)


@pytest.mark.torch
def test_export_refuses_a_mistyped_path_before_anything_else(tmp_path):
  """Checked before the manifest is read and the model loaded: no work is spent on a refusal."""
  pytest.importorskip('torch')
  sys.path.insert(0, REPO)
  from experiments import demo  # pylint: disable=import-outside-toplevel
  from jaxsae.bridge import export  # pylint: disable=import-outside-toplevel

  outputs = tmp_path / 'outputs'
  write_store(outputs / 'demo', SIZES)
  (outputs / 'sae').mkdir()
  before = snapshot(outputs)
  c = demo.get_config()
  c.data.store_path = str(outputs)  # the parent of the store
  c.export.manifest = str(tmp_path / 'no_manifest.jsonl')
  with pytest.raises(
      ConfigError, match=r'not an activation store and not empty: it holds demo/, sae/'
  ):
    export.export(c, progress=False)
  assert snapshot(outputs) == before
