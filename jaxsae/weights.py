"""Trained SAEs from a JAX checkpoint to safetensors, and back into jaxsae.model.

The layouts themselves (dictionary_learning's and SAELens's file and tensor names, reading,
writing, checks) are jaxsae.formats.weights, shared with the torch bridge; this module adds the
JAX ends: the checkpoint read on export and the model built on load.

The activation scale s used in training (inputs divided by s so that E||x||^2 = d) is folded into
the biases and the threshold on export: relu((x - s b_dec) W_enc + s b_enc) = s relu((x/s - b_dec)
W_enc + b_enc), so the exported SAE works on raw activations, as the peers' loaders expect.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxsae import checkpointing
from jaxsae import config as config_lib
from jaxsae import model
from jaxsae import train_step
from jaxsae.config import ConfigError
from jaxsae.formats import weights as weights_format
from jaxsae.formats.weights import DL_CONFIG, DL_WEIGHTS, SL_CONFIG, SL_WEIGHTS

__all__ = [
    'FORMATS',
    'DL_WEIGHTS',
    'DL_CONFIG',
    'SL_WEIGHTS',
    'SL_CONFIG',
    'fold_scale',
    'load_checkpoint',
    'export',
    'load',
]

FORMATS = weights_format.LAYOUTS


def fold_scale(params: model.Params, threshold: float, scale: float) -> tuple[dict, float]:
  """Parameters and threshold that act on raw activations (see the module docstring)."""
  p = {k: np.asarray(v, np.float32) for k, v in params.items()}
  p['b_enc'] = p['b_enc'] * scale
  p['b_dec'] = p['b_dec'] * scale
  return p, (threshold * scale if threshold >= 0 else threshold)


def load_checkpoint(
    workdir: str, step: int | None = None
) -> tuple[int, dict, dict, ml_collections.ConfigDict]:
  """(step, state, meta, config) of the newest (or given) checkpoint in `workdir`, on one device."""
  ckpt = checkpointing.Checkpointer(workdir, every=1, keep=10**9, async_save=False)
  steps = ckpt.all_steps()
  if not steps:
    raise ConfigError(
        f'no checkpoint in {ckpt.directory}: train first with '
        f'`python -m jaxsae.train --config=... --workdir={workdir}`.'
    )
  if step is not None and step not in steps:
    raise ConfigError(f'no checkpoint for step {step} in {ckpt.directory}; it has {steps}.')
  meta = ckpt.restore_meta(step if step is not None else steps[-1])
  c = ml_collections.ConfigDict(json.loads(meta['config']))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
      train_step.abstract_state(c),
  )
  restored = ckpt.restore(target, meta['shape'], step=step)
  ckpt.close()
  s, state, meta = restored
  return s, state, meta, c


def export(workdir: str, out: str, fmt: str, step: int | None = None) -> str:
  """Write the checkpoint's SAE to `out` in layout `fmt` (the folder appears complete or not at
  all, with a manifest that `load` verifies); returns the weights file's path."""
  weights_format.check_layout(fmt)
  weights_format.check_destination(out)  # before the checkpoint is read: nothing wasted
  s, state, meta, c = load_checkpoint(workdir, step)
  params, threshold = fold_scale(state['params'], float(state['threshold']), meta['scale'])
  return weights_format.write(out, fmt, params, threshold, _metadata(c, s, meta['scale']))


def _metadata(c: ml_collections.ConfigDict, step: int, scale: float) -> weights_format.Metadata:
  """What the files record beside the tensors, from the training config."""
  training = {
      'group_weights': list(config_lib.group_weights(c)),
      'lr': config_lib.learning_rate(c),
      'auxk_alpha': c.sae.auxk_alpha,
      'warmup_steps': c.optim.warmup_steps,
      'decay_start': c.optim.decay_start,
      'threshold_beta': c.sae.threshold_beta,
      'threshold_start_step': c.sae.threshold_start_step,
      'top_k_aux': config_lib.top_k_aux(c),
      'seed': c.seed,
  }
  return weights_format.Metadata(
      k=c.sae.k,
      group_sizes=tuple(config_lib.group_sizes(c)),
      step=step,
      scale=scale,
      layer=c.model.layer,
      model_name=c.model.name,
      hook_name=c.model.hook_name,
      training=training,
  )


def load(path: str) -> tuple[model.MatryoshkaSAE, dict[str, Any]]:
  """An exported SAE (either layout, detected from the files in `path`, checked against its
  manifest when it has one) and its config dict."""
  w = weights_format.read(path)
  k = w.k if w.k is not None else 1  # only BatchTopK encoding uses k; SAELens files may lack it
  return model.MatryoshkaSAE.from_params(w.params, k, w.group_sizes, w.threshold), w.cfg
