"""Exported safetensors (both layouts) load back into the same SAE, and work on raw activations."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers import tiny_config
from jaxsae import model, trainer, weights
from jaxsae.data import synthetic
from jaxsae.config import ConfigError


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('train'))
  c = tiny_config(**{'train.steps': 20, 'optim.decay_start': 15})
  trainer.train_and_evaluate(c, workdir)
  return workdir, c


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


def test_dictionary_learning_layout(trained, tmp_path):
  workdir, c = trained
  weights.export(workdir, str(tmp_path), 'dictionary_learning')
  t = load_file(str(tmp_path / 'ae.safetensors'))
  F = 64
  assert {k: v.shape for k, v in t.items()} == {
      'W_enc': (16, F), 'b_enc': (F,), 'W_dec': (F, 16), 'b_dec': (16,), 'k': (),
      'threshold': (), 'group_sizes': (5,)}
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
