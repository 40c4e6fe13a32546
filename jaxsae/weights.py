"""Trained SAEs as safetensors, in dictionary_learning's and SAELens's layouts, and back.

The activation scale s used in training (inputs divided by s so that E||x||^2 = d) is folded into
the biases and the threshold on export: relu((x - s b_dec) W_enc + s b_enc) = s relu((x/s - b_dec)
W_enc + b_enc), so the exported SAE works on raw activations, as the peers' loaders expect.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from safetensors.numpy import load_file, save_file

from jaxsae import checkpointing
from jaxsae import config as config_lib
from jaxsae import model
from jaxsae import train_step
from jaxsae.config import ConfigError

FORMATS = ('dictionary_learning', 'saelens')
DL_WEIGHTS, DL_CONFIG = 'ae.safetensors', 'config.json'
SL_WEIGHTS, SL_CONFIG = 'sae_weights.safetensors', 'cfg.json'


def fold_scale(params: model.Params, threshold: float, scale: float) -> tuple[dict, float]:
  """Parameters and threshold that act on raw activations (see the module docstring)."""
  p = {k: np.asarray(v, np.float32) for k, v in params.items()}
  p['b_enc'] = p['b_enc'] * scale
  p['b_dec'] = p['b_dec'] * scale
  return p, (threshold * scale if threshold >= 0 else threshold)


def load_checkpoint(workdir: str, step: int | None = None) -> tuple[int, dict, dict,
                                                                     ml_collections.ConfigDict]:
  """(step, state, meta, config) of the newest (or given) checkpoint in `workdir`, on one device."""
  ckpt = checkpointing.Checkpointer(workdir, every=1, keep=10**9, async_save=False)
  steps = ckpt.all_steps()
  if not steps:
    raise ConfigError(f'no checkpoint in {ckpt.directory}: train first with '
                      f'`python -m jaxsae.train --config=... --workdir={workdir}`.')
  if step is not None and step not in steps:
    raise ConfigError(f'no checkpoint for step {step} in {ckpt.directory}; it has {steps}.')
  meta = ckpt.restore_meta(step if step is not None else steps[-1])
  c = ml_collections.ConfigDict(json.loads(meta['config']))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                        train_step.abstract_state(c))
  restored = ckpt.restore(target, meta['shape'], step=step)
  ckpt.close()
  s, state, meta = restored
  return s, state, meta, c


def export(workdir: str, out: str, fmt: str, step: int | None = None) -> str:
  """Write the checkpoint's SAE to `out` in layout `fmt`; returns the weights file's path."""
  if fmt not in FORMATS:
    raise ConfigError(f'unknown export format {fmt!r}; choose one of {FORMATS}.')
  s, state, meta, c = load_checkpoint(workdir, step)
  params, threshold = fold_scale(state['params'], float(state['threshold']), meta['scale'])
  os.makedirs(out, exist_ok=True)
  writer = _write_dictionary_learning if fmt == 'dictionary_learning' else _write_saelens
  return writer(out, params, threshold, c, s, meta['scale'])


def _write_dictionary_learning(out, params, threshold, c, step, scale) -> str:
  sizes = config_lib.group_sizes(c)
  tensors = {**params, 'k': np.array(c.sae.k, np.int32), 'threshold': np.array(threshold, np.float32),
             'group_sizes': np.array(sizes, np.int64)}
  trainer = {
      'trainer_class': 'MatryoshkaBatchTopKTrainer', 'dict_class': 'MatryoshkaBatchTopKSAE',
      'activation_dim': c.sae.d, 'dict_size': config_lib.dict_size(c), 'k': c.sae.k,
      'group_fractions': [s / sum(sizes) for s in sizes], 'group_weights':
      list(config_lib.group_weights(c)), 'group_sizes': list(sizes),
      'lr': config_lib.learning_rate(c), 'steps': step, 'auxk_alpha': c.sae.auxk_alpha,
      'warmup_steps': c.optim.warmup_steps, 'decay_start': c.optim.decay_start,
      'threshold_beta': c.sae.threshold_beta, 'threshold_start_step': c.sae.threshold_start_step,
      'top_k_aux': config_lib.top_k_aux(c), 'seed': c.seed, 'layer': c.model.layer,
      'lm_name': c.model.name, 'submodule_name': c.model.hook_name, 'norm_factor': scale,
  }
  return _write(out, DL_WEIGHTS, tensors, DL_CONFIG, {'trainer': trainer})


def _write_saelens(out, params, threshold, c, step, scale) -> str:
  F = config_lib.dict_size(c)
  tensors = {**params, 'threshold': np.full((F,), max(threshold, 0.0), np.float32)}
  cfg = {
      'architecture': 'jumprelu', 'd_in': c.sae.d, 'd_sae': F, 'dtype': 'float32',
      'device': 'cpu', 'apply_b_dec_to_input': True, 'normalize_activations': 'none',
      'hook_name': c.model.hook_name, 'model_name': c.model.name,
      'metadata': {'hook_name': c.model.hook_name, 'model_name': c.model.name,
                   'jaxsae': {'k': c.sae.k, 'group_sizes': list(config_lib.group_sizes(c)),
                              'trained_steps': step, 'activation_scale': scale,
                              'layer': c.model.layer}},
  }
  return _write(out, SL_WEIGHTS, tensors, SL_CONFIG, cfg)


def _write(out, weights_name, tensors, config_name, cfg) -> str:
  """Config first, weights last, each via a temporary file and a rename: never half a file."""
  for name, payload in ((config_name, None), (weights_name, tensors)):
    tmp = os.path.join(out, name + '.tmp')
    if payload is None:
      with open(tmp, 'w') as f:
        json.dump(cfg, f, indent=2)
    else:
      save_file({k: np.array(v, order='C') for k, v in payload.items()}, tmp)  # keeps 0-d
    os.replace(tmp, os.path.join(out, name))
  return os.path.join(out, weights_name)


def load(path: str) -> tuple[model.MatryoshkaSAE, dict[str, Any]]:
  """An exported SAE (either layout, detected from the files in `path`) and its config dict."""
  if os.path.exists(os.path.join(path, DL_WEIGHTS)):
    t = load_file(os.path.join(path, DL_WEIGHTS))
    cfg = _read_json(os.path.join(path, DL_CONFIG))
    k, sizes, threshold = int(t['k']), t['group_sizes'].tolist(), t['threshold']
  elif os.path.exists(os.path.join(path, SL_WEIGHTS)):
    t = load_file(os.path.join(path, SL_WEIGHTS))
    cfg = _read_json(os.path.join(path, SL_CONFIG))
    if cfg.get('architecture') != 'jumprelu':
      raise ConfigError(f'{path}/{SL_CONFIG}: architecture {cfg.get("architecture")!r} is not '
                        'supported; jaxsae loads SAELens "jumprelu" SAEs.')
    extra = cfg.get('metadata', {}).get('jaxsae', {})
    F = t['W_enc'].shape[1]
    k, sizes = int(extra.get('k', 1)), extra.get('group_sizes', [F])
    threshold = t['threshold'] if np.ptp(t['threshold']) > 0 else t['threshold'][0]
  else:
    raise ConfigError(f'no SAE weights in {path!r}: expected {DL_WEIGHTS} (dictionary_learning) '
                      f'or {SL_WEIGHTS} (SAELens). Export with `python -m jaxsae.export_weights`.')
  missing = [n for n in ('W_enc', 'b_enc', 'W_dec', 'b_dec') if n not in t]
  if missing:
    raise ConfigError(f'{path}: the weights file lacks {missing}.')
  params = {n: t[n] for n in ('W_enc', 'b_enc', 'W_dec', 'b_dec')}
  d, F = params['W_enc'].shape
  if params['W_dec'].shape != (F, d) or params['b_enc'].shape != (F,) or params['b_dec'].shape != (d,):
    raise ConfigError(f'{path}: inconsistent shapes ' +
                      str({n: v.shape for n, v in params.items()}) + f' for d={d}, F={F}.')
  return model.MatryoshkaSAE.from_params(params, k, sizes, threshold), cfg


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    raise ConfigError(f'{path} is missing: the weights come with their config file.')
  with open(path) as f:
    return json.load(f)
