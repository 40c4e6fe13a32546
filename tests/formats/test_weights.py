"""Exported safetensors (both layouts) load back into the same SAE, and work on raw activations;
jaxsae.formats reads and writes them without JAX or torch."""

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers import REPO, tiny_config
from jaxsae import model, trainer, weights
from jaxsae.data import synthetic
from jaxsae.config import ConfigError
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
  assert sorted(os.listdir(tmp_path)) == sorted(weights_format.FILES[layout])  # no .tmp left
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
