"""The export's input side: studies read, decoded and prepared by worker processes, ahead of the
forward pass, in manifest order, and grouped into batches of similar token length.

Preparing a study (decoding its JPEGs, normalising each image once, the processor's resize and
tokenisation, the token kinds) costs far more than its forward pass on a GPU, so it runs in
`export.workers` worker processes (torch's DataLoader: ordered, with bounded prefetch) while the
main process runs the model. Each window of `export.bucket_window` studies is sorted by token
length before it is cut into forward batches, so 1-, 2- and 3-image studies are not padded to each
other's length; the rows still reach the store in manifest order.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import logging
import math
import os
import signal
import sys
import time
from typing import Any, Iterator, Sequence

import torch

from jaxsae.bridge import manifest, prompt

log = logging.getLogger(__name__)
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclasses.dataclass
class Skipped:
  """A study left out with --skip_bad: its store record."""

  record: dict


class Studies(torch.utils.data.Dataset):
  """Manifest rows [start, stop) as prepared model inputs: item i is row start+i's Prepared, a
  Skipped (bad, with skip_bad) or the BadStudyError to raise (bad, without skip_bad)."""

  def __init__(
      self,
      studies: Sequence[manifest.Study | manifest.BadStudyError],
      start: int,
      stop: int,
      processor: Any,
      teacher_forcing: bool,
      image_token_id: int,
      skip_bad: bool,
  ):
    self.studies, self.start, self.stop = studies, start, stop
    self.processor, self.teacher_forcing = processor, teacher_forcing
    self.image_token_id, self.skip_bad = image_token_id, skip_bad

  def __len__(self) -> int:
    return self.stop - self.start

  def __getitem__(self, i: int) -> prompt.Prepared | Skipped | manifest.BadStudyError:
    index = self.start + i
    s = self.studies[index]
    try:
      if isinstance(s, manifest.BadStudyError):
        raise s
      return prompt.prepare(
          self.processor, s, dict(s.images()), self.teacher_forcing, self.image_token_id
      )
    except manifest.BadStudyError as e:
      if not self.skip_bad:
        return e
      log.warning('skipping: %s', e)
      return Skipped({'study_id': e.study, 'manifest_index': index, 'skipped': e.record()})


class Inputs:
  """Iterates a Studies dataset in order, from worker processes when `workers` > 0, and counts the
  seconds the caller waited for each item (`wait_s`)."""

  def __init__(self, dataset: Studies, workers: int, window: int):
    self.dataset, self.workers, self.window = dataset, workers, window
    self.wait_s = 0.0

  def _items(self) -> Iterator[Any]:
    if not self.workers:
      return (self.dataset[i] for i in range(len(self.dataset)))
    loader = torch.utils.data.DataLoader(
        self.dataset,
        batch_size=None,  # one study per item; batches are formed after bucketing
        shuffle=False,
        num_workers=self.workers,
        # Two windows in flight: the next window is prepared while this one runs.
        prefetch_factor=max(2, math.ceil(2 * self.window / self.workers)),
        collate_fn=_as_is,
        worker_init_fn=functools.partial(_die_with_parent, os.getpid()),
    )
    return iter(loader)

  def windows(self) -> Iterator[list[Any]]:
    """Consecutive windows of up to `window` items, in manifest order."""
    items, window = self._items(), []
    while True:
      t = time.perf_counter()
      item = next(items, None)
      self.wait_s += time.perf_counter() - t
      if item is None:
        break
      if isinstance(item, manifest.BadStudyError):
        raise item
      window.append(item)
      if len(window) == self.window:
        yield window
        window = []
    if window:
      yield window


def _as_is(item: Any) -> Any:
  return item


def _die_with_parent(parent: int, worker_id: int) -> None:
  """A worker whose export is killed (kill -9, OOM) exits with it. Left alone it would wait
  forever to hand over the studies it prepared, holding their memory."""
  del worker_id
  if sys.platform.startswith('linux'):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the export died before the line above took effect
      os._exit(1)


def buckets(ready: list[prompt.Prepared], batch_size: int) -> list[list[prompt.Prepared]]:
  """Forward batches of up to `batch_size` studies, sorted by token length (ties in manifest
  order), so each batch pads to a similar length."""
  order = sorted(ready, key=lambda p: (len(p.input_ids), p.study.index))
  return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
