"""Orbax checkpoints of the training state, with resume that survives crashes.

Each checkpoint holds the state pytree, a small JSON `meta` (shapes, activation scale, config)
and the data iterator's state (grain's checkpoint handler: one file per JAX process). Orbax
writes into a temporary directory and renames it when complete, so a run killed mid-save leaves
only a temporary directory that is ignored and cleaned; a checkpoint that is complete on disk but
unreadable is skipped with a warning in favour of the one before it. A checkpoint from another
SAE shape stops the run before anything is overwritten.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any

import grain
import orbax.checkpoint as ocp

from jaxsae.config import ConfigError

log = logging.getLogger(__name__)


class Checkpointer:
  """Saves every `every` steps (asynchronously), keeps the newest `keep`, restores the newest."""

  def __init__(self, workdir: str, every: int, keep: int, async_save: bool = True):
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
    """`data_iterator`'s state is read now (before returning), so it matches `state`."""
    items = {'state': ocp.args.StandardSave(state), 'meta': ocp.args.JsonSave(meta)}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

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
  ) -> tuple[int, Any, dict] | None:
    """The newest readable checkpoint (or `step`): (step, state, meta); None if there is none.

    `expected_shape` ({'d': ..., 'F': ..., ...}) must equal the checkpoint's, else ConfigError.
    `data_iterator`, if given, is moved to the position saved with the state.
    """
    steps = [step] if step is not None else list(reversed(self.all_steps()))
    for s in steps:
      try:
        meta = self.restore_meta(s)
      except Exception as e:  # pylint: disable=broad-except
        self._skip(s, e, step)
        continue
      self.check_compatible(s, meta, expected_shape)
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

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
