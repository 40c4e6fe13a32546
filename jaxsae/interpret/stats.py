"""Streaming feature statistics: one pass over the activation store in bounded memory.

Per feature: how often it fires, the sum and max of its activations, firing tokens per token kind,
a log2 histogram, its top-N tokens, a uniform sample of its firing tokens (quantile examples are
drawn from it later) and its top image-token rows (for patch heatmaps). Nothing
[tokens x features]-sized outlives a batch: each batch's codes are cut on device to the firing
entries of each token (at most `row_capacity` of them; a batch with a fuller token is redone with
more room, so the result stays exact), and those update fixed-size per-feature tables.

Sharded: tokens over the mesh's `data` axis, features over `model` (`jax.shard_map`). Every device
keeps tables for its own tokens and features, so a batch needs no communication; the host merges
the devices' tables when it saves a checkpoint and at the end. Resumable: the merged tables and
the next batch are saved with Orbax every `interpret.checkpoint_every` batches, and a rerun goes on
from there (on any mesh).

The reservoir sample is "the M firing tokens with the largest hash(row, feature)": a fixed random
priority per (token, feature), so the sample is uniform, and the same whatever the mesh or batch
size.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxsae import metrics, model, sharding
from jaxsae.config import ConfigError
from jaxsae.formats import split as split_lib
from jaxsae.formats.store import ActivationStore
from jaxsae.formats.tokens import TOKEN_COLUMNS, TOKEN_KINDS
from jaxsae.interpret import alignment as alignment_lib

log = logging.getLogger(__name__)

LOG2_MIN, LOG2_MAX = -20, 20  # histogram range of activations: 2^-20 .. 2^20
IMAGE = TOKEN_KINDS.index('image')
KIND = TOKEN_COLUMNS.index('kind')
STUDY = TOKEN_COLUMNS.index('study')

# Per-feature tables: (key, payloads). Each keeps the n entries with the largest key.
TABLES = {
    'top': ('top_val', ('top_row',)),
    'reservoir': ('res_key', ('res_val', 'res_row')),
    'image': ('img_val', ('img_row',)),
}


@dataclasses.dataclass(frozen=True)
class Sizes:
  """Table widths (static: they shape the arrays)."""

  top: int
  reservoir: int
  image: int
  bins_per_octave: int
  seed: int

  @property
  def bins(self) -> int:
    return (LOG2_MAX - LOG2_MIN) * self.bins_per_octave

  def width(self, table: str) -> int:
    return getattr(self, table)

  @classmethod
  def from_config(cls, c: ml_collections.ConfigDict) -> 'Sizes':
    i = c.interpret
    return cls(i.top_examples, i.reservoir, i.heatmaps, i.histogram_bins_per_octave, i.seed)


def histogram_edges(sizes: Sizes) -> np.ndarray:
  """The activation values bounding the histogram's bins (the first and last bins also hold
  everything below / above the range)."""
  return 2.0 ** (LOG2_MIN + np.arange(sizes.bins + 1) / sizes.bins_per_octave)


# --------------------------------------------------------------------------------------------------
# The tables, on device and on the host
# --------------------------------------------------------------------------------------------------


def empty_tables(F: int, sizes: Sizes, shards: int = 1) -> dict[str, np.ndarray]:
  """Tables for `shards` independent slices of the tokens (leading axis)."""
  D, K = shards, len(TOKEN_KINDS)
  t = {
      'count': np.zeros((D, F), np.int32),
      'total': np.zeros((D, F), np.float32),
      'max': np.zeros((D, F), np.float32),
      'kinds': np.zeros((D, K, F), np.int32),
      'hist': np.zeros((D, F, sizes.bins), np.int32),
  }
  for table, (key, payloads) in TABLES.items():
    n = sizes.width(table)
    t[key] = np.full((D, F, n), -np.inf, np.float32)
    for p in payloads:
      t[p] = (
          np.full((D, F, n), -1, np.int32) if p.endswith('row') else np.zeros((D, F, n), np.float32)
      )
  return t


def merge_shards(t: dict[str, np.ndarray], sizes: Sizes) -> dict[str, np.ndarray]:
  """Fold the leading shard axis into one slice (exact: every statistic is a sum, a max or a
  top-n; ties are broken by the lower row, so the result does not depend on the sharding)."""
  out = {
      'count': t['count'].sum(0, dtype=np.int64),
      'total': t['total'].sum(0, dtype=np.float64),
      'max': t['max'].max(0),
      'kinds': t['kinds'].sum(0, dtype=np.int64),
      'hist': t['hist'].sum(0, dtype=np.int64),
  }
  for table, (key, payloads) in TABLES.items():
    n = sizes.width(table)
    cat = {name: np.concatenate(list(t[name]), axis=-1) for name in (key, *payloads)}  # [F, D*n]
    order = np.lexsort((cat[payloads[-1]], -cat[key]), axis=-1)[:, :n]  # last payload: the row
    for name, v in cat.items():
      out[name] = np.take_along_axis(v, order, axis=-1)
  return {k: v[None] for k, v in out.items()}


def _priority(rows: jax.Array, features: jax.Array, seed: int) -> jax.Array:
  """A fixed pseudo-random number in [0, 1) per (row, feature): lowbias32 of both."""
  h = (rows.astype(jnp.uint32) * jnp.uint32(0x9E3779B1)) ^ (
      (features.astype(jnp.uint32) + jnp.uint32(seed)) * jnp.uint32(0x85EBCA77)
  )
  h = (h ^ (h >> 16)) * jnp.uint32(0x7FEB352D)
  h = (h ^ (h >> 15)) * jnp.uint32(0x846CA68B)
  h = h ^ (h >> 16)
  return (h >> 8).astype(jnp.float32) * (1.0 / (1 << 24))


def _segment_top(
    f: int, n: int, feat: jax.Array, key: jax.Array, payloads: tuple[jax.Array, ...]
) -> tuple[jax.Array, ...]:
  """Per feature, the n entries with the largest key, as [f, n] tables (empty slots: key -inf).

  Entries whose `feat` is f (the sentinel) are dropped.
  """
  order = jnp.lexsort((-key, feat))
  sf = feat[order]
  idx = jnp.arange(sf.size)
  first = jnp.concatenate([jnp.ones(1, bool), sf[1:] != sf[:-1]])
  rank = idx - jax.lax.cummax(jnp.where(first, idx, 0))
  out = [jnp.full((f, n), -jnp.inf, key.dtype).at[sf, rank].set(key[order], mode='drop')]
  for p in payloads:
    fill = -1 if p.dtype == jnp.int32 else 0
    out.append(jnp.full((f, n), fill, p.dtype).at[sf, rank].set(p[order], mode='drop'))
  return tuple(out)


def _merge(old: tuple[jax.Array, ...], new: tuple[jax.Array, ...], n: int) -> tuple[jax.Array, ...]:
  cat = [jnp.concatenate([a, b], axis=1) for a, b in zip(old, new)]
  _, pick = jax.lax.top_k(cat[0], n)
  return tuple(jnp.take_along_axis(c, pick, axis=1) for c in cat)


def update(
    t: dict[str, jax.Array],
    x: jax.Array,
    kinds: jax.Array,
    rows: jax.Array,
    params: dict[str, jax.Array],
    *,
    capacity: int,
    sizes: Sizes,
    feature_offset: jax.Array | int = 0,
    codes: bool = False,
) -> tuple[jax.Array, ...]:
  """One batch into one shard's tables (leading shard axis of size 1); also returns whether some
  token fired on more than `capacity` features (then the caller redoes the batch with more), and
  with `codes` each token's candidates: activations and (global) feature indices [b, capacity]
  (fired where the activation is > 0), which the alignment statistics read on the host.

  x [b, d] rows of the store, kinds/rows [b] (row -1: padding). `params` holds this shard's
  features: W_enc [d, f], b_enc [f], threshold [f], and b_dec [d].
  """
  t = {k: v[0] for k, v in t.items()}
  f = params['W_enc'].shape[1]
  pre = model.pre_activations(params, x)
  acts = jnp.where(rows[:, None] >= 0, model.jumprelu(pre, params['threshold']), 0.0)
  vals, fidx = jax.lax.top_k(acts, min(capacity, f))
  # Whether a token filled every slot (so it may have more). Not `vals[:, -1] > 0`: slicing the
  # last column makes XLA:CPU replace its fast TopK with a ~6x slower sort.
  full = (vals > 0).all(axis=1).any() if capacity < f else jnp.zeros((), bool)
  fired = vals > 0
  feat = jnp.where(fired, fidx, f).ravel()  # f: not an entry (dropped by every scatter)
  v = vals.ravel()
  row = jnp.broadcast_to(rows[:, None], vals.shape).ravel()
  kind = jnp.broadcast_to(kinds[:, None], vals.shape).ravel()
  ones = fired.ravel().astype(jnp.int32)

  t['count'] = t['count'].at[feat].add(ones, mode='drop')
  t['total'] = t['total'].at[feat].add(v, mode='drop')
  t['max'] = t['max'].at[feat].max(v, mode='drop')
  t['kinds'] = t['kinds'].at[kind, feat].add(ones, mode='drop')
  b = jnp.floor(jnp.log2(jnp.maximum(v, 1e-30)) * sizes.bins_per_octave).astype(jnp.int32)
  b = jnp.clip(b - LOG2_MIN * sizes.bins_per_octave, 0, sizes.bins - 1)
  t['hist'] = t['hist'].at[feat, b].add(ones, mode='drop')

  prio = _priority(row, jnp.minimum(feat, f - 1) + feature_offset, sizes.seed)
  image_feat = jnp.where(kind == IMAGE, feat, f)
  for table, entries in (
      ('top', (feat, v, (row,))),
      ('reservoir', (feat, prio, (v, row))),
      ('image', (image_feat, v, (row,))),
  ):
    key, payloads = TABLES[table]
    n = sizes.width(table)
    names = (key, *payloads)
    new = _segment_top(f, n, entries[0], entries[1], entries[2])
    for name, value in zip(names, _merge(tuple(t[nm] for nm in names), new, n)):
      t[name] = value
  out = {k: v[None] for k, v in t.items()}
  if codes:
    return out, full, vals, fidx + feature_offset
  return out, full


def table_specs(t: dict[str, Any]) -> dict[str, P]:
  """Tables: shards over `data`, features over `model`."""
  return {
      k: P('data', None, 'model')
      if k == 'kinds'
      else P('data', 'model')
      if np.ndim(v) == 2
      else P('data', 'model', None)
      for k, v in t.items()
  }


PARAM_SPECS = {
    'W_enc': P(None, 'model'),
    'b_enc': P('model'),
    'threshold': P('model'),
    'b_dec': P(),
}


def sharded_update(
    mesh: jax.sharding.Mesh,
    tables: dict[str, Any],
    sizes: Sizes,
    capacity: int,
    codes: bool = False,
):
  """`update` over the mesh: each device its tokens and features, no communication. With
  `codes`, also each token's candidates [B, model shards * capacity] (see `update`)."""

  def local(t, x, kinds, rows, params):
    f = params['W_enc'].shape[1]
    offset = jax.lax.axis_index('model') * f
    new, full, *cand = update(
        t,
        x,
        kinds,
        rows,
        params,
        capacity=capacity,
        sizes=sizes,
        feature_offset=offset,
        codes=codes,
    )
    return new, full[None, None], *cand

  specs = table_specs(tables)
  fn = jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(specs, P('data', None), P('data'), P('data'), PARAM_SPECS),
      out_specs=(specs, P('data', 'model'), *([P('data', 'model')] * (2 if codes else 0))),
  )
  return jax.jit(fn)


# --------------------------------------------------------------------------------------------------
# The pass over the store
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
  """Merged statistics (host arrays, leading shard axis of size 1) and how they were made."""

  tables: dict[str, np.ndarray]
  tokens: int
  sizes: Sizes
  seconds: float
  redone_batches: int
  alignment: alignment_lib.Accumulator | None = None  # with labels: the finding histograms

  def get(self, name: str) -> np.ndarray:
    return self.tables[name][0]


def fingerprint(params: dict[str, np.ndarray]) -> str:
  """Identifies an SAE by content (small arrays and a row of W_enc), for safe resumption."""
  h = hashlib.sha256()
  for name in ('b_enc', 'b_dec', 'threshold'):
    h.update(np.ascontiguousarray(params[name], np.float32).tobytes())
  h.update(np.ascontiguousarray(params['W_enc'][:1], np.float32).tobytes())
  return h.hexdigest()[:16]


def _read_batch(
    source: ActivationStore, B: int, first_row: int, rows_end: int, i: int
) -> tuple[np.ndarray, ...]:
  start = first_row + i * B
  stop = min(start + B, rows_end)
  x = np.zeros((B, source.d), np.float32)
  kinds = np.zeros(B, np.int32)
  rows = np.full(B, -1, np.int32)
  study = np.full(B, -1, np.int64)
  x[: stop - start] = source.read_range(start, stop)
  meta = source.tokens(start, stop)
  kinds[: stop - start] = meta[:, KIND]
  study[: stop - start] = meta[:, STUDY]
  rows[: stop - start] = np.arange(start, stop, dtype=np.int32)
  return x, kinds, rows, study


def compute(
    c: ml_collections.ConfigDict,
    source: ActivationStore,
    params: dict[str, np.ndarray],
    checkpoint_dir: str,
    progress: bool = True,
    labels: Any = None,
) -> Result:
  """The statistics of every committed row of `source` under the SAE `params` (raw-activation
  weights: W_enc, b_enc, W_dec, b_dec, threshold [F]); resumes from `checkpoint_dir`.

  With `labels` (the studies' finding labels: int8 [study records, 14] aligned with
  `source.studies()`, a FindingLabels, or {manifest index: labels}) and `findings.enabled`, the
  same pass also streams the alignment statistics (`Result.alignment`,
  jaxsae/interpret/alignment.py)."""
  sizes = Sizes.from_config(c)
  d, F = params['W_enc'].shape
  if source.d != d:
    raise ConfigError(
        f'the store at {source.path!r} holds width-{source.d} activations but the '
        f'SAE expects d={d}: interpret with the weights trained on this store.'
    )
  if source.rows >= 2**31 - 1:
    raise ConfigError(f'{source.rows} rows do not fit int32 row ids; split the store.')
  mesh = sharding.make_mesh(c)
  D, M = mesh.shape['data'], mesh.shape['model']
  B = c.interpret.batch_size
  if B % D or F % M:
    raise ConfigError(
        f'interpret.batch_size={B} must divide over mesh.data={D} and the '
        f'{F} features over mesh.model={M}.'
    )
  capacity = c.interpret.row_capacity or 4 * c.sae.k
  rows_end = source.rows  # the committed rows now; a rerun after more are exported adds them
  meta_want = {
      'F': F,
      'd': d,
      'batch_size': B,
      'sae': fingerprint(params),
      'sizes': dataclasses.asdict(sizes),
      'store': os.path.abspath(source.path),
  }
  acc = None
  if labels is not None and c.findings.enabled:
    records = source.studies()
    label_table = alignment_lib.label_table(labels, records)
    acc = alignment_lib.Accumulator(
        F,
        params['threshold'],
        label_table,
        records,
        c.findings.probe_studies,
        c.findings.probe_held_out,
    )
    meta_want['findings'] = {
        'probe_studies': c.findings.probe_studies,
        'probe_held_out': c.findings.probe_held_out,
        'bins': [alignment_lib.OCTAVES, alignment_lib.PER_OCTAVE],
    }

  def seen_labels(next_row: int) -> str:
    """The labels of the studies whose rows come before `next_row` (what a checkpoint saw)."""
    seen = [
        int(r['manifest_index'])
        for r in records
        if not r.get('skipped') and r['rows'] and int(r['row_start']) < next_row
    ]
    return alignment_lib.labels_digest(label_table, np.array(seen, np.int64))

  manager = ocp.CheckpointManager(
      os.path.abspath(checkpoint_dir),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=1, create=True, cleanup_tmp_directories=True, enable_async_checkpointing=False
      ),
      item_names=('tables', 'meta', 'alignment'),
  )
  first_row, tokens, seconds, redone, tables, meta = 0, 0, 0.0, 0, None, None
  if manager.latest_step() is not None:
    step = manager.latest_step()
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    diff = {k: (meta.get(k), v) for k, v in meta_want.items() if meta.get(k) != v}
    if diff:
      raise ConfigError(
          f'{checkpoint_dir} holds statistics of another run ({diff}: saved vs '
          'now); use another --out, or delete that folder to start over.'
      )
    restored = manager.restore(
        step,
        args=ocp.args.Composite(
            tables=ocp.args.StandardRestore(
                {k: np.zeros(v.shape, v.dtype) for k, v in empty_tables(F, sizes).items()}
            )
        ),
    )['tables']
    tables = {k: np.asarray(v) for k, v in restored.items()}
    if acc is not None:
      if meta['alignment_labels'] != seen_labels(meta['next_row']):
        raise ConfigError(
            f'{checkpoint_dir} holds alignment statistics made with other finding labels '
            '(findings.*); use another --out, or delete that folder to start over.'
        )
      arrays = manager.restore(
          step,
          args=ocp.args.Composite(
              alignment=ocp.args.StandardRestore(acc.template(meta['alignment']))
          ),
      )['alignment']
      acc.restore(arrays, meta['alignment'])
    first_row, tokens, seconds, redone = (
        meta['next_row'],
        meta['tokens'],
        meta['seconds'],
        meta['redone_batches'],
    )
    log.info('statistics: resuming at row %d of %d', first_row, rows_end)

  host = empty_tables(F, sizes, D)
  if tables is not None:  # the merged tables go to shard 0; the others start empty
    for k, v in tables.items():
      host[k][0] = v[0]
  specs = table_specs(host)
  put = lambda tree, spec: jax.tree.map(
      lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), tree, spec
  )
  t = put(host, specs)
  dev_params = put(
      {
          'W_enc': params['W_enc'],
          'b_enc': params['b_enc'],
          'threshold': np.broadcast_to(params['threshold'], (F,)).astype(np.float32),
          'b_dec': params['b_dec'],
      },
      PARAM_SPECS,
  )
  steps = {}

  def step_fn(cap):
    if cap not in steps:
      steps[cap] = sharded_update(mesh, host, sizes, cap, codes=acc is not None)
    return steps[cap]

  pending = []  # the last batch's candidates, added to `acc` while the device runs the next

  def flush():
    while pending:
      study, kinds, rows, vals, fidx = pending.pop(0)
      valid = rows >= 0
      vals, fidx = jax.device_get((vals, fidx))
      acc.add(study[valid], kinds[valid], np.asarray(vals)[valid], np.asarray(fidx)[valid])

  def save(next_row):
    merged = merge_shards(jax.device_get(t), sizes)
    saved = {
        **meta_want,
        'next_row': next_row,
        'tokens': tokens,
        'seconds': seconds + time.perf_counter() - t0,
        'redone_batches': redone,
    }
    items = {'tables': ocp.args.StandardSave(merged), 'meta': ocp.args.JsonSave(saved)}
    if acc is not None:
      flush()
      if next_row == rows_end:
        acc.finish()
      arrays, saved['alignment'] = acc.state()
      saved['alignment_labels'] = seen_labels(next_row)
      items['alignment'] = ocp.args.StandardSave(arrays)
    manager.save(next_row, args=ocp.args.Composite(**items), force=True)
    manager.wait_until_finished()
    return merged, saved

  n_batches = -(-(rows_end - first_row) // B)
  reader = (
      grain.MapDataset.range(n_batches)
      .map(functools.partial(_read_batch, source, B, first_row, rows_end))
      .to_iter_dataset(
          grain.ReadOptions(num_threads=max(1, c.data.num_threads), prefetch_buffer_size=4)
      )
  )
  batch_sharding, row_sharding = NamedSharding(mesh, P('data', None)), NamedSharding(
      mesh, P('data')
  )
  t0 = time.perf_counter()
  cap = capacity  # grows for good once a token needs more: the next batches are likely alike
  for i, (x, kinds, rows, study) in enumerate(reader):
    args = (
        jax.device_put(x, batch_sharding),
        jax.device_put(kinds, row_sharding),
        jax.device_put(rows, row_sharding),
        dev_params,
    )
    new, full, *cand = step_fn(cap)(t, *args)
    if acc is not None:
      flush()  # the previous batch's, on the host while this one runs
    while bool(np.asarray(full).any()):  # a token fired on more features than fit: redo wider
      cap = min(2 * cap, F // M)
      redone += 1
      new, full, *cand = step_fn(cap)(t, *args)
    t = new
    if acc is not None:
      pending.append((study, kinds, rows, *cand))
    tokens += int((rows >= 0).sum())
    if (i + 1) % c.interpret.checkpoint_every == 0 and i + 1 < n_batches:
      save(first_row + (i + 1) * B)
    if progress and (i + 1) % 10 == 0:
      rate = tokens / (seconds + time.perf_counter() - t0)
      print(f'\rstatistics: batch {i + 1}/{n_batches} ({rate:,.0f} tokens/s)', end='', flush=True)
  if progress:
    print()
  if n_batches or tables is None:
    tables, meta = save(rows_end)
  return Result(tables, meta['tokens'], sizes, meta['seconds'], meta['redone_batches'], acc)


def held_out_dead(
    c: ml_collections.ConfigDict, source: ActivationStore, params: dict[str, np.ndarray]
) -> dict[str, Any]:
  """Dead latents by the one definition (jaxsae.metrics): firing on none of the first
  train.eval_tokens held-out rows of the store (data.held_out_fraction's split), encoded as
  `update` does, with the raw-activation weights. The statistics pass covers every row, training
  ones included, so its zero counts are not this figure; with no held-out rows it is None."""
  sp = split_lib.split(source.studies(), c.data.held_out_fraction)
  ids = sp.first_rows(c.train.eval_tokens)
  p = {k: jnp.asarray(params[k], jnp.float32) for k in ('W_enc', 'b_enc', 'b_dec')}
  p['threshold'] = jnp.asarray(params['threshold'], jnp.float32)
  fires_of = jax.jit(
      lambda p, x: jnp.sum(model.jumprelu(model.pre_activations(p, x), p['threshold']) > 0, 0)
  )
  fires = np.zeros(p['W_enc'].shape[1], np.int64)
  for lo in range(0, len(ids), c.interpret.batch_size):
    fires += np.asarray(fires_of(p, source.read(ids[lo : lo + c.interpret.batch_size])))
  if not len(ids):
    return {
        'dead_fraction': None,
        'dead_latents': None,
        'dead_over_tokens': 0,
        'dead_on': sp.describe(),
    }
  return {**metrics.dead_latents(fires, len(ids)), 'dead_on': sp.describe()}
