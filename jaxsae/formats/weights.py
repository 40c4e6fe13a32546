"""Trained SAEs on disk: dictionary_learning's and SAELens's layouts, read and written.

The JAX core (jaxsae.weights: export from a checkpoint, load into jaxsae.model) and the torch
bridge (jaxsae.bridge.sae) both go through this module, so the two sides cannot drift apart on a
file name, a tensor name or a default; it speaks numpy only, so neither side drags in the other's
framework.

Two layouts of one SAE, a directory each:

  dictionary_learning  ae.pt and ae.safetensors, one state dict twice: W_enc [d, F], b_enc [F],
                       W_dec [F, d], b_dec [d], k (int32, 0-d), threshold (float32, 0-d; -1 = none
                       learned yet), group_sizes (int64, [G]). ae.pt is torch.save's format, the one
                       dictionary_learning's trainer writes and its load_dictionary (and SAEBench)
                       read, as in the paper's released SAEs; jaxsae.formats.torch_pickle reads and
                       writes it without torch and refuses any pickle that is not a dict of tensors.
                       ae.safetensors, for the tools that read safetensors, holds no pickle at all:
                       `read` prefers it, and reads ae.pt where it is alone (as in the released
                       SAEs). config.json: {'trainer': {...}}, dictionary_learning's trainer config
                       (dict_class MatryoshkaBatchTopKSAE, layer, submodule_name = the hook, the
                       training hyperparameters; k and group_sizes there back up missing tensors).
  saelens              sae_weights.safetensors: the four parameters and threshold [F] (float32).
                       cfg.json: architecture 'jumprelu', d_in, d_sae, hook_name, model_name, and
                       metadata.jaxsae: k, group_sizes, layer, trained_steps, activation_scale.

Both describe encode(x) = a * (a > threshold) with a = relu((x - b_dec) W_enc + b_enc), and
decode(a) = a W_dec + b_dec, on raw activations (jaxsae.weights folds the training scale in). The
layout is detected from which weights files a directory holds.

A directory appears complete or not at all: its files are written into a temporary sibling folder
that one rename puts in place (swapped atomically with a previous export there), so a kill, a full
disk or an error leaves the old export or the new one, never a config of one step beside the
weights of another. jaxsae's exports also hold manifest.json (each file's size and SHA-256, the
format version), which `read` verifies; other tools' exports, without one, still load.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import hashlib
import importlib.metadata
import json
import os
import re
import secrets
import shutil
import stat
from typing import Any, Mapping, Sequence

import ml_dtypes
import numpy as np
import safetensors
from safetensors.numpy import load_file, save_file

from jaxsae.errors import ConfigError
from jaxsae.formats import torch_pickle

__all__ = [
    'LAYOUTS',
    'FILES',
    'WEIGHT_FILES',
    'DL_WEIGHTS',
    'DL_TORCH',
    'DL_CONFIG',
    'SL_WEIGHTS',
    'SL_CONFIG',
    'MANIFEST',
    'MANIFEST_FORMAT',
    'PARAMS',
    'SAEWeights',
    'Metadata',
    'check_layout',
    'detect',
    'read',
    'verify',
    'check_shapes',
    'check_destination',
    'write',
    'write_files',
]

LAYOUTS = ('dictionary_learning', 'saelens')
DL_WEIGHTS, DL_TORCH, DL_CONFIG = 'ae.safetensors', 'ae.pt', 'config.json'
SL_WEIGHTS, SL_CONFIG = 'sae_weights.safetensors', 'cfg.json'
# Per layout: the weights file `read` prefers, and the config file.
FILES = {'dictionary_learning': (DL_WEIGHTS, DL_CONFIG), 'saelens': (SL_WEIGHTS, SL_CONFIG)}
# Per layout: every file holding the weights, in the order `read` looks; `write` writes them all.
WEIGHT_FILES = {'dictionary_learning': (DL_WEIGHTS, DL_TORCH), 'saelens': (SL_WEIGHTS,)}
PARAMS = ('W_enc', 'b_enc', 'W_dec', 'b_dec')
MANIFEST, MANIFEST_FORMAT = 'manifest.json', 'jaxsae-weights/1'
# What a folder may hold for a new export to replace it: an export's files, of either layout.
_EXPORT_FILES = frozenset({DL_WEIGHTS, DL_TORCH, DL_CONFIG, SL_WEIGHTS, SL_CONFIG, MANIFEST})

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
  """The layout of the SAE in directory `path`, from the weights files it holds."""
  return _weights_file(path)[0]


def _weights_file(path: str) -> tuple[str, str]:
  """(layout, the weights file to read) of the SAE in directory `path`."""
  for layout, names in WEIGHT_FILES.items():
    for name in names:
      if os.path.exists(os.path.join(path, name)):
        return layout, os.path.join(path, name)
  raise ConfigError(
      f'no SAE weights in {path!r}: expected {DL_WEIGHTS} or {DL_TORCH} (dictionary_learning) '
      f'or {SL_WEIGHTS} (SAELens). {_EXPORT_HINT}'
  )


def read(path: str) -> SAEWeights:
  """The SAE in directory `path` (either layout), checked for shape consistency."""
  verify(path)  # before anything is parsed: a missing, truncated or changed file is named as such
  layout, weights_file = _weights_file(path)
  config_name = FILES[layout][1]
  cfg = _read_config(os.path.join(path, config_name), weights_file)
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
    out: str,
    layout: str,
    params: Mapping[str, np.ndarray],
    threshold: float,
    meta: Metadata,
    extra: Mapping[str, bytes] | None = None,
) -> str:
  """Write an SAE acting on raw activations to directory `out` in `layout`; returns the weights
  file's path. `threshold` < 0 means none learned yet (SAELens gets 0: every positive code).
  `extra`: more files by name (a model card), written and listed in the manifest with the rest."""
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
                'training': dict(meta.training),  # informational, as dictionary_learning's trainer
            },
        },
    }
  weights_name, config_name = FILES[layout]
  also = WEIGHT_FILES[layout][1:]
  return write_files(
      out, weights_name, tensors, config_name, cfg, manifest=True, also=also, extra=extra
  )


def write_files(
    out: str,
    weights_name: str,
    tensors: Mapping[str, np.ndarray],
    config_name: str,
    cfg: Mapping[str, Any],
    *,
    manifest: bool = False,
    also: Sequence[str] = (),
    extra: Mapping[str, bytes] | None = None,
) -> str:
  """Make directory `out` hold exactly these files (and, with `manifest`, their manifest.json), or
  leave it as it was: they are written into a temporary sibling folder that one rename puts at
  `out`. `also` names more files holding the same tensors; each weights file's format follows its
  name (.pt: a torch checkpoint, else safetensors). `extra` maps more file names to their bytes
  (listed in the manifest, so a later export may replace them). A previous export there is
  replaced; a folder holding anything else is refused. Returns the weights file's path."""
  target = os.path.realpath(out)
  existed = check_destination(out)
  extra = dict(extra or {})
  _check_extra(extra, (weights_name, *also, config_name))
  arrays = {k: np.array(v, order='C') for k, v in tensors.items()}  # np.array keeps 0-d
  config_bytes = json.dumps(cfg, indent=2).encode()
  weights_names = (weights_name, *also)
  needed = sum(a.nbytes for a in arrays.values()) * len(weights_names) + len(config_bytes) + 2**16
  needed += sum(len(b) for b in extra.values())
  parent, tmp = os.path.dirname(target), None
  try:
    os.makedirs(parent, exist_ok=True)
    _clean_leftovers(target)
    if shutil.disk_usage(parent).free < needed:  # refused before writing anything
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), parent)
    tmp = _sibling(target, 'tmp')
    os.mkdir(tmp)  # the umask's mode, like any folder the user makes (mkdtemp would give 0700)
    _write_folder(tmp, weights_names, arrays, config_name, config_bytes, manifest, extra)
    _swap_in(tmp, target)
  except (OSError, safetensors.SafetensorError) as e:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
    raise _write_error(out, parent, e, existed, needed) from None
  except BaseException:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
    raise
  return os.path.join(out, weights_name)


def verify(path: str) -> dict | None:
  """Check directory `path`'s files against its manifest.json: the manifest, or None where there is
  none (an export by another tool). A missing, truncated or altered file is a ConfigError."""
  manifest_file = os.path.join(path, MANIFEST)
  if not os.path.exists(manifest_file):
    return None
  redo = (
      f'Re-export it with `python -m jaxsae.export_weights --workdir=<training dir> --out={path}`.'
  )
  m = read_json(manifest_file, redo)
  files = m.get('files')
  if m.get('format') != MANIFEST_FORMAT or not isinstance(files, dict):
    raise ConfigError(
        f'{manifest_file} has format {m.get("format")!r}; this version of jaxsae reads '
        f'{MANIFEST_FORMAT!r} (with a "files" table). Upgrade jaxsae, or: {redo}'
    )
  for name, want in files.items():
    want = want if isinstance(want, dict) else {}
    file = os.path.join(path, name)
    if name != os.path.basename(name) or name in ('', '.', '..'):
      raise ConfigError(f'{manifest_file} lists {name!r}, which is not a file name. {redo}')
    if not os.path.exists(file):
      raise ConfigError(f'{file} is missing, though {manifest_file} lists it. {redo}')
    got = {'bytes': os.path.getsize(file)}
    if got['bytes'] == want.get('bytes'):
      got['sha256'] = _sha256(file)
    for key in ('bytes', 'sha256'):
      if key in got and got[key] != want.get(key):
        raise ConfigError(
            f'{file} does not match {manifest_file}: {key} expected {want.get(key)}, got '
            f'{got[key]}; it was truncated or changed after the export. {redo}'
        )
  return m


def check_destination(out: str) -> bool:
  """Whether an export is already at `out` (to be replaced); a ConfigError if something else is
  there. Writers call it before any work, `write_files` again before writing."""
  target = os.path.realpath(out)
  if not os.path.lexists(target):
    return False
  if not os.path.isdir(target):
    raise ConfigError(
        f'{out} exists and is not a folder; an SAE export is a folder. Choose another output '
        'folder, or move it away.'
    )
  entries = os.listdir(target)
  other = sorted(set(entries) - _EXPORT_FILES - _manifest_names(target))
  if other:
    shown = ', '.join(other[:5]) + (f' and {len(other) - 5} more' if len(other) > 5 else '')
    raise ConfigError(
        f'{out} holds {shown}, which is not part of an SAE export; an export replaces the whole '
        'folder, so nothing was written. Choose a new or empty output folder, or move those away.'
    )
  return bool(entries)


def _manifest_names(folder: str) -> set[str]:
  """The plain file names an export's manifest lists (its extra files too); none if unreadable."""
  try:
    with open(os.path.join(folder, MANIFEST), 'rb') as f:
      files = json.loads(f.read()).get('files')
  except (OSError, ValueError, AttributeError):
    return set()
  if not isinstance(files, dict):
    return set()
  return {
      n
      for n in files
      if isinstance(n, str) and n == os.path.basename(n) and n not in ('.', '..', '')
  }


def _check_extra(extra: Mapping[str, bytes], taken: Sequence[str]) -> None:
  """Extra files must be plain names of bytes, none clashing with the export's own files."""
  for name, data in extra.items():
    if name != os.path.basename(name) or name in ('', '.', '..') or name.startswith('.'):
      raise ValueError(f'extra export file {name!r} is not a plain file name')
    if name in (*taken, MANIFEST):
      raise ValueError(f"extra export file {name!r} would replace one of the export's own files")
    if not isinstance(data, bytes):
      raise TypeError(f'extra export file {name!r}: expected bytes, got {type(data).__name__}')


def _write_folder(
    folder: str,
    weights_names: Sequence[str],
    arrays: Mapping[str, np.ndarray],
    config_name: str,
    config_bytes: bytes,
    manifest: bool,
    extra: Mapping[str, bytes] | None = None,
) -> None:
  """The export's files, each flushed to disk before the folder is renamed into place."""
  config_file = os.path.join(folder, config_name)
  _write_bytes(config_file, config_bytes)
  extra = dict(extra or {})
  for name, data in extra.items():
    _write_bytes(os.path.join(folder, name), data)
  for name in weights_names:
    weights_file = os.path.join(folder, name)
    if name.endswith('.pt'):
      torch_pickle.save(weights_file, arrays)
    else:
      save_file(arrays, weights_file)
    os.chmod(weights_file, stat.S_IMODE(os.stat(config_file).st_mode))  # safetensors makes 0600
    _fsync(weights_file)
  if manifest:
    files = {}
    for name in (config_name, *weights_names, *extra):
      file = os.path.join(folder, name)
      files[name] = {'bytes': os.path.getsize(file), 'sha256': _sha256(file)}
    record = {'format': MANIFEST_FORMAT, 'jaxsae_version': _version(), 'files': files}
    _write_bytes(os.path.join(folder, MANIFEST), json.dumps(record, indent=2).encode())
  _fsync(folder)


def _swap_in(tmp: str, target: str) -> None:
  """Put folder `tmp` at `target` in one step: a rename, or an exchange with what is there (whose
  old contents are then removed). Where exchanging is unsupported, the old folder is renamed aside
  first; a run killed in between leaves it aside, and the next write puts it back."""
  if not os.path.lexists(target):
    os.rename(tmp, target)
  elif _exchange(tmp, target):
    shutil.rmtree(tmp, ignore_errors=True)  # now the previous export
  else:
    old = _sibling(target, 'old')
    os.rename(target, old)
    try:
      os.rename(tmp, target)
    except OSError:
      os.rename(old, target)
      raise
    shutil.rmtree(old, ignore_errors=True)
  _fsync(os.path.dirname(target))


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: str, b: str) -> bool:
  """Swap paths `a` and `b` atomically (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
  try:
    renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
  except (OSError, AttributeError, TypeError):
    return False
  renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
  if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # this filesystem or kernel cannot
    return False
  raise OSError(err, os.strerror(err), b)


def _sibling(target: str, kind: str) -> str:
  """A hidden temporary folder name beside `target`, recognisable as this module's leftover."""
  parent, base = os.path.split(target)
  return os.path.join(parent, f'.{base}.jaxsae-{kind}.{os.getpid()}.{secrets.token_hex(4)}')


def _clean_leftovers(target: str) -> None:
  """What writes killed mid-way left beside `target`: half-written folders are removed; a previous
  export that the fallback swap had moved aside is put back if nothing replaced it. Folders of
  writes still running (their process is alive) are left alone."""
  parent, base = os.path.split(target)
  pattern = re.compile(rf'\.{re.escape(base)}\.jaxsae-(tmp|old)\.(\d+)\.[0-9a-f]{{8}}')
  for name in sorted(os.listdir(parent), key=lambda n: 'old' not in n):  # restore before removing
    match = pattern.fullmatch(name)
    if match is None or _alive(int(match[2])):
      continue
    path = os.path.join(parent, name)
    if match[1] == 'old' and not os.path.lexists(target):
      os.rename(path, target)
    else:
      shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
  if pid == os.getpid():
    return False  # this process's own leftover: its write has ended
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _write_error(
    out: str, parent: str, error: Exception, existed: bool, needed: int
) -> ConfigError:
  kept = 'the previous export there is intact' if existed else 'nothing was written there'
  text = str(error)
  full = getattr(error, 'errno', None) in (errno.ENOSPC, errno.EDQUOT) or any(
      s in text for s in ('No space left on device', 'Disk quota exceeded')
  )
  if full:
    try:
      free = f'{_size(shutil.disk_usage(parent).free)} free'
    except OSError:
      free = 'free space unknown'
    return ConfigError(
        f'the disk is full: no space left on the device for the SAE export at {out} (it needs '
        f'about {_size(needed)}; {parent} has {free}, or no free inodes). Nothing was changed at '
        f'{out}: {kept}. Free some space, or export to a folder on another disk.'
    )
  return ConfigError(f'cannot write the SAE export at {out}: {text}. Nothing was changed: {kept}.')


def _size(n: int) -> str:
  for unit in ('bytes', 'KiB', 'MiB', 'GiB'):
    if n < 1024 or unit == 'GiB':
      return f'{n:.0f} {unit}' if unit == 'bytes' else f'{n:.1f} {unit}'
    n /= 1024
  return f'{n:.1f} TiB'


def _write_bytes(path: str, data: bytes) -> None:
  with open(path, 'wb') as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def _fsync(path: str) -> None:
  """Flush a file or folder to disk (a folder: the names in it), where the platform allows."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass  # some filesystems cannot fsync a directory
  finally:
    os.close(fd)


def _sha256(path: str) -> str:
  with open(path, 'rb') as f:
    return hashlib.file_digest(f, 'sha256').hexdigest()


def _version() -> str:
  try:
    return importlib.metadata.version('jaxsae')
  except importlib.metadata.PackageNotFoundError:
    return 'unknown'


def _read_config(path: str, weights_file: str) -> dict:
  if not os.path.exists(path):
    raise ConfigError(
        f'{path} is missing: the weights in {weights_file} come with their config '
        f'file. Copy it beside them, or re-export. {_EXPORT_HINT}'
    )
  return read_json(path, f'Re-export the weights. {_EXPORT_HINT}')


def read_json(path: str, fix: str) -> dict:
  """A JSON object from `path`, or a ConfigError naming the file and `fix`."""
  try:
    with open(path, 'rb') as f:
      value = json.loads(f.read())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ConfigError(f'{path} is not valid JSON ({e}): truncated or corrupt. {fix}') from None
  except OSError as e:
    raise ConfigError(f'cannot read {path}: {e}. {fix}') from None
  if not isinstance(value, dict):
    raise ConfigError(f'{path} holds a JSON {type(value).__name__}, not an object. {fix}')
  return value


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
  if path.endswith('.pt'):
    return torch_pickle.load(path)  # its errors name the file and the fix
  try:
    try:
      return load_file(path)
    except TypeError:  # a dtype numpy does not know
      with open(path, 'rb') as f:
        raw = safetensors.deserialize(f.read())
  except (safetensors.SafetensorError, OSError) as e:
    raise ConfigError(
        f'{path} cannot be read as safetensors ({e}): the file is empty, truncated or corrupt. '
        f'Re-export it, or copy it again from where it came from. {_EXPORT_HINT}'
    ) from None
  unknown = sorted({v['dtype'] for _, v in raw} - set(_RAW_DTYPES))
  if unknown:
    raise ConfigError(
        f'{path} holds tensors of dtype {unknown}; jaxsae reads '
        f'{sorted(_RAW_DTYPES)}. Save the SAE in float32.'
    )
  return {
      n: np.frombuffer(v['data'], _RAW_DTYPES[v['dtype']]).reshape(v['shape']).copy()
      for n, v in raw
  }
