"""Weights & Biases logging (jaxsae/wandb_log.py), for real in offline mode: what the trainer logs
is read back from the run's own `.wandb` file and compared with metrics.jsonl."""

import glob
import json
import os
import re
import struct
import sys
import time
import zlib

import pytest

from helpers import tiny_config
from jaxsae import config as config_lib
from jaxsae import trainer, wandb_log
from jaxsae.config import ConfigError


@pytest.fixture
def offline(tmp_path, monkeypatch):
  """No network and nothing written outside tmp_path: W&B's own directories point into it."""
  monkeypatch.setenv('WANDB_MODE', 'offline')
  monkeypatch.setenv('WANDB_SILENT', 'true')
  monkeypatch.delenv('WANDB_API_KEY', raising=False)
  for var in ('WANDB_DIR', 'WANDB_CACHE_DIR', 'WANDB_CONFIG_DIR', 'WANDB_DATA_DIR'):
    path = tmp_path / 'wandb-env' / var.lower()
    path.mkdir(parents=True)
    monkeypatch.setenv(var, str(path))


def read_records(path):
  """The protobuf records of a `.wandb` file: a 7-byte header (':W&B', magic 0xBEE1, version 0),
  then LevelDB-log framing (32 KiB blocks; each chunk a CRC-32 seeded with its type byte, a length
  and a type: full, first, middle, last), every checksum verified."""
  from wandb.proto import wandb_internal_pb2

  data = open(path, 'rb').read()
  assert struct.unpack('<4sHB', data[:7]) == (b':W&B', 0xBEE1, 0), data[:7]
  block, pos, records, pending = 32768, 7, [], b''
  while pos + 7 <= len(data):
    left = block - pos % block
    if left < 7:  # a block's tail too short for a chunk header is padding
      pos += left
      continue
    crc, length, kind = struct.unpack('<IHB', data[pos : pos + 7])
    chunk = data[pos + 7 : pos + 7 + length]
    assert kind in (1, 2, 3, 4) and len(chunk) == length, (path, pos, kind)
    assert crc == zlib.crc32(chunk, zlib.crc32(bytes([kind]))), (path, pos)
    pos += 7 + length
    pending = chunk if kind in (1, 2) else pending + chunk
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      records.append(record)
  return records


def _items(items):
  return {item.key or '/'.join(item.nested_key): json.loads(item.value_json) for item in items}


def finished_records(path, timeout=120.0):
  """The records once the file ends with the run's `exit` record: W&B's service process writes
  the file, and on a busy machine may still be flushing it when `finish()` has returned."""
  deadline, kinds = time.monotonic() + timeout, []
  while True:
    try:
      records = read_records(path)
      kinds = [r.WhichOneof('record_type') for r in records]
      if 'exit' in kinds:
        return records
    except AssertionError:  # a chunk still being written
      pass
    assert time.monotonic() < deadline, f'{path}: no exit record after {timeout} s: {kinds}'
    time.sleep(0.5)


def offline_run(run_dir):
  """history rows, the last summary, the run record and the config of one offline-run-* folder."""
  (path,) = glob.glob(os.path.join(run_dir, 'run-*.wandb'))
  history, summary, run = [], {}, None
  for record in finished_records(path):
    kind = record.WhichOneof('record_type')
    if kind == 'history':
      history.append(_items(record.history.item))
    elif kind == 'summary':
      summary.update(_items(record.summary.update))
    elif kind == 'run':
      run = record.run
  return history, summary, run, _items(run.config.update)


def wandb_config(steps, **overrides):
  return tiny_config(
      **{
          'train.steps': steps,
          'train.checkpoint_every': 10,
          'train.log_every': 5,
          'optim.decay_start': None,
          'train.async_checkpointing': False,
          'train.wandb.project': 'jaxsae-test',
          'train.wandb.mode': 'offline',
          **overrides,
      }
  )


def run_dirs(workdir):
  return sorted(glob.glob(os.path.join(workdir, 'wandb', 'offline-run-*')))


@pytest.mark.slow
def test_offline_run_logs_metrics_config_figure_and_summary_and_resumes_the_same_run(
    tmp_path, offline
):
  workdir = str(tmp_path / 'run')
  first = trainer.train_and_evaluate(wandb_config(20), workdir)
  run_id = open(os.path.join(workdir, wandb_log.ID_FILE)).read().strip()
  (run_dir,) = run_dirs(workdir)
  assert run_dir.endswith('-' + run_id)
  history, summary, run, config = offline_run(run_dir)
  assert (run.run_id, run.project, run.display_name) == (run_id, 'jaxsae-test', 'run')
  assert config['train']['wandb']['project'] == 'jaxsae-test'
  assert config['sae']['k'] == 4

  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  scalars = [h for h in history if 'train/loss' in h]
  assert [h['train/step'] for h in scalars] == [r['step'] for r in rows] == [5, 10, 15, 20]
  for h, r in zip(scalars, rows):
    for key in ('loss', 'l2_loss', 'l0', 'threshold', 'lr', 'grad_norm', 'fvu/prefix_64'):
      assert h[f'train/{key}'] == r[key], (key, h, r)
  # The figure at the final step, its PNG in the run's files; the summary's scalars.
  # (W&B's records spell a nested value as one item per leaf: 'training_summary/path', ...)
  (figure,) = [h for h in history if 'training_summary/path' in h]
  assert figure['train/step'] == 20 and figure['training_summary/_type'] == 'image-file'
  assert os.path.getsize(os.path.join(run_dir, 'files', figure['training_summary/path'])) > 10_000
  assert summary['summary/eval_fvu'] == pytest.approx(first['eval_fvu'])
  assert summary['summary/mmcs'] == pytest.approx(first['mmcs'])
  assert summary['summary/step'] == 20 and 'summary/plot' not in summary

  # A rerun with more steps resumes the checkpoint and the same W&B run; its history goes on.
  trainer.train_and_evaluate(wandb_config(40), workdir)
  assert open(os.path.join(workdir, wandb_log.ID_FILE)).read().strip() == run_id
  dirs = run_dirs(workdir)
  assert len(dirs) == 2 and all(d.endswith('-' + run_id) for d in dirs)
  (later,) = [d for d in dirs if d != run_dir]
  history, summary, run, _ = offline_run(later)
  assert run.run_id == run_id
  rows = [json.loads(l) for l in open(os.path.join(workdir, 'metrics.jsonl'))]
  scalars = [h for h in history if 'train/loss' in h]
  assert [h['train/step'] for h in scalars] == [r['step'] for r in rows if r['step'] > 20]
  assert [h['train/step'] for h in scalars] == [25, 30, 35, 40]
  assert [h['train/loss'] for h in scalars] == [r['loss'] for r in rows if r['step'] > 20]
  steps = [h['_step'] for h in history]  # W&B's own step only counts log calls: never refused
  assert steps == sorted(set(steps))
  assert summary['summary/step'] == 40


def test_off_unless_a_project_is_named_and_only_on_the_primary(tmp_path):
  assert isinstance(wandb_log.open_run(tiny_config(), str(tmp_path), True), wandb_log.NullRun)
  c = wandb_config(20)
  assert isinstance(wandb_log.open_run(c, str(tmp_path), False), wandb_log.NullRun)
  assert not os.listdir(tmp_path)


def test_a_missing_wandb_package_says_how_to_install_it(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'wandb', None)  # `import wandb` raises ImportError
  with pytest.raises(ConfigError, match=re.escape("pip install 'jaxsae[wandb]'")) as e:
    wandb_log.open_run(wandb_config(20), str(tmp_path), True)
  assert "train.wandb.project='jaxsae-test'" in str(e.value)
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize(
    'key, value, allowed',
    [
        ('train.wandb.mode', 'ofline', "one of '', 'online', 'offline', 'disabled'"),
        ('train.wandb.project', 'team/project', 'a W&B project name'),
        ('train.wandb.entity', 'my team', 'a W&B user or team name'),
    ],
)
def test_bad_wandb_settings_are_refused_by_validation(key, value, allowed):
  c = tiny_config(**{'train.wandb.project': 'p', key: value})
  with pytest.raises(ConfigError, match=re.escape(f'{key}={value!r} ')) as e:
    config_lib.validate(c, num_devices=1)
  assert allowed in str(e.value) and f'--config.{key}=' in str(e.value)
