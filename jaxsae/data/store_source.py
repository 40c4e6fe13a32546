"""Training batches from the activation store through grain, and its held-out rows.

The studies that `data.held_out_fraction` holds out (jaxsae.formats.split: by study id, stable as
the store grows) are never read for training; `held_out` gives their rows in store order for the
evaluation. Training batch i is a pure function of (store, split, seed, i): a lazy global
permutation of the training rows (grain's index shuffle, reseeded every epoch, so nothing of size N
is ever materialised; training row t maps to a store row through the few held-out gaps) cut into
batches of B, of which each JAX process reads its own contiguous slice with one TensorStore read.
The global batch is therefore the same for any number of hosts. Reading runs in threads (or worker
processes) ahead of the training step; the iterator's state is a position that the checkpoint
saves, so a resumed run with the same store and fraction continues at the exact row. With
fraction 0 nothing is held out and the batches are those of a plain shuffle of every row.
"""

from __future__ import annotations

from typing import Iterator

import grain
import ml_collections
from absl import flags
import numpy as np

from jaxsae.formats import split as split_lib
from jaxsae.formats import store as store_lib
from jaxsae.config import ConfigError

__all__ = ['StoreSource']


class _TrainingRows:
  """Training row t -> store row: the store's rows with the held-out studies' ranges cut out, as
  a few contiguous segments (one more than the held-out studies), never a per-row table."""

  def __init__(self, rows: int, held_out: np.ndarray):
    starts = np.concatenate([[0], held_out[:, 1]])
    stops = np.concatenate([held_out[:, 0], [rows]])
    keep = stops > starts
    self.store_start = starts[keep].astype(np.int64)
    lengths = (stops - starts)[keep]
    self.train_start = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    self.count = int(lengths.sum())

  def __call__(self, t: np.ndarray) -> np.ndarray:
    seg = np.searchsorted(self.train_start, t, side='right') - 1
    return self.store_start[seg] + (t - self.train_start[seg])


class _ReadRows:
  """Training row ids of a global batch -> this process's slice of the rows, [B_local, d] in
  `dtype` (None: the store's own)."""

  def __init__(
      self,
      store: store_lib.ActivationStore,
      lo: int,
      hi: int,
      rows: _TrainingRows | None,
      dtype=np.float32,
  ):
    self.store, self.lo, self.hi, self.rows, self.dtype = store, lo, hi, rows, dtype

  def __call__(self, ids: np.ndarray) -> np.ndarray:
    ids = ids[self.lo : self.hi]
    return self.store.read(ids if self.rows is None else self.rows(ids), self.dtype)


class StoreSource:
  """The store as a training source: random-access `batch(i)` and a checkpointable `iterator()`
  over the training studies' rows, and `held_out` over the others'."""

  def __init__(
      self,
      store: store_lib.ActivationStore,
      batch_size: int,
      seed: int,
      num_threads: int = 4,
      prefetch: int = 8,
      worker_processes: int = 0,
      shard: grain.sharding.ShardOptions | None = None,
      held_out_fraction: float = 0.0,
      native_dtype: bool = False,
  ):
    shard = shard or grain.sharding.ShardByJaxProcess(drop_remainder=True)
    if batch_size % shard.shard_count:
      raise ConfigError(
          f'data.batch_size={batch_size} is not divisible by the '
          f'{shard.shard_count} JAX processes reading the store.'
      )
    # Fraction 0 reads no study records: every row trains, exactly as before the split existed.
    self.split = split_lib.split(store.studies() if held_out_fraction else (), held_out_fraction)
    rows = _TrainingRows(store.rows, self.split.ranges) if len(self.split.ranges) else None
    n_train = store.rows if rows is None else rows.count
    if n_train < batch_size:
      held = f' after holding out {self.split.describe()}' if rows is not None else ''
      raise ConfigError(
          f'the activation store at {store.path!r} has {n_train} training rows{held}, fewer '
          f'than one batch (data.batch_size={batch_size}); export more studies, lower '
          'data.batch_size' + (' or data.held_out_fraction.' if rows is not None else '.')
      )
    self.held_out_rows = self.split.held_out_rows
    self.held_out_note = (
        f'the activation store {store.path}: {self.split.describe()}'
        if held_out_fraction
        else f'none of the activation store {store.path}: data.held_out_fraction=0'
    )
    self.store, self.d, self.scale = store, store.d, store.scale  # measured over all rows at export
    self.features = None  # real activations: no planted ground truth
    self.batch_size = batch_size // shard.shard_count  # rows this process reads per step
    lo = shard.shard_index * self.batch_size
    self.num_threads, self.prefetch, self.worker_processes = num_threads, prefetch, worker_processes
    self.dataset = (
        grain.MapDataset.range(n_train)
        .shuffle(seed=seed)
        .batch(batch_size, drop_remainder=True)
        .repeat()  # epoch e is batched from shuffle epoch e: a new permutation each
        .map(_ReadRows(store, lo, lo + self.batch_size, rows, None if native_dtype else np.float32))
    )

  @classmethod
  def from_config(cls, c: ml_collections.ConfigDict) -> 'StoreSource':
    """Open `data.store_path`, checking it against the config before anything is computed."""
    store = store_lib.open_store(c.data.store_path)
    if store.d != c.sae.d:
      raise ConfigError(
          f'the activation store at {c.data.store_path!r} has width d={store.d} '
          f'but the config says sae.d={c.sae.d}; set --config.sae.d={store.d}, or '
          'point data.store_path at a store exported from the intended layer.'
      )
    if store.dtype != c.data.store_dtype:
      raise ConfigError(
          f'the activation store at {c.data.store_path!r} holds {store.dtype} but '
          f'the config says data.store_dtype={c.data.store_dtype!r}; set '
          f'--config.data.store_dtype={store.dtype} if this store is the one you '
          'meant, or re-export with the intended dtype.'
      )
    return cls(
        store,
        c.data.batch_size,
        c.seed,
        c.data.num_threads,
        c.data.prefetch,
        c.data.worker_processes,
        held_out_fraction=c.data.held_out_fraction,
        # A bfloat16 step reads a bfloat16 store as it is: no float32 copy of the batch.
        native_dtype=c.sae.dtype == 'bfloat16',
    )

  def batch(self, index: int) -> np.ndarray:
    """Batch `index` (this process's rows), the same rows the iterator yields at that position."""
    return self.dataset[index]

  def held_out(self, tokens: int) -> Iterator[np.ndarray]:
    """The first `tokens` held-out rows (all of them if fewer), in store order, as float32 pieces
    of at most `batch_size` rows. Every process reads all of them: the evaluation is not sharded."""
    ids = self.split.first_rows(tokens)
    for lo in range(0, len(ids), self.batch_size):
      yield self.store.read(ids[lo : lo + self.batch_size])

  def iterator(self) -> grain.DatasetIterator:
    """The shuffled, prefetched batches; its state is the position a checkpoint saves."""
    ds = self.dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=self.num_threads, prefetch_buffer_size=self.prefetch)
    )
    if self.worker_processes:
      if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags; outside an absl
        flags.FLAGS.mark_as_parsed()  # app (a notebook, pytest) take their defaults
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.worker_processes))
    return iter(ds)
