"""`python -m jaxsae.interpret` end to end on the tiny stand-in: a store with image tokens, a
random SAE, an OpenAI-protocol server on loopback; then a rerun that redoes nothing."""

import json
import os

import numpy as np
import pytest

from helpers import build_tiny, random_torch_sae, run_cli, write_dictionary_learning
from openai_server import FakeOpenAI

pytestmark = pytest.mark.torch  # the store is exported with the tiny stand-in (the bridge)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  from jaxsae.bridge import export

  root = tmp_path_factory.mktemp('interp')
  c = build_tiny(root, studies=6)
  c.export.keep_kinds = ('image', 'prompt', 'report')
  c.data.store_path = str(root / 'store')
  export.export(c, progress=False)
  weights = write_dictionary_learning(str(root / 'weights'), random_torch_sae(threshold=0.03))
  args = [
      f'--config.model.name={c.model.name}',
      f'--config.export.manifest={c.export.manifest}',
      f'--config.data.store_path={c.data.store_path}',
      '--config.interpret.batch_size=64',
      '--config.interpret.max_features=12',
      '--config.interpret.llm.model=test',
      '--config.interpret.llm.concurrency=3',
      f'--weights={weights}',
  ]
  return root, c, args


def interpret(root, args, url, out):
  del root
  return run_cli(_interpret_args(args, url, out))


@pytest.mark.slow
def test_interpret_end_to_end_and_rerun(setup):
  from jaxsae.formats import store
  from jaxsae.interpret import records

  root, c, args = setup
  out = root / 'out'
  with FakeOpenAI() as server:
    r = interpret(root, args, server.url, out)
    assert r.returncode == 0, r.stderr[-3000:]
    first_requests = len(server.requests)
  summary = json.load(open(out / 'summary.json'))
  s = store.open_store(c.data.store_path)
  assert summary['tokens'] == s.rows and summary['features'] == 128
  assert 'feature browser: ' + str(out / 'index.html') in r.stdout

  recs = list(records.read_jsonl(str(out / records.FEATURES)))
  assert [x['feature'] for x in recs] == list(range(128))
  live = [x for x in recs if x['count'] > 0]
  assert live and sum(x['count'] for x in recs) > 0
  for x in live[:20]:
    top = x['top'][0]
    assert top['activation'] == pytest.approx(x['max'], rel=1e-3)  # the top token is the max
    assert top['acts'][top['target']] == pytest.approx(top['activation'])
    assert len(top['tokens']) == len(top['acts']) and all(isinstance(t, str) for t in top['tokens'])
    assert all(n['activation'] == 0 for n in x['negatives'])
    assert x['promoted_tokens'] and len(x['promoted_tokens']) == 10
    assert sum(x['histogram']['counts']) == x['count']
    assert sum(x['kind_counts'].values()) == x['count']
  # Image-token features come with heatmaps over the 4x4 patch grid of the X-ray they fired on.
  maps = [m for x in live for m in x['heatmaps']]
  assert maps and all(np.array(m['grid']).shape == (4, 4) for m in maps)
  assert all(os.path.exists(out / m['image_file']) for m in maps)
  assert all(max(map(max, m['grid'])) == pytest.approx(m['max'], rel=1e-3) for m in maps)

  # Explanations with detection scores for the live features among the first 12.
  expl = {e['feature']: e for e in records.read_jsonl(str(out / records.EXPLANATIONS))}
  want = {x['feature'] for x in live if x['feature'] < 12}
  assert set(expl) == want and summary['explained'] == len(want)
  scored = [e['score'] for e in expl.values() if e['score']]
  assert scored and all(0 <= sc['balanced_accuracy'] <= 1 for sc in scored)
  assert all(e['explanation'].startswith('the word') for e in expl.values())
  assert (out / 'index.html').exists() and (
      out / 'features' / f'{live[0]["feature"]}.html'
  ).exists()

  # A rerun resumes everything: the statistics are done, the records reused, no LLM request.
  mtime = os.path.getmtime(out / records.FEATURES)
  with FakeOpenAI() as server:
    r = interpret(root, args, server.url, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(server.requests) == 0 and first_requests > 0
  assert os.path.getmtime(out / records.FEATURES) == mtime
  assert json.load(open(out / 'summary.json'))['explained'] == len(want)


@pytest.mark.slow
def test_bad_settings_fail_before_any_work(setup):
  root, _, args = setup
  r = interpret(
      root, [a for a in args if 'llm.model' not in a], 'http://127.0.0.1:9/v1', root / 'bad'
  )
  assert r.returncode == 2 and 'interpret.llm.model is empty' in r.stderr
  r = interpret(
      root, args + ['--config.data.store_path=/nonexistent'], 'http://127.0.0.1:9/v1', root / 'bad'
  )
  assert r.returncode == 2 and 'no activation store' in r.stderr
  r = interpret(
      root, args + ['--config.interpret.llm.concurrency=0'], 'http://127.0.0.1:9/v1', root / 'bad'
  )
  assert r.returncode == 2 and 'interpret.llm.concurrency=0' in r.stderr
  assert not (root / 'bad' / 'stats_checkpoints').exists()


@pytest.mark.slow
def test_interpretation_never_imports_torch(setup, tmp_path):
  """Statistics, records and the browser are JAX/NumPy only (an OpenAI-compatible server does
  the explaining); only the local-model backend needs the bridge."""
  import subprocess
  import sys
  from helpers import REPO

  root, c, _ = setup
  code = f"""
import sys
sys.path.insert(0, {REPO!r})
from experiments import demo
from jaxsae.interpret import pipeline

c = demo.get_config()
c.model.name, c.export.manifest = {c.model.name!r}, {c.export.manifest!r}
c.data.store_path, c.interpret.explain = {c.data.store_path!r}, False
summary = pipeline.run(c, {str(root / "weights")!r}, {str(tmp_path / "out")!r}, progress=False)
assert summary['tokens'] > 0 and summary['index']
assert 'torch' not in sys.modules, [m for m in sys.modules if m.startswith('torch')][:5]
print('ok')
"""
  r = subprocess.run(
      [sys.executable, '-c', code],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=300,
      env={**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu'},
  )
  assert r.returncode == 0 and 'ok' in r.stdout, r.stderr[-3000:]


def _interpret_args(args, url, out):
  import sys

  return [
      sys.executable,
      '-m',
      'jaxsae.interpret',
      '--config=experiments/demo.py',
      *args,
      f'--config.interpret.llm.base_url={url}',
      f'--out={out}',
  ]


@pytest.fixture(scope='module')
def reference(setup):
  """One uninterrupted run (statistics checkpointed every 2 batches), to compare others with."""
  root, _, args = setup
  args = args + ['--config.interpret.checkpoint_every=2']
  with FakeOpenAI() as server:
    r = interpret(root, args, server.url, root / 'reference')
  assert r.returncode == 0, r.stderr[-3000:]
  return root / 'reference', args


def _outputs(out):
  """What a run leaves that must not depend on how it got there (timings left out)."""
  from jaxsae.interpret import records

  with np.load(out / 'stats.npz') as z:
    stats = {k: z[k] for k in z.files}
  summary = json.load(open(out / 'summary.json'))
  return {
      'stats': stats,
      'features': list(records.read_jsonl(str(out / records.FEATURES))),
      'explanations': {
          e['feature']: e for e in records.read_jsonl(str(out / records.EXPLANATIONS))
      },
      'images': {p.name: p.read_bytes() for p in (out / 'images').glob('*.png')},
      'pages': {p.name: p.read_text() for p in (out / 'features').glob('*.html')},
      'summary': {
          k: summary[k]
          for k in (
              'tokens',
              'features',
              'never_fired_in_store',
              'dead_latents',
              'explained',
              'failed',
          )
      },
  }


@pytest.mark.slow
def test_kill_9_at_random_points_then_finish_equals_an_uninterrupted_run(
    reference, tmp_path, faults
):
  """SIGKILL during the statistics, the records and the explanations; the run that finishes
  leaves exactly what an uninterrupted one does."""
  import random

  from helpers import kill_repeatedly

  ref, args = reference
  out = tmp_path / 'out'
  rng = random.Random(13)
  stages = [
      (lambda: any(p.name.isdigit() for p in out.glob('stats_checkpoints/*')), (0.0, 0.4)),
      (lambda: (out / 'stats.npz').exists(), (0.0, 1.0)),
      (lambda: (out / 'explanations.jsonl').exists(), (0.0, 0.6)),
  ]
  with FakeOpenAI(delay_s=0.1) as server:
    cmd = _interpret_args(args, server.url, out)
    kills = sum(kill_repeatedly(cmd, started, 1, rng, window=w) for started, w in stages)
    r = run_cli(cmd)
  assert r.returncode == 0, r.stderr[-3000:]
  assert kills >= 2  # the run takes seconds past each trigger: the kills land
  faults.inject('kill -9 during interpret', kills)
  want, got = _outputs(ref), _outputs(out)
  assert set(got['stats']) == set(want['stats'])
  for k, v in want['stats'].items():
    np.testing.assert_array_equal(got['stats'][k], v, err_msg=k)
    assert got['stats'][k].dtype == v.dtype, k
  for a, b in zip(got['features'], want['features']):
    assert a == b, (a['feature'], [k for k in a if a[k] != b.get(k)])
  for key in ('features', 'explanations', 'images', 'pages', 'summary'):
    assert got[key] == want[key], key
  assert want['images'] and want['explanations']


def _copy_without_explanations(ref, out):
  import shutil

  shutil.copytree(ref, out)
  os.remove(out / 'explanations.jsonl')


@pytest.mark.slow
def test_every_feature_failing_exits_nonzero_and_names_the_error_log(reference, tmp_path):
  ref, args = reference
  out = tmp_path / 'out'
  _copy_without_explanations(ref, out)
  args = args + ['--config.interpret.llm.max_retries=0']
  with FakeOpenAI(lambda messages: 500) as server:
    r = run_cli(_interpret_args(args, server.url, out))
  tried = json.load(open(ref / 'summary.json'))['explained']
  errors = out / 'explain_errors.jsonl'
  assert r.returncode == 1, r.stderr[-3000:]
  assert f'error: all {tried} features failed' in r.stderr and str(errors) in r.stderr
  logged = [json.loads(line) for line in errors.read_text().splitlines()]
  assert len(logged) == tried and all('HTTP 500' in e['error'] for e in logged)
  assert (out / 'index.html').exists()  # the rest of the run is kept

  # One feature failing of many: exit 0, with a summary line; the log then holds that one.
  with FakeOpenAI() as server:
    server.fail(500, n=1)
    r = run_cli(_interpret_args(args, server.url, out))
  assert r.returncode == 0, r.stderr[-3000:]
  assert f'1 of {tried} features could not be explained' in r.stderr and str(errors) in r.stderr
  assert len(errors.read_text().splitlines()) == 1
  with FakeOpenAI() as server:  # the retry of that one succeeds: no failure, no log
    r = run_cli(_interpret_args(args, server.url, out))
    assert r.returncode == 0 and len(server.bodies('explain')) == 1, r.stderr[-3000:]
  assert not errors.exists() and 'could not be explained' not in r.stderr
