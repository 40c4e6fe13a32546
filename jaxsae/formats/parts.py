"""A store written by several processes at once: how they share the manifest and claim the root.

N exporting processes (one per GPU or host) each take a contiguous block of the manifest's studies
(`shares`: block i is studies [n*i//N, n*(i+1)//N)) and write it into their own part, an ordinary
store (jaxsae.formats.store) under the root:

  store.json              the root record: format PARTS_FORMAT, `processes` N, `shares`, and the
                          settings every part must have (d, dtype, info, chunking)
  parts/000-of-00N/       process 0's store: its own store.json, arrays and study records
  parts/001-of-00N/ ...

The root record is written once, by whichever process comes first, with a conditional write (the
others read it and check their settings against it); it never changes. Each part commits on its
own, so killing one process loses nothing of the others', and its rerun continues its own part
after its last committed study. Readers (`store.open_store`, a `store.PartedStore`) see the parts'
committed rows one after another: as the shares are contiguous blocks in manifest order, that is
the order a one-process export writes them in.
"""

from __future__ import annotations

import json

from jaxsae.errors import ConfigError
from jaxsae.formats import store as store_lib

_SETTINGS = ('processes', 'shares', 'd', 'dtype', 'info', 'rows_per_chunk', 'rows_per_shard')


def shares(studies: int, count: int) -> list[tuple[int, int]]:
  """Contiguous, disjoint blocks [lo, hi) of `studies` manifest rows, one per process, in order."""
  return [(studies * i // count, studies * (i + 1) // count) for i in range(count)]


def claim(
    path: str,
    count: int,
    studies: int,
    d: int,
    dtype: str,
    info: dict,
    rows_per_chunk: int,
    rows_per_shard: int,
) -> dict:
  """The root record of the several-process store at `path`: written now if nothing is there (an
  atomic create: of processes starting together exactly one writes it), else read and checked
  against these settings. Refuses a one-process store and a root of other settings, unchanged."""
  want = {
      'format': store_lib.PARTS_FORMAT,
      'processes': count,
      'shares': [list(s) for s in shares(studies, count)],
      'd': d,
      'dtype': dtype,
      'info': info,
      'rows_per_chunk': rows_per_chunk,
      'rows_per_shard': rows_per_shard,
  }
  meta = store_lib.check_path(path)  # a file, or a directory of something else: refused here
  if meta is None:
    kv = store_lib.kvstore(path)
    absent = kv.read(store_lib.COMMIT).result().stamp.generation
    text = json.dumps(want, indent=1)
    if kv.write(store_lib.COMMIT, text, if_equal=absent).result().generation:
      return want
    meta = store_lib.read_commit(kv, path)  # another process created it first
  if not store_lib.is_parts(meta):
    raise ConfigError(
        f'the activation store at {path!r} was written by one process; {count} processes '
        '(export.processes) cannot add parts to it. Nothing was changed. Continue it with '
        '--config.export.processes=1, or export into a new data.store_path.'
    )
  got = {k: meta.get(k) for k in _SETTINGS}
  diff = [
      f'{k}: store {got[k]!r}, now {want[k]!r}'
      for k in _SETTINGS
      if json.loads(json.dumps(got[k])) != json.loads(json.dumps(want[k]))
  ]
  if diff:
    hint = (
        " (the processes, or the manifest's length or export.max_studies, changed: each share "
        'is fixed when the store is begun)'
        if got['processes'] != count or got['shares'] != want['shares']
        else ''
    )
    raise ConfigError(
        f'the several-process activation store at {path!r} was begun with other settings '
        f'({"; ".join(diff)}){hint}. Nothing was changed. Rerun with the settings it was begun '
        'with, or export into a new data.store_path.'
    )
  return meta
