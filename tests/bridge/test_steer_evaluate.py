"""Grounded parsing, steering generation and sweeps, and the in-model evaluation (tiny stand-in)."""

import csv
import json
import os
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from helpers import (
    LAYER,
    build_tiny,
    exact_torch_sae,
    random_torch_sae,
    run_cli,
    write_dictionary_learning,
)

pytestmark = pytest.mark.torch


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  from jaxsae.bridge import interventions as iv
  from jaxsae.bridge import loading

  root = tmp_path_factory.mktemp('tiny')
  c = build_tiny(root, studies=5)
  model, processor = loading.load(c)
  return c, iv.Site(model, random_torch_sae(), LAYER, c.model.hook_name), processor, root


def test_parse_grounded_reports():
  from jaxsae.bridge import steering

  p = steering.parse(
      '<obj>Small left pleural effusion<box><x55><y45><x70><y56></box></obj> '
      '<obj>Right basal atelectasis<box><x10><y60><x30><y80></box>'
      '<box><x0><y0><x99><y99></box></obj> <obj>No pneumothorax.</obj> Stable.'
  )
  assert not p.problems
  assert [ph.text for ph in p.phrases] == [
      'Small left pleural effusion',
      'Right basal atelectasis',
      'No pneumothorax.',
      'Stable.',
  ]
  assert p.phrases[0].boxes == [pytest.approx((0.555, 0.455, 0.705, 0.565))]
  assert p.phrases[1].boxes[1] == pytest.approx((0.005, 0.005, 0.995, 0.995))
  assert p.boxes == 3 and steering.contains(p.plain, 'PLEURAL  effusion')
  for bad, problem in (
      ('<obj>a<box><x1><y2><x3></box></obj>', 'needs <x><y><x><y>'),
      ('<obj>a<box><y1><x2><y3><x4></box></obj>', 'needs <x><y><x><y>'),
      ('<obj>a<box><x1><y2><x300><y4></box></obj>', 'outside 0..99'),
      ('<obj>a<box><x1><y2><x3><y4>', 'unclosed <box>'),
      ('<obj>a', 'unclosed <obj>'),
      ('a</obj>', '</obj> without <obj>'),
      ('<box><x1><y2><x3><y4></box>', '<box> outside <obj>'),
      ('see <x4>', 'coordinate <x4> outside <box>'),
  ):
    assert any(problem in q for q in steering.parse(bad).problems), bad
  assert steering.distinct_ngrams('a b c a b c a b c') == pytest.approx(3 / 7)


def test_sweep_baseline_and_steered(tiny):
  from jaxsae.bridge import steering

  c, site, processor, root = tiny
  batch = [
      steering.prepare(site, processor, s) for s in steering.studies(c.export.manifest, count=2)
  ]
  norm = steering.mean_residual_norm(site, batch)
  assert norm > 0
  rows = steering.sweep(
      site, processor, batch, [7], [0.0, 40.0], 'add', 'all', norm, target='the', max_new_tokens=8
  )
  assert [r['mode'] for r in rows] == ['baseline', 'add', 'add'] * 2
  assert rows[1]['report'] == rows[0]['report']  # alpha 0 adds exactly nothing
  assert any(rows[i + 2]['report'] != rows[i]['report'] for i in (0, 3))  # a strong push shows
  again = steering.sweep(
      site, processor, batch[:1], [7], [40.0], 'add', 'all', norm, max_new_tokens=8
  )
  assert again[0]['report'] == rows[0]['report'] and again[1]['report'] == rows[2]['report']
  summary = steering.summarise(rows)
  assert [s['alpha'] for s in summary] == ['baseline', 0.0, 40.0]
  assert all(s['studies'] == 2 and 0 <= s['target_rate'] <= 1 for s in summary)
  csv_path, png_path = steering.write_sweep(str(root / 'sweep'), rows, 'the', 'test')
  with open(csv_path) as f:
    assert len(list(csv.DictReader(f))) == 6
  assert os.path.getsize(png_path) > 0


def test_exact_sae_recovers_all_the_loss(tiny):
  from jaxsae.bridge import in_model_metrics, steering
  from jaxsae.bridge import interventions as iv

  c, site, processor, root = tiny
  studies = steering.studies(c.export.manifest, count=3, teacher_forcing=True)
  exact = in_model_metrics.evaluate(
      iv.Site(site.model, exact_torch_sae(), LAYER), processor, studies
  )
  assert exact['ce_splice'] == exact['ce_clean'] != exact['ce_zero']
  assert exact['loss_recovered'] == 1.0 and exact['kl_splice'] == 0.0 < exact['kl_zero']
  assert bool(exact['warnings']) == (exact['ce_zero'] <= exact['ce_clean'])  # a random model
  assert exact['fvu'] < 1e-10 and exact['prefix_fvu'][0] > 0.1  # relu(x) alone is half of x
  assert exact['report_tokens'] > 0 and exact['tokens'] > exact['report_tokens']
  rand = in_model_metrics.evaluate(site, processor, studies, ('report',), dense_threshold=0.5)
  assert rand['ce_splice'] != rand['ce_clean'] and np.isfinite(rand['loss_recovered'])
  assert rand['kl_splice'] > 0 and rand['fvu'] > 0.01
  assert rand['tokens'] == rand['report_tokens']  # spliced = scored: the report tokens
  assert len(rand['prefix_fvu']) == 2 and rand['prefix_fvu'][-1] == rand['fvu']
  assert 0 < rand['l0'] <= site.sae.F and rand['dense_latents'] + rand['dead_latents'] <= site.sae.F
  json_path, png_path = in_model_metrics.write(str(root / 'eval'), rand)
  with open(json_path) as f:
    saved = json.load(f)
  assert saved['loss_recovered'] == rand['loss_recovered'] and 'feature_frequency' not in saved
  assert os.path.getsize(png_path) > 0


@pytest.mark.slow
def test_steer_and_evaluate_commands(tiny, tmp_path):
  c, site, _, root = tiny
  weights = write_dictionary_learning(str(tmp_path / 'w'), random_torch_sae(seed=3))
  cfg = [
      '--config=experiments/demo.py',
      f'--config.model.name={c.model.name}',
      f'--config.export.manifest={c.export.manifest}',
      f'--config.data.store_path={c.data.store_path}',
  ]
  r = run_cli(
      [
          sys.executable,
          '-m',
          'jaxsae.steer',
          *cfg,
          f'--weights={weights}',
          '--feature=7',
          '--alpha=0,30',
          '--relative',
          '--num_studies=2',
          '--target=pleural effusion',
          '--max_new_tokens=6',
          f'--out={tmp_path / "sweep"}',
      ]
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'baseline' in r.stdout and (tmp_path / 'sweep' / 'steer_sweep.png').exists()
  with open(tmp_path / 'sweep' / 'steer_sweep.csv') as f:
    assert len(list(csv.DictReader(f))) == 2 * 3
  r = run_cli(
      [
          sys.executable,
          '-m',
          'jaxsae.evaluate',
          *cfg,
          f'--weights={weights}',
          '--num_studies=2',
          f'--out={tmp_path / "eval"}',
      ]
  )
  assert r.returncode == 0, r.stderr[-3000:]
  with open(tmp_path / 'eval' / 'evaluation.json') as f:
    res = json.load(f)
  assert res['studies'] == 2 and len(res['prefix_fvu']) == 2 and 'loss_recovered' in res
  assert 'not in the activation store' in res['held_out']
  # Clear errors from the command line: out-of-range feature, SAE for another layer.
  r = run_cli(
      [
          sys.executable,
          '-m',
          'jaxsae.steer',
          *cfg,
          f'--weights={weights}',
          '--feature=500',
          '--alpha=1',
      ]
  )
  assert r.returncode == 2 and 'feature 500 is out of range' in r.stderr and 'F=128' in r.stderr
  other = write_dictionary_learning(str(tmp_path / 'w1'), random_torch_sae(), layer=1)
  r = run_cli([sys.executable, '-m', 'jaxsae.evaluate', *cfg, f'--weights={other}'])
  assert r.returncode == 2 and 'trained on layer 1' in r.stderr and 'model.layer=1' in r.stderr
