"""The activation store: append-only TensorStore zarr3 arrays, their committed length written last.

Layout under the store's root, a local directory or any TensorStore kvstore URL (gs://, s3://,
memory://; passed to TensorStore unchanged):

  activations/            zarr3 [rows, d], float32 or bfloat16, sharded: one file per
                          `rows_per_shard` rows, holding uncompressed chunks of `rows_per_chunk`
                          rows (each with a crc32c), so a random row read touches one small chunk
  tokens/                 zarr3 int32 [rows, len(TOKEN_COLUMNS)]: where each row comes from
  studies/NNNNNNNN.json   the studies of commit N, in manifest order (row range and the crc32 of
                          its rows and token rows as written, or why it was skipped)
  skipped_studies.json    the report of skipped studies
  store.json              the commit record: committed rows and studies, statistics

A store written by several processes at once (`export.processes` = N) is a root whose store.json
says so (format PARTS_FORMAT: the number of parts, each one's share of the manifest) and N parts
under parts/III-of-NNN/, each a store as above written by one process; readers see the parts one
after another as one store (`PartedStore`; jaxsae.formats.parts says how the processes share the
manifest and claim the root).

A new store is made only where nothing is (a new path or an empty directory), and store.json is
written first, so a path without it is never taken for a store to overwrite. Readers see only the
rows below store.json's count, and a writer appends rows and study records before it rewrites
store.json (atomically), so a writer killed at any moment leaves a valid store that a restarted
writer continues after the last committed study: no duplicates, no gaps.

Missing or altered data is an error, never zeros or garbage: arrays are read with missing chunks
as errors (not the fill value), every chunk carries a crc32c, each study's crc32 is recorded, and
`python -m jaxsae.verify_store PATH` checks them all. Stores written before chunk and study
checksums existed stay readable (see `ActivationStore._recover` for their all-zero chunks).
Nothing here loads the whole store: 100M rows of d = 4096 stay on disk.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import json
import logging
import math
import os
import zlib
from typing import Any, Sequence

import ml_dtypes
import numpy as np
import tensorstore as ts

from jaxsae.errors import ConfigError
from jaxsae.formats.tokens import TOKEN_COLUMNS, TOKEN_KINDS

__all__ = [
    'FORMAT',
    'PARTS_FORMAT',
    'COMMIT',
    'REPORT',
    'DTYPES',
    'TOKEN_COLUMNS',
    'TOKEN_KINDS',
    'url',
    'exists',
    'where',
    'checksum',
    'check_path',
    'kvstore',
    'read_commit',
    'read_records',
    'open_array',
    'shard_rows',
    'shard_key',
    'shard_problem',
    'has_chunk_checksums',
    'describe_studies',
    'how_to_rebuild',
    'ActivationStore',
    'PartedStore',
    'part_key',
    'part_path',
    'open_store',
    'StoreWriter',
]

FORMAT = 'jaxsae-activations/1'
PARTS_FORMAT = 'jaxsae-activations-parts/1'  # the root of a store written by several processes
COMMIT = 'store.json'
REPORT = 'skipped_studies.json'
DTYPES = {'float32': np.dtype(np.float32), 'bfloat16': np.dtype(ml_dtypes.bfloat16)}
ARRAYS = ('activations', 'tokens')
_LEFTOVER = COMMIT + '.__lock'  # TensorStore's temporary file of a store.json write that was killed
_REQUIRED = ('format', 'rows', 'd', 'dtype', 'studies', 'commits', 'mean_sq_norm', 'scale', 'info')
_PARTS_REQUIRED = ('format', 'processes', 'shares', 'd', 'dtype', 'info')

log = logging.getLogger(__name__)
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


def where(path: str, key: str) -> str:
  """How messages name a file of the store: a local path, or the URL of the key."""
  return os.path.join(path, key) if '://' not in path else url(path) + key


def checksum(a: np.ndarray, value: int = 0) -> int:
  """crc32 of an array's bytes as stored (C order), continuing `value` (blocks of one study)."""
  return zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8), value)


def _checksum_text(value: int) -> str:
  return f'crc32:{value & 0xFFFFFFFF:08x}'


def kvstore(path: str) -> ts.KvStore:
  return ts.KvStore.open(url(path), context=_CONTEXT).result()


def _has_key(kv: ts.KvStore, key: str) -> bool:
  """Whether `key` exists, without reading it (a shard file can be large)."""
  return bool(kv.list(ts.KvStore.KeyRange(key.encode(), key.encode() + b'\0')).result())


def _status(e: Exception) -> str:
  """TensorStore's status code (NOT_FOUND, DATA_LOSS, ...) at the start of its error message."""
  head = str(e).split(':', 1)[0]
  return head if head.isupper() else ''


def _short(e: Exception, limit: int = 300) -> str:
  text = ' '.join(str(e).split())
  return text if len(text) <= limit else text[:limit] + '...'


def how_to_rebuild(path: str, verify: bool = True) -> str:
  """What to do about damaged rows: the store is append-only, so it is rebuilt, not patched."""
  first = (
      f'Run `python -m jaxsae.verify_store {path}` to list every damaged study. ' if verify else ''
  )
  return first + (
      'A store cannot be patched in place: restore the damaged files from a backup, or export the '
      'manifest into a new store (`python -m jaxsae.export_activations --config=<experiment> '
      '--config.data.store_path=<new path>`) and use that one.'
  )


# --------------------------------------------------------------------------------------------------
# The commit record, the study records, and what a path holds
# --------------------------------------------------------------------------------------------------


def read_commit(kv: ts.KvStore, path: str) -> dict | None:
  """store.json, checked enough to be used (None if there is none)."""
  try:
    r = kv.read(COMMIT).result()
  except ValueError as e:
    raise ConfigError(f'cannot read {where(path, COMMIT)}: {_short(e)}') from e
  if r.state != 'value':
    return None
  damaged = (
      f'the commit record of the activation store at {path!r} is damaged (truncated by a full '
      'disk or an interrupted copy?). Nothing was read or changed. Restore '
      f'{where(path, COMMIT)} from a backup, or export into a new store '
      '(--config.data.store_path=<new path>).'
  )
  try:
    meta = json.loads(r.value)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConfigError(
        f'{where(path, COMMIT)} is not valid JSON ({e}; {len(r.value)} bytes): {damaged}'
    ) from e
  parts = isinstance(meta, dict) and meta.get('format') == PARTS_FORMAT
  required = _PARTS_REQUIRED if parts else _REQUIRED
  missing = [k for k in required if k not in meta] if isinstance(meta, dict) else list(required)
  if missing:
    raise ConfigError(f'{where(path, COMMIT)} lacks {", ".join(missing)}: {damaged}')
  if meta['format'] not in (FORMAT, PARTS_FORMAT):
    raise ConfigError(
        f'{where(path, COMMIT)} has format {meta["format"]!r}; this version of '
        f'jaxsae reads {FORMAT!r} and {PARTS_FORMAT!r}. Re-export the activations.'
    )
  return meta


def is_parts(meta: dict | None) -> bool:
  """Whether a commit record is the root of a store written by several processes."""
  return meta is not None and meta.get('format') == PARTS_FORMAT


def parts_refused(path: str, meta: dict, what: str) -> ConfigError:
  """The error for using a several-process store's root as one process's store."""
  n = meta['processes']
  return ConfigError(
      f'the activation store at {path!r} was written by {n} processes (one part each, under '
      f'{where(path, "parts/")}); {what}. Export into it with --config.export.processes={n} and '
      f'--config.export.process_index=I for I in 0..{n - 1}, or into a new data.store_path.'
  )


def read_records(kv: ts.KvStore, path: str, commits: int) -> list[dict]:
  """The study records of commits [0, commits), in manifest order."""
  out = []
  for seq in range(commits):
    key = f'studies/{seq:08d}.json'
    try:
      r = kv.read(key).result()
      records = json.loads(r.value) if r.state == 'value' else None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
      raise ConfigError(
          f'the study records {where(path, key)} of commit {seq} cannot be read ({_short(e)}). '
          + how_to_rebuild(path)
      ) from e
    if not isinstance(records, list):
      raise ConfigError(
          f'the study records {where(path, key)} of commit {seq} are missing (store.json counts '
          f'{commits} commits). ' + how_to_rebuild(path)
      )
    out += records
  return out


def describe_studies(records: Sequence[dict], ranges: Sequence[tuple[int, int]], limit=5) -> str:
  """The studies holding rows in any of `ranges` ([lo, hi) pairs), for messages: how many, their
  ids and manifest rows."""
  hit = [
      r
      for r in records
      if not r.get('skipped')
      and r.get('rows')
      and any(r['row_start'] < hi and lo < r['row_start'] + r['rows'] for lo, hi in ranges)
  ]
  if not hit:
    return 'no committed study'
  ids = ', '.join(str(r['study_id']) for r in hit[:limit])
  more = f' and {len(hit) - limit} more' if len(hit) > limit else ''
  index = [r.get('manifest_index') for r in hit]
  rows = f'; manifest rows {index[0]}-{index[-1]}' if None not in index else ''
  return f'{len(hit)} stud{"y" if len(hit) == 1 else "ies"} ({ids}{more}{rows})'


def _contents(path: str, kv: ts.KvStore) -> list[str]:
  """What is at `path`, one level deep (directories end in /), ignoring a killed first write."""
  if '://' not in path:
    if not os.path.exists(path):
      return []
    names = [n + ('/' if os.path.isdir(os.path.join(path, n)) else '') for n in os.listdir(path)]
  else:
    keys = [k.decode(errors='replace') for k in kv.list().result()]
    names = list({k.split('/', 1)[0] + ('/' if '/' in k else '') for k in keys})
  return sorted(n for n in names if n != _LEFTOVER)


def check_path(path: str) -> dict | None:
  """The commit record at `path`, or None if a new store can be made there (nothing is there, or an
  empty directory); anything else is refused with what is there. Reads only: call it before any
  work is spent on what would be written."""
  if '://' not in path and os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(
        f'data.store_path={path!r} is a file, not an activation store; nothing was changed. '
        'Point --config.data.store_path at a store, or at a new or empty directory.'
    )
  kv = kvstore(path)
  meta = read_commit(kv, path)
  if meta is not None:
    return meta
  there = _contents(path, kv)
  if not there:
    return None
  shown = ', '.join(there[:6]) + (f' and {len(there) - 6} more' if len(there) > 6 else '')
  if {'activations/', 'tokens/', 'studies/', 'parts/'} & set(there):
    raise ConfigError(
        f'data.store_path={path!r} looks like an activation store whose commit record '
        f'({COMMIT}) is missing: it holds {shown} but no {COMMIT}. It was not touched: without '
        'its commit record nothing in it can be trusted or continued. Restore '
        f'{where(path, COMMIT)} from a backup, or export into a new path '
        '(--config.data.store_path=<new path>) and delete this one yourself once it is not '
        'needed. (A jaxsae older than this one also leaves this when killed before its first '
        'commit: then it holds nothing committed.)'
    )
  raise ConfigError(
      f'data.store_path={path!r} is not an activation store and not empty: it holds {shown}. '
      'Nothing was changed: a new store is made only in a new path or an empty directory. Point '
      '--config.data.store_path at the store itself (the directory with store.json) or at a new '
      'path.'
  )


# --------------------------------------------------------------------------------------------------
# The arrays
# --------------------------------------------------------------------------------------------------


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
                  'codecs': raw + [{'name': 'crc32c'}],  # every chunk read is verified
                  'index_codecs': raw + [{'name': 'crc32c'}],
              },
          }
      ],
  }


def open_array(path: str, name: str, rows: int | None, strict: bool = True) -> ts.TensorStore:
  """Committed rows [0, rows) of array `name` (None: all its rows), read-only. `strict`: a missing
  chunk is an error (TensorStore's default reads it as the fill value: zeros)."""
  spec = {**_array_spec(path, name), 'open': True, 'fill_missing_data_reads': not strict}
  try:
    arr = ts.open(spec, context=_CONTEXT, read=True).result()
  except ValueError as e:
    raise ConfigError(
        f'the activation store at {path!r} has no readable {name} array '
        f'({where(path, name + "/zarr.json")}: {_short(e)}). ' + how_to_rebuild(path)
    ) from e
  if rows is None:
    return arr
  if arr.shape[0] < rows:
    raise ConfigError(
        f'{where(path, COMMIT)} commits {rows} rows but the {name} array holds only '
        f'{arr.shape[0]}: the commit record does not belong to these arrays (copied from another '
        'store?) or the arrays were replaced. Nothing was read. ' + how_to_rebuild(path)
    )
  return arr[:rows]


def shard_rows(arr: ts.TensorStore) -> int:
  return int(arr.chunk_layout.write_chunk.shape[0])


def shard_key(arr: ts.TensorStore, name: str, shard: int) -> str:
  """The store key of the shard file holding rows [shard * shard_rows, ...) of array `name`."""
  enc = arr.spec().to_json()['metadata'].get('chunk_key_encoding', {'name': 'default'})
  default = '/' if enc.get('name', 'default') == 'default' else '.'
  sep = enc.get('configuration', {}).get('separator', default)
  prefix = 'c' + sep if enc.get('name', 'default') == 'default' else ''
  return f'{name}/{prefix}{shard}{sep}0'


def has_chunk_checksums(arr: ts.TensorStore) -> bool:
  """Whether each chunk carries a crc32c (stores written since jaxsae added it)."""
  codecs = arr.spec().to_json()['metadata']['codecs']
  inner = codecs[0].get('configuration', {}).get('codecs', []) if codecs else []
  return any(c.get('name') == 'crc32c' for c in inner)


_PROBLEMS = {
    'NOT_FOUND': 'is missing (the file, or a chunk in it)',
    'DATA_LOSS': 'is corrupt (its bytes fail their checksum, or it was truncated)',
    'FAILED_PRECONDITION': 'is truncated or not a shard file',
    'OUT_OF_RANGE': 'is truncated',
    'INVALID_ARGUMENT': 'is not a valid shard file',
}


def shard_problem(e: Exception) -> str:
  """What a failed read says about the shard file, in words, with TensorStore's message."""
  return f'{_PROBLEMS.get(_status(e), "cannot be read")} [{_short(e, 200)}]'


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


class _Rows:
  """grain's RandomAccessDataSource over `read`: row i as a float32 vector, and a batched read
  (`_getitems`: one read for many rows)."""

  rows: int

  def __len__(self) -> int:
    return self.rows

  def __getitem__(self, index: int) -> np.ndarray:
    return self.read(np.array([index]))[0]

  def _getitems(self, indices: Sequence[int]) -> list[np.ndarray]:
    return list(self.read(np.asarray(indices)))


class ActivationStore(_Rows):
  """The committed rows of a store, read-only. Also a grain RandomAccessDataSource (row i as a
  float32 vector) with a batched read (`_getitems`: one TensorStore read for many rows).

  A missing, truncated or altered shard raises ConfigError naming the file, its rows, the studies
  they belong to and what to do (never zeros or garbage). `fill_missing` reads chunks that were
  never written as zeros instead: only for stores grown without writing (tests, benchmarks)."""

  def __init__(self, path: str, fill_missing: bool = False, meta: dict | None = None):
    self.path, self.fill_missing = path, fill_missing
    if meta is not None:  # the commit a reader has already read (a part of a several-process store)
      self._set(meta)
      return
    if not exists(path):
      raise ConfigError(
          f'activation store not found: data.store_path={path!r} does not exist. Write it first '
          'with `python -m jaxsae.export_activations --config=<this experiment>` (it needs the '
          'model weights), or point --config.data.store_path at an existing store.'
      )
    meta = read_commit(kvstore(path), path)
    if meta is None:
      raise ConfigError(
          f'{path!r} is not a committed activation store: it has no {COMMIT}. Either it is not a '
          'store (check data.store_path), or its commit record was lost (`python -m '
          f'jaxsae.verify_store {path}` tells), or an older export was killed before its first '
          'commit: rerun `python -m jaxsae.export_activations` into a new path to write it.'
      )
    if is_parts(meta):
      raise ConfigError(
          f'{path!r} is a store written by several processes: open it with store.open_store.'
      )
    self._set(meta)

  def _set(self, meta: dict) -> None:
    self.meta = meta
    self.rows, self.d, self.dtype = int(meta['rows']), int(meta['d']), str(meta['dtype'])
    if self.rows == 0 and not int(meta['studies']):
      raise ConfigError(
          f'the activation store at {self.path!r} has no committed study yet: its export is '
          'still running, or was stopped before its first commit. Rerun `python -m '
          'jaxsae.export_activations` with the same config to continue it.'
      )
    if self.rows == 0:
      raise ConfigError(
          f'the activation store at {self.path!r} is empty: 0 rows committed '
          f'({meta["studies"]} studies processed, token kinds kept '
          f'{meta["info"].get("keep_kinds")}). '
          'Check export.manifest and export.keep_kinds, then re-export.'
      )
    self.mean_sq_norm = float(meta['mean_sq_norm'])
    self.scale = float(meta['scale'])
    self._arrays = {'activations': self._open('activations')}
    self._acts = self._arrays['activations']  # only committed rows are visible
    self._lenient: dict[str, ts.TensorStore] = {}
    self._records: list[dict] | None = None

  def __getstate__(self):  # worker processes reopen the same committed rows
    return {'path': self.path, 'meta': self.meta, 'fill_missing': self.fill_missing}

  def __setstate__(self, state):
    self.path, self.fill_missing = state['path'], state.get('fill_missing', False)
    self._set(state['meta'])

  def _open(self, name: str) -> ts.TensorStore:
    return open_array(self.path, name, self.rows, strict=not self.fill_missing)

  def _array(self, name: str) -> ts.TensorStore:
    if name not in self._arrays:
      self._arrays[name] = self._open(name)
    return self._arrays[name]

  def _fetch(self, name: str, index: slice | np.ndarray) -> np.ndarray:
    """Rows `index` of array `name` as stored; a damaged shard is a ConfigError that names it."""
    try:
      return self._array(name)[index].read().result()
    except ValueError as e:
      return self._recover(name, index, e)

  def _recover(self, name: str, index: slice | np.ndarray, error: ValueError) -> np.ndarray:
    """After a failed read: find the shards that fail, or (a store written before chunk checksums)
    read the chunks it left out because they were all zeros, as zeros."""
    arr = self._array(name)
    rows = np.arange(*index.indices(self.rows)) if isinstance(index, slice) else np.unique(index)
    S, kv, bad = shard_rows(arr), kvstore(self.path), []
    shards = np.unique(rows // S)
    if not len(shards):
      raise ConfigError(f'cannot read the activation store at {self.path!r}: {_short(error)}')
    bounds = np.searchsorted(rows, np.append(shards, shards[-1] + 1) * S)
    reads = [arr[rows[lo:hi]].read() for lo, hi in zip(bounds[:-1], bounds[1:])]  # all at once
    for s, read in zip(shards.tolist(), reads):
      try:
        read.result()
      except ValueError as e:
        key = shard_key(arr, name, s)
        if _status(e) == 'NOT_FOUND' and not has_chunk_checksums(arr) and _has_key(kv, key):
          continue  # an older writer left all-zero chunks out of an existing shard file
        bad.append((s, key, e))
    if bad:
      raise ConfigError(self._damage(name, S, bad))
    if name not in self._lenient:
      self._lenient[name] = open_array(self.path, name, self.rows, strict=False)
    try:
      return self._lenient[name][index].read().result()
    except ValueError as e:
      raise ConfigError(
          f'cannot read the {name} of the activation store at {self.path!r}: {_short(error)}. '
          + how_to_rebuild(self.path)
      ) from e

  def _damage(self, name: str, S: int, bad: list[tuple[int, str, Exception]]) -> str:
    files = '; '.join(
        f'{where(self.path, key)} (rows {s * S}-{min((s + 1) * S, self.rows) - 1}) '
        f'{shard_problem(e)}'
        for s, key, e in bad[:3]
    ) + (f'; and {len(bad) - 3} more shard files of {name}' if len(bad) > 3 else '')
    try:
      held = describe_studies(self.studies(), [(s * S, (s + 1) * S) for s, _, _ in bad])
      held = f'{"They hold" if len(bad) > 1 else "It holds"} rows of {held}.'
    except ConfigError as e:
      held = f'(The studies in it are unknown: {e})'
    return (
        f'the activation store at {self.path!r} is damaged: {files}. {held} Nothing was read '
        f'from it. ' + how_to_rebuild(self.path)
    )

  def _gather(self, name: str, indices: np.ndarray, dtype) -> np.ndarray:
    indices = np.asarray(indices, np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= self.rows):
      raise IndexError(f'row index out of range [0, {self.rows}) in {self.path}')
    order = np.argsort(indices, kind='stable')  # sorted reads walk the shards in order
    out = np.empty((len(indices), self._array(name).shape[1]), dtype)
    out[order] = self._fetch(name, indices[order])
    return out

  def read(self, indices: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Rows `indices` (any order, repeats allowed) as [len(indices), d] `dtype` (float32; None:
    the store's own, e.g. bfloat16 for a bfloat16 step without a float32 copy), one read."""
    return self._gather('activations', indices, DTYPES[self.dtype] if dtype is None else dtype)

  def read_range(self, start: int, stop: int) -> np.ndarray:
    return np.asarray(self._fetch('activations', slice(start, stop)), np.float32)

  def tokens(self, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Token metadata [rows, len(TOKEN_COLUMNS)] of rows [start, stop)."""
    return self._fetch('tokens', slice(start, stop))

  def tokens_at(self, indices: np.ndarray) -> np.ndarray:
    """Token metadata of the given rows (any order), like `read` for activations."""
    return self._gather('tokens', indices, np.int32)

  def studies(self) -> list[dict]:
    """Every processed study in manifest order: exported ones with their row range, and skipped
    ones with the reason."""
    if self._records is None:
      self._records = read_records(kvstore(self.path), self.path, int(self.meta['commits']))
    return list(self._records)


# --------------------------------------------------------------------------------------------------
# Stores written by several processes (jaxsae.formats.parts writes them)
# --------------------------------------------------------------------------------------------------


def part_key(index: int, count: int) -> str:
  return f'parts/{index:03d}-of-{count:03d}'


def part_path(path: str, index: int, count: int) -> str:
  """Where part `index` of `count` lives: a local directory or a URL below the root's."""
  key = part_key(index, count)
  return url(path) + key if '://' in path else os.path.join(path, key)


class PartedStore(_Rows):
  """The committed rows of every part, one part after another, read like an ActivationStore
  (`rows`, `d`, `dtype`, `scale`, `meta`, `read`, `read_range`, `tokens`, `tokens_at`, `studies`,
  and grain's random access). A part whose process has not committed yet holds no rows: the store
  is read with what is committed, and says which parts are incomplete in `incomplete()`."""

  def __init__(
      self,
      path: str,
      root: dict,
      fill_missing: bool = False,
      part_metas: Sequence[dict | None] | None = None,
  ):
    self.path, self.root, self.fill_missing = path, root, fill_missing
    count = int(root['processes'])
    self.part_paths = [part_path(path, i, count) for i in range(count)]
    if part_metas is None:
      part_metas = [read_commit(kvstore(p), p) if exists(p) else None for p in self.part_paths]
    self.part_metas = list(part_metas)
    for p, m in zip(self.part_paths, self.part_metas):
      if m is not None and (m.get('format') != FORMAT or m['d'] != root['d']):
        raise ConfigError(
            f'{where(p, COMMIT)} is not a part of the store at {path!r} '
            f'(format {m.get("format")!r}, d={m.get("d")}; the root says d={root["d"]}). '
            + how_to_rebuild(path)
        )
    rows = [int(m['rows']) if m else 0 for m in self.part_metas]
    self.offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
    self.parts = [
        ActivationStore(p, fill_missing, meta=m) if m and int(m['rows']) else None
        for p, m in zip(self.part_paths, self.part_metas)
    ]
    self.meta = self._combined()
    self.rows, self.d, self.dtype = int(self.meta['rows']), int(root['d']), str(root['dtype'])
    if self.rows == 0:
      raise ConfigError(
          f'the activation store at {path!r} (written by {count} processes) has no committed '
          f'row yet: {self.meta["studies"]} studies processed. Its exports are still running or '
          'were stopped before their first commit: rerun each with the same config to continue.'
      )
    self.mean_sq_norm, self.scale = float(self.meta['mean_sq_norm']), float(self.meta['scale'])
    self._records: list[dict] | None = None
    missing = self.incomplete()
    if missing:
      log.warning('the activation store at %s is incomplete: %s', path, '; '.join(missing))

  def _combined(self) -> dict:
    """One commit record for the whole store: sums, and the scale of all committed rows."""
    metas = [m for m in self.part_metas if m]
    total = lambda key: sum(int(m.get(key, 0)) for m in metas)  # noqa: E731
    counts = lambda key: {  # noqa: E731
        k: sum(int((m.get(key) or {}).get(k, 0)) for m in metas) for k in TOKEN_KINDS
    }
    rows, sum_sq = total('rows'), sum(float(m['sum_sq_norm']) for m in metas)
    mean_sq = sum_sq / rows if rows else None
    return {
        'format': PARTS_FORMAT,
        'rows': rows,
        'd': self.root['d'],
        'dtype': self.root['dtype'],
        'studies': total('studies'),
        'commits': total('commits'),
        'skipped': total('skipped'),
        'sum_sq_norm': sum_sq,
        'mean_sq_norm': mean_sq,
        'scale': None if mean_sq is None else float(np.sqrt(mean_sq / self.root['d'])),
        'kind_counts': counts('kind_counts'),
        'dropped_counts': counts('dropped_counts'),
        'info': self.root['info'],
        'processes': self.root['processes'],
        'parts': [
            {
                'path': part_key(i, len(self.part_paths)),
                'share': list(self.root['shares'][i]),
                'studies': int(m['studies']) if m else 0,
                'rows': int(m['rows']) if m else 0,
            }
            for i, m in enumerate(self.part_metas)
        ],
    }

  def incomplete(self) -> list[str]:
    """The parts that have not processed their whole share, in words."""
    out = []
    for p in self.meta['parts']:
      lo, hi = p['share']
      if p['studies'] < hi - lo:
        out.append(
            f'{p["path"]} has {p["studies"]} of its {hi - lo} studies (manifest rows {lo}-{hi - 1})'
        )
    return out

  def __getstate__(self):  # worker processes reopen the same committed rows
    return {
        'path': self.path,
        'root': self.root,
        'fill_missing': self.fill_missing,
        'part_metas': self.part_metas,
    }

  def __setstate__(self, state):
    self.__init__(state['path'], state['root'], state['fill_missing'], state['part_metas'])

  def _gather(self, method: str, indices: np.ndarray, width: int, out_dtype, **kw) -> np.ndarray:
    """Rows `indices` (any order) through each part's own `method`, back in the asked order."""
    indices = np.asarray(indices, np.int64)
    if indices.size and (indices.min() < 0 or indices.max() >= self.rows):
      raise IndexError(f'row index out of range [0, {self.rows}) in {self.path}')
    which = np.searchsorted(self.offsets, indices, side='right') - 1
    out = np.empty((len(indices), width), out_dtype)
    for i in np.unique(which):
      at = np.nonzero(which == i)[0]
      out[at] = getattr(self.parts[i], method)(indices[at] - self.offsets[i], **kw)
    return out

  def _span(self, method: str, start: int, stop: int | None) -> np.ndarray:
    stop = self.rows if stop is None else min(stop, self.rows)
    blocks = []
    for i, part in enumerate(self.parts):
      lo, hi = max(start, self.offsets[i]), min(stop, self.offsets[i + 1])
      if part is not None and lo < hi:
        blocks.append(getattr(part, method)(int(lo - self.offsets[i]), int(hi - self.offsets[i])))
    return np.concatenate(blocks) if blocks else np.zeros((0, 0))

  def read(self, indices: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Rows `indices` as [len(indices), d] `dtype` (None: the store's own), like
    ActivationStore.read."""
    kind = DTYPES[self.dtype] if dtype is None else dtype
    return self._gather('read', indices, self.d, kind, dtype=dtype)

  def read_range(self, start: int, stop: int) -> np.ndarray:
    return self._span('read_range', start, stop).reshape(-1, self.d)

  def tokens(self, start: int = 0, stop: int | None = None) -> np.ndarray:
    return self._span('tokens', start, stop).reshape(-1, len(TOKEN_COLUMNS))

  def tokens_at(self, indices: np.ndarray) -> np.ndarray:
    return self._gather('tokens_at', indices, len(TOKEN_COLUMNS), np.int32)

  def studies(self) -> list[dict]:
    """Every processed study of every part, in manifest order, row ranges in this store's rows."""
    if self._records is None:
      out = []
      for i, (p, m) in enumerate(zip(self.part_paths, self.part_metas)):
        if not m or not int(m['commits']):
          continue
        for r in read_records(kvstore(p), p, int(m['commits'])):
          r = dict(r)
          if not r.get('skipped'):
            r['row_start'] = int(r['row_start']) + int(self.offsets[i])
          out.append(r)
      self._records = out
    return list(self._records)


def open_store(path: str, fill_missing: bool = False) -> ActivationStore | PartedStore:
  """The committed rows of the store at `path`, written by one process or several (then a
  `PartedStore`, read the same way)."""
  if exists(path):
    meta = read_commit(kvstore(path), path)
    if is_parts(meta):
      return PartedStore(path, meta, fill_missing)
  return ActivationStore(path, fill_missing)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


class StoreWriter:
  """Appends rows and their token metadata, committing at study boundaries.

  Rows are buffered until `rows_per_shard` of them are waiting (a shard file is rewritten whole
  on every write to it, so this bounds the rewriting to about twice the data), then written and
  committed by a background thread while the caller computes the next ones. `info` (model, layer,
  kinds, ...) must match on resume. A path holding anything but a store of these settings is
  refused (`check_path`), never overwritten.
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
    meta = check_path(path)
    self._kv = kvstore(path)
    if meta is None:  # a new store: its commit record claims the path before anything else
      meta = self._first_commit(rows_per_chunk, rows_per_shard)
      self._kv.write(COMMIT, json.dumps(meta, indent=1)).result()
    elif is_parts(meta):
      raise parts_refused(path, meta, 'one process cannot append to it')
    else:
      self._check_resumable(meta)
    self.rows_per_shard = int(meta.get('rows_per_shard', rows_per_shard))
    chunk = int(meta.get('rows_per_chunk', rows_per_chunk))
    self._acts = self._open('activations', meta, [0, d], dtype, chunk, self.rows_per_shard)
    self._tokens = self._open(
        'tokens', meta, [0, len(TOKEN_COLUMNS)], 'int32', self.rows_per_shard, self.rows_per_shard
    )
    self.meta = self._committed = meta
    self._skipped = [
        s for s in read_records(self._kv, path, int(meta['commits'])) if s.get('skipped')
    ]
    self._rows, self._toks, self._records = [], [], []
    self._dropped = np.zeros(len(TOKEN_KINDS), np.int64)
    self._state = meta.get('export_state')
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='store-writer')
    self._pending: concurrent.futures.Future | None = None

  def _first_commit(self, rows_per_chunk: int, rows_per_shard: int) -> dict:
    return {
        'format': FORMAT,
        'd': self.d,
        'dtype': self.dtype,
        'rows': 0,
        'studies': 0,
        'commits': 0,
        'skipped': 0,
        'sum_sq_norm': 0.0,
        'mean_sq_norm': None,
        'scale': None,
        'kind_counts': {k: 0 for k in TOKEN_KINDS},
        'dropped_counts': {k: 0 for k in TOKEN_KINDS},
        'export_state': None,
        'last_study_id': None,
        'token_columns': list(TOKEN_COLUMNS),
        'kinds': list(TOKEN_KINDS),
        'info': self.info,
        'rows_per_chunk': rows_per_chunk,
        'rows_per_shard': rows_per_shard,
    }

  def _open(self, name, meta, shape, dtype, rows_per_chunk, rows_per_shard) -> ts.TensorStore:
    """The array for writing: created if the store has no commit yet and no array (a new store, or
    one killed right after claiming its path), else opened, its committed rows checked."""
    spec = {**_array_spec(self.path, name), 'store_data_equal_to_fill_value': True}
    if not int(meta['commits']) and not _has_key(self._kv, f'{name}/zarr.json'):
      metadata = _sharded_metadata(shape, dtype, rows_per_chunk, rows_per_shard)
      return ts.open({**spec, 'create': True, 'metadata': metadata}, context=_CONTEXT).result()
    arr = open_array(self.path, name, int(meta['rows']))  # the checks, and a clear error
    rows, S = int(meta['rows']), shard_rows(arr)
    if rows % S and not _has_key(self._kv, shard_key(arr, name, rows // S)):
      raise ConfigError(
          f'cannot continue the activation store at {self.path!r}: the shard file '
          f'{where(self.path, shard_key(arr, name, rows // S))} holding its last committed rows '
          f'({rows // S * S}-{rows - 1}) is missing, and appending would fill them with zeros. '
          'Nothing was changed. ' + how_to_rebuild(self.path)
      )
    return ts.open({**spec, 'open': True}, context=_CONTEXT).result()

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

  @property
  def studies_done(self) -> int:
    """Manifest rows processed (exported or skipped) by committed or buffered work."""
    return int(self.meta['studies']) + len(self._records)

  @property
  def last_study_id(self) -> str | None:
    return self._records[-1]['study_id'] if self._records else self.meta['last_study_id']

  @property
  def export_state(self) -> Any:
    """What the exporter asked to keep with the last appended studies (committed with them)."""
    return self._state

  def append(
      self,
      rows: np.ndarray,
      tokens: np.ndarray,
      records: list[dict],
      dropped: np.ndarray | None = None,
      state: Any = None,
  ) -> None:
    """Add the rows of whole studies (`records`, in manifest order, row ranges relative to this
    call's rows; skipped studies carry `skipped` and no rows). Commits when enough rows wait.
    `dropped`: tokens per kind these studies left out (outliers); `state`: JSON the exporter needs
    to continue exactly after these studies (committed with them)."""
    if rows.shape[1:] != (self.d,) or len(rows) != len(tokens):
      raise ValueError(
          f'rows {rows.shape} / tokens {tokens.shape} do not fit a [n, {self.d}] store'
      )
    offset = int(self.meta['rows']) + sum(len(r) for r in self._rows)
    for r in records:
      r = dict(r)
      if not r.get('skipped'):
        r['row_start'] = offset + r['row_start']
      self._records.append(r)
    self._rows.append(np.asarray(rows).astype(DTYPES[self.dtype]))
    self._toks.append(np.asarray(tokens, np.int32))
    if dropped is not None:
      self._dropped += np.asarray(dropped, np.int64)
    if state is not None:
      self._state = state
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
    was = m.get('dropped_counts') or {}
    m['dropped_counts'] = {
        k: int(was.get(k, 0)) + int(n) for k, n in zip(TOKEN_KINDS, self._dropped)
    }
    m['export_state'] = self._state
    self._dropped = np.zeros(len(TOKEN_KINDS), np.int64)
    m['last_study_id'] = records[-1]['study_id']
    self._skipped += [r for r in records if r.get('skipped')]
    m['skipped'] = len(self._skipped)
    self.meta = m
    self._pending = self._pool.submit(
        self._write_and_commit, start, rows, toks, records, m, list(self._skipped)
    )

  def _write_and_commit(self, start, rows, toks, records, meta, skipped) -> None:
    stop = start + len(rows)
    for r in records:  # what verify_store checks the rows against: their bytes as written
      if not r.get('skipped'):
        a, b = r['row_start'] - start, r['row_start'] - start + r['rows']
        r['checksums'] = {
            'rows': _checksum_text(checksum(rows[a:b])),
            'tokens': _checksum_text(checksum(toks[a:b])),
        }
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
    self._committed = meta

  def _wait(self) -> None:
    if self._pending is not None:
      pending, self._pending = self._pending, None
      try:
        pending.result()
      except (ValueError, OSError) as e:
        if isinstance(e, ValueError) and not _status(e):
          raise  # not TensorStore's I/O error (a full disk, ...): a bug, with its traceback
        c = self._committed
        raise ConfigError(
            f'writing the activation store at {self.path!r} failed: {_short(e)}. Its last commit '
            f'({c["studies"]} studies, {c["rows"]} rows) is intact; fix the cause (disk space, '
            'permissions) and rerun the same command to continue after it.'
        ) from e

  def close(self) -> dict:
    """Commit what is buffered, wait for it; returns the final commit record."""
    self.flush()
    self._wait()
    self._pool.shutdown()
    return self.meta
