"""Impossible or misspelt configs fail before any compute, naming the key, the value, what is
allowed and the fix."""

import math
import os
import re

import pytest

from helpers import REPO, cli_args, run_cli, tiny_config
from jaxsae import config as config_lib
from jaxsae.config import ConfigError


@pytest.mark.parametrize(
    'overrides, message',
    [
        ({'sae.k': 64}, 'sae.k must satisfy 0 < k < F'),
        ({'sae.group_fractions': (0.5, 0.4)}, 'sum to 1'),
        ({'sae.group_sizes': (10, 20)}, 'sum to F=64'),
        ({'sae.group_sizes': None, 'sae.group_fractions': None}, 'both None'),
        ({'sae.group_weights': (1.0,)}, 'group_weights has 1 entries'),
        ({'sae.group_weights': (0.0,) * 5}, 'are all 0'),
        ({'optim.warmup_steps': 100}, 'optim.warmup_steps'),
        ({'data.source': 'store', 'data.store_path': ''}, 'data.store_path is empty'),
        ({'data.synthetic.n_features': 5}, 'need 6 features but n_features=5'),
        ({'distributed.process_id': 1}, 'below distributed.num_processes=1'),
        ({'export.rows_per_shard': 6}, 'multiple of export.rows_per_chunk'),
        ({'interpret.n_top': 0, 'interpret.n_quantile': 0}, 'explainer needs examples'),
    ],
)
def test_invalid_relations(overrides, message):
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(tiny_config(**overrides), num_devices=1)


# The reproduced cases (each trained to exit 0), and the other ranges and types.
@pytest.mark.parametrize(
    'key, value, allowed',
    [
        ('optim.lr', -1e-3, 'a float > 0, or None'),
        ('sae.threshold_beta', 2.0, r'a float in \[0, 1\)'),
        ('optim.grad_clip', -1.0, 'a float > 0'),
        ('optim.b1', 1.5, r'a float in \[0, 1\)'),
        ('optim.b2', 1.0, r'a float in \[0, 1\)'),
        ('sae.auxk_alpha', -1.0, 'a float >= 0'),
        ('sae.dead_tokens_threshold', -5, 'an int >= 1'),
        ('interpret.batch_size', -3, 'an int >= 1'),
        ('optim.eps', 0.0, 'a float > 0'),
        ('optim.eps', math.nan, 'a float > 0'),
        ('sae.auxk_alpha', math.inf, 'a float >= 0'),
        ('sae.k', 0, 'an int >= 1'),
        ('sae.group_sizes', (32, 0, 32), 'a non-empty tuple of ints >= 1'),
        ('sae.group_fractions', (1.5, -0.5), r'a non-empty tuple of floats in \(0, 1\]'),
        ('sae.kernel', 'fast', "one of 'auto'"),
        ('data.batch_size', 0, 'an int >= 1'),
        ('data.held_out_fraction', 1.0, r'a float in \[0, 1\)'),
        ('data.held_out_fraction', -0.1, r'a float in \[0, 1\)'),
        ('train.eval_tokens', 0, 'an int >= 1'),
        ('train.log_every', 0, 'an int >= 1'),
        ('mesh.data', 0, 'an int >= 1, or -1'),
        ('mesh.model', -1, 'an int >= 1'),
        ('model.layer', -1, 'an int >= 0'),
        ('model.dtype', 'float64', "one of 'float32'"),
        ('export.keep_kinds', ('prompt', 'pixels'), 'a non-empty tuple from'),
        ('export.keep_kinds', (), 'a non-empty tuple from'),
        ('export.batch_size', 0, 'an int >= 1'),
        ('interpret.row_capacity', -1, 'an int >= 1, or 0'),
        ('interpret.llm.timeout_s', 0.0, 'a float > 0'),
        ('interpret.llm.base_url', 'localhost:8000', 'an http:// or https:// URL'),
        ('distributed.coordinator_address', 'host', 'host:port'),
    ],
)
def test_out_of_range_values_name_key_value_allowed_and_fix(key, value, allowed):
  expected = re.escape(f'{key}={value!r} ') + '.*' + re.escape(f'{key} must be ') + allowed
  with pytest.raises(ConfigError, match='^' + expected) as e:
    config_lib.validate(tiny_config(**{key: value}), num_devices=1)
  default = config_lib.config_keys()[key]
  assert f'--config.{key}={config_lib.flag_text(default)} (the default)' in str(e.value)


@pytest.mark.parametrize(
    'key, value, problem',
    [
        ('sae.k', True, 'is a bool'),
        ('train.progress_bar', None, 'cannot be None'),
        ('optim.b1', None, 'cannot be None'),
        ('data.store_path', None, 'cannot be None'),
    ],
)
def test_wrong_types(key, value, problem):
  with pytest.raises(ConfigError, match=re.escape(f'{key}={value!r} {problem}')):
    config_lib.validate(tiny_config(**{key: value}))


def test_every_key_has_a_rule_and_the_defaults_pass():
  """A key added to default_config() without a rule in config.RULES fails here."""
  keys = set(config_lib.config_keys())
  assert not keys - set(config_lib.RULES), 'keys without a rule in config.RULES'
  assert not set(config_lib.RULES) - keys, 'rules for keys default_config() does not have'
  config_lib.validate(config_lib.default_config(), num_devices=1)
  for key, default in config_lib.config_keys().items():
    assert (default is None) <= config_lib.RULES[key].optional, key


def test_a_key_without_a_rule_is_refused(monkeypatch):
  monkeypatch.delitem(config_lib.RULES, 'optim.b1')
  with pytest.raises(ConfigError, match="'optim.b1' has no validation rule"):
    config_lib.validate(tiny_config())


def test_optional_keys_take_none():
  optional = {k for k, r in config_lib.RULES.items() if r.optional}
  assert {'optim.decay_start', 'optim.lr', 'sae.dict_size', 'sae.top_k_aux'} <= optional
  c = tiny_config(**{k: None for k in optional - {'sae.group_fractions'}})
  config_lib.validate(c, num_devices=1)


def test_decay_start_past_the_steps_says_to_set_it_to_none():
  c = config_lib.load_experiment(os.path.join(REPO, 'experiments', 'demo.py'))
  c.train.steps = 60
  with pytest.raises(ConfigError, match=r'got 300 \(warmup 50, steps 60\)') as e:
    config_lib.validate(c)
  assert '--config.optim.decay_start=None (no decay)' in str(e.value)
  c.optim.decay_start = None
  config_lib.validate(c)


def test_section_validators_check_their_keys_only():
  c = tiny_config(**{'optim.b1': 1.5})
  config_lib.validate_export(c)  # the export does not read optim
  config_lib.validate_interpret(c)
  with pytest.raises(ConfigError, match='export.batch_size=0'):
    config_lib.validate_export(tiny_config(**{'export.batch_size': 0}))
  with pytest.raises(ConfigError, match='interpret.batch_size=-3'):
    config_lib.validate_interpret(tiny_config(**{'interpret.batch_size': -3}))


def test_batch_must_divide_over_data_devices():
  with pytest.raises(ConfigError, match='not divisible by the 8 devices'):
    config_lib.validate(tiny_config(**{'data.batch_size': 100}), num_devices=8)
  config_lib.validate(tiny_config(**{'data.batch_size': 64}), num_devices=8)
  with pytest.raises(ConfigError, match='does not use the 8 available devices'):
    config_lib.validate(tiny_config(**{'mesh.data': 3}), num_devices=8)


def test_unknown_key_is_named():
  c = tiny_config()
  c.sae.kk = 3
  with pytest.raises(ConfigError, match=r"unknown config key 'sae.kk'; did you mean 'sae.k'\?"):
    config_lib.validate(c)
  assert "did you mean 'optim.lr'?" in config_lib.unknown_key('lr')  # same leaf, other section


def test_derived_values():
  c = tiny_config(**{'sae.group_fractions': (0.3, 0.3, 0.4)})
  assert config_lib.group_sizes(c) == (19, 19, 26)  # int(f*F), remainder to the last group
  c = config_lib.default_config()
  c.sae.d, c.sae.expansion_factor = 4096, 4
  assert config_lib.learning_rate(c) == pytest.approx(2e-4)  # F = 2^14


@pytest.mark.slow
def test_cli_rejects_unknown_override_and_bad_k_before_training(tmp_path):
  r = run_cli(cli_args('jaxsae.train', workdir=str(tmp_path / 'w'), **{'sae.nope': 1}))
  assert r.returncode != 0 and 'nope' in r.stderr
  r = run_cli(cli_args('jaxsae.train', workdir=str(tmp_path / 'w'), **{'sae.k': 1000}))
  assert r.returncode == 2 and 'sae.k must satisfy 0 < k < F' in r.stderr
  assert not (tmp_path / 'w' / 'checkpoints').exists()


@pytest.mark.slow
def test_paper_configs_stop_clearly_without_the_store(tmp_path):
  for ef, F in ((2, 8192), (4, 16384), (8, 32768)):
    path = os.path.join(REPO, 'experiments', f'maira2_layer15_ef{ef}.py')
    r = run_cli(
        [
            cli_args('jaxsae.train')[0],
            '-m',
            'jaxsae.train',
            f'--config={path}',
            f'--workdir={tmp_path / str(ef)}',
            f'--config.data.store_path={tmp_path / "missing_store"}',
        ]
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert 'activation store not found' in r.stderr and 'export_activations' in r.stderr
  import importlib.util

  spec = importlib.util.spec_from_file_location(
      'ef4', os.path.join(REPO, 'experiments', 'maira2_layer15_ef4.py')
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  assert (c.sae.d, config_lib.dict_size(c), c.model.layer) == (4096, 16384, 15)
