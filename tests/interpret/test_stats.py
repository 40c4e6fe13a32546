"""Streaming feature statistics against brute force over the dense [tokens, features] codes."""

import json

import numpy as np
import pytest

from helpers import REPO, run_on_devices, tiny_config
from jaxsae.formats import parts, store
from jaxsae.config import ConfigError
from jaxsae.interpret import stats

D, F = 16, 64


def make_store(path, sizes, seed=0):
  """Studies of random rows whose tokens have every kind, image patches included."""
  rng = np.random.default_rng(seed)
  w = store.StoreWriter(
      str(path), D, 'float32', {'test': True}, rows_per_chunk=8, rows_per_shard=64
  )
  for i, n in enumerate(sizes):
    x = (rng.standard_normal((n, D)) * 2 + 0.5).astype(np.float32)
    t = np.zeros((n, len(store.TOKEN_COLUMNS)), np.int32)
    t[:, 0], t[:, 1], t[:, 2] = i, np.arange(n), rng.integers(0, 50, n)
    t[:, 3] = rng.integers(0, 4, n)
    w.append(x, t, [{'study_id': f's{i}', 'manifest_index': i, 'row_start': 0, 'rows': n}])
  w.close()
  return store.open_store(str(path))


def sae_params(seed=1):
  rng = np.random.default_rng(seed)
  return {
      'W_enc': rng.standard_normal((D, F)).astype(np.float32) / 2,
      'b_enc': rng.standard_normal(F).astype(np.float32) * 0.1,
      'W_dec': rng.standard_normal((F, D)).astype(np.float32),
      'b_dec': rng.standard_normal(D).astype(np.float32) * 0.1,
      'threshold': np.r_[1e9, rng.uniform(1.5, 4.0, F - 1)].astype(np.float32),
  }  # 0: dead


def config(**interpret):
  c = tiny_config(**{'sae.d': D, 'sae.k': 2})
  c.interpret.update(
      {
          'batch_size': 48,
          'top_examples': 5,
          'reservoir': 7,
          'heatmaps': 2,
          'checkpoint_every': 3,
          'row_capacity': 3,
          **interpret,
      }
  )
  c.data.num_threads = 1
  return c


def brute_force(s, p):
  x = s.read_range(0, s.rows).astype(np.float64)
  pre = np.maximum((x - p['b_dec']) @ p['W_enc'] + p['b_enc'], 0)
  return np.where(pre > p['threshold'], pre, 0.0)


def top_rows(keys, n):
  """Per feature (column), the rows of the n largest positive keys, highest first."""
  out = []
  for f in range(keys.shape[1]):
    rows = np.flatnonzero(keys[:, f] > -np.inf)
    rows = rows[np.lexsort((rows, -keys[rows, f]))][:n]
    out.append(list(rows))
  return out


def check_against_brute_force(r, s, p, sizes):
  acts = brute_force(s, p)
  fired = acts > 0
  kinds = s.tokens()[:, 3]
  assert r.tokens == s.rows
  np.testing.assert_array_equal(r.get('count'), fired.sum(0))
  np.testing.assert_allclose(r.get('total'), acts.sum(0), rtol=1e-5)
  np.testing.assert_allclose(r.get('max'), acts.max(0), rtol=1e-5)
  for k in range(4):
    np.testing.assert_array_equal(r.get('kinds')[k], fired[kinds == k].sum(0))
  edges = stats.histogram_edges(sizes)
  for f in range(F):
    want = np.histogram(np.clip(acts[fired[:, f], f], edges[0], edges[-1] * 0.999), edges)[0]
    np.testing.assert_array_equal(r.get('hist')[f], want, err_msg=f'feature {f}')
  top = np.where(fired, acts, -np.inf)
  for f, rows in enumerate(top_rows(top, sizes.top)):
    assert list(r.get('top_row')[f][: len(rows)]) == rows, f
    np.testing.assert_allclose(r.get('top_val')[f][: len(rows)], acts[rows, f], rtol=1e-5)
    assert (r.get('top_row')[f][len(rows) :] == -1).all()
  prio = np.asarray(
      stats._priority(  # pylint: disable=protected-access
          np.arange(s.rows)[:, None].repeat(F, 1), np.arange(F)[None].repeat(s.rows, 0), sizes.seed
      )
  )
  for f, rows in enumerate(top_rows(np.where(fired, prio, -np.inf), sizes.reservoir)):
    assert sorted(r.get('res_row')[f][: len(rows)]) == sorted(rows), f
    got = dict(zip(r.get('res_row')[f], r.get('res_val')[f]))
    np.testing.assert_allclose([got[i] for i in rows], acts[rows, f], rtol=1e-5)
  image = np.where(fired & (kinds[:, None] == 0), acts, -np.inf)
  for f, rows in enumerate(top_rows(image, sizes.image)):
    assert list(r.get('img_row')[f][: len(rows)]) == rows, f


@pytest.mark.slow
def test_statistics_equal_brute_force_and_full_tokens_are_redone(tmp_path):
  s = make_store(tmp_path / 's', [30, 1, 57, 44, 9])  # 141 rows: a partial last batch
  p = sae_params()
  assert (brute_force(s, p) > 0).sum(1).max() > 3  # some tokens overflow row_capacity=3
  c = config()
  r = stats.compute(c, s, p, str(tmp_path / 'ckpt'), progress=False)
  assert r.redone_batches > 0
  check_against_brute_force(r, s, p, r.sizes)
  # Features that never fire, and the reservoir's sample being uniform, are covered above: the
  # fixture has both dead features and features firing on more tokens than the reservoir holds.
  counts = r.get('count')
  assert (counts == 0).any() and (counts > c.interpret.reservoir).any()


def test_a_store_written_by_two_processes_gives_the_brute_force_statistics(tmp_path):
  """The same studies as two export processes write them (jaxsae.formats.parts): read as one."""
  one = make_store(tmp_path / 'one', [30, 1, 57, 44, 9])
  parts.claim(str(tmp_path / 'two'), 2, 5, D, 'float32', {'test': True}, 8, 64)
  for i, (lo, hi) in enumerate(parts.shares(5, 2)):
    w = store.StoreWriter(store.part_path(str(tmp_path / 'two'), i, 2), D, 'float32',
                          {'test': True}, 8, 64)  # fmt: skip
    for r in one.studies()[lo:hi]:
      a, n = r['row_start'], r['rows']
      w.append(one.read_range(a, a + n), one.tokens(a, a + n), [{**r, 'row_start': 0}])
    w.close()
  two = store.open_store(str(tmp_path / 'two'))
  assert isinstance(two, store.PartedStore) and two.rows == one.rows
  p = sae_params()
  r = stats.compute(config(), two, p, str(tmp_path / 'ckpt'), progress=False)
  check_against_brute_force(r, two, p, r.sizes)
  np.testing.assert_array_equal(r.get('count'), stats.compute(
      config(), one, p, str(tmp_path / 'ckpt_one'), progress=False).get('count'))  # fmt: skip


@pytest.mark.slow
def test_interrupted_pass_resumes_to_the_same_result_and_new_rows_are_added(tmp_path):
  s = make_store(tmp_path / 's', [40, 50, 51, 60, 50])  # 6 batches of 48
  p = sae_params()
  c = config()
  real = stats._read_batch  # pylint: disable=protected-access

  def dying(*args):
    if args[-1] == 4:  # the batch after the checkpoint at batch 3
      raise RuntimeError('the machine went away')
    return real(*args)

  stats._read_batch = dying  # pylint: disable=protected-access
  try:
    with pytest.raises(Exception, match='went away'):
      stats.compute(c, s, p, str(tmp_path / 'ckpt'), progress=False)
  finally:
    stats._read_batch = real  # pylint: disable=protected-access
  meta = json.load(open(next((tmp_path / 'ckpt').glob('*/meta/metadata'))))
  assert meta['next_row'] == 3 * 48
  r = stats.compute(c, s, p, str(tmp_path / 'ckpt'), progress=False)
  check_against_brute_force(r, s, p, r.sizes)

  # A finished pass is not redone; rows exported since are added to it.
  w = store.StoreWriter(s.path, D, 'float32', {'test': True}, rows_per_chunk=8, rows_per_shard=64)
  rng = np.random.default_rng(5)
  t = np.zeros((20, 6), np.int32)
  t[:, 0], t[:, 3] = 3, rng.integers(0, 4, 20)
  w.append(
      rng.standard_normal((20, D)).astype(np.float32) * 2,
      t,
      [{'study_id': 's3', 'manifest_index': 3, 'row_start': 0, 'rows': 20}],
  )
  w.close()
  s = store.open_store(s.path)
  r = stats.compute(c, s, p, str(tmp_path / 'ckpt'), progress=False)
  check_against_brute_force(r, s, p, r.sizes)


def test_resuming_with_another_sae_is_refused(tmp_path):
  s = make_store(tmp_path / 's', [30])
  c = config()
  stats.compute(c, s, sae_params(1), str(tmp_path / 'ckpt'), progress=False)
  with pytest.raises(ConfigError, match='another run.*delete that folder'):
    stats.compute(c, s, sae_params(2), str(tmp_path / 'ckpt'), progress=False)


@pytest.mark.multidevice
@pytest.mark.slow
def test_meshes_give_the_same_statistics(tmp_path):
  """8 simulated devices: tokens over `data`, features over `model`, merged on the host."""
  make_store(tmp_path / 's', [30, 1, 57, 44, 9])
  code = f"""
import sys, numpy as np
sys.path[:0] = [{REPO + "/tests"!r}, {REPO + "/tests/interpret"!r}]
from test_stats import config, sae_params
from jaxsae.formats import store
from jaxsae.interpret import stats
s = store.open_store({str(tmp_path / "s")!r})
out = {{}}
for data, model in [(1, 1), (8, 1), (2, 4), (1, 8)]:
  c = config()
  c.mesh.data, c.mesh.model = data, model
  r = stats.compute(c, s, sae_params(), {str(tmp_path)!r} + f"/ckpt{{data}}x{{model}}", progress=False)
  out[(data, model)] = r.tables
for mesh, t in out.items():
  for k, v in t.items():
    ref = out[(1, 1)][k]
    assert np.allclose(v, ref, rtol=1e-5) if v.dtype.kind == 'f' else (v == ref).all(), (mesh, k)
print('ok')
"""
  run_on_devices(code, 8)
