"""Orbax checkpoints of the training state, with resume that survives crashes.

Each checkpoint holds the state pytree, a small JSON `meta` (shapes, activation scale, config)
and the data iterator's state (grain's checkpoint handler: one file per JAX process). Orbax
writes into a temporary directory and renames it when complete, so a run killed mid-save leaves
only a temporary directory that is ignored and cleaned; a checkpoint that is complete on disk but
unreadable is skipped with a warning in favour of the one before it. A checkpoint from another
SAE shape stops the run before anything is overwritten. A save that fills the disk stops the run
with one line naming the newest complete checkpoint, which is kept.

A checkpoint also remembers the data it was trained on (`data_identity`): for an activation store
its path, committed rows and fingerprint, for synthetic data its seed and settings. Resuming on
other data is refused unless train.allow_store_change; a store that only grew (more studies
appended by a resumed export) is recognised as the same store and the growth is logged.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from typing import Any

import grain
import ml_collections
import orbax.checkpoint as ocp

from jaxsae.config import ConfigError
from jaxsae.formats import store as store_lib

log = logging.getLogger(__name__)


class Checkpointer:
  """Saves every `every` steps (asynchronously), keeps the newest `keep`, restores the newest."""

  def __init__(self, workdir: str, every: int, keep: int, async_save: bool = True):
    logging.getLogger('absl').addFilter(_QUIET_DISK_FULL)  # once: the same filter object
    self.directory = os.path.join(os.path.abspath(workdir), 'checkpoints')
    self.every = every
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=every,
            max_to_keep=keep,
            create=True,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save,
        ),
        item_names=('state', 'meta', 'data'),
    )

  def save(
      self,
      step: int,
      state: Any,
      meta: dict,
      force: bool = False,
      data_iterator: grain.DatasetIterator | None = None,
  ) -> bool:
    """`data_iterator`'s state is read now (before returning), so it matches `state`. A full disk
    (in this save or the previous, asynchronous one) is a one-line ConfigError."""
    items = {'state': ocp.args.StandardSave(state), 'meta': ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    try:
      return self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:  # pylint: disable=broad-except
      self._stop_if_disk_full(e)
      raise

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def restore(
      self,
      abstract_state: Any,
      expected_shape: dict,
      step: int | None = None,
      data_iterator: grain.DatasetIterator | None = None,
      data: dict | None = None,
      allow_data_change: bool = False,
  ) -> tuple[int, Any, dict] | None:
    """The newest readable checkpoint (or `step`): (step, state, meta); None if there is none.

    `expected_shape` ({'d': ..., 'F': ..., ...}) must equal the checkpoint's, else ConfigError.
    `data` (`data_identity` of this run), if given, must be the checkpoint's data or a store that
    grew, else ConfigError unless `allow_data_change`. `data_iterator`, if given, is moved to the
    position saved with the state.
    """
    steps = [step] if step is not None else list(reversed(self.all_steps()))
    for s in steps:
      try:
        meta = self.restore_meta(s)
      except Exception as e:  # pylint: disable=broad-except
        self._skip(s, e, step)
        continue
      self.check_compatible(s, meta, expected_shape)
      if data is not None:
        self.check_data(s, meta, data, allow_data_change)
      try:
        restored = self.manager.restore(
            s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
        if data_iterator is not None:
          self.manager.restore(
              s, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iterator))
          )
      except Exception as e:  # pylint: disable=broad-except
        self._skip(s, e, step)
        continue
      return s, restored['state'], meta
    return None

  def _skip(self, s: int, error: Exception, requested: int | None) -> None:
    if requested is not None:
      raise ConfigError(
          f'checkpoint {os.path.join(self.directory, str(s))} cannot be read: '
          f'{type(error).__name__}: {error}'
      ) from error
    # Moved aside (not deleted) so the step can be saved again and nothing is lost.
    aside = os.path.join(os.path.dirname(self.directory), 'checkpoints_unreadable', str(s))
    os.makedirs(os.path.dirname(aside), exist_ok=True)
    shutil.move(os.path.join(self.directory, str(s)), aside + f'.{os.getpid()}')
    self.manager.reload()
    log.warning(
        'checkpoint at step %d in %s is incomplete or corrupt (%s: %s); moved it to %s '
        'and trying the previous one.',
        s,
        self.directory,
        type(error).__name__,
        error,
        aside,
    )

  def check_compatible(self, s: int, meta: dict, expected: dict) -> None:
    saved = meta.get('shape', {})
    diff = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
    if diff:
      what = ', '.join(f'{k}: checkpoint {a}, config {b}' for k, (a, b) in diff.items())
      raise ConfigError(
          f'the checkpoint at step {s} in {self.directory} is from an incompatible config '
          f'({what}). Nothing was overwritten: use a new --workdir, or restore that config.'
      )

  def check_data(self, s: int, meta: dict, now: dict, allow_change: bool) -> None:
    """Refuse to resume checkpoint `s` on data other than its own (unless `allow_change`: then a
    warning); log a store that grew. Checkpoints from before data was recorded are not checked."""
    saved = meta.get('data', {})
    if not ({'fingerprint', 'seed'} & set(saved)):
      log.warning(
          'the checkpoint at step %d in %s does not record its data (an older jaxsae); '
          'resuming on %s unchecked.',
          s,
          self.directory,
          _describe(now),
      )
      return
    change, why = _data_change(saved, now)
    scale = f'{float(meta.get("scale", 1.0)):.4g}'
    if change == 'grew':
      log.warning(
          'the activation store %s grew since the checkpoint at step %d: %d -> %d rows (%d -> %d '
          "studies); resuming on all of them, with the checkpoint's activation scale %s.",
          now['path'],
          s,
          saved['rows'],
          now['rows'],
          saved['studies'],
          now['studies'],
          scale,
      )
    elif change == 'other':
      what = (
          f'the checkpoint at step {s} in {self.directory} was trained on {_describe(saved)}, '
          f'but this run reads {_describe(now)}: {why}'
      )
      if not allow_change:
        raise ConfigError(
            f'{what}. Nothing was changed. Resume on the data it was trained on, train in a new '
            '--workdir, or set --config.train.allow_store_change=True to continue on this data '
            f"(the activation scale stays the checkpoint's, {scale})."
        )
      log.warning(
          "%s; continuing as train.allow_store_change=True asks, with the checkpoint's "
          'activation scale %s.',
          what,
          scale,
      )

  def newest_complete(self) -> int | None:
    """The newest step whose checkpoint finished writing (Orbax renames it into place)."""
    try:
      steps = [int(n) for n in os.listdir(self.directory) if n.isdigit()]
    except OSError:
      return None
    return max(steps, default=None)

  def _stop_if_disk_full(self, error: BaseException) -> None:
    """Orbax's long traceback for a full disk, as one line that says what is kept."""
    if not _disk_full(error):
      return
    try:
      free = f'{shutil.disk_usage(self.directory).free / 2**20:.1f} MiB free'
    except OSError:
      free = 'free space unknown'
    try:  # stop Orbax's background work: this manager is done
      self.manager.close()
    except Exception:  # pylint: disable=broad-except
      pass  # the same failure, reported below
    newest = self.newest_complete()
    kept = (
        f'the newest complete checkpoint is step {newest} ({os.path.join(self.directory, str(newest))}), '
        f'kept as it was'
        if newest is not None
        else 'there is no complete checkpoint yet'
    )
    raise ConfigError(
        f'the disk is full: saving a checkpoint in {self.directory} failed with "no space left on '
        f'device" ({free}); {kept}. Training stopped. Free some space (or use a --workdir on '
        'another disk) and rerun the same command to resume.'
    ) from None

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._stop_if_disk_full(e)
      raise

  def close(self) -> None:
    try:
      self.manager.close()
    except Exception as e:  # pylint: disable=broad-except
      self._stop_if_disk_full(e)
      raise


_DISK_FULL_TEXT = ('No space left on device', 'Disk quota exceeded')


class _QuietDiskFull(logging.Filter):
  """Drops Orbax's error records of a full disk (each with a traceback, from its threads): the
  save's one-line ConfigError says it, and what was kept."""

  def filter(self, record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    try:
      text = record.getMessage()
    except Exception:  # pylint: disable=broad-except
      text = str(record.msg)
    full = (error is not None and _disk_full(error)) or any(s in text for s in _DISK_FULL_TEXT)
    return not (full and record.levelno >= logging.ERROR)


_QUIET_DISK_FULL = _QuietDiskFull()


def _disk_full(error: BaseException) -> bool:
  """Whether `error`, or any error it was raised from or wraps, is ENOSPC / EDQUOT (Orbax and
  TensorStore re-raise it in other types, some with only the message left)."""
  seen, stack = set(), [error]
  while stack:
    e = stack.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    text = str(e)
    if getattr(e, 'errno', None) in (errno.ENOSPC, errno.EDQUOT) or any(
        s in text for s in _DISK_FULL_TEXT
    ):
      return True
    stack += [e.__cause__, e.__context__, *getattr(e, 'exceptions', ())]
  return False


# --------------------------------------------------------------------------------------------------
# The data a checkpoint was trained on
# --------------------------------------------------------------------------------------------------


def data_identity(c: ml_collections.ConfigDict) -> dict[str, Any]:
  """What this run reads, for its checkpoints to record: the source kind, and for a store its path
  (as given and resolved), committed rows and studies, and fingerprints; for synthetic data its
  seed and generator settings."""
  if c.data.source == 'synthetic':
    settings = c.data.synthetic.to_dict()
    return {'source': 'synthetic', 'seed': settings['seed'], 'synthetic': settings}
  path = c.data.store_path
  commit = _store_json(path, store_lib.COMMIT)  # opened and checked already by the source
  if not store_lib.is_parts(commit):
    return {'source': 'store', **_store_identity(path, commit)}
  # Written by several processes: each part grows on its own; the whole is identified by its root
  # record and its parts' identities.
  count = int(commit['processes'])
  found = []
  for i in range(count):
    part = store_lib.part_path(path, i, count)
    meta = store_lib.read_commit(store_lib.kvstore(part), part) if store_lib.exists(part) else None
    found.append(_store_identity(part, meta) if meta and int(meta['rows']) else None)
  header = {k: commit.get(k) for k in ('format', 'processes', 'shares', 'd', 'dtype', 'info')}
  return {
      'source': 'store',
      'path': path,
      'resolved': path if '://' in path else os.path.realpath(path),
      'rows': sum(p['rows'] for p in found if p),
      'studies': sum(p['studies'] for p in found if p),
      'commits': sum(p['commits'] for p in found if p),
      'fingerprint': _digest(header),
      'parts': found,
  }


def _store_identity(path: str, commit: dict) -> dict[str, Any]:
  """One store's (or one part's) identity: its header, first and last commits and rows."""
  commits = int(commit['commits'])
  rows = int(commit['rows'])
  # A store only grows by appending commits: its header, first commit and first rows identify it
  # (two stores of one manifest, model and layer differ in their activations), and the
  # checkpoint's last commit and last rows, still there unchanged, show that the rest was appended.
  header = {k: commit.get(k) for k in ('format', 'd', 'dtype', 'info')}
  header['first_commit'] = _commit_digest(path, 0)
  header['first_rows'] = _rows_digest(path, 0, min(rows, _ROWS))
  return {
      'path': path,
      'resolved': path if '://' in path else os.path.realpath(path),
      'rows': rows,
      'studies': int(commit['studies']),
      'commits': commits,
      'fingerprint': _digest(header),
      'last_commit': _commit_digest(path, commits - 1),
      'last_rows': _rows_digest(path, max(rows - _ROWS, 0), rows),
  }


def _data_change(saved: dict, now: dict) -> tuple[str, str]:
  """('same' | 'grew' | 'other', why) for resuming a checkpoint trained on `saved` on `now`."""
  if saved.get('source') != now['source']:
    return 'other', f'data.source was {saved.get("source")!r}, now {now["source"]!r}'
  if now['source'] == 'synthetic':  # keys only one side knows (a newer jaxsae's) are not compared
    was, is_ = saved['synthetic'], now['synthetic']
    diff = sorted(k for k in set(was) & set(is_) if was[k] != is_[k])
    if diff:
      return 'other', ', '.join(f'data.synthetic.{k} was {was[k]!r}, now {is_[k]!r}' for k in diff)
    return 'same', ''
  if saved['fingerprint'] != now['fingerprint']:
    return 'other', 'another store (its settings or first studies differ)'
  if 'parts' not in now:
    return _store_change(saved, now)
  changes = []
  for i, (was, is_) in enumerate(zip(saved.get('parts') or [], now['parts'])):
    if was is None:  # a part with no rows then: anything it holds now was appended
      changes.append(('grew' if is_ else 'same', ''))
    elif is_ is None:
      changes.append(('other', f'part {i} held {was["rows"]} rows and now holds none'))
    else:
      kind, why = _store_change(was, is_)
      changes.append((kind, f'part {i}: {why}' if why else ''))
  for kind in ('other', 'grew'):
    hit = [why for k, why in changes if k == kind]
    if hit:
      return kind, '; '.join(w for w in hit if w)
  return 'same', ''


def _store_change(saved: dict, now: dict) -> tuple[str, str]:
  """_data_change for one store (or one part) of the same fingerprint."""
  if saved['fingerprint'] != now['fingerprint']:
    return 'other', 'another store (its settings or first studies differ)'
  if now['commits'] < saved['commits'] or now['rows'] < saved['rows']:
    return 'other', (
        f'the store has {now["rows"]} rows in {now["commits"]} commits, fewer than the '
        f'{saved["rows"]} rows in {saved["commits"]} commits it had: it was rewritten'
    )
  rows = saved['rows']
  if _commit_digest(now['resolved'], saved['commits'] - 1) != saved['last_commit'] or (
      _rows_digest(now['resolved'], max(rows - _ROWS, 0), rows) != saved['last_rows']
  ):
    return 'other', f'its studies or rows up to row {rows} differ: it was rewritten'
  return ('grew' if now['rows'] > saved['rows'] else 'same'), ''


def _describe(data: dict) -> str:
  if data.get('source') == 'synthetic':
    return f'synthetic data (seed {data.get("seed")})'
  if 'fingerprint' not in data:
    return f'data.source={data.get("source")!r}'
  return (
      f'the activation store {data["path"]!r} ({data["rows"]} rows, {data["studies"]} studies, '
      f'fingerprint {data["fingerprint"][:12]})'
  )


def _store_json(path: str, key: str) -> Any:
  """A JSON file of the store (through the store's own kvstore: memory:// stores included)."""
  r = store_lib.kvstore(path).read(key).result()
  if r.state != 'value':
    raise ConfigError(
        f'{store_lib.where(path, key)} is missing: {path!r} is not a complete activation store. '
        + store_lib.how_to_rebuild(path)
    )
  try:
    return json.loads(r.value)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ConfigError(
        f'{store_lib.where(path, key)} is not valid JSON ({e}). ' + store_lib.how_to_rebuild(path)
    ) from None


def _commit_digest(path: str, seq: int) -> str:
  """A digest of commit `seq`'s study records: ids, row ranges and the rows' checksums, what never
  changes once committed."""
  records = _store_json(path, f'studies/{seq:08d}.json') if seq >= 0 else []
  return _digest(
      [
          [
              r.get('study_id'),
              r.get('row_start'),
              r.get('rows'),
              bool(r.get('skipped')),
              (r.get('checksums') or {}).get('rows'),
          ]
          for r in records
      ]
  )


_ROWS = 64  # rows read for a fingerprint: one small read, and two stores never share them


def _rows_digest(path: str, start: int, stop: int) -> str:
  return hashlib.sha256(store_lib.open_store(path).read_range(start, stop).tobytes()).hexdigest()


def _digest(value: Any) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
