"""Features against clinical findings: AUROC, precision/recall and sparse probes per finding.

A study's score for a feature and token kind is the feature's largest activation over the study's
tokens of that kind ('any': all its tokens; 0 when it never fires). The statistics pass
(jaxsae/interpret/stats.py) hands every batch's firing features to an `Accumulator`, which keeps
only what the figures need, in memory that does not grow with the number of studies:

- per kind, histograms of the scores, binned by log2(score / the feature's threshold) (9 bins an
  octave over 6 octaves; JumpReLU scores start at the threshold): over all studies `all`
  [F, BINS], over those labelled positive `pos` [14, F, BINS] and uncertain `unc` [14, F, BINS]
  (negatives are all - pos - unc; a study that did not fire is implicit in the class totals). Every
  `findings.uncertain` rule is read off the same histograms. Memory: 4 bytes x F x BINS x
  (1 + 2 x 14) per kind, ~103 MB per kind at F = 16384 (BINS = 54).
- the study in progress (studies are contiguous in the store; one can span batches): its sparse
  per-(kind, feature) maxima.
- for up to `findings.probe_studies` studies (chosen by a hash of the study id) their sparse
  'any' maxima, for the k-sparse probes (SAEBench's sparse probing: top-k features by mean
  difference on the training studies, then an L2 logistic regression on those k).

AUROC from the histograms is exact for the binned scores (Mann-Whitney, ties half); two scores
within ~8 % of each other (one bin), or both above 64 x the threshold, may count as a tie.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Mapping, Sequence

import numpy as np

from jaxsae.findings.labels import NOT_MENTIONED, OBSERVATIONS, POSITIVE, UNCERTAIN
from jaxsae.formats.tokens import TOKEN_KINDS

OCTAVES, PER_OCTAVE = 6, 9  # score bins: the feature's threshold x 2^0 .. 2^6, above clipped
BINS = OCTAVES * PER_OCTAVE
NO_THRESHOLD_SCALE = 2.0**-3  # the bins' start for a feature without a positive threshold
NF = len(OBSERVATIONS)
ANY = 'any'
KIND_ORDER = ('report', 'prompt', 'boilerplate', 'image')  # how kinds are listed in the output
L2 = 1.0  # the probes' ridge penalty on standardised features (the intercept is not penalised)
FEATURES_LISTED = 5  # findings listed per feature


def scales(threshold: np.ndarray) -> np.ndarray:
  """Where each feature's bins start: its JumpReLU threshold (every score it has is above)."""
  t = np.asarray(threshold, np.float64)
  return np.where(t > 0, t, NO_THRESHOLD_SCALE)


def bin_of(values: np.ndarray, scale: np.ndarray) -> np.ndarray:
  """The histogram bin (0 .. BINS-1) of positive scores of features whose bins start at scale."""
  b = np.floor(np.log2(np.maximum(values / scale, 1e-30)) * PER_OCTAVE).astype(np.int64)
  return np.clip(b, 0, BINS - 1)


def binned(scores: np.ndarray, threshold: np.ndarray) -> np.ndarray:
  """Scores [..., F] as the histograms see them: 0 for none, else 1 + bin (order-preserving)."""
  return np.where(scores > 0, 1 + bin_of(scores, scales(threshold)), 0)


def study_hash(study_id: str, salt: str) -> float:
  """A fixed number in [0, 1) per study id: picks probe studies and their held-out split."""
  h = hashlib.blake2b(f'{salt}:{study_id}'.encode(), digest_size=8).digest()
  return int.from_bytes(h, 'big') / 2.0**64


def probe_split(study_ids: Sequence[str], n: int, held_out: float) -> tuple[set, set]:
  """(probe studies, held-out ones among them): the n studies of smallest hash, and those whose
  second hash falls below `held_out`."""
  ids = sorted(set(map(str, study_ids)), key=lambda s: (study_hash(s, 'probe'), s))[:n]
  return set(ids), {s for s in ids if study_hash(s, 'held_out') < held_out}


def label_table(labels: Any, studies: Sequence[dict]) -> np.ndarray:
  """Labels by manifest index (int8 [max index + 1, 14]; unknown studies NOT_MENTIONED), from
  an array aligned with the store's study records, a FindingLabels or {manifest index: row}."""
  exported = [r for r in studies if not r.get('skipped')]
  top = max([int(r['manifest_index']) for r in studies] + [-1]) + 1
  out = np.full((top, NF), NOT_MENTIONED, np.int8)
  if hasattr(labels, 'aligned'):  # FindingLabels
    values, _ = labels.aligned([r['study_id'] for r in exported])
    out[[int(r['manifest_index']) for r in exported]] = values
  elif isinstance(labels, Mapping):
    for i, row in labels.items():
      if int(i) >= len(out):
        continue
      out[int(i)] = np.asarray(row, np.int8)
  else:
    values = np.asarray(labels, np.int8)
    if values.shape != (len(studies), NF):
      raise ValueError(
          f'finding labels {values.shape}: expected one row of {NF} per study record '
          f"({len(studies)}), in the store's order."
      )
    out[[int(r['manifest_index']) for r in studies]] = values
  return out


def _group_max(key: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(unique keys, the maximum value of each)."""
  if not key.size:
    return key, values
  order = np.argsort(key, kind='stable')
  k = key[order]
  starts = np.flatnonzero(np.r_[True, k[1:] != k[:-1]])
  return k[starts], np.maximum.reduceat(values[order], starts)


class Accumulator:
  """Streams the store's firing features (`add`) into the alignment histograms."""

  def __init__(
      self,
      F: int,
      threshold: np.ndarray,
      labels: np.ndarray,
      studies: Sequence[dict],
      probe_studies: int,
      probe_held_out: float,
  ):
    self.F, self.labels = F, labels
    self.scale = np.broadcast_to(scales(threshold), (F,))
    self.ids = {int(r['manifest_index']): str(r['study_id']) for r in studies}
    probe, _ = probe_split(
        [r['study_id'] for r in studies if not r.get('skipped')], probe_studies, probe_held_out
    )
    self.probe_index = {i for i, s in self.ids.items() if s in probe}
    self.hist: dict[str, dict[str, np.ndarray]] = {}
    self.n_all, self.n_labelled = 0, 0
    self.n_pos, self.n_unc = np.zeros(NF, np.int64), np.zeros(NF, np.int64)
    self.open = -1  # manifest index of the study in progress (-1: none)
    self.open_kf = np.zeros(0, np.int64)  # its entries: kind * F + feature, and their maxima
    self.open_v = np.zeros(0, np.float32)
    self.probe_rows: list[tuple[int, np.ndarray, np.ndarray]] = []  # (study, features, maxima)

  def kind_hist(self, name: str) -> dict[str, np.ndarray]:
    if name not in self.hist:
      self.hist[name] = {
          'all': np.zeros((self.F, BINS), np.int32),
          'pos': np.zeros((NF, self.F, BINS), np.int32),
          'unc': np.zeros((NF, self.F, BINS), np.int32),
      }
    return self.hist[name]

  def add(self, study: np.ndarray, kind: np.ndarray, vals: np.ndarray, fidx: np.ndarray) -> None:
    """A batch's tokens in store order: study (manifest index) and kind per token, and each
    token's candidate features vals/fidx [tokens, C] (fired where vals > 0)."""
    if not study.size:
      return
    change = np.r_[True, study[1:] != study[:-1]]
    local = np.cumsum(change) - 1
    firsts = study[change]
    fired = vals > 0
    row, col = np.nonzero(fired)
    key = (local[row].astype(np.int64) * len(TOKEN_KINDS) + kind[row]) * self.F + fidx[row, col]
    v = vals[row, col].astype(np.float32)
    if self.open >= 0 and self.open != firsts[0]:
      self._close_open()
    if self.open >= 0:  # the study in progress goes on: its maxima so far join local study 0
      key, v = np.r_[self.open_kf, key], np.r_[self.open_v, v]
    key, v = _group_max(key, v)
    span = len(TOKEN_KINDS) * self.F
    s_local = key // span
    last = len(firsts) - 1
    done = s_local < last
    self._close(firsts[s_local[done]], key[done] % span, v[done], firsts[:last])
    self.open, self.open_kf, self.open_v = int(firsts[last]), key[~done] % span, v[~done]

  def finish(self) -> None:
    """Close the study in progress (the end of the store)."""
    if self.open >= 0:
      self._close_open()

  def _close_open(self) -> None:
    self._close(
        np.full(self.open_kf.size, self.open), self.open_kf, self.open_v, np.array([self.open])
    )
    self.open, self.open_kf, self.open_v = -1, np.zeros(0, np.int64), np.zeros(0, np.float32)

  def _close(self, s: np.ndarray, kf: np.ndarray, v: np.ndarray, studies: np.ndarray) -> None:
    """Finished studies: entries (study s, kind * F + feature kf, maximum v), unique."""
    lab = self.labels[studies]
    self.n_all += len(studies)
    self.n_labelled += int((lab != NOT_MENTIONED).any(1).sum())
    self.n_pos += (lab == POSITIVE).sum(0)
    self.n_unc += (lab == UNCERTAIN).sum(0)
    kind, f = kf // self.F, kf % self.F
    # 'any': the maximum over kinds, per (study, feature)
    any_key, any_v = _group_max(s.astype(np.int64) * self.F + f, v)
    groups = [(ANY, any_key // self.F, any_key % self.F, any_v)]
    for k in np.unique(kind):
      m = kind == k
      groups.append((TOKEN_KINDS[k], s[m], f[m], v[m]))
    for name, gs, gf, gv in groups:
      h = self.kind_hist(name)
      if not len(gs):  # no feature fired in these studies: only the class totals count them
        continue
      flat = gf * BINS + bin_of(gv, self.scale[gf])
      cuts = np.flatnonzero(gs[1:] != gs[:-1]) + 1
      for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(gs)]):
        # One study's entries name distinct features: plain fancy increments (no np.add.at)
        idx, lab = flat[lo:hi], self.labels[gs[lo]]
        h['all'].reshape(-1)[idx] += 1
        for j in np.flatnonzero(lab == POSITIVE):
          h['pos'][j].reshape(-1)[idx] += 1
        for j in np.flatnonzero(lab == UNCERTAIN):
          h['unc'][j].reshape(-1)[idx] += 1
    for i in studies:
      if int(i) in self.probe_index:
        m = any_key // self.F == i
        self.probe_rows.append((int(i), any_key[m] % self.F, any_v[m]))

  # ---- checkpoints ------------------------------------------------------------------------------

  def state(self) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, json meta) to save; variable-length arrays get one padding entry (Orbax cannot
    save empty arrays)."""
    arrays = {f'{k}.{c}': a for k, h in self.hist.items() for c, a in h.items()}
    ptr = np.cumsum([0] + [len(r[1]) for r in self.probe_rows])
    arrays.update(
        n_pos=self.n_pos,
        n_unc=self.n_unc,
        open_kf=np.r_[self.open_kf, 0],
        open_v=np.r_[self.open_v, 0].astype(np.float32),
        probe_study=np.r_[[r[0] for r in self.probe_rows], 0].astype(np.int64),
        probe_ptr=ptr.astype(np.int64),
        probe_f=np.r_[np.concatenate([np.zeros(0, np.int64)] + [r[1] for r in self.probe_rows]), 0],
        probe_v=np.r_[
            np.concatenate([np.zeros(0, np.float32)] + [r[2] for r in self.probe_rows]), 0
        ].astype(np.float32),
    )
    meta = {
        'kinds': sorted(self.hist),
        'n_all': self.n_all,
        'n_labelled': self.n_labelled,
        'open': self.open,
        'shapes': {k: [list(a.shape), a.dtype.str] for k, a in arrays.items()},
    }
    return arrays, meta

  @staticmethod
  def template(meta: dict) -> dict[str, np.ndarray]:
    return {k: np.zeros(shape, np.dtype(dt)) for k, (shape, dt) in meta['shapes'].items()}

  def restore(self, arrays: dict[str, np.ndarray], meta: dict) -> None:
    a = {k: np.asarray(v) for k, v in arrays.items()}
    self.hist = {
        k: {c: a[f'{k}.{c}'].astype(np.int32) for c in ('all', 'pos', 'unc')} for k in meta['kinds']
    }
    self.n_all, self.n_labelled, self.open = meta['n_all'], meta['n_labelled'], meta['open']
    self.n_pos, self.n_unc = a['n_pos'].astype(np.int64), a['n_unc'].astype(np.int64)
    self.open_kf, self.open_v = a['open_kf'][:-1].astype(np.int64), a['open_v'][:-1]
    ptr = a['probe_ptr']
    self.probe_rows = [
        (int(i), a['probe_f'][lo:hi].astype(np.int64), a['probe_v'][lo:hi].astype(np.float32))
        for i, lo, hi in zip(a['probe_study'][:-1], ptr[:-1], ptr[1:])
    ]


def labels_digest(labels: np.ndarray, indices: np.ndarray) -> str:
  """Identifies the labels of the studies a checkpoint has seen (a resumed pass must use them)."""
  return hashlib.sha256(np.ascontiguousarray(labels[indices]).tobytes()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------


def classes(acc: Accumulator, uncertain: str) -> tuple[np.ndarray, np.ndarray]:
  """Studies counted positive and negative per finding under the `uncertain` rule."""
  neg = acc.n_all - acc.n_pos - acc.n_unc
  pos = acc.n_pos + (acc.n_unc if uncertain == 'positive' else 0)
  return pos, neg + (acc.n_unc if uncertain == 'negative' else 0)


def kind_figures(
    h: dict[str, np.ndarray], acc: Accumulator, uncertain: str, chunk: int = 1024
) -> dict[str, np.ndarray]:
  """AUROC, precision and recall [F, 14] of one kind's histograms (NaN where undefined), and the
  studies each feature fired on, fired [F]."""
  P, N = classes(acc, uncertain)
  F = acc.F
  out = {k: np.full((F, NF), np.nan) for k in ('auroc', 'precision', 'recall')}
  for lo in range(0, F, chunk):
    a = h['all'][lo : lo + chunk].astype(np.int64)[:, None, :]
    pos = h['pos'][:, lo : lo + chunk].astype(np.int64).transpose(1, 0, 2)  # [f, 14, BINS]
    unc = h['unc'][:, lo : lo + chunk].astype(np.int64).transpose(1, 0, 2)
    neg = a - pos - unc
    p = pos + (unc if uncertain == 'positive' else 0)
    n = neg + (unc if uncertain == 'negative' else 0)
    p = np.concatenate([(P - p.sum(-1))[..., None], p], -1)  # bin 0: did not fire
    n = np.concatenate([(N - n.sum(-1))[..., None], n], -1)
    below = np.cumsum(n, -1) - n
    with np.errstate(invalid='ignore', divide='ignore'):
      out['auroc'][lo : lo + chunk] = (p * (below + 0.5 * n)).sum(-1) / (P * N)
      tp, fp = p[..., 1:].sum(-1), n[..., 1:].sum(-1)
      out['precision'][lo : lo + chunk] = np.where(tp + fp > 0, tp / (tp + fp), np.nan)
      out['recall'][lo : lo + chunk] = tp / P
  out['fired'] = h['all'].sum(-1, dtype=np.int64)
  return out


def _r(x: float) -> float | None:
  return None if x is None or not math.isfinite(x) else round(float(x), 4)


def auroc(scores: np.ndarray, y: np.ndarray) -> float:
  """Mann-Whitney AUROC of scores for binary y (ties count half); NaN without both classes."""
  pos, neg = scores[y], scores[~y]
  if not len(pos) or not len(neg):
    return math.nan
  allv = np.r_[pos, neg]
  order = np.argsort(allv, kind='stable')
  ranks = np.empty(len(allv))
  sv = allv[order]
  starts = np.flatnonzero(np.r_[True, sv[1:] != sv[:-1]])
  ends = np.r_[starts[1:], len(sv)]
  ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
  return (ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def logistic(X: np.ndarray, y: np.ndarray, l2: float = L2, iters: int = 100) -> np.ndarray:
  """Weights [k + 1] (intercept last) minimising the log loss + l2/2 |w|^2 (Newton's method)."""
  A = np.c_[X, np.ones(len(X))]
  w = np.zeros(A.shape[1])
  reg = np.full(A.shape[1], l2)
  reg[-1] = 0.0
  for _ in range(iters):
    p = 1.0 / (1.0 + np.exp(-(A @ w)))
    grad = A.T @ (p - y) + reg * w
    H = (A * (p * (1 - p))[:, None]).T @ A + np.diag(reg) + 1e-9 * np.eye(len(w))
    step = np.linalg.solve(H, grad)
    w -= step
    if np.abs(step).max() < 1e-10:
      break
  return w


def probe_matrix(acc: Accumulator) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
  """The probe studies (manifest indices, sorted) and their sparse 'any' maxima."""
  rows = sorted(acc.probe_rows, key=lambda r: r[0])
  return np.array([r[0] for r in rows], np.int64), [(r[1], r[2]) for r in rows]


def mean_difference(
    sparse: Sequence[tuple[np.ndarray, np.ndarray]], y: np.ndarray, F: int
) -> np.ndarray:
  """Mean score over positive studies minus over negative ones, per feature."""
  sums = np.zeros((2, F))
  for (f, v), yi in zip(sparse, y):
    sums[int(yi), f] += v
  return sums[1] / max(int(y.sum()), 1) - sums[0] / max(int((~y).sum()), 1)


def dense(sparse: Sequence[tuple[np.ndarray, np.ndarray]], features: np.ndarray) -> np.ndarray:
  """[studies, len(features)] scores of the chosen features."""
  col = {int(f): i for i, f in enumerate(features)}
  X = np.zeros((len(sparse), len(features)))
  for r, (f, v) in enumerate(sparse):
    for ff, vv in zip(f, v):
      i = col.get(int(ff))
      if i is not None:
        X[r, i] = vv
  return X


def probe(
    sparse: Sequence[tuple[np.ndarray, np.ndarray]],
    y: np.ndarray,
    test: np.ndarray,
    ks: Sequence[int],
    F: int,
) -> dict | None:
  """The k-sparse probes of one finding: y bool [studies], test bool [studies] (the held-out
  ones); None when the training or held-out studies lack a class."""
  train = ~test
  if y[train].all() or not y[train].any() or y[test].all() or not y[test].any():
    return None
  tr = [s for s, t in zip(sparse, train) if t]
  diff = mean_difference(tr, y[train], F)
  ranked = np.lexsort((np.arange(F), -diff))
  kmax = min(max(ks), F)
  X = dense(sparse, ranked[:kmax])
  majority = bool(y[train].mean() >= 0.5)
  out = {'k': [], 'accuracy': [], 'balanced_accuracy': [], 'auroc': [], 'features': []}
  for k in ks:
    k = min(k, F)
    Xk = X[:, :k]
    mu, sd = Xk[train].mean(0), Xk[train].std(0)
    sd = np.where(sd > 0, sd, 1.0)
    Z = (Xk - mu) / sd
    w = logistic(Z[train], y[train].astype(np.float64))
    s = Z[test] @ w[:-1] + w[-1]
    pred, yt = s > 0, y[test]
    out['k'].append(int(k))
    out['accuracy'].append(_r((pred == yt).mean()))
    out['balanced_accuracy'].append(_r(0.5 * (pred[yt].mean() + (~pred[~yt]).mean())))
    out['auroc'].append(_r(auroc(s, yt)))
    out['features'].append([int(f) for f in ranked[:k]])
  out['train_studies'] = int(train.sum())
  out['test_studies'] = int(test.sum())
  out['majority_accuracy'] = _r((y[test] == majority).mean())
  return out


def report(acc: Accumulator, findings: Any) -> dict:
  """The alignment.json contract (see the module docstring and the issue's output contract).

  `findings`: the config's `findings` group (uncertain, coverage_auroc, probe_k, probe_held_out,
  top_features, min_positives)."""
  uncertain = findings.uncertain
  P, N = classes(acc, uncertain)
  kinds = [k for k in KIND_ORDER if k in acc.hist] + [ANY]
  figs = {k: kind_figures(acc.kind_hist(k), acc, uncertain) for k in kinds}
  A = np.stack([figs[k]['auroc'] for k in kinds])  # [K, F, 14]
  fired = np.stack([figs[k]['fired'] for k in kinds])  # [K, F]
  reasons = []
  for j in range(NF):
    if P[j] < findings.min_positives:
      reasons.append(
          f'only {int(P[j])} positive stud{"y" if P[j] == 1 else "ies"} (fewer than '
          f'findings.min_positives={findings.min_positives})'
      )
    elif N[j] == 0:
      reasons.append('no negative studies')
    else:
      reasons.append(None)
  valid = np.array([r is None for r in reasons])
  best_kind = np.nan_to_num(A, nan=-1).argmax(0)  # [F, 14]
  best = np.take_along_axis(np.nan_to_num(A, nan=-1), best_kind[None], 0)[0]  # [F, 14]

  def entry(f, j, with_feature):
    k = kinds[best_kind[f, j]]
    e = {'feature': int(f)} if with_feature else {'finding': OBSERVATIONS[j]}
    e.update(
        kind=k,
        auroc=_r(figs[k]['auroc'][f, j]),
        precision=_r(figs[k]['precision'][f, j]),
        recall=_r(figs[k]['recall'][f, j]),
    )
    if not with_feature:
      e['fired'] = int(figs[k]['fired'][f])
    return e

  features = {}
  live = np.flatnonzero(fired.max(0) > 0)
  if valid.any():
    vj = np.flatnonzero(valid)
    for f in live:
      order = vj[np.lexsort((vj, -best[f, vj]))][:FEATURES_LISTED]
      features[str(int(f))] = [entry(f, j, False) for j in order]

  ids, sparse = probe_matrix(acc)
  held = np.array(
      [study_hash(acc.ids[int(i)], 'held_out') < findings.probe_held_out for i in ids], bool
  )
  lab = acc.labels[ids] if len(ids) else np.zeros((0, NF), np.int8)
  by_finding, covered = {}, []
  for j, name in enumerate(OBSERVATIONS):
    b = {'positives': int(P[j]), 'negatives': int(N[j]), 'reason': reasons[j]}
    if valid[j]:
      order = live[np.lexsort((live, -best[live, j]))][: findings.top_features]
      b['features'] = [entry(f, j, True) for f in order]
      if live.size and best[live, j].max() >= findings.coverage_auroc:
        covered.append(name)
      y, keep = _classes_of(lab[:, j], uncertain)
      b['probe'] = probe(
          [s for s, k in zip(sparse, keep) if k], y[keep], held[keep], findings.probe_k, acc.F
      )
    else:
      b['features'], b['probe'] = [], None
    by_finding[name] = b
  return {
      'findings': list(OBSERVATIONS),
      'kinds': kinds,
      'uncertain': uncertain,
      'coverage_auroc': findings.coverage_auroc,
      'studies': {
          'total': int(acc.n_all),
          'labelled': int(acc.n_labelled),
          'positives': {o: int(acc.n_pos[j]) for j, o in enumerate(OBSERVATIONS)},
          'negatives': {
              o: int(acc.n_all - acc.n_pos[j] - acc.n_unc[j]) for j, o in enumerate(OBSERVATIONS)
          },
          'uncertain': {o: int(acc.n_unc[j]) for j, o in enumerate(OBSERVATIONS)},
      },
      'features': features,
      'by_finding': by_finding,
      'coverage': {
          'covered': covered,
          'count': len(covered),
          'of': int(valid.sum()),
          'threshold': findings.coverage_auroc,
      },
  }


def _classes_of(column: np.ndarray, uncertain: str) -> tuple[np.ndarray, np.ndarray]:
  """(positive, counted) per study for one finding's labels under the `uncertain` rule."""
  pos = (column == POSITIVE) | ((column == UNCERTAIN) & (uncertain == 'positive'))
  keep = (column != UNCERTAIN) | (uncertain != 'exclude')
  return pos, keep


def summary_line(alignment: dict) -> str:
  """One line for the command's output: coverage and each covered finding's best feature."""
  cov = alignment['coverage']
  best = []
  for name in cov['covered']:
    top = alignment['by_finding'][name]['features'][0]
    best.append(f'{name}: feature {top["feature"]} ({top["kind"]}, AUROC {top["auroc"]})')
  line = (
      f'findings: {cov["count"]} of {cov["of"]} findings (with enough positive studies) have a '
      f'feature with AUROC >= {cov["threshold"]}'
  )
  return line + ('; ' + '; '.join(best) if best else '')
