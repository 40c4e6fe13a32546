"""The training program end to end: outputs, recovery of planted features, bad data, checkpoints."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import PLANTED, cli_args, run_cli, tiny_config
from jaxsae import data, trainer, weights
from jaxsae.config import ConfigError


@pytest.mark.slow
def test_cli_run_writes_metrics_tensorboard_plot_and_summary(tmp_path):
  workdir = tmp_path / 'run'
  r = run_cli(cli_args('jaxsae.train', workdir=str(workdir), **{'sae.k': 3}))
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(l) for l in open(workdir / 'metrics.jsonl')]
  assert [row['step'] for row in rows] == [10, 20, 30, 40]
  for key in (
      'loss',
      'fvu/prefix_64',
      'l0',
      'auxk_dead_fraction',
      'threshold',
      'lr',
      'grad_norm',
      'tokens_per_s',
  ):
    assert np.isfinite(rows[-1][key]), key
  assert rows[-1]['l0'] == pytest.approx(3.0)  # BatchTopK keeps exactly B*k
  assert 'dead_fraction' not in rows[-1]  # AuxK's counters say auxk_: "dead" is held-out only
  assert rows[-1]['threshold'] > 0 and rows[0]['threshold'] == -1  # EMA starts at step 10
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

  events = EventAccumulator(str(workdir / 'tensorboard'))
  events.Reload()
  assert [e.step for e in events.Scalars('loss')] == [10, 20, 30, 40]
  assert (workdir / 'training_summary.png').stat().st_size > 10_000
  summary = json.load(open(workdir / 'summary.json'))
  assert summary['step'] == 40 and 0 <= summary['mmcs'] <= 1
  # Held-out figures: train.eval_tokens fresh tokens, N stated beside the dead count.
  assert summary['eval_tokens'] == summary['dead_over_tokens'] == 65536
  assert 'generated batches 2147483648' in summary['eval_on'] and np.isfinite(summary['eval_fvu'])
  assert summary['dead_latents'] == round(summary['dead_fraction'] * 64)
  assert sorted(int(s) for s in os.listdir(workdir / 'checkpoints')) == [30, 35, 40]  # keep 3


@pytest.mark.slow
def test_recovers_planted_features():
  """An easy planted dictionary is found: most true features have a decoder row at cos > 0.9."""
  c = tiny_config(
      **{
          **PLANTED,
          'train.steps': 600,
          'optim.decay_start': 500,
          'train.checkpoint_every': 600,
          'train.log_every': 100,
      }
  )
  import tempfile

  with tempfile.TemporaryDirectory() as workdir:
    summary = trainer.train_and_evaluate(c, workdir)
  assert summary['mmcs'] > 0.9, summary
  assert summary['frac_recovered_0.9'] > 0.8, summary


class _PoisonedSource:
  """The synthetic source with NaN in one batch."""

  def __init__(self, inner, bad_index):
    self.inner, self.bad = inner, bad_index
    self.d, self.batch_size = inner.d, inner.batch_size
    self.scale = self.features = None  # the optional members of data.ActivationSource: unused
    self.held_out_rows, self.held_out_note, self.held_out = (
        None,
        inner.held_out_note,
        inner.held_out,
    )

  def iterator(self):
    return None  # the plain in-order pipeline over `batch`, which holds the NaN

  def batch(self, index):
    x = self.inner.batch(index)
    return x.at[3, 2].set(jnp.nan) if index == self.bad else x


def _poison(monkeypatch, bad_index):
  real = data.open_source
  monkeypatch.setattr(data, 'open_source', lambda c: _PoisonedSource(real(c), bad_index))


@pytest.mark.slow
def test_nonfinite_batch_stops_naming_step_and_checkpoint(tmp_path, monkeypatch):
  _poison(monkeypatch, bad_index=17)
  with pytest.raises(trainer.NonFiniteError, match=r'at step 17.*checkpoint before it is step 15'):
    trainer.train_and_evaluate(tiny_config(), str(tmp_path))
  _, state, _, _ = weights.load_checkpoint(str(tmp_path))
  assert np.all(np.isfinite(np.asarray(state['params']['W_enc'])))  # nothing bad was saved


@pytest.mark.slow
def test_skip_nonfinite_counts_and_continues(tmp_path, monkeypatch):
  _poison(monkeypatch, bad_index=17)
  summary = trainer.train_and_evaluate(tiny_config(**{'train.skip_nonfinite': True}), str(tmp_path))
  assert summary['step'] == 40
  rows = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert rows[-1]['nonfinite_batches'] == 1 and np.isfinite(rows[-1]['loss'])


def test_data_width_mismatch_fails_before_compute(tmp_path, monkeypatch):
  real = data.open_source
  monkeypatch.setattr(
      data.synthetic.SyntheticSource,
      'from_config',
      classmethod(lambda cls, c: cls(24, 64, 32, 3.0, 1.0, 0, 2, 0.0, 0)),
  )
  with pytest.raises(ConfigError, match='width d=24 but the config says sae.d=16'):
    real(tiny_config())
  del real


@pytest.mark.slow
def test_corrupt_latest_checkpoint_falls_back_with_warning(tmp_path, caplog):
  c = tiny_config()
  trainer.train_and_evaluate(c, str(tmp_path))
  # Damage every data file of the newest checkpoint (step 40).
  for root, _, files in os.walk(tmp_path / 'checkpoints' / '40' / 'state'):
    for f in files:
      with open(os.path.join(root, f), 'wb') as fh:
        fh.write(b'garbage')
  summary = trainer.train_and_evaluate(c, str(tmp_path))
  assert 'step 40' in caplog.text and 'corrupt' in caplog.text
  assert summary['step'] == 40  # resumed from 35, retrained 5 steps
  assert os.listdir(tmp_path / 'checkpoints_unreadable')  # moved aside, not deleted


@pytest.mark.slow
def test_incompatible_checkpoint_is_refused_and_kept(tmp_path):
  trainer.train_and_evaluate(tiny_config(), str(tmp_path))
  before = sorted(os.listdir(tmp_path / 'checkpoints'))
  with pytest.raises(ConfigError, match=r'incompatible config \(F: checkpoint 64, config 128'):
    trainer.train_and_evaluate(tiny_config(**{'sae.expansion_factor': 8}), str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == before
