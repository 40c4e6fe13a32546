"""Model forward passes -> the activation store, resumable after any crash.

Studies are read from the manifest in order and run through the model `export.batch_size` at a
time (right-padded, so every real token sees exactly the positions it would see alone). A forward
hook on decoder layer L keeps its output, the residual stream after the layer, and (by default)
stops the forward pass there. The rows of the kept token kinds go to the store with their token
metadata; the store commits at study boundaries, and a restarted export continues after the last
committed study.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import ml_collections
import numpy as np
import torch

from jaxsae.formats import store as store_lib
from jaxsae.bridge import loading, manifest, prompt
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


def rows_of(
    p: prompt.Prepared, hidden: torch.Tensor, keep: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """The kept tokens' activations (float32 [n, d]) and metadata (int32 [n, 6])."""
  pos = np.nonzero(np.isin(p.kinds, keep))[0]
  x = hidden[torch.from_numpy(pos)].float().cpu().numpy()
  tokens = np.stack(
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
  return x, tokens


def _hidden_size(model: torch.nn.Module) -> int:
  config = getattr(model.config, 'text_config', None) or model.config
  return int(config.hidden_size)


def export(
    c: ml_collections.ConfigDict, skip_bad: bool | None = None, progress: bool = True
) -> dict[str, Any]:
  """Export every study of `c.export.manifest` not yet in `c.data.store_path`; returns the
  store's commit record."""
  validate_export(c)
  skip_bad = c.export.skip_bad if skip_bad is None else skip_bad
  if not c.data.store_path:
    raise ConfigError('data.store_path is empty: set where the activation store goes.')
  store_lib.check_path(c.data.store_path)  # a path holding anything but a store: refused, untouched
  studies = manifest.read(c.export.manifest, c.export.teacher_forcing)
  if not skip_bad:  # stop before the model loads
    bad = next((s for s in studies if isinstance(s, manifest.BadStudyError)), None)
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
  writer = store_lib.StoreWriter(
      c.data.store_path,
      d,
      c.data.store_dtype,
      info,
      c.export.rows_per_chunk,
      c.export.rows_per_shard,
  )
  start = writer.studies_done
  end = len(studies) if c.export.max_studies is None else min(len(studies), c.export.max_studies)
  if start and (start > len(studies) or _id(studies[start - 1]) != writer.last_study_id):
    raise ConfigError(
        f'the store at {c.data.store_path!r} has {start} studies, the last '
        f'{writer.last_study_id!r}, but the manifest does not list that study at row '
        f'{start}: it changed since the export began. Use another data.store_path.'
    )
  keep = np.array([TOKEN_KINDS.index(k) for k in c.export.keep_kinds])
  image_token_id = _image_token_id(model, processor)
  pad_id = processor.tokenizer.pad_token_id or 0
  device, dtype = torch.device(c.model.device), getattr(torch, c.model.dtype)
  capture = Capture(module, stop=c.export.stop_at_layer)
  t0, done = time.perf_counter(), 0
  try:
    for b0 in range(start, end, c.export.batch_size):
      entries = []  # per study, in manifest order: its Prepared inputs, or why it was skipped
      for i, s in enumerate(studies[b0 : min(end, b0 + c.export.batch_size)]):
        try:
          if isinstance(s, manifest.BadStudyError):
            raise s
          entries.append(
              prompt.prepare(
                  processor, s, dict(s.images()), c.export.teacher_forcing, image_token_id
              )
          )
        except manifest.BadStudyError as e:
          if not skip_bad:
            raise
          log.warning('skipping: %s', e)
          entries.append({'study_id': e.study, 'manifest_index': b0 + i, 'skipped': e.record()})
      ready = [e for e in entries if isinstance(e, prompt.Prepared)]
      hidden = capture.run(model, collate(ready, pad_id, device, dtype)) if ready else None
      records, xs, toks, rows = [], [], [], 0
      for e in entries:
        if isinstance(e, dict):
          records.append(e)
          continue
        x, t = rows_of(e, hidden[ready.index(e)], keep)
        records.append(
            {
                'study_id': e.study.study_id,
                'manifest_index': e.study.index,
                'row_start': rows,
                'rows': len(x),
                'tokens': len(e.input_ids),
            }
        )
        xs.append(x)
        toks.append(t)
        rows += len(x)
      writer.append(
          np.concatenate(xs) if xs else np.zeros((0, d), np.float32),
          np.concatenate(toks) if toks else np.zeros((0, 6), np.int32),
          records,
      )
      done += len(records)
      if progress:
        rate = done / (time.perf_counter() - t0)
        print(
            f'\rexport: {writer.studies_done}/{end} studies ({rate:.1f}/s)',
            end='',
            file=sys.stderr,
            flush=True,
        )
    meta = writer.close()
  finally:
    capture.remove()
  if progress:
    print(file=sys.stderr)
  return meta


def _id(s: manifest.Study | manifest.BadStudyError) -> str:
  return s.study if isinstance(s, manifest.BadStudyError) else s.study_id


def _image_token_id(model: torch.nn.Module, processor: Any) -> int:
  for key in ('image_token_id', 'image_token_index'):
    value = getattr(model.config, key, None)
    if value is not None:
      return int(value)
  return int(processor.tokenizer.convert_tokens_to_ids(processor.image_token))
