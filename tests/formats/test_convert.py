"""python -m jaxsae.convert_weights: a released SAE (or any export) rewritten in the other layout
keeps its codes, k, groups, threshold, layer, hook and trainer config; Hub ids work offline."""

import json
import os
import sys

import numpy as np
import pytest

from helpers import run_cli, write_hub_cache, write_sae
from jaxsae import weights
from jaxsae.config import ConfigError
from jaxsae.formats import weights as weights_format

GROUPS = (8, 8, 16)
TRAINER = {'lr': 3e-4, 'seed': 7, 'auxk_alpha': 0.03125, 'wandb_name': 'maira2_ef4'}


def _source(folder, threshold=0.2):
  return write_sae(
      folder,
      group_sizes=GROUPS,
      k=6,
      threshold=threshold,
      step=1234,
      scale=3.5,
      layer=15,
      model_name='microsoft/maira-2',
      hook_name='model.language_model.layers.15',
      training=TRAINER,
  )


def _codes(path, x):
  sae, _ = weights.load(path)
  return np.asarray(sae.encode(x)), np.asarray(sae(x))


@pytest.mark.parametrize('threshold', [0.2, -1.0], ids=['learned', 'not_yet'])
def test_dictionary_learning_to_saelens_and_back_keeps_the_sae(tmp_path, threshold):
  src, sl, dl = (str(tmp_path / n) for n in ('src', 'sl', 'dl'))
  p = _source(src, threshold)
  assert weights.convert(src, sl, 'saelens') == os.path.join(sl, weights_format.SL_WEIGHTS)
  assert weights.convert(sl, dl, 'dictionary_learning') == os.path.join(
      dl, weights_format.DL_WEIGHTS
  )
  x = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32) * 2
  want_codes, want_recon = _codes(src, x)
  assert (want_codes > 0).any() and (want_codes == 0).any()
  for path in (sl, dl):
    codes, recon = _codes(path, x)
    np.testing.assert_array_equal(codes, want_codes, err_msg=path)
    np.testing.assert_array_equal(recon, want_recon, err_msg=path)
  for path, layout in ((sl, 'saelens'), (dl, 'dictionary_learning')):
    w = weights_format.read(path)
    assert (w.layout, w.k, w.group_sizes, w.layer, w.hook_name) == (
        layout,
        6,
        GROUPS,
        15,
        'model.language_model.layers.15',
    )
    for name, value in p.items():
      np.testing.assert_array_equal(w.params[name], value, err_msg=f'{path} {name}')
  sl_cfg = json.load(open(os.path.join(sl, weights_format.SL_CONFIG)))
  assert sl_cfg['model_name'] == 'microsoft/maira-2'
  assert sl_cfg['metadata']['jaxsae']['trained_steps'] == 1234
  assert sl_cfg['metadata']['jaxsae']['activation_scale'] == 3.5  # recorded, not applied


def test_the_trainer_config_is_kept_under_training(tmp_path):
  src, dl = str(tmp_path / 'src'), str(tmp_path / 'dl')
  _source(src)
  weights.convert(src, dl, 'dictionary_learning')
  trainer = json.load(open(os.path.join(dl, weights_format.DL_CONFIG)))['trainer']
  assert {k: trainer[k] for k in TRAINER} == TRAINER
  assert (trainer['k'], trainer['group_sizes'], trainer['steps'], trainer['norm_factor']) == (
      6,
      list(GROUPS),
      1234,
      3.5,
  )
  assert (trainer['layer'], trainer['lm_name']) == (15, 'microsoft/maira-2')


def test_conversion_refusals_are_named(tmp_path):
  src = str(tmp_path / 'src')
  _source(src)
  (tmp_path / 'busy').mkdir()
  (tmp_path / 'busy' / 'notes.txt').write_text('mine')
  with pytest.raises(ConfigError, match=r'busy holds notes.txt, which is not part of an SAE'):
    weights.convert(src, str(tmp_path / 'busy'), 'saelens')
  with pytest.raises(ConfigError, match=r'--out=.*src is the folder of the SAE being converted'):
    weights.convert(src, src, 'saelens')
  with pytest.raises(ConfigError, match=r"unknown export format 'onnx'"):
    weights.convert(src, str(tmp_path / 'o'), 'onnx')
  with pytest.raises(ConfigError, match=r'no SAE weights in .*nowhere'):
    weights.convert(str(tmp_path / 'nowhere'), str(tmp_path / 'o'), 'saelens')


def test_the_command_converts_a_hub_id_offline(tmp_path):
  """The real command line, in a fresh process whose environment holds the offline Hub cache."""
  src = str(tmp_path / 'src')
  _source(src)
  write_hub_cache(tmp_path / 'hub', 'org/sae', {'ef4': src})
  env = {'HF_HUB_CACHE': str(tmp_path / 'hub'), 'HF_HUB_OFFLINE': '1'}
  out = str(tmp_path / 'sl')
  args = ['-m', 'jaxsae.convert_weights', '--weights=hf://org/sae/ef4', f'--out={out}']
  r = run_cli([sys.executable, *args, '--format=saelens'], env)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.strip() == f'wrote {os.path.join(out, weights_format.SL_WEIGHTS)}'
  x = np.random.default_rng(1).standard_normal((16, 16)).astype(np.float32)
  np.testing.assert_array_equal(_codes(out, x)[0], _codes(src, x)[0])
  missing = ['--weights=hf://org/sae/ef8', f'--out={tmp_path / "x"}']
  r = run_cli([sys.executable, *args[:2], *missing], env)
  assert r.returncode == 2 and r.stderr.startswith('error: hf://org/sae/ef8: the cached copy')
  assert 'Traceback' not in r.stderr
