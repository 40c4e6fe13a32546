"""The Python API (jaxsae.api, reached as jaxsae.*): its docstring examples run as written, and
each method computes what the model computes, on numpy and JAX inputs alike, with clear errors."""

import doctest
import io
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import jaxsae
from helpers import REPO, SYNTHETIC, write_hub_cache, write_sae
from jaxsae import api
from jaxsae import weights
from jaxsae.config import ConfigError

D, GROUPS, K = 16, (4, 4, 8, 16, 32), 4
F = sum(GROUPS)


def _run_doctests(names: tuple[str, ...]) -> doctest.TestResults:
  """Run the examples of jaxsae.api's docstrings named `names` ('' = the module's), as
  doctest.testmod would; fail with doctest's own report."""
  finder = doctest.DocTestFinder()
  flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
  runner = doctest.DocTestRunner(optionflags=flags)
  report = io.StringIO()
  found = {t.name.removeprefix('jaxsae.api').lstrip('.'): t for t in finder.find(api)}
  assert set(names) <= set(found), sorted(found)
  for name in names:
    runner.run(found[name], out=report.write)
  results = runner.summarize(verbose=False)
  assert results.failed == 0, report.getvalue()
  return results


def test_the_examples_of_the_sae_class_run_as_written():
  results = _run_doctests(('SAE',))
  assert results.attempted >= 10


@pytest.mark.slow
def test_the_module_example_trains_exports_loads_and_encodes(tmp_path, monkeypatch):
  """The README's example, word for word in jaxsae/api.py's docstring: run from a folder laid out
  as the repository (experiments/synthetic.py), writing its runs/ there."""
  (tmp_path / 'experiments').mkdir()
  shutil.copy(SYNTHETIC, tmp_path / 'experiments' / 'synthetic.py')
  monkeypatch.chdir(tmp_path)
  results = _run_doctests(('',))
  assert results.attempted >= 10
  assert (tmp_path / 'runs' / 'synthetic-sae' / 'ae.safetensors').is_file()


# --------------------------------------------------------------------------------------------------
# Loaded SAEs: the model's own results, both layouts, numpy and JAX inputs
# --------------------------------------------------------------------------------------------------


@pytest.fixture(params=['dictionary_learning', 'saelens'])
def folder(request, tmp_path):
  """An exported SAE (decoder rows of norm 2, threshold 0.3) and its float32 parameters."""
  out = tmp_path / request.param
  params = write_sae(out, request.param, d=D, group_sizes=GROUPS, k=K, row_norm=2.0)
  return str(out), params


def _x(B=64, seed=1):
  return np.random.default_rng(seed).standard_normal((B, D)).astype(np.float32)


def test_what_a_loaded_sae_is(folder):
  path, _ = folder
  sae = jaxsae.load(path)
  assert isinstance(sae, jaxsae.SAE) and sae.source == path
  assert (sae.d, sae.F, sae.k, sae.group_sizes) == (D, F, K, GROUPS)
  assert isinstance(sae.threshold, float) and sae.threshold == pytest.approx(0.3)
  assert isinstance(sae.config, dict) and sae.config == weights.load(path)[1]
  assert repr(sae) == f'SAE(d={D}, F={F}, k={K}, group_sizes={GROUPS}, threshold=0.3)'


def test_encode_decode_reconstruct_are_the_models_own(folder):
  path, _ = folder
  sae, (model, _) = jaxsae.load(path), weights.load(path)
  x = _x()
  for batch_topk in (False, True):
    codes = sae.encode(x, batch_topk=batch_topk)
    want = model.encode(jnp.asarray(x), use_threshold=not batch_topk)
    np.testing.assert_array_equal(np.asarray(codes), np.asarray(want))
    np.testing.assert_array_equal(
        np.asarray(sae.reconstruct(x, batch_topk=batch_topk)), np.asarray(model.decode(want))
    )
  codes = sae.encode(x)
  assert (np.asarray(codes) > 0).any()
  np.testing.assert_array_equal(np.asarray(sae.decode(codes)), np.asarray(model.decode(codes)))
  np.testing.assert_array_equal(np.asarray(sae.reconstruct(x)), np.asarray(model(jnp.asarray(x))))


def test_numpy_jax_lists_and_leading_axes_give_the_same_codes(folder):
  sae = jaxsae.load(folder[0])
  x = _x(B=12)
  want = np.asarray(sae.encode(x))
  for same in (jnp.asarray(x), x.tolist(), x.astype(np.float64)):
    got = sae.encode(same)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), want)
  # [3, 4, d] (studies x tokens) in, [3, 4, F] out; one token [d] in, [F] out.
  np.testing.assert_array_equal(np.asarray(sae.encode(x.reshape(3, 4, D))), want.reshape(3, 4, F))
  np.testing.assert_array_equal(np.asarray(sae.encode(x[5])), want[5])
  assert sae.decode(want.reshape(3, 4, F)).shape == (3, 4, D)
  # BatchTopK's budget is over all the tokens given, whatever their leading shape.
  np.testing.assert_array_equal(
      np.asarray(sae.encode(x.reshape(3, 4, D), batch_topk=True)).reshape(12, F),
      np.asarray(sae.encode(x, batch_topk=True)),
  )


def test_batch_topk_keeps_exactly_b_times_k(folder):
  sae = jaxsae.load(folder[0])
  for B in (1, 7, 64):
    codes = np.asarray(sae.encode(_x(B=B, seed=B), batch_topk=True))
    assert int((codes > 0).sum()) == B * K, B


def _numpy_codes(params, x, threshold):
  pre = np.maximum((x - params['b_dec']) @ params['W_enc'] + params['b_enc'], 0.0)
  return np.where(pre > threshold, pre, 0.0)


@pytest.mark.parametrize('n', [1, 5, F + 10])
def test_top_features_agree_with_numpy(tmp_path, n):
  """Brute force in float64 numpy: rank by total activation, stats over the firing tokens. The
  threshold is high enough that some features never fire: those are left out."""
  params = write_sae(tmp_path, d=D, group_sizes=GROUPS, k=K, threshold=1.5)
  sae, x = jaxsae.load(str(tmp_path)), _x(B=200)
  codes = _numpy_codes({k: v.astype(np.float64) for k, v in params.items()}, x, 1.5)
  fires, total = (codes > 0).sum(0), codes.sum(0)
  assert 0 < (fires > 0).sum() < F
  order = [f for f in np.argsort(-total, kind='stable') if fires[f] > 0][:n]

  top = sae.top_features(x, n=n)
  assert isinstance(top, jaxsae.TopFeatures)
  np.testing.assert_array_equal(top.ids, order)
  np.testing.assert_allclose(top.mean, total[order] / fires[order], rtol=1e-5)
  np.testing.assert_allclose(top.max, codes[:, order].max(0), rtol=1e-5)
  np.testing.assert_allclose(top.firing_fraction, fires[order] / len(x), rtol=1e-6)


def test_top_features_of_batch_topk_codes_fire_b_times_k_in_all(folder):
  sae, x = jaxsae.load(folder[0]), _x(B=32)
  top = sae.top_features(x, n=F, batch_topk=True)
  assert round(float(top.firing_fraction.sum()) * len(x)) == len(x) * K


def test_direction_is_the_unit_decoder_row(folder):
  path, params = folder
  sae = jaxsae.load(path)
  for f in (0, 7, F - 1):
    u = np.asarray(sae.direction(f))
    assert u.shape == (D,)
    np.testing.assert_allclose(u, params['W_dec'][f] / 2.0, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(u), 1.0, rtol=1e-6)


def test_bad_inputs_are_named_with_expected_and_got(folder):
  path, _ = folder
  sae = jaxsae.load(path)
  with pytest.raises(ValueError, match=rf'x has width 17 .*shape \(5, 17\).*{path}.*width d=16'):
    sae.encode(np.zeros((5, D + 1), np.float32))
  with pytest.raises(ValueError, match=r'x has width none \(a scalar\).*d=16'):
    sae.reconstruct(1.0)
  with pytest.raises(ValueError, match=rf'codes has width 16 .*decodes codes of width F={F}'):
    sae.decode(np.zeros((5, D), np.float32))
  with pytest.raises(ValueError, match=r'x has width 8 .*d=16'):
    sae.top_features(np.zeros((5, 8), np.float32))
  with pytest.raises(ValueError, match=r'n=0: top_features needs n >= 1'):
    sae.top_features(_x(), n=0)
  for f in (-1, F):
    with pytest.raises(IndexError, match=rf'feature {f} is out of range: .* 0 to {F - 1}'):
      sae.direction(f)


def test_a_hub_id_loads_from_the_cache_offline(tmp_path, monkeypatch):
  local = tmp_path / 'src' / 'ef2'
  write_sae(local, 'saelens', d=D, group_sizes=GROUPS, k=K, seed=3)
  write_hub_cache(tmp_path / 'hub', 'org/sae', {'ef2': str(local)})
  monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'hub'))
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  sae = jaxsae.load('hf://org/sae/ef2@main')
  assert sae.source == 'hf://org/sae/ef2@main' and sae.d == D
  x = _x()
  np.testing.assert_array_equal(
      np.asarray(sae.encode(x)), np.asarray(jaxsae.load(str(local)).encode(x))
  )
  with pytest.raises(ConfigError, match=r'offline mode'):
    jaxsae.load('hf://org/sae/ef4')


def test_from_params_builds_the_same_sae_as_the_files(folder):
  path, params = folder
  loaded = jaxsae.load(path)
  built = jaxsae.SAE.from_params(params, k=K, threshold=0.3, group_sizes=GROUPS)
  x = _x()
  for batch_topk in (False, True):
    np.testing.assert_array_equal(
        np.asarray(built.encode(x, batch_topk=batch_topk)),
        np.asarray(loaded.encode(x, batch_topk=batch_topk)),
    )
  assert built.config == {} and built.group_sizes == GROUPS
  assert jaxsae.SAE.from_params(params, k=K, threshold=0.3).group_sizes == (F,)


# --------------------------------------------------------------------------------------------------
# The package face and configs
# --------------------------------------------------------------------------------------------------


def test_import_jaxsae_loads_no_jax_until_the_api_is_used(tmp_path):
  write_sae(tmp_path, d=D, group_sizes=GROUPS, k=K)
  code = (
      'import sys, jaxsae\n'
      "assert not {'jax', 'torch', 'jaxsae.api'} & set(sys.modules), sorted(sys.modules)\n"
      "assert {'SAE', 'TopFeatures', 'load', 'make_config', 'train', 'export'} <= set(dir(jaxsae))\n"
      'try:\n  jaxsae.no_such_thing\nexcept AttributeError as e:\n  print(e)\n'
      'from jaxsae import config\n'  # submodules still import as before
      f'print(jaxsae.load({str(tmp_path)!r}).d)\n'
      "assert 'jax' in sys.modules and 'torch' not in sys.modules\n"
  )
  env = {**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu'}
  r = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.split('\n')[:2] == ["module 'jaxsae' has no attribute 'no_such_thing'", str(D)]


def test_make_config_applies_overrides_to_a_copy():
  c = jaxsae.make_config(SYNTHETIC)
  got = jaxsae.make_config(SYNTHETIC, {'train.steps': 7, 'optim.decay_start': None})
  assert (got.train.steps, got.optim.decay_start, got.sae.d) == (7, None, c.sae.d)
  base = jaxsae.make_config(SYNTHETIC)
  again = jaxsae.make_config(base, {'sae.k': 3})
  assert (again.sae.k, base.sae.k) == (3, c.sae.k)  # the ConfigDict given is left as it was


def test_make_config_reads_an_experiment_argument(tmp_path):
  path = tmp_path / 'exp.py'
  path.write_text(
      'from jaxsae.config import default_config\n\n\n'
      'def get_config(arg=None):\n'
      '  c = default_config()\n'
      '  c.sae.k = int(arg) if arg else 5\n'
      '  return c\n'
  )
  assert jaxsae.make_config(f'{path}:9').sae.k == 9
  assert jaxsae.make_config(str(path)).sae.k == 5


def test_bad_configs_and_overrides_fail_before_any_work(tmp_path):
  with pytest.raises(
      ConfigError, match=r"unknown config key 'sae.kk' in overrides; did you mean 'sae.k'"
  ):
    jaxsae.train(SYNTHETIC, str(tmp_path / 'run'), {'sae.kk': 3})
  with pytest.raises(ConfigError, match=r"overrides\['train.steps'\]='many' does not fit the key"):
    jaxsae.make_config(SYNTHETIC, {'train.steps': 'many'})
  with pytest.raises(ConfigError, match=r'no experiment file at .*nowhere.py'):
    jaxsae.train(str(tmp_path / 'nowhere.py'), str(tmp_path / 'run'))
  with pytest.raises(TypeError, match=r'config is a dict; pass the path of an experiment file'):
    jaxsae.make_config({'sae': {}})
  assert not (tmp_path / 'run').exists()


def test_export_without_a_checkpoint_says_to_train_first(tmp_path):
  with pytest.raises(ConfigError, match=r'no checkpoint in .*train first'):
    jaxsae.export(str(tmp_path / 'empty'), str(tmp_path / 'out'))
