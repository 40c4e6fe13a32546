"""A checkpoint save that fills the disk keeps the previous checkpoint and stops with one line; a
checkpoint remembers the data it was trained on: resuming on other data is refused (unless asked),
and a store that only grew is recognised and said so."""

import logging
import os
import shutil

import jax
import numpy as np
import pytest

from helpers import cli_args, fill_disk, run_cli, small_disk, tiny_config, write_store
from jaxsae import checkpointing, trainer, weights
from jaxsae.config import ConfigError
from jaxsae.formats import store as store_lib

# --------------------------------------------------------------------------------------------------
# A full disk during a checkpoint save
# --------------------------------------------------------------------------------------------------


def _state(n, value):
  return {'w': np.full(n, value, np.float32), 'step': np.int32(value)}


def _raise_disk_full(*args, **kwargs):
  """What Orbax raises when a write runs out of space, as it chains it (the errno underneath)."""
  try:
    raise OSError(28, 'No space left on device')
  except OSError as e:
    raise ValueError('Failed to write checkpoint item') from e


# After a failed asynchronous save, TensorStore may still complete callbacks onto the closed event
# loop of Orbax's worker thread: Orbax's noise at garbage collection, not a failure of the save.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('async_save', [True, False], ids=['async', 'sync'])
def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(
    tmp_path, monkeypatch, async_save, faults
):
  """On a real 1 MiB folder (a tmpfs) where the machine allows mounting, else a simulated ENOSPC:
  one line naming the newest complete checkpoint, which then restores, with keep=1."""
  faults.inject('disk full during a checkpoint save', 1)
  workdir = str(tmp_path / 'run')
  meta = {'shape': {'d': 1}, 'scale': 1.0}
  with small_disk(os.path.join(workdir, 'checkpoints'), '1M') as mounted:
    ckpt = checkpointing.Checkpointer(workdir, every=1, keep=1, async_save=async_save)
    ckpt.save(1, _state(1000, 1), meta, force=True)
    ckpt.wait()
    if mounted:
      ballast = fill_disk(ckpt.directory)
    else:
      monkeypatch.setattr(ckpt.manager, 'save', _raise_disk_full)
    with pytest.raises(ConfigError) as e:
      ckpt.save(2, _state(100_000, 2), meta, force=True)
      ckpt.wait()  # an asynchronous save fails here, or in the next save
    msg = str(e.value)
    assert msg.startswith(f'the disk is full: saving a checkpoint in {ckpt.directory} failed')
    assert f'newest complete checkpoint is step 1 ({ckpt.directory}/1), kept as it was' in msg
    assert 'rerun the same command to resume' in msg and '\n' not in msg
    if mounted:
      os.remove(ballast)
    again = checkpointing.Checkpointer(workdir, every=1, keep=1, async_save=False)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), _state(1000, 0))
    step, state, _ = again.restore(abstract, {'d': 1})
    assert step == 1 and again.all_steps() == [1]
    np.testing.assert_array_equal(state['w'], np.full(1000, 1, np.float32))
    again.close()


@pytest.mark.slow
def test_train_on_a_full_disk_stops_with_one_line_and_resumes(tmp_path, faults):
  """The command: `error: ...` naming the kept checkpoint, no traceback; after space is freed, the
  same command resumes from it."""
  faults.inject('disk full during training (CLI)', 1)
  workdir = str(tmp_path / 'run')
  args = lambda steps: cli_args(
      'jaxsae.train',
      workdir=workdir,
      **{'train.steps': steps, 'optim.decay_start': 8, 'train.keep_checkpoints': 1},
  )
  with small_disk(os.path.join(workdir, 'checkpoints'), '2M') as mounted:
    if not mounted:
      pytest.skip('mounting a tmpfs is not allowed here; the save itself is tested simulated')
    trainer.train_and_evaluate(tiny_config(**{'train.steps': 10, 'optim.decay_start': 8}), workdir)
    ballast = fill_disk(os.path.join(workdir, 'checkpoints'))
    r = run_cli(args(20))
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [l for l in r.stderr.splitlines() if l.startswith('error:')]
    assert len(errors) == 1 and 'Traceback' not in r.stderr, r.stderr[-3000:]
    assert 'the disk is full' in errors[0] and 'newest complete checkpoint is step 10' in errors[0]
    os.remove(ballast)  # space again: the same run resumes from step 10
    c = tiny_config(**{'train.steps': 20, 'optim.decay_start': 8, 'train.keep_checkpoints': 1})
    assert trainer.train_and_evaluate(c, workdir)['step'] == 20
    assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['20']


# --------------------------------------------------------------------------------------------------
# The data a checkpoint was trained on
# --------------------------------------------------------------------------------------------------


def _store_config(path):
  return tiny_config(
      **{'data.source': 'store', 'data.store_path': str(path), 'data.batch_size': 32}
  )


def _append_studies(path, rows_per_study, seed=5):
  """More studies appended to a store, as a resumed export does."""
  w = store_lib.StoreWriter(str(path), 16, 'float32', {'test': True}, 8, 64)
  rng = np.random.default_rng(seed)
  first = w.studies_done
  for i, n in enumerate(rows_per_study):
    tokens = np.zeros((n, len(store_lib.TOKEN_COLUMNS)), np.int32)
    record = {'study_id': f'g{first + i}', 'manifest_index': first + i, 'row_start': 0, 'rows': n}
    w.append(rng.standard_normal((n, 16)).astype(np.float32), tokens, [record])
  w.close()


@pytest.fixture
def ckpt(tmp_path):
  c = checkpointing.Checkpointer(str(tmp_path / 'run'), every=1, keep=1, async_save=False)
  yield c
  c.close()


def test_checkpoint_records_the_store(tmp_path):
  write_store(tmp_path / 'a', [40, 40, 30])
  rec = checkpointing.data_identity(_store_config(tmp_path / 'a'))
  assert (rec['source'], rec['path'], rec['rows'], rec['studies']) == (
      'store',
      str(tmp_path / 'a'),
      110,
      3,
  )
  assert rec['resolved'] == os.path.realpath(tmp_path / 'a') and len(rec['fingerprint']) == 64
  os.symlink(tmp_path / 'a', tmp_path / 'link')  # the same store by another path: the same data
  moved = checkpointing.data_identity(_store_config(tmp_path / 'link'))
  assert moved['fingerprint'] == rec['fingerprint'] and moved['resolved'] == rec['resolved']


def test_resume_on_a_grown_store_is_stated(tmp_path, ckpt, caplog):
  write_store(tmp_path / 'a', [40, 40, 30])
  saved = checkpointing.data_identity(_store_config(tmp_path / 'a'))
  meta = {'data': saved, 'scale': 2.5}
  with caplog.at_level(logging.WARNING, logger='jaxsae'):
    ckpt.check_data(5, meta, saved, allow_change=False)
  assert not caplog.records  # the same store: nothing to say
  _append_studies(tmp_path / 'a', [50, 20])
  grown = checkpointing.data_identity(_store_config(tmp_path / 'a'))
  assert grown['fingerprint'] == saved['fingerprint'] and grown['rows'] == 180
  with caplog.at_level(logging.WARNING, logger='jaxsae'):
    ckpt.check_data(5, meta, grown, allow_change=False)
  assert (
      f'the activation store {tmp_path / "a"} grew since the checkpoint at step 5: 110 -> 180 rows '
      "(3 -> 5 studies); resuming on all of them, with the checkpoint's activation scale 2.5"
  ) in caplog.text


def test_resume_on_another_store_is_refused_unless_asked(tmp_path, ckpt, caplog):
  """Another store of the same width, even with the same study ids and sizes (other activations),
  and a store rewritten in place, are refused naming both; allow_store_change lets it go on."""
  write_store(tmp_path / 'a', [40, 40, 30])
  saved = checkpointing.data_identity(_store_config(tmp_path / 'a'))
  meta = {'data': saved, 'scale': 2.5}
  write_store(tmp_path / 'b', [40, 40, 30], seed=1)
  other = checkpointing.data_identity(_store_config(tmp_path / 'b'))
  with pytest.raises(ConfigError) as e:
    ckpt.check_data(5, meta, other, allow_change=False)
  msg = str(e.value)
  assert f"was trained on the activation store '{tmp_path / 'a'}' (110 rows, 3 studies" in msg
  assert f"but this run reads the activation store '{tmp_path / 'b'}' (110 rows" in msg
  assert 'another store' in msg and '--config.train.allow_store_change=True' in msg
  assert "activation scale stays the checkpoint's, 2.5" in msg
  with caplog.at_level(logging.WARNING, logger='jaxsae'):
    ckpt.check_data(5, meta, other, allow_change=True)
  assert 'continuing as train.allow_store_change=True asks' in caplog.text
  # Rewritten in place with more rows than before (its first rows now differ): not "grown".
  shutil.rmtree(tmp_path / 'a')
  write_store(tmp_path / 'a', [40, 40, 30, 30], seed=2)
  with pytest.raises(ConfigError, match='another store'):
    ckpt.check_data(5, meta, checkpointing.data_identity(_store_config(tmp_path / 'a')), False)


def test_a_store_rewritten_from_its_first_rows_on_is_not_grown(tmp_path, ckpt):
  """Same first commit and rows, longer, but the studies the checkpoint ended on were replaced:
  refused."""
  write_store(tmp_path / 'a', [80, 40], rows_per_shard=32)  # a commit per study
  saved = checkpointing.data_identity(_store_config(tmp_path / 'a'))
  shutil.rmtree(tmp_path / 'a')
  write_store(tmp_path / 'a', [80], rows_per_shard=32)
  _append_studies(tmp_path / 'a', [40, 10], seed=9)
  now = checkpointing.data_identity(_store_config(tmp_path / 'a'))
  assert now['fingerprint'] == saved['fingerprint'] and now['rows'] > saved['rows']
  with pytest.raises(ConfigError, match='up to row 120 differ: it was rewritten'):
    ckpt.check_data(5, {'data': saved, 'scale': 1.0}, now, allow_change=False)


def test_synthetic_data_is_recorded_and_a_change_refused(ckpt, caplog):
  saved = checkpointing.data_identity(tiny_config())
  assert saved['source'] == 'synthetic' and saved['seed'] == tiny_config().data.synthetic.seed
  meta = {'data': saved, 'scale': 1.0}
  ckpt.check_data(5, meta, saved, allow_change=False)
  other = checkpointing.data_identity(tiny_config(**{'data.synthetic.seed': 7}))
  with pytest.raises(
      ConfigError, match=r'synthetic data \(seed 1234\).*data.synthetic.seed was 1234, now 7'
  ):
    ckpt.check_data(5, meta, other, allow_change=False)
  store = {'source': 'store', 'path': 'x', 'rows': 1, 'studies': 1, 'fingerprint': 'f' * 64}
  with pytest.raises(ConfigError, match="data.source was 'synthetic', now 'store'"):
    ckpt.check_data(5, meta, store, allow_change=False)
  # A checkpoint from before data was recorded: resumed, with a warning that it was not checked.
  with caplog.at_level(logging.WARNING, logger='jaxsae'):
    ckpt.check_data(5, {'data': {'source': 'synthetic'}, 'scale': 1.0}, other, False)
  assert 'does not record its data' in caplog.text


@pytest.mark.slow
def test_training_resumes_on_a_grown_store_and_refuses_another(tmp_path, caplog):
  """End to end through the trainer: the checkpoint's meta holds the store, a grown store resumes
  (stated), another is refused before anything is overwritten."""
  write_store(tmp_path / 'a', [100, 100, 60])
  write_store(tmp_path / 'b', [100, 100, 60], seed=1)
  workdir = str(tmp_path / 'run')
  c = _store_config(tmp_path / 'a')
  c.train.steps, c.optim.decay_start = 10, 8
  trainer.train_and_evaluate(c, workdir)
  _, _, meta, _ = weights.load_checkpoint(workdir)
  assert meta['data']['path'] == str(tmp_path / 'a') and meta['data']['rows'] == 260
  _append_studies(tmp_path / 'a', [64, 64])
  c.train.steps = 15
  with caplog.at_level(logging.WARNING, logger='jaxsae'):
    assert trainer.train_and_evaluate(c, workdir)['step'] == 15
  assert 'grew since the checkpoint at step 10: 260 -> 388 rows' in caplog.text
  _, _, meta, _ = weights.load_checkpoint(workdir)
  assert meta['data']['rows'] == 388  # the next resume compares against the grown store
  c.data.store_path, c.train.steps = str(tmp_path / 'b'), 20
  with pytest.raises(ConfigError, match=f"reads the activation store '{tmp_path / 'b'}'"):
    trainer.train_and_evaluate(c, workdir)
  assert checkpointing.Checkpointer(workdir, 5, 3).all_steps()[-1] == 15
