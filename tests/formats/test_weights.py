"""Exported safetensors (both layouts) load back into the same SAE, and work on raw activations;
jaxsae.formats reads and writes them without JAX or torch. An export folder appears complete or
not at all (kills, full disks, damaged files included), and its manifest catches changed files."""

import dataclasses
import errno
import hashlib
import json
import os
import random
import re
import shutil
import stat
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers import REPO, fill_disk, kill_repeatedly, run_cli, small_disk, tiny_config
from jaxsae import model, trainer, weights
from jaxsae.data import synthetic
from jaxsae.config import ConfigError
from jaxsae.formats import torch_pickle
from jaxsae.formats import weights as weights_format


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('train'))
  c = tiny_config(**{'train.steps': 20, 'optim.decay_start': 15})
  trainer.train_and_evaluate(c, workdir)
  return workdir, c


@pytest.mark.slow
@pytest.mark.parametrize('fmt', weights.FORMATS)
def test_export_load_gives_the_trained_encodings(trained, tmp_path, fmt):
  workdir, c = trained
  path = weights.export(workdir, str(tmp_path), fmt)
  sae, _ = weights.load(str(tmp_path))
  _, state, meta, _ = weights.load_checkpoint(workdir)
  s = meta['scale']
  assert s != pytest.approx(1.0)  # the fold is really exercised
  x = synthetic.SyntheticSource.from_config(c).batch(1000)
  pre = model.pre_activations(state['params'], x / s)
  acts = model.jumprelu(pre, state['threshold'])
  np.testing.assert_allclose(sae.encode(x), acts * s, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(sae(x), model.decode(state['params'], acts) * s, rtol=1e-5, atol=1e-5)
  assert os.path.basename(path) in ('ae.safetensors', 'sae_weights.safetensors')
  # The numpy reader sees the folded parameters exactly, and the JAX model holds the same.
  w = weights_format.read(str(tmp_path))
  folded, theta = weights.fold_scale(state['params'], float(state['threshold']), s)
  assert (w.layout, w.k, w.group_sizes, w.threshold.shape) == (fmt, 4, sae.group_sizes, ())
  np.testing.assert_allclose(w.threshold, theta, rtol=1e-6)
  for name, value in folded.items():
    np.testing.assert_array_equal(w.params[name], value, err_msg=name)
    np.testing.assert_array_equal(np.asarray(sae.params()[name]), value, err_msg=name)


def test_dictionary_learning_layout(trained, tmp_path):
  workdir, c = trained
  weights.export(workdir, str(tmp_path), 'dictionary_learning')
  t = load_file(str(tmp_path / 'ae.safetensors'))
  F = 64
  assert {k: v.shape for k, v in t.items()} == {
      'W_enc': (16, F),
      'b_enc': (F,),
      'W_dec': (F, 16),
      'b_dec': (16,),
      'k': (),
      'threshold': (),
      'group_sizes': (5,),
  }
  pt = torch_pickle.load(str(tmp_path / 'ae.pt'))  # the same state dict, for load_dictionary
  assert sorted(pt) == sorted(t)
  for name, value in t.items():
    assert pt[name].dtype == value.dtype and pt[name].shape == value.shape, name
    np.testing.assert_array_equal(pt[name], value, err_msg=name)
  cfg = json.load(open(tmp_path / 'config.json'))['trainer']
  assert cfg['dict_class'] == 'MatryoshkaBatchTopKSAE' and cfg['dict_size'] == F
  assert sum(cfg['group_sizes']) == F and cfg['k'] == 4 and cfg['steps'] == 20


def test_saelens_layout(trained, tmp_path):
  workdir, _ = trained
  weights.export(workdir, str(tmp_path), 'saelens', step=10)
  t = load_file(str(tmp_path / 'sae_weights.safetensors'))
  assert t['threshold'].shape == (64,)
  cfg = json.load(open(tmp_path / 'cfg.json'))
  assert (cfg['architecture'], cfg['d_in'], cfg['d_sae']) == ('jumprelu', 16, 64)
  assert cfg['metadata']['jaxsae']['trained_steps'] == 10


def test_bad_requests_are_named(trained, tmp_path):
  workdir, _ = trained
  with pytest.raises(ConfigError, match='no checkpoint for step 7'):
    weights.export(workdir, str(tmp_path), 'saelens', step=7)
  with pytest.raises(ConfigError, match='unknown export format'):
    weights.export(workdir, str(tmp_path), 'onnx')
  with pytest.raises(ConfigError, match='no checkpoint in'):
    weights.export(str(tmp_path / 'empty'), str(tmp_path), 'saelens')
  with pytest.raises(ConfigError, match='no SAE weights'):
    weights.load(str(tmp_path))


def _random_params(d=8, F=24, seed=0):
  rng = np.random.default_rng(seed)
  return {
      'W_enc': rng.standard_normal((d, F)),
      'b_enc': rng.standard_normal(F),
      'W_dec': rng.standard_normal((F, d)),
      'b_dec': rng.standard_normal(d),
  }


META = weights_format.Metadata(
    k=3,
    group_sizes=(8, 16),
    step=7,
    scale=2.5,
    layer=1,
    model_name='m',
    hook_name='h',
    training={'lr': 1e-3},
)


@pytest.mark.parametrize('layout', weights_format.LAYOUTS)
@pytest.mark.parametrize('threshold', [0.25, -1.0], ids=['learned', 'not_yet'])
def test_write_read_round_trip(tmp_path, layout, threshold):
  """The numpy API alone: what `write` records, `read` gives back, normalised across layouts."""
  p = _random_params()
  path = weights_format.write(str(tmp_path), layout, p, threshold, META)
  assert path == os.path.join(str(tmp_path), weights_format.FILES[layout][0])
  config_name = weights_format.FILES[layout][1]
  want = sorted([*weights_format.WEIGHT_FILES[layout], config_name, weights_format.MANIFEST])
  assert sorted(os.listdir(tmp_path)) == want  # and no temporary folder beside it
  assert not [n for n in os.listdir(tmp_path.parent) if '.jaxsae-' in n]
  w = weights_format.read(str(tmp_path))
  assert (w.layout, w.k, w.group_sizes, w.layer, w.hook_name, w.d, w.F) == (
      layout,
      3,
      (8, 16),
      1,
      'h',
      8,
      24,
  )
  for name, value in p.items():
    assert w.params[name].dtype == np.float32
    np.testing.assert_array_equal(w.params[name], value.astype(np.float32))
  # SAELens has no "none yet": a negative threshold is written as 0 (keep every positive code).
  want = threshold if layout == 'dictionary_learning' else max(threshold, 0.0)
  assert w.threshold.shape == () and float(w.threshold) == want
  if layout == 'dictionary_learning':
    assert w.cfg['trainer']['lr'] == 1e-3 and w.cfg['trainer']['norm_factor'] == 2.5
  else:
    assert w.cfg['metadata']['jaxsae']['activation_scale'] == 2.5


def test_dictionary_learning_ae_pt_alone_reads_the_same(tmp_path):
  """The released SAEs hold ae.pt and config.json only (no safetensors, no manifest): `read` takes
  the state dict from ae.pt, the same as from ae.safetensors beside it."""
  p = _random_params()
  weights_format.write(str(tmp_path / 'both'), 'dictionary_learning', p, 0.25, META)
  both = weights_format.read(str(tmp_path / 'both'))
  m = json.load(open(tmp_path / 'both' / weights_format.MANIFEST))
  assert sorted(m['files']) == sorted([*DL, weights_format.DL_TORCH])
  alone = tmp_path / 'alone'
  alone.mkdir()
  for name in (weights_format.DL_TORCH, weights_format.DL_CONFIG):
    shutil.copy(tmp_path / 'both' / name, alone / name)
  assert weights_format.detect(str(alone)) == 'dictionary_learning'
  w = weights_format.read(str(alone))
  assert (w.k, w.group_sizes, w.layer, w.hook_name, float(w.threshold)) == (
      3,
      (8, 16),
      1,
      'h',
      0.25,
  )
  for name, value in both.params.items():
    assert w.params[name].dtype == np.float32
    np.testing.assert_array_equal(w.params[name], value, err_msg=name)
  data = (alone / weights_format.DL_TORCH).read_bytes()
  (alone / weights_format.DL_TORCH).write_bytes(data[: len(data) // 2])
  with pytest.raises(ConfigError, match=r'ae.pt cannot be read as a torch checkpoint.*truncated'):
    weights_format.read(str(alone))
  os.remove(alone / weights_format.DL_TORCH)
  with pytest.raises(ConfigError, match=r'no SAE weights .*ae.safetensors or ae.pt'):
    weights_format.read(str(alone))


def test_read_keeps_a_per_latent_threshold(tmp_path):
  weights_format.write(str(tmp_path), 'saelens', _random_params(), 0.5, META)
  t = load_file(str(tmp_path / weights_format.SL_WEIGHTS))
  t['threshold'] = np.linspace(0.1, 0.9, 24, dtype=np.float32)
  weights_format.write_files(
      str(tmp_path),
      weights_format.SL_WEIGHTS,
      t,
      weights_format.SL_CONFIG,
      json.load(open(tmp_path / weights_format.SL_CONFIG)),
  )
  np.testing.assert_array_equal(weights_format.read(str(tmp_path)).threshold, t['threshold'])


def test_read_errors_name_the_file_and_the_fix(tmp_path):
  p = _random_params()
  weights_format.write(str(tmp_path), 'dictionary_learning', p, 0.5, META)
  ae = str(tmp_path / weights_format.DL_WEIGHTS)
  cfg = json.load(open(tmp_path / weights_format.DL_CONFIG))

  def rewrite(**tensors):
    t = {**load_file(ae), **tensors}
    weights_format.write_files(
        str(tmp_path),
        weights_format.DL_WEIGHTS,
        {k: v for k, v in t.items() if v is not None},
        weights_format.DL_CONFIG,
        cfg,
    )

  rewrite(b_dec=None)
  with pytest.raises(ConfigError, match=r"ae.safetensors lacks \['b_dec'\].*export_weights"):
    weights_format.read(str(tmp_path))
  rewrite(b_dec=np.zeros(9, np.float32))
  with pytest.raises(ConfigError, match=r'ae.safetensors: inconsistent shapes.*b_dec \[9\]'):
    weights_format.read(str(tmp_path))
  rewrite(b_dec=np.zeros(8, np.float32), group_sizes=np.array([8, 8]))
  with pytest.raises(ConfigError, match=r'group sizes \[8, 8\] sum to 16, not F=24'):
    weights_format.read(str(tmp_path))
  rewrite(group_sizes=np.array([8, 16]), threshold=np.ones(5, np.float32))
  with pytest.raises(ConfigError, match=r'threshold has shape \[5\]; expected a scalar or \[F=24'):
    weights_format.read(str(tmp_path))
  (tmp_path / weights_format.DL_CONFIG).write_text('{"trainer": ')
  with pytest.raises(ConfigError, match='config.json is not valid JSON'):
    weights_format.read(str(tmp_path))
  with pytest.raises(ConfigError, match="unknown export format 'onnx'"):
    weights_format.write(str(tmp_path), 'onnx', p, 0.5, META)


def test_formats_import_neither_jax_nor_torch(tmp_path):
  """The contracts both sides share: every module of jaxsae.formats, used, without JAX or torch."""
  code = f"""
import importlib, pkgutil, sys
sys.path.insert(0, {REPO!r})
import numpy as np
import jaxsae.formats
from jaxsae.formats import weights
found = sorted(m.name for m in pkgutil.iter_modules(jaxsae.formats.__path__))
assert found == sorted(jaxsae.formats.__all__), (found, jaxsae.formats.__all__)
for name in found:
  importlib.import_module('jaxsae.formats.' + name)
p = {{'W_enc': np.ones((4, 6)), 'b_enc': np.zeros(6), 'W_dec': np.ones((6, 4)),
     'b_dec': np.zeros(4)}}
meta = weights.Metadata(k=2, group_sizes=(2, 4), step=1, scale=1.0, layer=0, model_name='m',
                        hook_name='h')
for layout in weights.LAYOUTS:
  weights.write({str(tmp_path)!r} + '/' + layout, layout, p, 0.1, meta)
  assert weights.read({str(tmp_path)!r} + '/' + layout).F == 6
bad = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'torch'))
assert not bad, bad[:5]
print('ok')
"""
  r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
  assert r.returncode == 0 and 'ok' in r.stdout, r.stderr[-2000:]


# --------------------------------------------------------------------------------------------------
# Atomic exports: one rename, the umask's modes, a manifest the readers verify
# --------------------------------------------------------------------------------------------------

DL, SL = weights_format.FILES['dictionary_learning'], weights_format.FILES['saelens']


def _export(out, threshold=0.5, layout='dictionary_learning', params=None):
  params = params if params is not None else _random_params()
  F = params['W_enc'].shape[1]
  meta = dataclasses.replace(META, group_sizes=(F // 3, F - F // 3))
  return weights_format.write(str(out), layout, params, threshold, meta)


def _leftovers(folder):
  """The temporary folders of writes (hidden siblings of their output folder)."""
  return [n for n in os.listdir(folder) if '.jaxsae-' in n]


def _dead_pid():
  proc = subprocess.Popen([sys.executable, '-c', 'pass'])
  proc.wait()
  return proc.pid


@pytest.mark.parametrize('exchange', [True, False], ids=['renameat2', 'two_renames'])
def test_export_replaces_a_previous_export_whole(tmp_path, monkeypatch, exchange):
  """Another layout over an export leaves only the new files (a stale ae.safetensors would win
  `detect`), with the atomic exchange and with the fallback for filesystems without it."""
  if not exchange:
    monkeypatch.setattr(weights_format, '_exchange', lambda a, b: False)
  out = tmp_path / 'sae'
  _export(out, 0.5, 'dictionary_learning')
  _export(out, 0.25, 'saelens')
  assert sorted(os.listdir(out)) == sorted([*SL, weights_format.MANIFEST])
  w = weights_format.read(str(out))
  assert (w.layout, float(w.threshold)) == ('saelens', 0.25)
  assert not _leftovers(tmp_path)


def test_export_files_get_the_umask_mode(tmp_path):
  """Not 0600 (what safetensors creates) beside 0644 files: the umask decides, as for any file."""
  old = os.umask(0o022)
  try:
    _export(tmp_path / 'sae')
  finally:
    os.umask(old)
  modes = {
      n: stat.S_IMODE(os.stat(tmp_path / 'sae' / n).st_mode) for n in os.listdir(tmp_path / 'sae')
  }
  assert modes == dict.fromkeys([*DL, weights_format.DL_TORCH, weights_format.MANIFEST], 0o644)
  assert stat.S_IMODE(os.stat(tmp_path / 'sae').st_mode) == 0o755


def test_export_refuses_a_folder_holding_other_files(tmp_path):
  out = tmp_path / 'results'
  out.mkdir()
  (out / 'notes.txt').write_text('mine')
  with pytest.raises(ConfigError, match=r'results holds notes.txt, which is not part of an SAE'):
    _export(out)
  assert os.listdir(out) == ['notes.txt'] and (out / 'notes.txt').read_text() == 'mine'
  (tmp_path / 'file').write_text('x')
  with pytest.raises(ConfigError, match='file exists and is not a folder'):
    _export(tmp_path / 'file')
  # weights.export says so before it reads the checkpoint
  with pytest.raises(ConfigError, match='results holds notes.txt'):
    weights.export(str(tmp_path / 'no_run'), str(out), 'saelens')
  assert not (tmp_path / 'no_run').exists()


def test_manifest_catches_truncated_altered_and_missing_files(tmp_path):
  out = tmp_path / 'sae'
  _export(out)
  m = json.load(open(out / weights_format.MANIFEST))
  assert m['format'] == weights_format.MANIFEST_FORMAT
  assert sorted(m['files']) == sorted([*DL, weights_format.DL_TORCH])
  ae = out / weights_format.DL_WEIGHTS
  data = ae.read_bytes()
  assert m['files'][weights_format.DL_WEIGHTS]['bytes'] == len(data)
  redo = r'Re-export it with `python -m jaxsae.export_weights --workdir=<training dir> --out='
  ae.write_bytes(data[:-7])
  want = rf'ae.safetensors does not match .*manifest.json: bytes expected {len(data)}, got '
  with pytest.raises(ConfigError, match=want + rf'{len(data) - 7}; it was truncated.*{redo}'):
    weights_format.read(str(out))
  flipped = bytearray(data)
  flipped[-3] ^= 1
  ae.write_bytes(bytes(flipped))
  for load in (weights_format.read, weights.load):  # the numpy reader and the JAX loader
    with pytest.raises(ConfigError, match=r'ae.safetensors does not match .*: sha256 expected'):
      load(str(out))
  ae.write_bytes(data)
  assert weights_format.read(str(out)).F == 24
  pt = out / weights_format.DL_TORCH  # checked too, though `read` takes ae.safetensors
  pt_data = pt.read_bytes()
  pt.write_bytes(pt_data[:-1] + bytes([pt_data[-1] ^ 1]))
  with pytest.raises(ConfigError, match=r'ae.pt does not match .*: sha256 expected'):
    weights_format.read(str(out))
  pt.write_bytes(pt_data)
  os.remove(out / weights_format.DL_CONFIG)
  with pytest.raises(ConfigError, match=r'config.json is missing, though .*manifest.json lists'):
    weights_format.read(str(out))
  (out / weights_format.MANIFEST).write_text('{"files": ')
  with pytest.raises(ConfigError, match=r'manifest.json is not valid JSON .*truncated or corrupt'):
    weights_format.read(str(out))


def test_damaged_files_without_a_manifest_name_the_file(tmp_path):
  """Other tools' exports have no manifest: an empty or truncated weights file, or a config that
  is not a JSON object, is still named with the fix instead of safetensors' bare header error."""
  out = tmp_path / 'sae'
  _export(out)
  os.remove(out / weights_format.MANIFEST)
  ae = out / weights_format.DL_WEIGHTS
  data = ae.read_bytes()
  for broken in (b'', data[:20], data[:-7]):
    ae.write_bytes(broken)
    with pytest.raises(
        ConfigError,
        match=re.escape(str(ae))
        + r' cannot be read as safetensors \(.*header.*\): the file is empty, truncated or '
        'corrupt. Re-export',
    ):
      weights_format.read(str(out))
  ae.write_bytes(data)
  (out / weights_format.DL_CONFIG).write_text('[1, 2]')
  with pytest.raises(ConfigError, match=r'config.json holds a JSON list, not an object'):
    weights_format.read(str(out))


def test_leftovers_of_a_killed_export_are_cleaned(tmp_path):
  out = tmp_path / 'sae'
  _export(out, 0.5)
  half = tmp_path / f'.sae.jaxsae-tmp.{_dead_pid()}.0123abcd'  # killed while writing
  half.mkdir()
  (half / weights_format.DL_CONFIG).write_text('{"trai')
  running = tmp_path / f'.sae.jaxsae-tmp.{os.getppid()}.0123abcd'  # a live process's: left alone
  running.mkdir()
  _export(out, 0.25)
  assert _leftovers(tmp_path) == [running.name]
  assert float(weights_format.read(str(out)).threshold) == 0.25


def _enospc_save_file(tensors, path):
  with open(path, 'wb') as f:
    f.write(b'\0' * 100)  # half a file, then the disk is full
  raise safetensors_error(
      'Error while serializing: I/O error: No space left on device (os error 28)'
  )


def safetensors_error(message):
  import safetensors

  return safetensors.SafetensorError(message)


def test_an_export_moved_aside_by_a_killed_swap_is_put_back(tmp_path, monkeypatch):
  """The fallback swap's window (old export renamed aside, the new not yet in): the next write puts
  the old one back first, so even a write that then fails leaves it at `out`."""
  out = tmp_path / 'sae'
  _export(out, 0.5)
  os.rename(out, tmp_path / f'.sae.jaxsae-old.{_dead_pid()}.0123abcd')
  monkeypatch.setattr(weights_format, 'save_file', _enospc_save_file)
  with pytest.raises(ConfigError, match='the disk is full'):
    _export(out, 0.25)
  assert float(weights_format.read(str(out)).threshold) == 0.5 and not _leftovers(tmp_path)


@pytest.mark.parametrize(
    'limit',
    [
        'bytes',
        'bytes_mid_write',
        'inodes_at_config',
        'inodes_at_weights',
        'inodes_at_torch',
        'inodes_at_manifest',
    ],
)
def test_a_full_disk_keeps_the_previous_export(tmp_path, monkeypatch, limit, faults):
  """ENOSPC at every point of an export over an older one, on a real 1 MiB folder (a tmpfs; bytes
  or inodes run out) where the machine allows mounting, else simulated: a one-line error naming
  the folder and the full disk, and the old export intact."""
  faults.inject('disk full during export_weights', 1)
  params = _random_params(d=64, F=512)  # 2 x 256 KiB (ae.safetensors, ae.pt): fits once in 1 MiB
  # The root, the old export (folder, config, 2 weights files, manifest), then the new one's.
  inodes = {
      'inodes_at_config': 7,
      'inodes_at_weights': 8,
      'inodes_at_torch': 9,
      'inodes_at_manifest': 10,
  }.get(limit)
  with small_disk(tmp_path / 'disk', '1M', inodes) as mounted:
    out = tmp_path / 'disk' / 'sae'
    _export(out, 0.5, params=params if inodes is None else None)
    if not mounted:
      monkeypatch.setattr(weights_format, 'save_file', _enospc_save_file)
    elif limit == 'bytes_mid_write':  # past the free-space check: the write itself fails
      free = weights_format.shutil.disk_usage(tmp_path)
      monkeypatch.setattr(weights_format.shutil, 'disk_usage', lambda p: free)
    with pytest.raises(ConfigError) as e:
      _export(out, 0.25, params=params if inodes is None else None)
    msg = str(e.value)
    assert msg.startswith(
        f'the disk is full: no space left on the device for the SAE export at {out}'
    )
    assert 'the previous export there is intact' in msg and '\n' not in msg
    assert float(weights_format.read(str(out)).threshold) == 0.5  # and its manifest verifies
    assert not _leftovers(tmp_path / 'disk')


def _digest(path):
  with open(path, 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.slow
def test_kill_minus_9_during_export_weights_leaves_a_complete_export(tmp_path, faults):
  """`python -m jaxsae.export_weights` killed at random moments over an existing export, half the
  kills timed to land while its temporary folder is being written: `--out` always holds a
  complete export that verifies, the old one or the new one, and the next run cleans up."""
  run = str(tmp_path / 'run')
  c = tiny_config(**{'sae.d': 128, 'sae.expansion_factor': 64, 'train.steps': 10,
                     'optim.decay_start': 8, 'train.checkpoint_every': 5})  # fmt: skip
  trainer.train_and_evaluate(c, run)  # 2 x 4 MiB of weights: a write window worth hitting
  out, ref = tmp_path / 'sae', tmp_path / 'ref'
  which = {}
  for name, step in (('old', 5), ('new', 10)):
    weights.export(run, str(ref / name), 'saelens', step=step)
    which[_digest(ref / name / weights_format.SL_WEIGHTS)] = name
  args = [sys.executable, '-m', 'jaxsae.export_weights', f'--workdir={run}', f'--out={out}',
          '--format=saelens', '--step=10']  # fmt: skip
  writing = lambda: bool(_leftovers(tmp_path))
  rng, kills, outcomes = random.Random(0), 0, []
  # Until 3 kills have landed (a run may finish before its kill; at most 16 tries).
  for attempt in range(16):
    if attempt >= 6 and kills >= 3:
      break
    for name in [*_leftovers(tmp_path), out.name]:  # each try replaces the old export afresh
      shutil.rmtree(tmp_path / name, ignore_errors=True)
    shutil.copytree(ref / 'old', out)
    started, window = (writing, (0.0, 0.04)) if attempt % 2 else (lambda: True, (0.5, 3.0))
    kills += kill_repeatedly(args, started, 1, rng, window=window)
    weights_format.verify(str(out))  # complete: every file as its manifest says
    assert sorted(os.listdir(out)) == sorted([*SL, weights_format.MANIFEST])
    outcomes.append(which[_digest(out / weights_format.SL_WEIGHTS)] + ('+tmp' if writing() else ''))
  print(f'{kills} kills; --out afterwards (+tmp: killed mid-write): {outcomes}')
  assert kills >= 3
  faults.inject('kill -9 during export_weights', kills)
  r = run_cli(args)
  assert r.returncode == 0, r.stderr[-2000:]
  assert which[_digest(out / weights_format.SL_WEIGHTS)] == 'new' and not _leftovers(tmp_path)
