"""The activation store: append-only TensorStore zarr3 arrays, their committed length written last.

Layout under the store's root, a local directory or any TensorStore kvstore URL (gs://, s3://,
memory://; passed to TensorStore unchanged):

  activations/            zarr3 [rows, d], float32 or bfloat16, sharded: one file per
                          `rows_per_shard` rows, holding uncompressed chunks of `rows_per_chunk`
                          rows, so a random row read touches one small chunk
  tokens/                 zarr3 int32 [rows, len(TOKEN_COLUMNS)]: where each row comes from
  studies/NNNNNNNN.json   the studies of commit N, in manifest order (row range, or why skipped)
  skipped_studies.json    the report of skipped studies
  store.json              the commit record, written last: committed rows and studies, statistics

Readers see only the rows below store.json's count, and a writer appends rows and study records
before it rewrites store.json (atomically), so a writer killed at any moment leaves a valid store
that a restarted writer continues after the last committed study: no duplicates, no gaps.
Nothing here loads the whole store: 100M rows of d = 4096 stay on disk.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import os
from typing import Any, Sequence

import ml_dtypes
import numpy as np
import tensorstore as ts

from jaxsae.errors import ConfigError
from jaxsae.formats.tokens import TOKEN_COLUMNS, TOKEN_KINDS

__all__ = [
    'FORMAT',
    'COMMIT',
    'REPORT',
    'DTYPES',
    'TOKEN_COLUMNS',
    'TOKEN_KINDS',
    'url',
    'exists',
    'ActivationStore',
    'open_store',
    'StoreWriter',
]

FORMAT = 'jaxsae-activations/1'
COMMIT = 'store.json'
REPORT = 'skipped_studies.json'
DTYPES = {'float32': np.dtype(np.float32), 'bfloat16': np.dtype(ml_dtypes.bfloat16)}

# One context for every open: shared caches, memory:// stores that outlive a single open, and many
# reads in flight (a shuffled batch reads thousands of scattered chunks; disks reward queue depth).
_CONTEXT = ts.Context({'file_io_concurrency': {'limit': 64}})


def url(path: str) -> str:
  """The kvstore URL of a store root: URLs unchanged, local paths as absolute file:// URLs."""
  if '://' in path:
    return path.rstrip('/') + '/'
  return 'file://' + os.path.abspath(path).rstrip('/') + '/'


def exists(path: str) -> bool:
  """Whether anything is at `path` (remote URLs are assumed to exist; opening them will tell)."""
  return '://' in path or os.path.exists(path)


def _kvstore(path: str) -> ts.KvStore:
  return ts.KvStore.open(url(path), context=_CONTEXT).result()


def _read_json(kv: ts.KvStore, key: str) -> Any | None:
  r = kv.read(key).result()
  return json.loads(r.value) if r.state == 'value' else None


def _array_spec(path: str, name: str) -> dict:
  return {'driver': 'zarr3', 'kvstore': url(path) + name + '/'}


def _sharded_metadata(
    shape: list[int], dtype: str, rows_per_chunk: int, rows_per_shard: int
) -> dict:
  raw = [{'name': 'bytes', 'configuration': {'endian': 'little'}}]
  return {
      'shape': shape,
      'data_type': dtype,
      'chunk_grid': {
          'name': 'regular',
          'configuration': {'chunk_shape': [rows_per_shard, shape[1]]},
      },
      'codecs': [
          {
              'name': 'sharding_indexed',
              'configuration': {
                  'chunk_shape': [rows_per_chunk, shape[1]],
                  'codecs': raw,
                  'index_codecs': raw + [{'name': 'crc32c'}],
              },
          }
      ],
  }


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


class ActivationStore:
  """The committed rows of a store, read-only. Also a grain RandomAccessDataSource (row i as a
  float32 vector) with a batched read (`_getitems`: one TensorStore read for many rows)."""

  def __init__(self, path: str):
    self.path = path
    if not exists(path):
      raise ConfigError(
          f'activation store not found: data.store_path={path!r} does not exist. Write it first '
          'with `python -m jaxsae.export_activations --config=<this experiment>` (it needs the '
          'model weights), or point --config.data.store_path at an existing store.'
      )
    try:
      meta = _read_json(_kvstore(path), COMMIT)
    except (ValueError, json.JSONDecodeError) as e:
      raise ConfigError(f'cannot read the activation store at {path!r}: {e}') from e
    if meta is None:
      raise ConfigError(
          f'{path!r} is not a committed activation store: it has no {COMMIT}. Either it is not a '
          'store, or its export has not committed a single study yet (still running, or killed '
          'before the first commit): rerun `python -m jaxsae.export_activations` to finish it.'
      )
    if meta.get('format') != FORMAT:
      raise ConfigError(
          f'{path}/{COMMIT} has format {meta.get("format")!r}; this version of '
          f'jaxsae reads {FORMAT!r}. Re-export the activations.'
      )
    self._set(meta)

  def _set(self, meta: dict) -> None:
    self.meta = meta
    self.rows, self.d, self.dtype = int(meta['rows']), int(meta['d']), str(meta['dtype'])
    if self.rows == 0:
      raise ConfigError(
          f'the activation store at {self.path!r} is empty: 0 rows committed '
          f'({meta["studies"]} studies processed, token kinds kept '
          f'{meta["info"].get("keep_kinds")}). '
          'Check export.manifest and export.keep_kinds, then re-export.'
      )
    self.mean_sq_norm = float(meta['mean_sq_norm'])
    self.scale = float(meta['scale'])
    arr = ts.open(
        {**_array_spec(self.path, 'activations'), 'open': True}, context=_CONTEXT, read=True
    ).result()
    self._acts = arr[: self.rows]  # only committed rows are visible
    self._tokens = None

  def __getstate__(self):  # worker processes reopen the same committed rows
    return {'path': self.path, 'meta': self.meta}

  def __setstate__(self, state):
    self.path = state['path']
    self._set(state['meta'])

  def __len__(self) -> int:
    return self.rows

  def __getitem__(self, index: int) -> np.ndarray:
    return self.read(np.array([index]))[0]

  def _getitems(self, indices: Sequence[int]) -> list[np.ndarray]:
    return list(self.read(np.asarray(indices)))

  def _gather(self, array: ts.TensorStore, indices: np.ndarray, dtype) -> np.ndarray:
    indices = np.asarray(indices, np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= self.rows):
      raise IndexError(f'row index out of range [0, {self.rows}) in {self.path}')
    order = np.argsort(indices, kind='stable')  # sorted reads walk the shards in order
    out = np.empty((len(indices), array.shape[1]), dtype)
    out[order] = array[indices[order]].read().result()
    return out

  def read(self, indices: np.ndarray) -> np.ndarray:
    """Rows `indices` (any order, repeats allowed) as float32 [len(indices), d], one read."""
    return self._gather(self._acts, indices, np.float32)

  def read_range(self, start: int, stop: int) -> np.ndarray:
    return np.asarray(self._acts[start:stop].read().result(), np.float32)

  def tokens(self, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Token metadata [rows, len(TOKEN_COLUMNS)] of rows [start, stop)."""
    if self._tokens is None:
      arr = ts.open(
          {**_array_spec(self.path, 'tokens'), 'open': True}, context=_CONTEXT, read=True
      ).result()
      self._tokens = arr[: self.rows]
    return self._tokens[start:stop].read().result()

  def tokens_at(self, indices: np.ndarray) -> np.ndarray:
    """Token metadata of the given rows (any order), like `read` for activations."""
    self.tokens(0, 0)  # opens the array
    return self._gather(self._tokens, indices, np.int32)

  def studies(self) -> list[dict]:
    """Every processed study in manifest order: exported ones with their row range, and skipped
    ones with the reason."""
    kv = _kvstore(self.path)
    out = []
    for seq in range(int(self.meta['commits'])):
      out += _read_json(kv, f'studies/{seq:08d}.json')
    return out


def open_store(path: str) -> ActivationStore:
  return ActivationStore(path)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


class StoreWriter:
  """Appends rows and their token metadata, committing at study boundaries.

  Rows are buffered until `rows_per_shard` of them are waiting (a shard file is rewritten whole
  on every write to it, so this bounds the rewriting to about twice the data), then written and
  committed by a background thread while the caller computes the next ones. `info` (model, layer,
  kinds, ...) must match on resume.
  """

  def __init__(
      self,
      path: str,
      d: int,
      dtype: str,
      info: dict,
      rows_per_chunk: int = 4,
      rows_per_shard: int = 4096,
  ):
    if dtype not in DTYPES:
      raise ConfigError(f'data.store_dtype must be one of {tuple(DTYPES)}, got {dtype!r}.')
    self.path, self.d, self.dtype, self.info = path, d, dtype, info
    self.rows_per_shard = rows_per_shard
    self._kv = _kvstore(path)
    meta = _read_json(self._kv, COMMIT)
    if meta is None:  # fresh store, or one whose first commit never happened: start over
      meta = {
          'format': FORMAT,
          'd': d,
          'dtype': dtype,
          'rows': 0,
          'studies': 0,
          'commits': 0,
          'skipped': 0,
          'sum_sq_norm': 0.0,
          'mean_sq_norm': None,
          'scale': None,
          'kind_counts': {k: 0 for k in TOKEN_KINDS},
          'last_study_id': None,
          'token_columns': list(TOKEN_COLUMNS),
          'kinds': list(TOKEN_KINDS),
          'info': info,
          'rows_per_chunk': rows_per_chunk,
          'rows_per_shard': rows_per_shard,
      }
      create = {'create': True, 'delete_existing': True}
      self._acts = ts.open(
          {
              **_array_spec(path, 'activations'),
              **create,
              'metadata': _sharded_metadata([0, d], dtype, rows_per_chunk, rows_per_shard),
          },
          context=_CONTEXT,
      ).result()
      self._tokens = ts.open(
          {
              **_array_spec(path, 'tokens'),
              **create,
              'metadata': _sharded_metadata(
                  [0, len(TOKEN_COLUMNS)], 'int32', rows_per_shard, rows_per_shard
              ),
          },
          context=_CONTEXT,
      ).result()
    else:
      self._check_resumable(meta)
      self._acts = ts.open(
          {**_array_spec(path, 'activations'), 'open': True}, context=_CONTEXT
      ).result()
      self._tokens = ts.open(
          {**_array_spec(path, 'tokens'), 'open': True}, context=_CONTEXT
      ).result()
    self.meta = meta
    self._skipped = [s for s in self._committed_records() if s.get('skipped')]
    self._rows, self._toks, self._records = [], [], []
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='store-writer')
    self._pending: concurrent.futures.Future | None = None

  def _check_resumable(self, meta: dict) -> None:
    want = {'d': self.d, 'dtype': self.dtype, **{f'info.{k}': v for k, v in self.info.items()}}
    got = {
        'd': meta['d'],
        'dtype': meta['dtype'],
        **{f'info.{k}': meta['info'].get(k) for k in self.info},
    }
    diff = [
        f'{k}: store {got[k]!r}, config {v!r}'
        for k, v in want.items()
        if json.loads(json.dumps(got[k])) != json.loads(json.dumps(v))
    ]
    if diff:
      raise ConfigError(
          f'the activation store at {self.path!r} was written with other settings '
          f'({"; ".join(diff)}); nothing was changed. Use another data.store_path, or delete it '
          'to start over.'
      )

  def _committed_records(self) -> list[dict]:
    out = []
    for seq in range(int(self.meta['commits'])):
      out += _read_json(self._kv, f'studies/{seq:08d}.json')
    return out

  @property
  def studies_done(self) -> int:
    """Manifest rows processed (exported or skipped) by committed or buffered work."""
    return int(self.meta['studies']) + len(self._records)

  @property
  def last_study_id(self) -> str | None:
    return self._records[-1]['study_id'] if self._records else self.meta['last_study_id']

  def append(self, rows: np.ndarray, tokens: np.ndarray, records: list[dict]) -> None:
    """Add the rows of whole studies (`records`, in manifest order, row ranges relative to this
    call's rows; skipped studies carry `skipped` and no rows). Commits when enough rows wait."""
    if rows.shape[1:] != (self.d,) or len(rows) != len(tokens):
      raise ValueError(
          f'rows {rows.shape} / tokens {tokens.shape} do not fit a [n, {self.d}] ' 'store'
      )
    offset = int(self.meta['rows']) + sum(len(r) for r in self._rows)
    for r in records:
      r = dict(r)
      if not r.get('skipped'):
        r['row_start'] = offset + r['row_start']
      self._records.append(r)
    self._rows.append(np.asarray(rows).astype(DTYPES[self.dtype]))
    self._toks.append(np.asarray(tokens, np.int32))
    if sum(len(r) for r in self._rows) >= self.rows_per_shard:
      self.flush()

  def flush(self) -> None:
    """Hand the buffered studies to the writer thread (after the previous commit finished)."""
    self._wait()
    if not self._records:
      return
    rows = np.concatenate(self._rows) if self._rows else np.zeros((0, self.d), DTYPES[self.dtype])
    toks = np.concatenate(self._toks) if self._toks else np.zeros((0, len(TOKEN_COLUMNS)), np.int32)
    records, self._rows, self._toks, self._records = self._records, [], [], []
    x = rows.astype(np.float32)  # statistics of what training will read, after any rounding
    sum_sq = float(np.sum(np.einsum('ij,ij->i', x, x), dtype=np.float64))
    start, m = int(self.meta['rows']), dict(self.meta)
    m['rows'] = start + len(rows)
    m['studies'] = int(m['studies']) + len(records)
    m['commits'] = int(m['commits']) + 1
    m['sum_sq_norm'] = float(m['sum_sq_norm']) + sum_sq
    if m['rows']:
      m['mean_sq_norm'] = m['sum_sq_norm'] / m['rows']
      m['scale'] = math.sqrt(m['mean_sq_norm'] / self.d)  # E||x/scale||^2 = d
    counts = np.bincount(toks[:, TOKEN_COLUMNS.index('kind')], minlength=len(TOKEN_KINDS))
    m['kind_counts'] = {k: int(m['kind_counts'][k]) + int(n) for k, n in zip(TOKEN_KINDS, counts)}
    m['last_study_id'] = records[-1]['study_id']
    self._skipped += [r for r in records if r.get('skipped')]
    m['skipped'] = len(self._skipped)
    self.meta = m
    self._pending = self._pool.submit(
        self._write_and_commit, start, rows, toks, records, m, list(self._skipped)
    )

  def _write_and_commit(self, start, rows, toks, records, meta, skipped) -> None:
    stop = start + len(rows)
    # Each array is grown on its own: a run killed between the two resizes leaves one longer.
    if stop > self._acts.shape[0]:
      self._acts = self._acts.resize(exclusive_max=[stop, self.d], expand_only=True).result()
    if stop > self._tokens.shape[0]:
      self._tokens = self._tokens.resize(
          exclusive_max=[stop, len(TOKEN_COLUMNS)], expand_only=True
      ).result()
    writes = [self._acts[start:stop].write(rows), self._tokens[start:stop].write(toks)]
    writes.append(self._kv.write(f'studies/{meta["commits"] - 1:08d}.json', json.dumps(records)))
    if any(r.get('skipped') for r in records):
      writes.append(self._kv.write(REPORT, json.dumps(skipped, indent=1)))
    for w in writes:
      w.result()
    self._kv.write(COMMIT, json.dumps(meta, indent=1)).result()  # the commit point

  def _wait(self) -> None:
    if self._pending is not None:
      pending, self._pending = self._pending, None
      pending.result()

  def close(self) -> dict:
    """Commit what is buffered, wait for it; returns the final commit record."""
    self.flush()
    self._wait()
    self._pool.shutdown()
    return self.meta
