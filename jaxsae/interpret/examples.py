"""From statistics to feature records: examples in context, negatives, heatmaps, promoted tokens.

The statistics pass keeps row ids only; here those rows are turned into what a reader (human or
LLM) needs: each example's surrounding tokens as text with the feature's activation at every one
of them, random non-firing tokens for detection scoring, the feature's activation over an image's
patch grid, and the tokens its decoder direction promotes. Features are handled in chunks, so the
rows read at once stay bounded whatever the number of features.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxsae import model
from jaxsae.interpret import records as rec
from jaxsae.interpret.stats import Result, histogram_edges
from jaxsae.formats.store import ActivationStore
from jaxsae.formats.tokens import TOKEN_COLUMNS, TOKEN_KINDS

log = logging.getLogger(__name__)
COL = {name: i for i, name in enumerate(TOKEN_COLUMNS)}
IMAGE_FIELDS = ('frontal', 'lateral', 'prior_frontal')  # the store's `image` column: 0, 1, 2

Tokenizer = Callable[[Sequence[int]], list[str]]


def _sig(x) -> float:
  """5 significant digits: short JSON, whatever the activations' scale."""
  return float(f'{float(x):.5g}')


# --------------------------------------------------------------------------------------------------
# Token text and the unembedding (read from the model's files: no torch)
# --------------------------------------------------------------------------------------------------


def load_tokenizer(model_dir: str) -> Tokenizer:
  """Token ids -> display strings, from `model_dir/tokenizer.json` ('<id>' if it is missing).

  SentencePiece/BPE word-start marks become spaces; a word-level vocabulary (the demo's) gets a
  space before each word so that joined tokens read as text.
  """
  path = os.path.join(model_dir or '', 'tokenizer.json')
  if not os.path.exists(path):
    log.warning('no tokenizer at %s: examples show token ids', path)
    return lambda ids: [f'<{int(i)}>' for i in ids]
  import tokenizers  # pylint: disable=import-outside-toplevel  (Rust; does not import torch)

  tok = tokenizers.Tokenizer.from_file(path)
  vocab = tok.get_vocab()
  marked = any(t.startswith(('\u2581', '\u0120')) for t in vocab)
  cache: dict[int, str] = {}

  def show(i: int) -> str:
    if i not in cache:
      t = tok.id_to_token(i)
      if t is None:
        t = f'<{i}>'
      elif marked:
        t = t.replace('\u2581', ' ').replace('\u0120', ' ').replace('\u010a', '\n')
        t = '\n' if t == '<0x0A>' else t
      elif t[:1].isalnum():
        t = ' ' + t
      cache[i] = t
    return cache[i]

  return lambda ids: [show(int(i)) for i in ids]


def load_unembedding(model_dir: str) -> np.ndarray | None:
  """The language model's output embedding [vocab, d], with the final RMSNorm's weight folded in
  when found, read from the model's safetensors files; None if the model is not at hand."""
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel

  if not model_dir or not os.path.isdir(model_dir):
    return None
  index = os.path.join(model_dir, 'model.safetensors.index.json')
  if os.path.exists(index):
    with open(index) as f:
      where = json.load(f)['weight_map']
  elif os.path.exists(os.path.join(model_dir, 'model.safetensors')):
    with safe_open(os.path.join(model_dir, 'model.safetensors'), 'np') as f:
      where = {k: 'model.safetensors' for k in f.keys()}
  else:
    return None

  def find(suffixes):
    for s in suffixes:
      for k in where:
        if k.endswith(s):
          with safe_open(os.path.join(model_dir, where[k]), 'np') as f:
            return f.get_tensor(k).astype(np.float32)
    return None

  U = find(('lm_head.weight',))
  if U is None:
    U = find(('embed_tokens.weight',))  # tied embeddings
  if U is None:
    return None
  norm = find(('language_model.norm.weight', 'model.norm.weight'))
  return U * norm[None] if norm is not None and norm.shape == (U.shape[1],) else U


def promoted_tokens(
    W_dec: np.ndarray, U: np.ndarray, tokenizer: Tokenizer, n: int = 10, chunk: int = 1024
) -> list[list[tuple[str, float]]]:
  """Per feature, the n tokens whose logits its decoder direction raises most."""
  Uj = jnp.asarray(U.T)
  top = jax.jit(lambda w: jax.lax.top_k(w @ Uj, n))
  out = []
  for s in range(0, len(W_dec), chunk):
    vals, ids = (np.asarray(a) for a in top(jnp.asarray(W_dec[s : s + chunk], jnp.float32)))
    for v, i in zip(vals, ids):
      out.append([(t, _sig(x)) for t, x in zip(tokenizer(i), v)])
  return out


# --------------------------------------------------------------------------------------------------
# Encoding chosen rows for chosen features
# --------------------------------------------------------------------------------------------------


def feature_acts(params: dict[str, np.ndarray], x: np.ndarray, features: np.ndarray) -> np.ndarray:
  """Activations [rows, len(features)] of the given features only (a slice of W_enc)."""
  sub = {
      'W_enc': params['W_enc'][:, features],
      'b_enc': params['b_enc'][features],
      'b_dec': params['b_dec'],
  }
  thr = np.broadcast_to(params['threshold'], params['b_enc'].shape)[features]
  return np.asarray(_acts(sub, jnp.asarray(x, jnp.float32), jnp.asarray(thr)))


@jax.jit
def _acts(params, x, threshold):
  return model.jumprelu(model.pre_activations(params, x), threshold)


class Rows:
  """Reads store rows and their token metadata, and knows each row's study."""

  def __init__(self, source: ActivationStore):
    self.source = source
    self.studies = [s for s in source.studies() if not s.get('skipped')]
    self.starts = [s['row_start'] for s in self.studies]

  def study_of(self, row: int) -> dict:
    return self.studies[bisect.bisect_right(self.starts, row) - 1]

  def window(self, row: int, before: int, after: int) -> tuple[int, int]:
    s = self.study_of(row)
    return max(s['row_start'], row - before), min(s['row_start'] + s['rows'], row + after + 1)

  def read(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(activations, token metadata) of sorted unique `rows`."""
    return self.source.read(rows), self.source.tokens_at(rows)


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------


def _occupied(edges: list[float], counts: np.ndarray) -> rec.Histogram:
  """The histogram cut to the bins from the first to the last non-empty one."""
  nz = np.flatnonzero(counts)
  if not len(nz):
    return {'edges': [], 'counts': []}
  lo, hi = int(nz[0]), int(nz[-1]) + 1
  return {'edges': edges[lo : hi + 1], 'counts': counts[lo:hi].tolist()}


def _quantile_rows(vals: np.ndarray, rows: np.ndarray, bins: int, per_bin: int) -> list[list[int]]:
  """From the uniform sample (vals, rows), `per_bin` evenly spaced rows in each of `bins`
  activation-quantile bins, lowest bin first."""
  keep = rows >= 0
  vals, rows = vals[keep], rows[keep]
  order = np.argsort(vals, kind='stable')
  out = []
  for part in np.array_split(order, bins):
    pick = (
        part[np.unique(np.linspace(0, len(part) - 1, min(per_bin, len(part))).astype(int))]
        if len(part)
        else part
    )
    out.append([int(r) for r in rows[pick]])
  return out


def negative_rows(
    c: ml_collections.ConfigDict, source: ActivationStore, params: dict[str, np.ndarray]
) -> list[list[int]]:
  """Per feature, up to `n_negatives` rows from a seeded random pool where it does not fire."""
  i = c.interpret
  F = params['W_enc'].shape[1]
  rng = np.random.default_rng(i.seed)
  pool = rng.choice(source.rows, size=min(i.negative_pool, source.rows), replace=False)
  quiet = np.zeros((len(pool), F), bool)
  for s in range(0, len(pool), 1024):
    quiet[s : s + 1024] = feature_acts(params, source.read(pool[s : s + 1024]), np.arange(F)) <= 0
  return [[int(r) for r in pool[np.flatnonzero(quiet[:, f])[: i.n_negatives]]] for f in range(F)]


def build(
    c: ml_collections.ConfigDict,
    source: ActivationStore,
    params: dict[str, np.ndarray],
    result: Result,
    tokenizer: Tokenizer,
    images: Callable[[dict, int], str] | None = None,
    promoted: list[list[tuple[str, float]]] | None = None,
    chunk: int = 256,
) -> Iterator[rec.FeatureRecord]:
  """Feature records in feature order (dead features included, with no examples).

  `images(study_record, image_index)` returns the image file a heatmap is drawn over, relative to
  the interpretation's out dir ('' if none).
  """
  i = c.interpret
  F = params['W_enc'].shape[1]
  count, total, mx = result.get('count'), result.get('total'), result.get('max')
  edges = histogram_edges(result.sizes).tolist()
  rows = Rows(source)
  negatives = negative_rows(c, source, params)
  for f0 in range(0, F, chunk):
    feats = np.arange(f0, min(F, f0 + chunk))
    wanted: dict[int, dict[str, list]] = {}
    for f in feats:
      top = [int(r) for r in result.get('top_row')[f] if r >= 0]
      quant = _quantile_rows(
          result.get('res_val')[f], result.get('res_row')[f], i.n_quantiles, i.per_quantile
      )
      wanted[int(f)] = {'top': top, 'quantiles': quant, 'negatives': negatives[f]}
    # Every row any example's context needs, read once for the chunk.
    targets = {r for w in wanted.values() for r in w['top'] + w['negatives']}
    targets |= {r for w in wanted.values() for q in w['quantiles'] for r in q}
    windows = {r: rows.window(r, i.context_before, i.context_after) for r in targets}
    need = np.unique(
        np.concatenate([np.arange(lo, hi) for lo, hi in windows.values()])
        if windows
        else np.zeros(0, np.int64)
    )
    x, toks = rows.read(need) if len(need) else (np.zeros((0, source.d)), np.zeros((0, 6)))
    acts = feature_acts(params, x, feats) if len(need) else np.zeros((0, len(feats)))
    where = {int(r): j for j, r in enumerate(need)}
    heat = _heatmaps(c, rows, params, result, feats, images) if i.heatmaps else {}

    def example(r: int, col: int) -> rec.Example:
      lo, hi = windows[r]
      js = [where[q] for q in range(lo, hi)]
      t = toks[js]
      return {
          'study_id': rows.study_of(r)['study_id'],
          'row': r,
          'position': int(t[r - lo, COL['position']]),
          'kind': TOKEN_KINDS[int(t[r - lo, COL['kind']])],
          'activation': _sig(acts[where[r], col]),
          'tokens': tokenizer(t[:, COL['token_id']]),
          'acts': [_sig(a) for a in acts[js, col]],
          'target': r - lo,
      }

    for col, f in enumerate(feats):
      w, f = wanted[int(f)], int(f)
      n = int(count[f])
      yield {
          'feature': f,
          'density': n / max(result.tokens, 1),
          'count': n,
          'mean': float(total[f]) / n if n else 0.0,  # in float64 whatever the table's dtype
          'max': float(mx[f]),
          'kind_counts': {k: int(v) for k, v in zip(TOKEN_KINDS, result.get('kinds')[:, f])},
          'histogram': _occupied(edges, result.get('hist')[f]),
          'top': [example(r, col) for r in w['top']],
          'quantiles': [[example(r, col) for r in q] for q in w['quantiles']] if n else [],
          'negatives': [example(r, col) for r in w['negatives']] if n else [],
          'heatmaps': heat.get(f, []),
          'promoted_tokens': promoted[f] if promoted else [],
      }


def _heatmaps(
    c,
    rows: Rows,
    params,
    result: Result,
    feats: np.ndarray,
    images: Callable[[dict, int], str] | None,
) -> dict[int, list[rec.Heatmap]]:
  """Per feature of `feats` that fired on image tokens: its activation over the patch grid of
  the images holding its top image tokens. Each image's rows are read and encoded once."""
  img_rows = result.get('img_row')[feats]  # [features, heatmaps], -1 where none
  listed = img_rows[img_rows >= 0]
  image_of = dict(zip(listed.tolist(), rows.source.tokens_at(listed)[:, COL['image']].tolist()))
  by_image: dict[tuple[int, int], list[int]] = {}
  for f, rs in zip(feats, img_rows):
    for r in rs[rs >= 0].tolist():
      key = (rows.study_of(r)['row_start'], image_of[r])
      if int(f) not in by_image.setdefault(key, []):
        by_image[key].append(int(f))
  out: dict[int, list[rec.Heatmap]] = {}
  for (start, image), fs in sorted(by_image.items()):
    study = rows.study_of(start)
    span = np.arange(start, start + study['rows'])
    t = rows.source.tokens_at(span)
    mine = (t[:, COL['kind']] == TOKEN_KINDS.index('image')) & (t[:, COL['image']] == image)
    patch_rows, patches = span[mine], t[mine, COL['patch']]
    acts = feature_acts(params, rows.source.read(patch_rows), np.array(fs))
    n = int(patches.max()) + 1
    cols = int(np.ceil(np.sqrt(n)))
    grid = np.zeros((int(np.ceil(n / cols)), cols), np.float32)
    for col, f in enumerate(fs):
      grid[:] = 0
      grid.flat[patches] = acts[:, col]
      out.setdefault(f, []).append(
          {
              'study_id': study['study_id'],
              'image': image,
              'image_file': images(study, image) if images else '',
              'grid': [[_sig(a) for a in line] for line in grid],
              'max': float(acts[:, col].max()),
          }
      )
  for maps in out.values():
    maps.sort(key=lambda m: -m['max'])
  return out
