"""Trained SAEs on disk: dictionary_learning's and SAELens's safetensors layouts, read and written.

The JAX core (jaxsae.weights: export from a checkpoint, load into jaxsae.model) and the torch
bridge (jaxsae.bridge.sae) both go through this module, so the two sides cannot drift apart on a
file name, a tensor name or a default; it speaks numpy only, so neither side drags in the other's
framework.

Two layouts of one SAE, a directory each:

  dictionary_learning  ae.safetensors: W_enc [d, F], b_enc [F], W_dec [F, d], b_dec [d], k (int32,
                       0-d), threshold (float32, 0-d; -1 = none learned yet), group_sizes (int64,
                       [G]). config.json: {'trainer': {...}}, dictionary_learning's trainer config
                       (dict_class MatryoshkaBatchTopKSAE, layer, submodule_name = the hook, the
                       training hyperparameters; k and group_sizes there back up missing tensors).
  saelens              sae_weights.safetensors: the four parameters and threshold [F] (float32).
                       cfg.json: architecture 'jumprelu', d_in, d_sae, hook_name, model_name, and
                       metadata.jaxsae: k, group_sizes, layer, trained_steps, activation_scale.

Both describe encode(x) = a * (a > threshold) with a = relu((x - b_dec) W_enc + b_enc), and
decode(a) = a W_dec + b_dec, on raw activations (jaxsae.weights folds the training scale in). The
layout is detected from which weights file a directory holds. Files are written config first and
weights last, each through a temporary file and a rename, so a weights file is never half written
and never lacks its config.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import ml_dtypes
import numpy as np
import safetensors
from safetensors.numpy import load_file, save_file

from jaxsae.errors import ConfigError

__all__ = [
    'LAYOUTS',
    'FILES',
    'DL_WEIGHTS',
    'DL_CONFIG',
    'SL_WEIGHTS',
    'SL_CONFIG',
    'PARAMS',
    'SAEWeights',
    'Metadata',
    'check_layout',
    'detect',
    'read',
    'check_shapes',
    'write',
    'write_files',
]

LAYOUTS = ('dictionary_learning', 'saelens')
DL_WEIGHTS, DL_CONFIG = 'ae.safetensors', 'config.json'
SL_WEIGHTS, SL_CONFIG = 'sae_weights.safetensors', 'cfg.json'
FILES = {'dictionary_learning': (DL_WEIGHTS, DL_CONFIG), 'saelens': (SL_WEIGHTS, SL_CONFIG)}
PARAMS = ('W_enc', 'b_enc', 'W_dec', 'b_dec')

_EXPORT_HINT = (
    'Export them with `python -m jaxsae.export_weights --workdir=... --out=DIR '
    '--format=dictionary_learning`.'
)


@dataclasses.dataclass(frozen=True)
class SAEWeights:
  """An SAE as read from a directory, normalised across the layouts (tensors in the file's dtype).

  `k` is None when the files do not record it; `threshold` is 0-d, or [F] when the latents'
  thresholds differ (a per-latent threshold with one value throughout reads as that scalar).
  """

  params: dict[str, np.ndarray]
  threshold: np.ndarray
  k: int | None
  group_sizes: tuple[int, ...]
  layout: str
  layer: int | None
  hook_name: str | None
  cfg: dict[str, Any]
  path: str

  @property
  def d(self) -> int:
    return int(self.params['W_enc'].shape[0])

  @property
  def F(self) -> int:
    return int(self.params['W_enc'].shape[1])


@dataclasses.dataclass(frozen=True)
class Metadata:
  """What the writers record beside the tensors; the JAX side fills it from its config.

  `training` is copied into dictionary_learning's trainer config (lr, seed, ...): informational,
  nothing reads it back.
  """

  k: int
  group_sizes: tuple[int, ...]
  step: int
  scale: float
  layer: int | None
  model_name: str | None
  hook_name: str | None
  training: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def check_layout(layout: str) -> str:
  if layout not in LAYOUTS:
    raise ConfigError(f'unknown export format {layout!r}; choose one of {LAYOUTS}.')
  return layout


def detect(path: str) -> str:
  """The layout of the SAE in directory `path`, from the weights file it holds."""
  for layout, (weights_name, _) in FILES.items():
    if os.path.exists(os.path.join(path, weights_name)):
      return layout
  raise ConfigError(
      f'no SAE weights in {path!r}: expected {DL_WEIGHTS} (dictionary_learning) or '
      f'{SL_WEIGHTS} (SAELens). {_EXPORT_HINT}'
  )


def read(path: str) -> SAEWeights:
  """The SAE in directory `path` (either layout), checked for shape consistency."""
  layout = detect(path)
  weights_name, config_name = FILES[layout]
  weights_file = os.path.join(path, weights_name)
  cfg = _read_json(os.path.join(path, config_name), weights_file)
  if layout == 'saelens' and cfg.get('architecture') != 'jumprelu':
    raise ConfigError(
        f'{os.path.join(path, config_name)}: architecture '
        f'{cfg.get("architecture")!r} is not supported; jaxsae reads SAELens '
        '"jumprelu" SAEs (what it exports).'
    )
  t = _read_tensors(weights_file)
  required = PARAMS + (('threshold',) if layout == 'saelens' else ())
  missing = [n for n in required if n not in t]
  if missing:
    raise ConfigError(f'{weights_file} lacks {missing}; it holds {sorted(t)}. {_EXPORT_HINT}')
  if t['W_enc'].ndim != 2:
    raise ConfigError(f'{weights_file}: W_enc has shape {t["W_enc"].shape}; expected [d, F].')
  F = t['W_enc'].shape[1]
  if layout == 'dictionary_learning':
    extra = cfg.get('trainer', {})
    k = int(t['k']) if 'k' in t else extra.get('k')
    sizes = t['group_sizes'].tolist() if 'group_sizes' in t else extra.get('group_sizes', [F])
    threshold = t['threshold'] if 'threshold' in t else np.array(-1.0, np.float32)
    layer, hook = extra.get('layer'), extra.get('submodule_name')
  else:
    extra = cfg.get('metadata', {}).get('jaxsae', {})
    k, sizes, threshold = extra.get('k'), extra.get('group_sizes', [F]), t['threshold']
    layer, hook = extra.get('layer'), cfg.get('hook_name')
  params = {n: t[n] for n in PARAMS}
  sizes = tuple(int(s) for s in sizes)
  check_shapes({n: a.shape for n, a in params.items()}, threshold.shape, sizes, weights_file)
  if threshold.ndim == 1 and threshold.size and bool(np.all(threshold == threshold[0])):
    threshold = threshold[0, ...]  # one value for all latents: a scalar, as the other layout has
  return SAEWeights(
      params,
      threshold,
      None if k is None else int(k),
      sizes,
      layout,
      None if layer is None else int(layer),
      hook,
      cfg,
      path,
  )


def check_shapes(
    shapes: Mapping[str, Sequence[int]],
    threshold_shape: Sequence[int] = (),
    group_sizes: Sequence[int] | None = None,
    source: str = 'SAE',
) -> tuple[int, int]:
  """(d, F) if the parameters, threshold and Matryoshka groups fit one SAE; else a ConfigError
  naming `source` (a file, or the code that built the SAE in memory)."""
  shapes = {n: tuple(int(s) for s in shapes[n]) for n in PARAMS}
  d, F = shapes['W_enc'] if len(shapes['W_enc']) == 2 else (-1, -1)
  if d < 0 or (shapes['W_dec'], shapes['b_enc'], shapes['b_dec']) != ((F, d), (F,), (d,)):
    raise ConfigError(
        f'{source}: inconsistent shapes '
        + ', '.join(f'{n} {list(shapes[n])}' for n in PARAMS)
        + '; expected [d, F], [F], [F, d], [d] with one width d and one dictionary '
        'size F. Re-export the weights, or pass parameters of one SAE.'
    )
  threshold_shape = tuple(threshold_shape)
  if threshold_shape not in ((), (F,)):
    raise ConfigError(
        f'{source}: threshold has shape {list(threshold_shape)}; expected a scalar ' f'or [F={F}].'
    )
  if group_sizes is not None and sum(group_sizes) != F:
    raise ConfigError(
        f'{source}: group sizes {list(group_sizes)} sum to {sum(group_sizes)}, not '
        f'F={F}; the Matryoshka groups must partition the latents.'
    )
  return d, F


def write(
    out: str, layout: str, params: Mapping[str, np.ndarray], threshold: float, meta: Metadata
) -> str:
  """Write an SAE acting on raw activations to directory `out` in `layout`; returns the weights
  file's path. `threshold` < 0 means none learned yet (SAELens gets 0: every positive code)."""
  check_layout(layout)
  p = {n: np.asarray(params[n], np.float32) for n in PARAMS}
  sizes = [int(s) for s in meta.group_sizes]
  d, F = check_shapes({n: a.shape for n, a in p.items()}, (), sizes, out)
  if layout == 'dictionary_learning':
    tensors = {
        **p,
        'k': np.array(meta.k, np.int32),
        'threshold': np.array(threshold, np.float32),
        'group_sizes': np.array(sizes, np.int64),
    }
    trainer = {
        'trainer_class': 'MatryoshkaBatchTopKTrainer',
        'dict_class': 'MatryoshkaBatchTopKSAE',
        'activation_dim': d,
        'dict_size': F,
        'k': meta.k,
        'group_fractions': [s / sum(sizes) for s in sizes],
        'group_sizes': sizes,
        'steps': meta.step,
        **meta.training,
        'layer': meta.layer,
        'lm_name': meta.model_name,
        'submodule_name': meta.hook_name,
        'norm_factor': meta.scale,
    }
    cfg = {'trainer': trainer}
  else:
    tensors = {**p, 'threshold': np.full((F,), max(threshold, 0.0), np.float32)}
    cfg = {
        'architecture': 'jumprelu',
        'd_in': d,
        'd_sae': F,
        'dtype': 'float32',
        'device': 'cpu',
        'apply_b_dec_to_input': True,
        'normalize_activations': 'none',
        'hook_name': meta.hook_name,
        'model_name': meta.model_name,
        'metadata': {
            'hook_name': meta.hook_name,
            'model_name': meta.model_name,
            'jaxsae': {
                'k': meta.k,
                'group_sizes': sizes,
                'trained_steps': meta.step,
                'activation_scale': meta.scale,
                'layer': meta.layer,
            },
        },
    }
  weights_name, config_name = FILES[layout]
  return write_files(out, weights_name, tensors, config_name, cfg)


def write_files(
    out: str,
    weights_name: str,
    tensors: Mapping[str, np.ndarray],
    config_name: str,
    cfg: Mapping[str, Any],
) -> str:
  """Config first, weights last, each via a temporary file and a rename: never half a file.
  Returns the weights file's path."""
  os.makedirs(out, exist_ok=True)
  for name, payload in ((config_name, None), (weights_name, tensors)):
    tmp = os.path.join(out, name + '.tmp')
    if payload is None:
      with open(tmp, 'w') as f:
        json.dump(cfg, f, indent=2)
    else:
      save_file({k: np.array(v, order='C') for k, v in payload.items()}, tmp)  # keeps 0-d
    os.replace(tmp, os.path.join(out, name))
  return os.path.join(out, weights_name)


def _read_json(path: str, weights_file: str) -> dict:
  if not os.path.exists(path):
    raise ConfigError(
        f'{path} is missing: the weights in {weights_file} come with their config '
        f'file. Copy it beside them, or re-export. {_EXPORT_HINT}'
    )
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ConfigError(f'{path} is not valid JSON ({e}); re-export the weights.') from None


# numpy lacks bfloat16: such files are read from the raw buffers, typed by ml_dtypes.
_RAW_DTYPES = {
    'BF16': ml_dtypes.bfloat16,
    'F16': np.float16,
    'F32': np.float32,
    'F64': np.float64,
    'I32': np.int32,
    'I64': np.int64,
}


def _read_tensors(path: str) -> dict[str, np.ndarray]:
  try:
    return load_file(path)
  except TypeError:  # a dtype numpy does not know
    with open(path, 'rb') as f:
      raw = safetensors.deserialize(f.read())
    unknown = sorted({v['dtype'] for _, v in raw} - set(_RAW_DTYPES))
    if unknown:
      raise ConfigError(
          f'{path} holds tensors of dtype {unknown}; jaxsae reads '
          f'{sorted(_RAW_DTYPES)}. Save the SAE in float32.'
      ) from None
    return {
        n: np.frombuffer(v['data'], _RAW_DTYPES[v['dtype']]).reshape(v['shape']).copy()
        for n, v in raw
    }
