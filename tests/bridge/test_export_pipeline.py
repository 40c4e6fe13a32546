"""The pipelined export (worker processes, length buckets, background writes), several processes
exporting into one store, and the outlier-token filter."""

import json
import os
import random
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import transformers

from helpers import (
    REPO,
    demo_config as config,
    kill_repeatedly,
    processes_naming,
    repeated_manifest,
    run_cli,
)
from jaxsae import verify_store
from jaxsae.bridge import export, export_inputs, prompt
from jaxsae.bridge.norm_filter import NormFilter
from jaxsae.config import ConfigError
from jaxsae.formats import parts, store
from jaxsae.formats.tokens import TOKEN_COLUMNS, TOKEN_KINDS

pytestmark = pytest.mark.torch

ID = TOKEN_COLUMNS.index('token_id')


def _same_rows(a, b, atol=1e-6):
  """Stores `a` and `b` hold the same studies, row ranges and tokens, in the same order, and the
  same activations up to float32 rounding (a batch's composition changes the matmul blocking)."""
  key = lambda s: (s['study_id'], s.get('row_start'), s.get('rows'), bool(s.get('skipped')))
  assert [key(s) for s in a.studies()] == [key(s) for s in b.studies()]
  np.testing.assert_array_equal(a.tokens(), b.tokens())
  np.testing.assert_allclose(a.read_range(0, a.rows), b.read_range(0, b.rows), atol=atol, rtol=1e-5)


def test_pipelined_export_equals_the_serial_one_row_for_row(demo, tmp_path):
  demo_dir, _ = demo
  serial = {'export.workers': 0, 'export.bucket_window': 1, 'export.batch_size': 3}
  piped = {'export.workers': 2, 'export.bucket_window': 8, 'export.batch_size': 3}
  a = export.export(config(demo_dir, tmp_path / 'serial', **serial), progress=False)
  b = export.export(config(demo_dir, tmp_path / 'piped', **piped), progress=False)
  assert a['run']['studies'] == b['run']['studies'] == 16
  assert 0 <= b['run']['input_wait_share'] <= 1 and b['run']['forward_s'] > 0
  _same_rows(store.open_store(str(tmp_path / 'serial')), store.open_store(str(tmp_path / 'piped')))


class _Fake:

  def __init__(self, index, n):
    self.study = type('S', (), {'index': index})()
    self.input_ids = np.zeros(n)


def test_buckets_group_studies_of_similar_length():
  lengths = [300, 20, 310, 25, 600, 22, 305, 590, 21]
  ready = [_Fake(i, n) for i, n in enumerate(lengths)]
  batches = export_inputs.buckets(ready, 3)
  assert [[p.study.index for p in b] for b in batches] == [[1, 8, 5], [3, 0, 6], [2, 7, 4]]
  padded = sum(len(b) * max(len(p.input_ids) for p in b) for b in batches)
  in_order = sum(
      len(ready[i : i + 3]) * max(len(p.input_ids) for p in ready[i : i + 3]) for i in (0, 3, 6)
  )
  assert padded < 0.75 * in_order, (padded, in_order)


def _two_process_args(demo_dir, store_path, manifest, index, **extra):
  small = {
      'export.manifest': str(manifest),
      'export.rows_per_shard': 64,
      'export.rows_per_chunk': 8,
      'export.batch_size': 2,
      'export.workers': 1,
      'export.bucket_window': 4,
      'export.processes': 2,
      'export.process_index': index,
      **extra,
  }
  return [
      sys.executable,
      '-m',
      'jaxsae.export_activations',
      f'--config={REPO}/experiments/demo.py',
      f'--config.model.name={demo_dir / "model"}',
      f'--config.data.store_path={store_path}',
  ] + [f'--config.{k}={v}' for k, v in small.items()]


@pytest.mark.slow
def test_two_processes_one_killed_and_restarted_equal_one_process(demo, tmp_path, faults):
  demo_dir, _ = demo
  path, ids = repeated_manifest(demo_dir, tmp_path, 10)  # 160 studies, 80 per process
  one = tmp_path / 'one'
  c = config(demo_dir, one, **{'export.manifest': str(path), 'export.workers': 0})
  export.export(c, progress=False)
  two = tmp_path / 'two'
  env = {'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu'}
  first = subprocess.Popen(
      _two_process_args(demo_dir, two, path, 0),
      cwd=REPO,
      env={**os.environ, **env},
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
  )
  part = two / store.part_key(1, 2) / store.COMMIT
  progress = []

  def committed():  # kill process 1 at a random moment after its run's first commit
    try:
      n = json.load(open(part))['studies']
    except (OSError, ValueError):
      return False
    if not progress or n > progress[-1]:
      progress.append(n)
      return True
    return False

  second = _two_process_args(demo_dir, two, path, 1)
  kills = kill_repeatedly(second, committed, 2, random.Random(2), window=(0.0, 0.4))
  print(f'killed process 1 {kills} times; its committed studies seen: {progress}')
  assert kills >= 1 and progress[-1] < 80, f'not killed mid-export: {kills} kills, {progress}'
  faults.inject('kill -9 of one of two exporting processes', kills)
  r = run_cli(second)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'part 1 of 2' in r.stdout
  out, err = first.communicate(timeout=600)
  assert first.returncode == 0, err[-3000:]
  a, b = store.open_store(str(one)), store.open_store(str(two))
  assert isinstance(b, store.PartedStore) and not b.incomplete()
  assert [s['study_id'] for s in b.studies()] == ids
  assert b.meta['studies'] == 160 and [p['studies'] for p in b.meta['parts']] == [80, 80]
  _same_rows(a, b)
  assert b.scale == pytest.approx(a.scale, rel=1e-6)
  report = verify_store.verify(str(two))
  assert report.ok and not report.notes and report.verified == 160, report.problems
  time.sleep(1)  # the killed processes' workers exit with them (none is left waiting forever)
  assert not processes_naming(str(two))


def test_a_store_begun_by_two_processes_refuses_other_settings(demo, tmp_path):
  demo_dir, _ = demo
  two = tmp_path / 'two'
  c = config(demo_dir, two, **{'export.processes': 2, 'export.process_index': 0})
  c.export.max_studies = 6
  export.export(c, progress=False)
  for key, value, words in (
      ('export.processes', 1, 'written by 2 processes'),
      ('export.max_studies', 8, 'each share is fixed when the store is begun'),
  ):
    c2 = config(demo_dir, two, **{'export.processes': 2, 'export.process_index': 1})
    c2.export.max_studies = 6
    node, leaf = key.split('.')
    c2[node][leaf] = value
    if value == 1:
      c2.export.process_index = 0
    with pytest.raises(ConfigError, match=words):
      export.export(c2, progress=False)
  c3 = config(demo_dir, two, **{'export.processes': 2})  # no index and no $RANK
  with pytest.raises(ConfigError, match='does not know its index'):
    export.export(c3, progress=False)
  # Process 1 has not run: the store reads with process 0's rows and says what is missing.
  s = store.open_store(str(two))
  assert s.meta['studies'] == 3 and s.incomplete() == [
      'parts/001-of-002 has 0 of its 3 studies (manifest rows 3-5)'
  ]


def _planted_model(demo_dir, out):
  """The demo's tiny model with one word's input embedding scaled by 1000: its tokens carry
  massive norms at every layer (the residual stream adds the embedding), like Vicuna's."""
  model = transformers.AutoModelForImageTextToText.from_pretrained(str(demo_dir / 'model'))
  processor = transformers.AutoProcessor.from_pretrained(str(demo_dir / 'model'))
  word = processor.tokenizer.convert_tokens_to_ids('effusion')
  assert word != processor.tokenizer.unk_token_id
  with torch.no_grad():
    model.get_input_embeddings().weight[word] *= 1000.0
  model.save_pretrained(str(out))
  processor.save_pretrained(str(out))
  return word


def test_the_outlier_filter_drops_exactly_the_planted_tokens(demo, tmp_path):
  demo_dir, _ = demo
  word = _planted_model(demo_dir, tmp_path / 'model')
  kw = {'model.name': str(tmp_path / 'model'), 'export.workers': 0}
  export.export(config(demo_dir, tmp_path / 'all', **kw), progress=False)
  full = store.open_store(str(tmp_path / 'all'))
  x, t = full.read_range(0, full.rows), full.tokens()
  norms = np.linalg.norm(x, axis=1)
  planted = t[:, ID] == word
  median = np.median(norms)
  assert planted.sum() > 10 and norms[planted].min() > 50 * median  # the premise: massive ...
  assert norms[~planted].max() < 10 * median  # ... and nothing else is near the threshold

  c = config(demo_dir, tmp_path / 'filtered', **kw, **{'export.max_norm_multiple': 10.0})
  meta = export.export(c, progress=False)
  s = store.open_store(str(tmp_path / 'filtered'))
  np.testing.assert_array_equal(s.tokens(), t[~planted])
  np.testing.assert_allclose(s.read_range(0, s.rows), x[~planted], rtol=1e-6, atol=1e-7)
  kinds = np.bincount(t[planted, TOKEN_COLUMNS.index('kind')], minlength=len(TOKEN_KINDS))
  assert meta['dropped_counts'] == dict(zip(TOKEN_KINDS, kinds.tolist()))
  assert meta['run']['dropped'] == meta['dropped_counts']
  assert sum(r['dropped'] for r in s.studies()) == planted.sum()
  want_scale = np.sqrt(np.mean(norms[~planted].astype(np.float64) ** 2) / s.d)
  assert s.scale == pytest.approx(want_scale, rel=1e-5)  # computed without them
  assert meta['info']['max_norm_multiple'] == 10.0

  # Stopped after 7 studies and continued: the running median resumes from the commit.
  part = tmp_path / 'resumed'
  c = config(demo_dir, part, **kw, **{'export.max_norm_multiple': 10.0})
  c.export.max_studies = 7
  export.export(c, progress=False)
  c.export.max_studies = None
  export.export(c, progress=False)
  _same_rows(s, store.open_store(str(part)))
  assert json.load(open(part / store.COMMIT))['export_state']['norm_filter']['median'] > 0
  with pytest.raises(ConfigError, match='max_norm_multiple'):  # not continued with another value
    export.export(config(demo_dir, part, **kw, **{'export.max_norm_multiple': 20.0}))


def test_norm_filter_median_and_state():
  rng = np.random.default_rng(0)
  f = NormFilter(4.0)
  x = rng.normal(size=(1001, 8))
  keep = f.keep(x)
  norms = np.linalg.norm(x, axis=1)
  assert f.median() == pytest.approx(np.median(norms), rel=0.006)
  np.testing.assert_array_equal(keep, norms <= 4.0 * f.median())
  g = NormFilter(4.0, json.loads(json.dumps(f.state())))
  y = np.concatenate([rng.normal(size=(50, 8)), 100 * rng.normal(size=(3, 8))])
  np.testing.assert_array_equal(f.keep(y), g.keep(y))
  assert f.keep(y)[-3:].tolist() == [False] * 3 and f.median() == g.median()
  assert NormFilter(2.0).keep(np.zeros((0, 8))).shape == (0,)


def test_image_normalisation_is_the_float_stretch_of_every_pixel():
  """The lookup-table stretch equals stretching each pixel in float64 (MAIRA-2's definition)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from jaxsae.bridge.maira2.processing import normalise_image  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(0)
  for lo, hi in ((0, 255), (13, 200), (50, 50), (0, 0), (1, 2), (100, 255)):
    pixels = rng.integers(lo, hi + 1, (60, 47)).astype(np.uint8)
    x = pixels.astype(np.float64) - pixels.min()
    if x.max() > 0:
      x *= 255 / x.max()
    for image in (Image.fromarray(pixels), Image.fromarray(pixels).convert('RGB')):
      out = normalise_image(image)
      assert out.mode == 'L'
      np.testing.assert_array_equal(np.asarray(out), x.astype(np.uint8))


def test_each_image_is_decoded_and_normalised_once(demo, tmp_path, monkeypatch):
  from jaxsae.bridge import manifest  # pylint: disable=import-outside-toplevel
  from jaxsae.bridge.maira2 import processing  # pylint: disable=import-outside-toplevel

  demo_dir, rows = demo
  calls = {'open': 0, 'normalise': 0}

  def counted(name, fn):
    def wrapper(*a, **kw):
      calls[name] += 1
      return fn(*a, **kw)

    return wrapper

  monkeypatch.setattr(manifest.Image, 'open', counted('open', manifest.Image.open))
  normalise = counted('normalise', processing.normalise_image)
  monkeypatch.setattr(processing, 'normalise_image', normalise)
  monkeypatch.setattr(prompt, 'normalise_image', normalise)
  c = config(demo_dir, tmp_path / 's', **{'export.workers': 0, 'export.max_studies': 6})
  export.export(c, progress=False)
  images = sum(1 for r in rows[:6] for f in ('frontal', 'lateral', 'prior_frontal') if r.get(f))
  assert calls == {'open': images, 'normalise': images} and images > 6
