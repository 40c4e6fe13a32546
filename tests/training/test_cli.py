"""The commands' shared command line (jaxsae/cli.py): config-flag typos, None for optional keys,
finite --alpha, and one error line instead of a traceback."""

import os
import sys

import pytest
from absl import flags

from helpers import REPO, cli_args, run_cli, tiny_config
from jaxsae import cli
from jaxsae.config import ConfigError

DEMO = os.path.join(REPO, 'experiments', 'demo.py')


def test_a_flag_typo_gets_did_you_mean():
  with pytest.raises(
      ConfigError, match=r"'optim.lrr' \(from --config.optim.lrr=1\); did you mean 'optim.lr'\?"
  ):
    cli.prepare_overrides(['prog', '--config=x.py', '--config.optim.lrr=1'])
  with pytest.raises(ConfigError, match="unknown config key 'sae.kk'"):
    cli.prepare_overrides(['prog', '--config=x.py', '--config.sae.kk', '3'])
  with pytest.raises(ConfigError, match='--no applies to True/False keys only'):
    cli.prepare_overrides(['prog', '--noconfig.sae.k'])


def test_none_is_taken_out_for_optional_keys_and_the_last_override_wins():
  argv = ['prog', '--config=x.py', '--config.optim.decay_start=None', '--config.train.steps=60']
  o = cli.prepare_overrides(argv)
  assert o.argv == ['prog', '--config=x.py', '--config.train.steps=60']
  assert o.none_keys == ['optim.decay_start']
  o = cli.prepare_overrides(
      argv[:2] + ['--config.optim.decay_start=None', '--config.optim.decay_start=7']
  )
  assert (o.argv[2:], o.none_keys) == (['--config.optim.decay_start=7'], [])
  o = cli.prepare_overrides(
      argv[:2] + ['--config.sae.group_sizes', 'None', '--config.optim.lr=none']
  )
  assert (o.argv[2:], o.none_keys) == ([], ['sae.group_sizes', 'optim.lr'])
  o = cli.prepare_overrides(argv[:2] + ['--config.model.name=None', '--config.optim=x', '--', 'a'])
  assert o.argv[2:] == ['--config.model.name=None', '--config.optim=x', '--', 'a']  # a str key
  with pytest.raises(ConfigError, match=r'optim.b1 cannot be None: it must be a float in \[0, 1\)'):
    cli.prepare_overrides(argv[:2] + ['--config.optim.b1=None'])


def test_set_none_on_a_locked_config():
  c = tiny_config()
  c.lock()
  cli.set_none(c, ['optim.decay_start', 'sae.group_weights'])
  assert c.optim.decay_start is None and c.sae.group_weights is None


def test_alpha_refuses_nan_and_inf():
  parser = cli.FloatListParser()
  assert parser.parse('0,2.5,-1e1') == [0.0, 2.5, -10.0]
  for bad in ('nan', '0,inf', '-inf', 'x'):
    with pytest.raises(ValueError, match='not a (finite )?number'):
      parser.parse(bad)
  fv = flags.FlagValues()
  cli.define_float_list('alpha', None, 'strengths', flag_values=fv)
  cli.define_int_list('feature', None, 'latents', flag_values=fv)
  with pytest.raises(flags.IllegalFlagValueError, match=r"--alpha=1,nan: 'nan' is not a finite"):
    fv(['prog', '--alpha=1,nan'])
  fv(['prog', '--alpha=1,4', '--feature=3,12'])
  assert (fv.alpha, fv.feature) == ([1.0, 4.0], [3, 12])


def _train(workdir, *flags_):
  return run_cli(
      [sys.executable, '-m', 'jaxsae.train', f'--config={DEMO}', f'--workdir={workdir}', *flags_]
  )


@pytest.mark.slow
def test_train_flag_typo_is_one_error_line(tmp_path):
  r = run_cli(cli_args('jaxsae.train', workdir=str(tmp_path / 'w'), **{'optim.lrr': 1}))
  assert r.returncode == 2
  assert r.stderr.startswith("error: unknown config key 'optim.lrr'")
  assert "did you mean 'optim.lr'?" in r.stderr and len(r.stderr.strip().splitlines()) == 1
  assert not (tmp_path / 'w').exists()


@pytest.mark.slow
def test_train_steps_on_the_demo_config_with_decay_start_none(tmp_path):
  store = f'--config.data.store_path={tmp_path / "no_store"}'
  r = _train(tmp_path / 'w', '--config.train.steps=60', store)
  assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
  assert 'decay_start' in r.stderr and '--config.optim.decay_start=None (no decay)' in r.stderr
  # With decay_start=None the config is valid: training gets as far as opening the store.
  r = _train(tmp_path / 'w', '--config.train.steps=60', '--config.optim.decay_start=None', store)
  assert r.returncode == 2 and 'activation store not found' in r.stderr, r.stderr[-2000:]
