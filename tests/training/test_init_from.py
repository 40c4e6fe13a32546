"""train.init_from: a run starts at an exported or released SAE (a folder or an hf:// id), its
biases and threshold unfolded by the run's own activation scale; a misfit is refused before any
work; once the workdir has a checkpoint, the checkpoint wins."""

import json
import logging
import os

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers import HUB_COMMIT, tiny_config, write_hub_cache, write_sae
from jaxsae import data, model, train_step, trainer, weights
from jaxsae.config import ConfigError
from jaxsae.data import synthetic
from jaxsae.formats import weights as weights_format

# Two steps, the first at learning rate 0 (warmup from 0): the checkpoint after step 1 holds the
# initial parameters, and step 1's logged loss is the initial SAE's loss on the first batch.
OVERRIDES = {
    'train.steps': 2,
    'optim.warmup_steps': 1,
    'optim.decay_start': None,
    'train.log_every': 1,
    'train.checkpoint_every': 1,
    'train.keep_checkpoints': 5,
    'sae.threshold_start_step': 10,  # the loaded threshold is kept as it is
}
GROUPS = (4, 4, 8, 16, 32)  # tiny_config's: F = 64 from the default fractions


def _config(**overrides):
  return tiny_config(**{**OVERRIDES, **overrides})


def _step1(workdir):
  _, state, meta, _ = weights.load_checkpoint(str(workdir), step=1)
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  return state, meta, next(r for r in rows if r['step'] == 1)


def _no_data(c):
  raise AssertionError('the data was opened before the SAE was checked')


@pytest.fixture
def hub_sae(tmp_path, monkeypatch):
  """A raw-activation SAE in dictionary_learning's layout, offered as an hf:// id from a
  pre-filled, offline Hub cache; returns (id, its parameters, its threshold)."""
  raw = write_sae(tmp_path / 'src', group_sizes=GROUPS, threshold=0.7, seed=3)
  write_hub_cache(tmp_path / 'hub', 'org/sae', {'ef4': str(tmp_path / 'src')})
  monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'hub'))
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  return 'hf://org/sae/ef4', raw, 0.7


@pytest.mark.slow
def test_training_starts_at_the_sae_unfolded_by_the_runs_scale(tmp_path, hub_sae):
  spec, raw, raw_threshold = hub_sae
  c = _config(**{'train.init_from': spec})
  trainer.train_and_evaluate(c, str(tmp_path / 'run'))
  state, meta, logged = _step1(tmp_path / 'run')
  scale = meta['scale']
  assert scale != pytest.approx(1.0)  # the unfolding is really exercised
  want, want_threshold = weights.unfold_scale(raw, raw_threshold, scale)
  for name, value in want.items():  # lr 0 in step 1: only the decoder renormalisation (~1e-7)
    np.testing.assert_allclose(state['params'][name], value, rtol=1e-6, atol=1e-7, err_msg=name)
  assert float(state['threshold']) == pytest.approx(want_threshold, rel=1e-6)
  # The first step's loss is the SAE's own loss on the first batch (scaled as training sees it).
  first = synthetic.SyntheticSource.from_config(c).batch(0) / scale
  loss, _ = model.loss_fn(
      {n: jnp.asarray(v) for n, v in want.items()},
      jnp.asarray(first),
      jnp.zeros(64, jnp.int32),
      train_step.StepConfig.from_config(c),
  )
  assert logged['loss'] == pytest.approx(float(loss), rel=1e-5)
  record = meta['init_from']
  assert (record['from'], record['commit'], record['layout']) == (
      spec,
      HUB_COMMIT,
      'dictionary_learning',
  )
  assert record['unfolded_by_scale'] == scale and record['threshold'] == pytest.approx(0.7)
  assert record['renormalised_rows'] == 0 and record['group_sizes'] == list(GROUPS)


@pytest.mark.slow
def test_an_export_continues_where_its_run_stopped(tmp_path):
  """Export -> init_from on the same data: the same scale, so the parameters come back as they
  were in the checkpoint (folded, then unfolded)."""
  c = _config(**{'train.steps': 12, 'sae.threshold_start_step': 2})
  trainer.train_and_evaluate(c, str(tmp_path / 'a'))
  weights.export(str(tmp_path / 'a'), str(tmp_path / 'w'), 'saelens')
  _, before, _, _ = weights.load_checkpoint(str(tmp_path / 'a'))
  c = _config(**{'train.init_from': str(tmp_path / 'w')})
  trainer.train_and_evaluate(c, str(tmp_path / 'b'))
  after, meta, _ = _step1(tmp_path / 'b')
  for name in before['params']:
    np.testing.assert_allclose(
        after['params'][name], before['params'][name], rtol=1e-5, atol=1e-6, err_msg=name
    )
  assert float(after['threshold']) == pytest.approx(float(before['threshold']), rel=1e-5)
  assert meta['init_from']['from'] == str(tmp_path / 'w') and meta['init_from']['commit'] is None


@pytest.mark.parametrize(
    'overrides, message',
    [
        (
            {'sae.expansion_factor': 8},
            r'ae.safetensors: the SAE of --config.train.init_from=.*src does not fit the config: '
            r'F \(dictionary size\) expected 128 \(the config\), got 64; group_sizes expected '
            r'\[8, 8, 16, 32, 64\] \(the config\), got \[4, 4, 8, 16, 32\]\. To continue training '
            r'it, pass --config.sae.dict_size=64 --config.sae.group_sizes="\(4, 4, 8, 16, 32\)"; '
            r'or train from scratch with --config.train.init_from=""',
        ),
        (
            {'sae.k': 8},
            r'k \(BatchTopK budget\) expected 8 \(the config\), got 4\. .*--config.sae.k=4',
        ),
        (
            {'sae.d': 32, 'data.synthetic.n_features': 64},
            r'd \(activation width\) expected 32 \(the config\), got 16; F .*expected 128.*'
            r'--config.sae.d=16 --config.sae.dict_size=64.*\(and activations of width 16\)',
        ),
        (
            {'sae.group_sizes': (32, 32)},
            r'group_sizes expected \[32, 32\] \(the config\), got \[4, 4, 8, 16, 32\]',
        ),
    ],
    ids=['F', 'k', 'd', 'groups'],
)
def test_a_misfit_is_refused_before_any_work(tmp_path, monkeypatch, overrides, message):
  write_sae(tmp_path / 'src', group_sizes=GROUPS)
  monkeypatch.setattr(data, 'open_source', _no_data)
  c = _config(**{'train.init_from': str(tmp_path / 'src'), **overrides})
  with pytest.raises(ConfigError, match=message):
    trainer.train_and_evaluate(c, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'metrics.jsonl')


def test_a_missing_init_from_is_named_before_any_work(tmp_path, monkeypatch):
  monkeypatch.setattr(data, 'open_source', _no_data)
  c = _config(**{'train.init_from': str(tmp_path / 'nowhere')})
  with pytest.raises(ConfigError, match=r'no SAE weights in .*nowhere'):
    trainer.train_and_evaluate(c, str(tmp_path / 'run'))
  monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'hub'))
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  c = _config(**{'train.init_from': 'hf://org/sae/ef4'})
  with pytest.raises(ConfigError, match=r'hf://org/sae/ef4: org/sae \(folder ef4\) is not in'):
    trainer.train_and_evaluate(c, str(tmp_path / 'run'))


@pytest.mark.slow
def test_a_checkpoint_wins_over_init_from(tmp_path, hub_sae, caplog):
  """Resuming a run that began from init_from reads its checkpoint: init_from is not read (here
  it names nothing), the record of where the run began is kept, and the run ends as one that was
  never interrupted."""
  spec, _, _ = hub_sae
  workdir = str(tmp_path / 'run')
  trainer.train_and_evaluate(_config(**{'train.init_from': spec}), workdir)
  caplog.set_level(logging.INFO, logger='jaxsae')
  resumed = _config(**{'train.init_from': str(tmp_path / 'nowhere'), 'train.steps': 4})
  assert trainer.train_and_evaluate(resumed, workdir)['step'] == 4
  assert 'resumed from' in caplog.text
  assert 'not read: the run continues from its checkpoint' in caplog.text
  _, a, meta, _ = weights.load_checkpoint(workdir)
  assert meta['init_from']['from'] == spec
  straight = str(tmp_path / 'straight')
  trainer.train_and_evaluate(_config(**{'train.init_from': spec, 'train.steps': 4}), straight)
  _, b, _, _ = weights.load_checkpoint(straight)
  for name in a['params']:
    np.testing.assert_array_equal(a['params'][name], b['params'][name], err_msg=name)


def test_rows_off_unit_norm_are_renormalised_keeping_the_reconstruction(tmp_path, caplog):
  raw = write_sae(tmp_path / 'src', group_sizes=GROUPS, row_norm=2.5, threshold=-1.0)
  w, location = weights.read_for_init(_config(), str(tmp_path / 'src'))
  with caplog.at_level(logging.WARNING, logger='jaxsae'):
    params, threshold, record = weights.initial_params(w, location, 2.0)
  assert '64 of 64 decoder rows were not unit norm (norms 2.5 to 2.5); renormalised' in caplog.text
  np.testing.assert_allclose(np.linalg.norm(params['W_dec'], axis=1), 1.0, rtol=1e-6)
  assert threshold == -1.0 and record['renormalised_rows'] == 64
  unfolded, _ = weights.unfold_scale(raw, -1.0, 2.0)
  x = np.random.default_rng(0).standard_normal((32, 16)).astype(np.float32)

  def reconstruct(p):
    pre = np.maximum((x - p['b_dec']) @ p['W_enc'] + p['b_enc'], 0)
    return pre @ p['W_dec'] + p['b_dec']

  np.testing.assert_allclose(reconstruct(params), reconstruct(unfolded), rtol=1e-5, atol=1e-5)


def test_a_per_latent_threshold_is_learned_again(tmp_path, caplog):
  raw = write_sae(tmp_path / 'src', layout='saelens', group_sizes=GROUPS)
  folder = str(tmp_path / 'src')
  t = load_file(os.path.join(folder, weights_format.SL_WEIGHTS))
  t['threshold'] = np.linspace(0.1, 0.5, 64, dtype=np.float32)
  cfg = json.load(open(os.path.join(folder, weights_format.SL_CONFIG)))
  weights_format.write_files(folder, weights_format.SL_WEIGHTS, t, weights_format.SL_CONFIG, cfg)
  w, location = weights.read_for_init(_config(), folder)
  with caplog.at_level(logging.WARNING, logger='jaxsae'):
    params, threshold, _ = weights.initial_params(w, location, 1.0)
  assert threshold == -1.0 and 'threshold per latent' in caplog.text
  np.testing.assert_array_equal(params['b_dec'], raw['b_dec'])


def test_unfold_undoes_fold():
  rng = np.random.default_rng(0)
  shapes = {'W_enc': (8, 24), 'b_enc': (24,), 'W_dec': (24, 8), 'b_dec': (8,)}
  p = {n: rng.standard_normal(s).astype(np.float32) for n, s in shapes.items()}
  for theta in (0.4, -1.0):
    back, t = weights.unfold_scale(*weights.fold_scale(p, theta, 3.0), 3.0)
    assert t == pytest.approx(theta)
    for name in p:
      np.testing.assert_allclose(back[name], p[name], rtol=1e-6, err_msg=name)


@pytest.mark.slow
def test_the_reference_librarys_own_release_starts_a_run(tmp_path):
  """dictionary_learning's ae.pt + config.json (tests/fixtures/dictionary_learning_release,
  written by the reference library) initialises training: step 1 holds its parameters, unfolded."""
  fixture = os.path.join(
      os.path.dirname(os.path.dirname(__file__)), 'fixtures', 'dictionary_learning_release'
  )
  c = _config(**{'train.init_from': fixture, 'sae.group_sizes': (8, 8, 16, 32)})
  trainer.train_and_evaluate(c, str(tmp_path / 'run'))
  state, meta, _ = _step1(tmp_path / 'run')
  w = weights_format.read(fixture)
  want, want_threshold = weights.unfold_scale(w.params, float(w.threshold), meta['scale'])
  for name, value in want.items():
    np.testing.assert_allclose(state['params'][name], value, rtol=1e-5, atol=1e-6, err_msg=name)
  assert float(state['threshold']) == pytest.approx(want_threshold, rel=1e-6)
  assert meta['init_from']['layout'] == 'dictionary_learning'
