"""Which studies of an activation store are held out: never trained on, evaluated on.

A study is held out when SHA-256 of its id, read as a number in [0, 1), falls below
`data.held_out_fraction`. Membership is a pure function of (study id, fraction): it does not
depend on the store's order, size or the other studies, so a study keeps its side when more
studies are exported later, every reader (trainer, evaluate, interpret) computes the same split
without storing it, and raising the fraction only moves studies into the held-out side. The share
actually held out is binomial around the fraction (a store of 20 studies at 0.05 may hold out
none: `Split.describe` says how many). Whole studies, not rows, are held out: a study's tokens
share a report and images, so rows of a training study would not be unseen data.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Sequence

import numpy as np

from jaxsae.errors import ConfigError

__all__ = ['held_out_score', 'is_held_out', 'Split', 'split']

_SALT = b'jaxsae held-out split\0'  # keeps this hash unrelated to any other use of the ids


def held_out_score(study_id: str) -> float:
  """A fixed pseudo-random number in [0, 1) per study id."""
  digest = hashlib.sha256(_SALT + study_id.encode('utf-8')).digest()
  return int.from_bytes(digest[:8], 'big') / 2.0**64


def is_held_out(study_id: str, fraction: float) -> bool:
  return held_out_score(study_id) < fraction


@dataclasses.dataclass(frozen=True)
class Split:
  """A store's studies on either side, and the held-out studies' rows in store order."""

  fraction: float
  held_out: tuple[str, ...]  # study ids, store order
  training: tuple[str, ...]
  ranges: np.ndarray  # int64 [n, 2]: (start, stop) row ranges of the held-out studies, sorted

  @property
  def held_out_rows(self) -> int:
    return int(np.sum(self.ranges[:, 1] - self.ranges[:, 0]))

  def first_rows(self, tokens: int) -> np.ndarray:
    """The row ids of the first `tokens` held-out rows (all if fewer), in store order."""
    pieces, left = [], tokens
    for a, b in self.ranges:
      if left <= 0:
        break
      pieces.append(np.arange(a, a + min(b - a, left)))
      left -= len(pieces[-1])
    return np.concatenate(pieces) if pieces else np.zeros(0, np.int64)

  def describe(self) -> str:
    n = len(self.held_out) + len(self.training)
    return (
        f'{len(self.held_out)} of {n} studies ({self.held_out_rows} rows) held out by '
        f'data.held_out_fraction={self.fraction:g} (by study id, jaxsae.formats.split)'
    )


def split(records: Sequence[dict], fraction: float) -> Split:
  """The split of a store's study records (ActivationStore.studies(); skipped ones are ignored)."""
  if not 0.0 <= fraction < 1.0:
    raise ConfigError(
        f'data.held_out_fraction must be in [0, 1), got {fraction!r}: it is the share of '
        'studies kept out of training for the held-out evaluation (0: none).'
    )
  held, training, ranges = [], [], []
  for r in records:
    if r.get('skipped'):
      continue
    if is_held_out(r['study_id'], fraction):
      held.append(r['study_id'])
      if r['rows']:
        ranges.append((int(r['row_start']), int(r['row_start']) + int(r['rows'])))
    else:
      training.append(r['study_id'])
  arr = np.array(sorted(ranges), np.int64).reshape(-1, 2)
  return Split(float(fraction), tuple(held), tuple(training), arr)
