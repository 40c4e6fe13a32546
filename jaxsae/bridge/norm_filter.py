"""Outlier tokens: those whose activation norm exceeds a multiple of the running median norm.

Llama-family decoders (Vicuna-7B, MAIRA-2's language model) carry a few massive-norm tokens (the
first "." or newline after BOS) whose norm is hundreds of times the median; left in, they dominate
the activation scale and the reconstruction loss. The median is running (over every token of the
kinds kept, of this process's studies so far, the current study's included) and kept as a
histogram of log-norms (64 bins per octave, so within 0.6% of the exact median), small enough to be
committed with each store commit: a resumed export filters exactly as an uninterrupted one.
"""

from __future__ import annotations

import numpy as np

_PER_OCTAVE = 64
_LOWEST = -64  # log2 of the smallest norm binned; smaller ones (zeros) share the first bin
_BINS = 128 * _PER_OCTAVE  # up to 2^64


class NormFilter:
  """Decides, study by study in manifest order, which rows to keep."""

  def __init__(self, multiple: float, state: dict | None = None):
    self.multiple = float(multiple)
    self.counts = np.zeros(_BINS, np.int64)
    if state:
      bins, counts = np.array(state['bins'], np.int64).reshape(2, -1)
      self.counts[bins] = counts

  def median(self) -> float:
    """The running median norm (the centre of its histogram bin)."""
    total = int(self.counts.sum())
    if not total:
      return float('nan')
    b = int(np.searchsorted(np.cumsum(self.counts), (total + 1) // 2))
    return float(2.0 ** ((b + 0.5) / _PER_OCTAVE + _LOWEST))

  def keep(self, x: np.ndarray) -> np.ndarray:
    """Which rows of one study's activations x [n, d] to write: the study's norms join the
    running median first, then those above `multiple` times it are dropped."""
    norms = np.sqrt(np.einsum('ij,ij->i', x, x, dtype=np.float64))
    with np.errstate(divide='ignore'):
      at = np.floor((np.log2(norms) - _LOWEST) * _PER_OCTAVE)
    np.add.at(self.counts, np.clip(np.nan_to_num(at, neginf=0), 0, _BINS - 1).astype(np.int64), 1)
    return norms <= self.multiple * self.median()

  def state(self) -> dict:
    """The histogram, sparse, as JSON for the store's commit record."""
    bins = np.nonzero(self.counts)[0]
    median = self.median()
    return {
        'bins': [bins.tolist(), self.counts[bins].tolist()],
        'median': None if np.isnan(median) else median,
    }
