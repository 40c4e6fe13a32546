"""The held-out split: by study, deterministic, stable as the store grows, never read in training,
and what the end-of-training evaluation, the resume check and interpret's dead count read."""

import grain
import jax
import numpy as np
import pytest

from helpers import check_iterator_resumes, tiny_config, write_store
from jaxsae import metrics, model, train_step, trainer, weights
from jaxsae.config import ConfigError
from jaxsae.data import store_source, synthetic
from jaxsae.formats import split, store
from jaxsae.formats.tokens import TOKEN_COLUMNS
from jaxsae.interpret import stats

SIZES = [37 + 3 * i for i in range(27)]  # distinct study sizes: a held-out row count names studies


@pytest.fixture
def split_store(tmp_path):
  x = write_store(tmp_path / 's', SIZES)
  return store.open_store(str(tmp_path / 's')), x


def _starts():
  return np.concatenate([[0], np.cumsum(SIZES)])


def _held_rows(fraction):
  """The held-out studies and their row ids, from the rule applied by hand to the study ids."""
  starts = _starts()
  held = [i for i in range(len(SIZES)) if split.is_held_out(f's{i}', fraction)]
  return held, np.concatenate([np.arange(starts[i], starts[i + 1]) for i in held] or [[]])


def _ids(batch, x):
  lookup = {row.tobytes(): i for i, row in enumerate(x)}
  return [lookup[row.tobytes()] for row in batch]


def test_the_split_is_by_study_id_deterministic_and_grows_with_the_fraction(split_store):
  s, _ = split_store
  records = s.studies()
  a, b = split.split(records, 0.3), split.split(list(reversed(records)), 0.3)
  held, rows = _held_rows(0.3)
  assert 0 < len(held) < len(SIZES)  # the fixture holds some studies out, not all
  assert a.held_out == tuple(f's{i}' for i in held) and set(b.held_out) == set(a.held_out)
  assert np.array_equal(a.ranges, b.ranges) and a.held_out_rows == len(rows)
  assert set(a.held_out).isdisjoint(a.training) and len(a.held_out + a.training) == len(SIZES)
  assert (
      set(split.split(records, 0.1).held_out)
      <= set(a.held_out)
      <= set(split.split(records, 0.6).held_out)
  )
  assert split.split(records, 0.0).held_out == ()
  np.testing.assert_array_equal(a.first_rows(10**9), rows)
  np.testing.assert_array_equal(a.first_rows(50), rows[:50])
  with pytest.raises(ConfigError, match=r'held_out_fraction must be in \[0, 1\), got 1.0'):
    split.split(records, 1.0)


def test_training_never_reads_a_held_out_row_and_held_out_gives_them_in_order(split_store):
  s, x = split_store
  _, held = _held_rows(0.3)
  src = store_source.StoreSource(s, 50, seed=1, held_out_fraction=0.3)
  n_train = s.rows - len(held)
  epoch = sum((_ids(src.batch(i), x) for i in range(n_train // 50)), [])
  assert len(set(epoch)) == len(epoch) == n_train // 50 * 50  # a permutation of training rows
  assert not set(epoch) & set(held.tolist())
  assert len(set(range(s.rows)) - set(epoch) - set(held.tolist())) == n_train % 50  # remainder
  assert src.held_out_rows == len(held) and f'({len(held)} rows) held out' in src.held_out_note
  pieces = list(src.held_out(10**9))
  assert all(len(p) <= 50 for p in pieces)
  np.testing.assert_array_equal(np.concatenate(pieces), x[held])
  np.testing.assert_array_equal(np.concatenate(list(src.held_out(77))), x[held[:77]])


def test_membership_is_stable_when_the_store_grows(tmp_path):
  path = str(tmp_path / 's')
  write_store(path, SIZES[:12])
  before = split.split(store.open_store(path).studies(), 0.3)
  w = store.StoreWriter(path, 16, 'float32', {'test': True}, rows_per_chunk=8, rows_per_shard=64)
  rng = np.random.default_rng(5)
  for i in range(15):  # more studies exported later, appended after the first ones
    w.append(
        rng.standard_normal((40, 16)).astype(np.float32),
        np.zeros((40, len(TOKEN_COLUMNS)), np.int32),
        [{'study_id': f'later{i}', 'manifest_index': 12 + i, 'row_start': 0, 'rows': 40}],
    )
  w.close()
  after = split.split(store.open_store(path).studies(), 0.3)
  old = {f's{i}' for i in range(12)}
  assert [h for h in after.held_out if h in old] == list(before.held_out)
  assert [t for t in after.training if t in old] == list(before.training)
  assert np.array_equal(after.ranges[: len(before.ranges)], before.ranges)
  assert len(after.held_out) > len(before.held_out)  # some of the new ones are held out too


def test_fraction_zero_reads_exactly_the_old_pipeline(split_store):
  s, _ = split_store
  old = (
      grain.MapDataset.range(s.rows).shuffle(seed=3).batch(64, drop_remainder=True).repeat()
  )  # the pipeline before the split existed
  for fraction in (0.0, 0.01):  # 0.01 holds out none of these 27 studies
    src = store_source.StoreSource(s, 64, seed=3, held_out_fraction=fraction)
    assert src.held_out_rows == 0
    for i in (0, 5, 30):
      np.testing.assert_array_equal(src.batch(i), s.read(old[i]))


def test_iterator_with_a_split_resumes_at_the_exact_batch(split_store):
  s, _ = split_store
  src = store_source.StoreSource(s, 64, seed=0, held_out_fraction=0.3, num_threads=2, prefetch=2)
  # across the epoch boundary
  check_iterator_resumes(src, 3, 14)


def test_a_split_leaving_less_than_a_batch_names_the_fraction(split_store):
  s, _ = split_store
  with pytest.raises(ConfigError, match=r'training rows after holding out .*held_out_fraction'):
    store_source.StoreSource(s, s.rows - 40, seed=0, held_out_fraction=0.3)


def test_synthetic_held_out_batches_come_from_an_index_range_training_never_reads():
  src = synthetic.SyntheticSource.from_config(tiny_config())
  pieces = list(src.held_out(150))
  assert [len(p) for p in pieces] == [64, 64, 22] and src.held_out_rows is None
  np.testing.assert_array_equal(pieces[0], src.batch(synthetic.HELD_OUT_START))
  np.testing.assert_array_equal(pieces[2], src.batch(synthetic.HELD_OUT_START + 2)[:22])
  assert not np.allclose(pieces[0], src.batch(0))


def _state(d=16, F=64, threshold=0.3, seed=0):
  params = {k: np.asarray(v) for k, v in model.init_params(jax.random.PRNGKey(seed), d, F).items()}
  params['b_dec'] = np.full(d, 1.0, np.float32)  # the stored rows' centre
  params['b_enc'] = np.linspace(-3, 0.5, F).astype(np.float32)
  params['b_enc'][: F // 4] = -1e4  # dead on any rows
  return {'params': params, 'threshold': np.float32(threshold)}


def _by_hand(state, x, scale):
  """FVU (about the rows' mean), L0 and firing counts of the JumpReLU SAE on rows x."""
  p, x = state['params'], x / scale
  pre = np.maximum((x - p['b_dec']) @ p['W_enc'] + p['b_enc'], 0)
  acts = np.where(pre > state['threshold'], pre, 0)
  err = np.sum((x - acts @ p['W_dec'] - p['b_dec']) ** 2)
  return err / np.sum((x - x.mean(0)) ** 2), (acts > 0).sum(1).mean(), (acts > 0).sum(0)


def _planted_store(path, fraction):
  """SIZES studies whose held-out ones hold rows 5x larger than the training ones: a figure
  measured on the wrong rows is far off."""
  rng = np.random.default_rng(0)
  w = store.StoreWriter(str(path), 16, 'float32', {'test': True}, rows_per_chunk=8)
  out = []
  for i, n in enumerate(SIZES):
    x = rng.standard_normal((n, 16)) * (15 if split.is_held_out(f's{i}', fraction) else 3) + 1
    out.append(x.astype(np.float32))
    w.append(
        out[-1],
        np.zeros((n, len(TOKEN_COLUMNS)), np.int32),
        [{'study_id': f's{i}', 'manifest_index': i, 'row_start': 0, 'rows': n}],
    )
  w.close()
  return store.open_store(str(path)), np.concatenate(out)


def test_end_of_training_metrics_come_from_the_held_out_rows(tmp_path):
  s, x = _planted_store(tmp_path / 's', 0.3)
  _, held = _held_rows(0.3)
  src = store_source.StoreSource(s, 64, seed=0, held_out_fraction=0.3)
  state, scale = _state(), 2.0
  sc = train_step.StepConfig.from_config(tiny_config())
  for tokens, rows in ((10**6, held), (100, held[:100])):
    got = trainer.end_of_training_metrics(state, src, scale, sc, tokens)
    fvu, l0, fires = _by_hand(state, x[rows], scale)
    assert got['eval_tokens'] == got['dead_over_tokens'] == len(rows)
    assert got['eval_fvu'] == pytest.approx(fvu, rel=1e-4)
    assert got['eval_l0'] == pytest.approx(l0, rel=1e-5)
    assert got['dead_latents'] == int((fires == 0).sum()) and 0 < got['dead_latents'] < 64
    assert got['dead_fraction'] == got['dead_latents'] / 64 and 'held out' in got['eval_on']
  train_rows = np.setdiff1d(np.arange(s.rows), held)
  assert _by_hand(state, x[train_rows], scale)[1] < 0.8 * got['eval_l0']  # the planted gap
  none = store_source.StoreSource(s, 64, seed=0)  # fraction 0: nothing to evaluate on, said so
  got = trainer.end_of_training_metrics(state, none, scale, sc, 1000)
  assert got['eval_tokens'] == 0 and got['eval_fvu'] is None and got['dead_fraction'] is None
  assert 'held_out_fraction=0' in got['eval_on']


def test_interpret_counts_dead_latents_the_summary_way(split_store):
  s, _ = split_store
  c = tiny_config(**{'data.held_out_fraction': 0.3, 'train.eval_tokens': 500})
  c.interpret.batch_size = 128
  state, scale = _state(), 2.0
  src = store_source.StoreSource(s, 64, seed=0, held_out_fraction=0.3)
  sc = train_step.StepConfig.from_config(c)
  summary = trainer.end_of_training_metrics(state, src, scale, sc, c.train.eval_tokens)
  raw, threshold = weights.fold_scale(state['params'], float(state['threshold']), scale)
  got = stats.held_out_dead(c, s, {**raw, 'threshold': np.full(64, threshold, np.float32)})
  assert got['dead_over_tokens'] == summary['dead_over_tokens'] == 500
  assert got['dead_latents'] == summary['dead_latents'] and got['dead_on'] in src.held_out_note
  assert metrics.dead_latents(np.array([0, 3, 0, 1]), 9) == {
      'dead_fraction': 0.5,
      'dead_latents': 2,
      'dead_over_tokens': 9,
  }


@pytest.mark.slow
def test_resuming_with_another_held_out_fraction_is_refused(tmp_path):
  write_store(tmp_path / 's', [150] * 8)
  overrides = {
      'data.source': 'store',
      'data.store_path': str(tmp_path / 's'),
      'data.held_out_fraction': 0.2,
      'train.steps': 6,
      'optim.warmup_steps': 2,
      'optim.decay_start': 4,
      'sae.threshold_start_step': 2,
      'train.checkpoint_every': 3,
  }
  run = str(tmp_path / 'run')
  trainer.train_and_evaluate(tiny_config(**overrides), run)
  with pytest.raises(ConfigError, match=r'trained with data.held_out_fraction=0.2 .* says 0\b'):
    trainer.train_and_evaluate(
        tiny_config(**{**overrides, 'data.held_out_fraction': 0.0, 'train.steps': 9}), run
    )
