"""Model forward passes -> the activation store, pipelined, resumable after any crash, from one
process or several.

Worker processes prepare studies ahead of the model (jaxsae.bridge.export_inputs); each window of
studies runs through the model `export.batch_size` at a time, sorted by token length and
right-padded (so every real token sees exactly the positions it would see alone). A forward hook on
decoder layer L keeps its output, the residual stream after the layer, and (by default) stops the
forward pass there. The kept tokens' rows are copied to the host and written to the store by a
background thread while the next batch runs, in manifest order; tokens above
`export.max_norm_multiple` times the running median norm are left out (jaxsae.bridge.norm_filter).
The store commits at study boundaries, and a restarted export continues after the last committed
study. With `export.processes` = N, process i exports the i-th contiguous share of the manifest
into its own part of one store (jaxsae.formats.parts).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import sys
import time
from typing import Any

import ml_collections
import numpy as np
import torch

from jaxsae.bridge import export_inputs, loading, manifest, prompt
from jaxsae.bridge import norm_filter as norm_filter_lib
from jaxsae.formats import parts
from jaxsae.formats import store as store_lib
from jaxsae.config import ConfigError, validate_export
from jaxsae.formats.tokens import TOKEN_KINDS

log = logging.getLogger(__name__)


class _Stop(Exception):
  """Raised by the hook to end the forward pass after the hooked layer."""


class Capture:
  """A forward hook that keeps the layer's output and optionally stops the forward pass."""

  def __init__(self, module: torch.nn.Module, stop: bool):
    self.stop, self.output = stop, None
    self.handle = module.register_forward_hook(self)

  def __call__(self, module, args, output):
    self.output = output[0] if isinstance(output, tuple) else output
    if self.stop:
      raise _Stop

  def run(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The hooked layer's output [batch, tokens, d] for `inputs`."""
    self.output = None
    try:
      with torch.inference_mode():
        model(**inputs, use_cache=False)
    except _Stop:
      pass
    return self.output

  def remove(self) -> None:
    self.handle.remove()


def collate(
    batch: list[prompt.Prepared], pad_id: int, device: torch.device, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
  """One right-padded batch: input_ids, attention_mask, and every image's pixel_values."""
  length = max(len(p.input_ids) for p in batch)
  ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
  mask = torch.zeros((len(batch), length), dtype=torch.long)
  for i, p in enumerate(batch):
    ids[i, : len(p.input_ids)] = p.input_ids
    mask[i, : len(p.input_ids)] = 1
  out = {
      'input_ids': ids.to(device),
      'attention_mask': mask.to(device),
      'pixel_values': torch.cat([p.inputs['pixel_values'] for p in batch]).to(device, dtype),
  }
  if 'image_sizes' in batch[0].inputs:
    out['image_sizes'] = torch.cat([p.inputs['image_sizes'] for p in batch]).to(device)
  return out


class Rows:
  """One forward batch's kept rows on their way to the host: gathered on the model's device in one
  index_select, copied without blocking (pinned memory, on CUDA), split per study when ready."""

  def __init__(self, batch: list[prompt.Prepared], hidden: torch.Tensor, keep: np.ndarray):
    T, d = hidden.shape[1], hidden.shape[2]
    self.positions = [np.nonzero(np.isin(p.kinds, keep))[0] for p in batch]
    flat = np.concatenate([i * T + pos for i, pos in enumerate(self.positions)]).astype(np.int64)
    picked = hidden.reshape(-1, d).index_select(0, torch.from_numpy(flat).to(hidden.device))
    self.event = None
    if picked.is_cuda:
      self.host = torch.empty(picked.shape, dtype=picked.dtype, pin_memory=True)
      self.host.copy_(picked, non_blocking=True)
      self.event = torch.cuda.Event()
      self.event.record()
    else:
      self.host = picked
    self.batch = batch

  def per_study(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """manifest row -> (activations float32 [n, d], positions [n]) of each study of the batch."""
    if self.event is not None:
      self.event.synchronize()
    x = self.host.float().numpy()
    out, at = {}, 0
    for p, pos in zip(self.batch, self.positions):
      out[p.study.index] = (x[at : at + len(pos)], pos)
      at += len(pos)
    return out


def token_rows(p: prompt.Prepared, pos: np.ndarray) -> np.ndarray:
  """The store's token metadata (int32 [n, 6]) of study `p`'s tokens at positions `pos`."""
  return np.stack(
      [
          np.full(len(pos), p.study.index),
          pos,
          p.input_ids.numpy()[pos],
          p.kinds[pos],
          p.patch[pos],
          p.image[pos],
      ],
      axis=1,
  ).astype(np.int32)


def _hidden_size(model: torch.nn.Module) -> int:
  config = getattr(model.config, 'text_config', None) or model.config
  return int(config.hidden_size)


_RANK_VARIABLES = ('RANK', 'SLURM_PROCID', 'OMPI_COMM_WORLD_RANK')


def process_index(c: ml_collections.ConfigDict) -> int:
  """This process's index among `export.processes`: the config's, else the launcher's rank."""
  n, i = c.export.processes, c.export.process_index
  if i >= 0 or n == 1:
    return max(i, 0)
  for name in _RANK_VARIABLES:
    if os.environ.get(name, '').isdigit():
      i = int(os.environ[name])
      if i >= n:
        raise ConfigError(
            f'${name}={i} but export.processes={n}: launch {n} processes, or set '
            f'--config.export.processes to the number launched.'
        )
      return i
  raise ConfigError(
      f'export.processes={n} but this process does not know its index: set '
      f'--config.export.process_index=I (0..{n - 1}), or launch with $RANK or $SLURM_PROCID set.'
  )


class _Sink:
  """Turns each window's forward results into store rows in manifest order, on a background thread
  (host copies, the outlier filter, the store's buffering) while the main thread runs the model.
  At most two windows wait, which bounds the memory held."""

  def __init__(self, writer: store_lib.StoreWriter, keep: np.ndarray, d: int, norm_filter):
    self.writer, self.keep, self.d, self.filter = writer, keep, d, norm_filter
    self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='export-sink')
    self.pending: list[concurrent.futures.Future] = []
    self.dropped = np.zeros(len(TOKEN_KINDS), np.int64)

  def submit(self, window: list, rows: list[Rows]) -> None:
    while len(self.pending) >= 2:
      self.pending.pop(0).result()
    self.pending.append(self.pool.submit(self._write, window, rows))

  def _write(self, window: list, rows: list[Rows]) -> None:
    got = {}
    for r in rows:
      got.update(r.per_study())
    records, xs, toks, n = [], [], [], 0
    dropped = np.zeros(len(TOKEN_KINDS), np.int64)
    for e in window:  # manifest order
      if isinstance(e, export_inputs.Skipped):
        records.append(e.record)
        continue
      x, pos = got[e.study.index]
      if self.filter is not None:
        kept = self.filter.keep(x)
        dropped += np.bincount(e.kinds[pos[~kept]], minlength=len(TOKEN_KINDS))
        x, pos = x[kept], pos[kept]
      record = {
          'study_id': e.study.study_id,
          'manifest_index': e.study.index,
          'row_start': n,
          'rows': len(x),
          'tokens': len(e.input_ids),
      }
      if self.filter is not None:
        record['dropped'] = int(len(kept) - kept.sum())
      records.append(record)
      xs.append(x)
      toks.append(token_rows(e, pos))
      n += len(x)
    self.dropped += dropped
    self.writer.append(
        np.concatenate(xs) if xs else np.zeros((0, self.d), np.float32),
        np.concatenate(toks) if toks else np.zeros((0, len(store_lib.TOKEN_COLUMNS)), np.int32),
        records,
        dropped=dropped,
        state=None if self.filter is None else {'norm_filter': self.filter.state()},
    )

  def close(self) -> None:
    try:
      for f in self.pending:
        f.result()
    finally:
      self.pool.shutdown()


def export(
    c: ml_collections.ConfigDict, skip_bad: bool | None = None, progress: bool = True
) -> dict[str, Any]:
  """Export every study of this process's share of `c.export.manifest` not yet in
  `c.data.store_path`; returns the commit record of what this process wrote, with `run`: this
  run's studies, seconds, input wait and forward seconds, and dropped tokens per kind."""
  validate_export(c)
  skip_bad = c.export.skip_bad if skip_bad is None else skip_bad
  if not c.data.store_path:
    raise ConfigError('data.store_path is empty: set where the activation store goes.')
  count, index = c.export.processes, process_index(c)
  there = store_lib.check_path(c.data.store_path)  # anything but a store: refused, untouched
  if count == 1 and store_lib.is_parts(there):
    raise store_lib.parts_refused(c.data.store_path, there, 'export.processes=1 cannot continue it')
  studies = manifest.read(c.export.manifest, c.export.teacher_forcing)
  end = len(studies) if c.export.max_studies is None else min(len(studies), c.export.max_studies)
  lo, hi = parts.shares(end, count)[index]
  if not skip_bad:  # stop before the model loads
    bad = next((s for s in studies[lo:hi] if isinstance(s, manifest.BadStudyError)), None)
    if bad is not None:
      raise bad
  model, processor = loading.load(c)
  hook_path, module = loading.find_layer(model, c.model.hook_name, c.model.layer)
  d = _hidden_size(model)
  if d != c.sae.d:
    raise ConfigError(
        f'{c.model.name} layer {hook_path} has width {d} but sae.d={c.sae.d}; set '
        f'--config.sae.d={d} so that training can read this store.'
    )
  info = {
      'model': c.model.name,
      'model_fingerprint': loading.fingerprint(c.model.name),
      'layer': c.model.layer,
      'hook_name': hook_path,
      'keep_kinds': sorted(c.export.keep_kinds),
      'teacher_forcing': c.export.teacher_forcing,
  }
  if c.export.max_norm_multiple is not None:  # absent when off: stores written before it match
    info['max_norm_multiple'] = c.export.max_norm_multiple
  path = c.data.store_path
  if count > 1:
    parts.claim(path, count, end, d, c.data.store_dtype, info, c.export.rows_per_chunk,
                c.export.rows_per_shard)  # fmt: skip
    path = store_lib.part_path(path, index, count)
  writer = store_lib.StoreWriter(
      path, d, c.data.store_dtype, info, c.export.rows_per_chunk, c.export.rows_per_shard
  )
  start = lo + writer.studies_done
  if writer.studies_done and (start > hi or _id(studies[start - 1]) != writer.last_study_id):
    raise ConfigError(
        f'the store at {path!r} has {writer.studies_done} studies, the last '
        f'{writer.last_study_id!r}, but the manifest does not list that study at row '
        f'{start}: it changed since the export began. Use another data.store_path.'
    )
  keep = np.array([TOKEN_KINDS.index(k) for k in c.export.keep_kinds])
  pad_id = processor.tokenizer.pad_token_id or 0
  device, dtype = torch.device(c.model.device), getattr(torch, c.model.dtype)
  inputs = export_inputs.Inputs(
      export_inputs.Studies(
          studies,
          start,
          hi,
          processor,
          c.export.teacher_forcing,
          _image_token_id(model, processor),
          skip_bad,
      ),
      c.export.workers,
      c.export.bucket_window,
  )
  norm_filter = None
  if c.export.max_norm_multiple is not None:
    state = (writer.export_state or {}).get('norm_filter')
    norm_filter = norm_filter_lib.NormFilter(c.export.max_norm_multiple, state)
  sink = _Sink(writer, keep, d, norm_filter)
  threads = torch.get_num_threads()
  if device.type == 'cpu' and c.export.workers:  # the workers need cores too: leave them theirs
    torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 1) - c.export.workers)))
  capture = Capture(module, stop=c.export.stop_at_layer)
  t0, done, forward_s = time.perf_counter(), 0, 0.0
  try:
    for window in inputs.windows():
      t = time.perf_counter()
      ready = [e for e in window if isinstance(e, prompt.Prepared)]
      rows = [
          Rows(batch, capture.run(model, collate(batch, pad_id, device, dtype)), keep)
          for batch in export_inputs.buckets(ready, c.export.batch_size)
      ]
      forward_s += time.perf_counter() - t
      sink.submit(window, rows)
      done += len(window)
      if progress:
        rate, wait = done / (time.perf_counter() - t0), inputs.wait_s / (time.perf_counter() - t0)
        print(
            f'\rexport{f" [{index}/{count}]" if count > 1 else ""}: '
            f'{start - lo + done}/{hi - lo} studies ({rate:.1f}/s, input wait {wait:.0%})',
            end='',
            file=sys.stderr,
            flush=True,
        )
    sink.close()
    meta = writer.close()
  finally:
    capture.remove()
    sink.pool.shutdown(wait=False, cancel_futures=True)
    torch.set_num_threads(threads)
  seconds = time.perf_counter() - t0
  if progress:
    print(file=sys.stderr)
  run = {
      'studies': done,
      'seconds': seconds,
      'input_wait_s': inputs.wait_s,
      'forward_s': forward_s,
      'input_wait_share': inputs.wait_s / seconds if seconds else 0.0,
      'studies_per_s': done / seconds if seconds else 0.0,
      'dropped': {k: int(n) for k, n in zip(TOKEN_KINDS, sink.dropped)},
      'process': [index, count],
      'path': path,
  }
  return {**meta, 'run': run}


def _id(s: manifest.Study | manifest.BadStudyError) -> str:
  return s.study if isinstance(s, manifest.BadStudyError) else s.study_id


def _image_token_id(model: torch.nn.Module, processor: Any) -> int:
  for key in ('image_token_id', 'image_token_index'):
    value = getattr(model.config, key, None)
    if value is not None:
      return int(value)
  return int(processor.tokenizer.convert_tokens_to_ids(processor.image_token))
