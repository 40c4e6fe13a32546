"""Impossible or misspelt configs fail before any compute, naming the key."""

import pytest

from helpers import cli_args, run_cli, tiny_config
from jaxsae import config as config_lib
from jaxsae.config import ConfigError


@pytest.mark.parametrize(
    'overrides, message',
    [
        ({'sae.k': 64}, 'sae.k must satisfy 0 < k < F'),
        ({'sae.group_fractions': (0.5, 0.4)}, 'sum to 1'),
        ({'sae.group_sizes': (10, 20)}, 'sum to F=64'),
        ({'sae.group_weights': (1.0,)}, 'group_weights has 1 entries'),
        ({'optim.warmup_steps': 100}, 'optim.warmup_steps'),
        ({'optim.decay_start': 2}, 'optim.decay_start'),
        ({'data.source': 'store', 'data.store_path': ''}, 'data.store_path is empty'),
    ],
)
def test_invalid_values(overrides, message):
  with pytest.raises(ConfigError, match=message):
    config_lib.validate(tiny_config(**overrides), num_devices=1)


def test_batch_must_divide_over_data_devices():
  with pytest.raises(ConfigError, match='not divisible by the 8 devices'):
    config_lib.validate(tiny_config(**{'data.batch_size': 100}), num_devices=8)
  config_lib.validate(tiny_config(**{'data.batch_size': 64}), num_devices=8)


def test_unknown_key_is_named():
  c = tiny_config()
  c.sae.kk = 3
  with pytest.raises(ConfigError, match=r"unknown config key 'sae.kk'.*Did you mean sae.k"):
    config_lib.validate(c)


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
  from helpers import REPO
  import os

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
