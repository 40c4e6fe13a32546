"""Alignment statistics (features vs finding labels) against brute force over the dense
[studies x kinds x features] maxima, with a feature planted on the positive studies of one
finding."""

import numpy as np
import pytest
from scipy import optimize

from helpers import REPO, run_on_devices
from jaxsae.findings.labels import NEGATIVE, NOT_MENTIONED, OBSERVATIONS, POSITIVE, UNCERTAIN
from jaxsae.formats import store
from jaxsae.interpret import alignment, stats
from test_stats import D, F, brute_force, config as stats_config

EFFUSION, CARDIO = OBSERVATIONS.index('Pleural Effusion'), OBSERVATIONS.index('Cardiomegaly')
PLANTED, N_STUDIES = 5, 90


def make_store(path, seed=0):
  """Studies of 12..40 rows of every kind; on the studies positive for effusion, a third of the
  report tokens carry a large coordinate 0 (which only feature PLANTED reads)."""
  rng = np.random.default_rng(seed)
  labels = np.full((N_STUDIES, len(OBSERVATIONS)), NOT_MENTIONED, np.int8)
  labels[:, EFFUSION] = rng.choice([POSITIVE, NEGATIVE, UNCERTAIN, NOT_MENTIONED], N_STUDIES,
                                   p=[0.35, 0.3, 0.1, 0.25])  # fmt: skip
  labels[:, CARDIO] = rng.choice([POSITIVE, NEGATIVE], N_STUDIES, p=[0.4, 0.6])
  labels[:3, OBSERVATIONS.index('Fracture')] = POSITIVE  # too few for figures
  w = store.StoreWriter(str(path), D, 'float32', {'test': True}, rows_per_chunk=8,
                        rows_per_shard=64)  # fmt: skip
  for i in range(N_STUDIES):
    n = int(rng.integers(12, 41))
    x = (rng.standard_normal((n, D)) * 2 + 0.5).astype(np.float32)
    x[:, 0] = rng.standard_normal(n)
    t = np.zeros((n, len(store.TOKEN_COLUMNS)), np.int32)
    t[:, 0], t[:, 1], t[:, 2] = i, np.arange(n), rng.integers(0, 50, n)
    t[:, 3] = rng.choice([0, 1, 3], n)  # image, prompt, report (no boilerplate)
    if labels[i, EFFUSION] == POSITIVE:
      report = np.flatnonzero(t[:, 3] == 3)
      x[report[::3], 0] += rng.uniform(6, 12, len(report[::3]))
    w.append(x, t, [{'study_id': f's{i}', 'manifest_index': i, 'row_start': 0, 'rows': n}])
  w.close()
  return store.open_store(str(path)), labels


def sae_params(seed=1):
  rng = np.random.default_rng(seed)
  W = rng.standard_normal((D, F)).astype(np.float32) / 2
  W[0] = 0.0  # coordinate 0 is read by PLANTED only
  W[:, PLANTED] = 0.0
  W[0, PLANTED] = 1.0
  threshold = rng.uniform(1.5, 4.0, F).astype(np.float32)
  threshold[PLANTED], threshold[0] = 4.0, 1e9  # 0: dead
  return {
      'W_enc': W,
      'b_enc': rng.standard_normal(F).astype(np.float32) * 0.1,
      'W_dec': rng.standard_normal((F, D)).astype(np.float32),
      'b_dec': np.r_[0.0, rng.standard_normal(D - 1) * 0.1].astype(np.float32),
      'threshold': threshold,
  }


def config(**interpret):
  """row_capacity=F: no batch is redone (one compilation); the fixture's run redoes some."""
  c = stats_config(**{'batch_size': 96, 'checkpoint_every': 4, 'row_capacity': F, **interpret})
  c.findings.probe_studies = 80
  c.findings.probe_held_out = 0.3
  c.findings.probe_k = (1, 2, 5)
  return c


def scores(s, p):
  """Dense per-study maxima [studies, kinds (TOKEN_KINDS) + any, F] by brute force."""
  acts = brute_force(s, p)
  t = s.tokens()
  out = np.zeros((N_STUDIES, len(store.TOKEN_KINDS) + 1, F))
  for i in range(N_STUDIES):
    for k in range(len(store.TOKEN_KINDS)):
      m = (t[:, 0] == i) & (t[:, 3] == k)
      if m.any():
        out[i, k] = acts[m].max(0)
    out[i, -1] = out[i, :-1].max(0)
  return out


def pairwise_auroc(pos, neg):
  """[P, F], [N, F] -> [F]: P(pos > neg) + P(pos == neg) / 2 over all pairs."""
  a, b = pos[:, None], neg[None]
  return ((a > b) + 0.5 * (a == b)).mean((0, 1))


def classes(column, uncertain='exclude'):
  pos = (column == POSITIVE) | ((column == UNCERTAIN) & (uncertain == 'positive'))
  keep = (column != UNCERTAIN) | (uncertain != 'exclude')
  return pos, keep


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  root = tmp_path_factory.mktemp('align')
  s, labels = make_store(root / 's')
  p = sae_params()
  c = config()
  r = stats.compute(
      config(row_capacity=16), s, p, str(root / 'ckpt'), progress=False, labels=labels
  )
  assert r.redone_batches > 0  # candidates of a redone batch are the wider ones
  return root, s, labels, p, c, r


def test_auroc_precision_recall_equal_brute_force_on_the_binned_scores(run):
  _, s, labels, p, c, r = run
  acc = r.alignment
  dense = scores(s, p)
  kinds = {k: i for i, k in enumerate(store.TOKEN_KINDS)}
  kinds['any'] = len(store.TOKEN_KINDS)
  assert sorted(acc.hist) == ['any', 'image', 'prompt', 'report']
  assert acc.n_all == N_STUDIES and (acc.n_pos == (labels == POSITIVE).sum(0)).all()
  for uncertain in ('exclude', 'positive', 'negative'):
    for name in acc.hist:
      figs = alignment.kind_figures(acc.hist[name], acc, uncertain)
      code = alignment.binned(dense[:, kinds[name]], p['threshold'])
      np.testing.assert_array_equal(figs['fired'], (code > 0).sum(0))
      for j in (EFFUSION, CARDIO):
        pos, keep = classes(labels[:, j], uncertain)
        want = pairwise_auroc(code[pos & keep], code[~pos & keep])
        np.testing.assert_allclose(figs['auroc'][:, j], want, rtol=0, atol=1e-12)
        tp, fp = (code[pos & keep] > 0).sum(0), (code[~pos & keep] > 0).sum(0)
        with np.errstate(invalid='ignore'):
          np.testing.assert_allclose(figs['precision'][:, j], tp / (tp + fp), atol=1e-12)
        np.testing.assert_allclose(figs['recall'][:, j], tp / (pos & keep).sum(), atol=1e-12)
  # Binning changes AUROC little: within 0.01 of the unbinned brute force on average and for
  # the planted feature, within 0.025 for every feature (90 studies: one tied pair is 1/2000).
  for j in (EFFUSION, CARDIO):
    pos, keep = classes(labels[:, j])
    raw = pairwise_auroc(dense[pos & keep, -1], dense[~pos & keep, -1])
    got = alignment.kind_figures(acc.hist['any'], acc, 'exclude')['auroc'][:, j]
    err = np.abs(got - raw)
    assert err.mean() < 0.01 and err[PLANTED] < 0.01 and err.max() < 0.025, (err.mean(), err.max())


def test_the_planted_feature_aligns_with_its_finding_and_the_report_says_so(run):
  _, s, labels, p, c, r = run
  rep = alignment.report(r.alignment, c.findings)
  eff = rep['by_finding']['Pleural Effusion']
  assert eff['reason'] is None and eff['features'][0]['feature'] == PLANTED
  assert eff['features'][0]['auroc'] >= 0.95 and eff['features'][0]['kind'] in ('report', 'any')
  assert rep['by_finding']['Fracture']['reason'].startswith('only 3 positive studies')
  assert rep['by_finding']['Fracture']['probe'] is None
  assert rep['coverage']['of'] == 2 and 'Pleural Effusion' in rep['coverage']['covered']
  assert rep['kinds'] == ['report', 'prompt', 'image', 'any']
  assert rep['studies']['total'] == N_STUDIES
  assert rep['studies']['positives']['Pleural Effusion'] == (labels[:, EFFUSION] == POSITIVE).sum()
  assert rep['features'][str(PLANTED)][0]['finding'] == 'Pleural Effusion'
  assert '0' not in rep['features']  # dead
  # An unrelated feature (it never reads coordinate 0) is near chance for effusion.
  dense = scores(s, p)
  busy = int(np.argmax((dense[:, -1] > 0).sum(0) * (np.arange(F) != PLANTED)))
  any_auroc = alignment.kind_figures(r.alignment.hist['any'], r.alignment, 'exclude')['auroc']
  assert abs(any_auroc[busy, EFFUSION] - 0.5) < 0.15
  assert rep['by_finding']['Pleural Effusion']['probe']['features'][0] == [PLANTED]
  line = alignment.summary_line(rep)
  assert 'of 2 findings' in line and f'Pleural Effusion: feature {PLANTED}' in line
  json_text = __import__('json').dumps(rep)
  assert 'NaN' not in json_text


def brute_probe(dense_any, y, test, k):
  """Top-k by mean difference on train, standardised, L2 logistic regression by scipy."""
  train = ~test
  diff = dense_any[train][y[train]].mean(0) - dense_any[train][~y[train]].mean(0)
  feats = np.lexsort((np.arange(F), -diff))[:k]
  X = dense_any[:, feats]
  mu, sd = X[train].mean(0), X[train].std(0)
  Z = (X - mu) / np.where(sd > 0, sd, 1.0)
  A, t = np.c_[Z[train], np.ones(train.sum())], y[train].astype(float)

  def loss(w):
    m = A @ w
    return np.sum(np.logaddexp(0, m) - t * m) + alignment.L2 / 2 * np.sum(w[:-1] ** 2)

  w = optimize.minimize(loss, np.zeros(k + 1), method='BFGS', options={'gtol': 1e-10}).x
  pred = Z[test] @ w[:-1] + w[-1] > 0
  return list(feats), (pred == y[test]).mean()


def test_sparse_probes_equal_brute_force(run):
  _, s, labels, p, c, r = run
  rep = alignment.report(r.alignment, c.findings)
  dense = scores(s, p)[:, -1]
  probe, held = alignment.probe_split([f's{i}' for i in range(N_STUDIES)], 80, 0.3)
  ids = np.array(sorted(int(x[1:]) for x in probe))
  test = np.array([f's{i}' in held for i in ids])
  for j in (EFFUSION, CARDIO):
    y, keep = classes(labels[ids, j])
    got = rep['by_finding'][OBSERVATIONS[j]]['probe']
    assert (
        got['train_studies'] == (keep & ~test).sum() and got['test_studies'] == (keep & test).sum()
    )
    for i, k in enumerate((1, 2)):
      feats, acc = brute_probe(dense[ids][keep], y[keep], test[keep], k)
      assert got['features'][i] == feats
      assert abs(got['accuracy'][i] - acc) < 1e-4  # the report rounds to 4 decimals
  assert rep['by_finding']['Pleural Effusion']['probe']['accuracy'][0] >= 0.9


def test_an_interrupted_pass_resumes_to_the_same_alignment(run, tmp_path):
  _, s, labels, p, c, r = run
  real = stats._read_batch  # pylint: disable=protected-access

  def dying(*args):
    if args[-1] == 5:  # the batch after the checkpoint at batch 4
      raise RuntimeError('the machine went away')
    return real(*args)

  stats._read_batch = dying  # pylint: disable=protected-access
  try:
    with pytest.raises(Exception, match='went away'):
      stats.compute(c, s, p, str(tmp_path / 'ckpt'), progress=False, labels=labels)
  finally:
    stats._read_batch = real  # pylint: disable=protected-access
  resumed = stats.compute(c, s, p, str(tmp_path / 'ckpt'), progress=False, labels=labels)
  a, b = resumed.alignment.state(), r.alignment.state()
  assert a[1] == b[1]
  for k in a[0]:
    np.testing.assert_array_equal(a[0][k], b[0][k], err_msg=k)
  assert alignment.report(resumed.alignment, c.findings) == alignment.report(
      r.alignment, c.findings
  )
  # A finished pass restores the same alignment; other labels are refused.
  again = stats.compute(c, s, p, str(tmp_path / 'ckpt'), progress=False, labels=labels)
  assert alignment.report(again.alignment, c.findings) == alignment.report(r.alignment, c.findings)
  other = labels.copy()
  other[0, CARDIO] = POSITIVE if other[0, CARDIO] != POSITIVE else NEGATIVE
  with pytest.raises(stats.ConfigError, match='other finding labels'):
    stats.compute(c, s, p, str(tmp_path / 'ckpt'), progress=False, labels=other)


def test_without_labels_nothing_changes(run, tmp_path):
  _, s, labels, p, c, r = run
  plain = stats.compute(c, s, p, str(tmp_path / 'a'), progress=False)
  assert plain.alignment is None
  c.findings.enabled = False
  off = stats.compute(c, s, p, str(tmp_path / 'b'), progress=False, labels=labels)
  c.findings.enabled = True
  assert off.alignment is None
  for k, v in r.tables.items():
    np.testing.assert_array_equal(plain.tables[k], v, err_msg=k)


def test_labels_as_a_mapping_or_finding_labels_give_the_same_table(run):
  _, s, labels, _, _, _ = run
  from jaxsae.findings import labels as labels_lib

  recs = s.studies()
  want = alignment.label_table(labels, recs)
  by_index = alignment.label_table({i: labels[i] for i in range(N_STUDIES)}, recs)
  table = labels_lib.from_rows([f's{i}' for i in range(N_STUDIES)], labels)
  np.testing.assert_array_equal(by_index, want)
  np.testing.assert_array_equal(alignment.label_table(table, recs), want)


@pytest.mark.multidevice
@pytest.mark.slow
def test_meshes_give_the_same_alignment(run):
  root = run[0]
  code = f"""
import sys, numpy as np
sys.path[:0] = [{REPO + "/tests"!r}, {REPO + "/tests/interpret"!r}]
from test_alignment import config, make_store, sae_params
from jaxsae.interpret import alignment, stats
s, labels = make_store({str(root / "mesh_store")!r})
out = {{}}
for data, model in [(1, 1), (2, 1), (1, 2)]:
  c = config()
  c.mesh.data, c.mesh.model = data, model
  r = stats.compute(c, s, sae_params(), {str(root)!r} + f"/mckpt{{data}}x{{model}}",
                    progress=False, labels=labels)
  out[(data, model)] = alignment.report(r.alignment, c.findings)
assert out[(2, 1)] == out[(1, 1)] and out[(1, 2)] == out[(1, 1)]
print('ok')
"""
  run_on_devices(code, 2)


def test_studies_where_nothing_fires_count_in_the_totals_only():
  """Closing studies without one firing feature (a quiet SAE) adds nothing to the histograms."""
  labels = np.full((3, len(OBSERVATIONS)), NOT_MENTIONED, np.int8)
  labels[1, 10] = POSITIVE
  records = [
      {'study_id': f's{i}', 'manifest_index': i, 'row_start': 2 * i, 'rows': 2} for i in range(3)
  ]
  acc = alignment.Accumulator(4, np.ones(4, np.float32), labels, records, 10, 0.5)
  quiet = np.zeros((6, 2), np.float32)
  acc.add(np.repeat(np.arange(3), 2), np.full(6, 3), quiet, np.zeros((6, 2), np.int64))
  acc.finish()
  assert acc.n_all == 3 and acc.n_pos[10] == 1
  assert all(int(h['all'].sum()) == 0 for h in acc.hist.values())
