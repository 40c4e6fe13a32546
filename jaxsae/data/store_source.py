"""Training batches from the activation store through grain.

Batch i is a pure function of (store, seed, i): a lazy global permutation of the row ids (grain's
index shuffle, reseeded every epoch, so nothing of size N is ever materialised) cut into batches of
B, of which each JAX process reads its own contiguous slice with one TensorStore read. The global
batch is therefore the same for any number of hosts. Reading runs in threads (or worker processes)
ahead of the training step; the iterator's state is a position that the checkpoint saves, so a
resumed run continues at the exact row.
"""

from __future__ import annotations

import grain
import ml_collections
from absl import flags
import numpy as np

from jaxsae.formats import store as store_lib
from jaxsae.config import ConfigError

__all__ = ['StoreSource']


class _ReadRows:
  """Row ids of a global batch -> this process's slice of the rows, float32 [B_local, d]."""

  def __init__(self, store: store_lib.ActivationStore, lo: int, hi: int):
    self.store, self.lo, self.hi = store, lo, hi

  def __call__(self, ids: np.ndarray) -> np.ndarray:
    return self.store.read(ids[self.lo : self.hi])


class StoreSource:
  """The store as a training source: random-access `batch(i)` and a checkpointable `iterator()`."""

  def __init__(
      self,
      store: store_lib.ActivationStore,
      batch_size: int,
      seed: int,
      num_threads: int = 4,
      prefetch: int = 8,
      worker_processes: int = 0,
      shard: grain.sharding.ShardOptions | None = None,
  ):
    shard = shard or grain.sharding.ShardByJaxProcess(drop_remainder=True)
    if batch_size % shard.shard_count:
      raise ConfigError(
          f'data.batch_size={batch_size} is not divisible by the '
          f'{shard.shard_count} JAX processes reading the store.'
      )
    if store.rows < batch_size:
      raise ConfigError(
          f'the activation store at {store.path!r} has {store.rows} rows, fewer '
          f'than one batch (data.batch_size={batch_size}); export more studies or '
          'lower data.batch_size.'
      )
    self.store, self.d, self.scale = store, store.d, store.scale  # measured over all rows at export
    self.features = None  # real activations: no planted ground truth
    self.batch_size = batch_size // shard.shard_count  # rows this process reads per step
    lo = shard.shard_index * self.batch_size
    self.num_threads, self.prefetch, self.worker_processes = num_threads, prefetch, worker_processes
    self.dataset = (
        grain.MapDataset.range(store.rows)
        .shuffle(seed=seed)
        .batch(batch_size, drop_remainder=True)
        .repeat()  # epoch e is batched from shuffle epoch e: a new permutation each
        .map(_ReadRows(store, lo, lo + self.batch_size))
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
    )

  def batch(self, index: int) -> np.ndarray:
    """Batch `index` (this process's rows), the same rows the iterator yields at that position."""
    return self.dataset[index]

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
