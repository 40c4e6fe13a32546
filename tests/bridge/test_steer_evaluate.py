"""Grounded parsing, steering generation and sweeps, and the in-model evaluation (tiny stand-in)."""

import csv
import json
import os
import re
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from jaxsae.bridge.maira2 import grounding
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

  p = grounding.parse(
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
  assert p.boxes == 3 and 'pleural effusion' in ' '.join(p.plain.lower().split())
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
    assert any(problem in q for q in grounding.parse(bad).problems), bad
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
      site,
      processor,
      batch,
      [7],
      [0.0, 40.0],
      'add',
      'all',
      norm,
      target='pleural effusion',
      max_new_tokens=8,
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
  csv_path, json_path, png_path = steering.write_sweep(str(root / 'sweep'), rows, 'test')
  with open(csv_path) as f:
    assert len(list(csv.DictReader(f))) == 6
  with open(json_path) as f:
    assert [s['study_id'] for s in json.load(f)['studies']] == [b.study.study_id for b in batch]
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


def _store_of(path, ids, rows=30, d=8, seed=0):
  """An activation store holding the studies `ids` (random rows); its scale."""
  from jaxsae.formats import store
  from jaxsae.formats.tokens import TOKEN_COLUMNS

  rng = np.random.default_rng(seed)
  w = store.StoreWriter(str(path), d, 'float32', {'test': True}, rows_per_chunk=2, rows_per_shard=8)
  for i, sid in enumerate(ids):
    w.append(
        rng.standard_normal((rows, d)).astype(np.float32),
        np.zeros((rows, len(TOKEN_COLUMNS)), np.int32),
        [{'study_id': sid, 'manifest_index': i, 'row_start': 0, 'rows': rows}],
    )
  return w.close()['scale']


def test_evaluate_takes_only_held_out_studies_unless_allowed(tiny, tmp_path):
  from jaxsae.bridge import in_model_metrics as imm, steering
  from jaxsae.formats import split

  c, _, _, root = tiny
  manifest = c.export.manifest
  ids = [s.study_id for s in steering.studies(manifest)]
  held = [i for i in ids if split.is_held_out(i, 0.55)]
  assert 0 < len(held) < len(ids)  # the tiny manifest's ids: some on each side at 0.55
  scale = _store_of(tmp_path / 'store', ids)  # the store holds every manifest study
  path = str(tmp_path / 'store')

  studies, note, ok = imm.held_out(manifest, path, 10, fraction=0.55, trained_scale=scale)
  assert ok and [s.study_id for s in studies] == held and 'outside the training split' in note
  assert imm.held_out(manifest, path, 10, [held[-1]], fraction=0.55)[2]
  training = next(i for i in ids if i not in held)
  for kwargs, why in (
      (dict(store_path=str(root / 'no_store')), 'no activation store at'),
      (dict(fraction=0.0), 'every study of'),
      (dict(ids=[held[0], training]), f"'{training}' is in the training split"),
      (dict(trained_scale=scale * 1.5), 'not the store the SAE was trained on'),
  ):
    args = {'store_path': path, 'fraction': 0.55, 'trained_scale': scale, **kwargs}
    with pytest.raises(imm.NotHeldOut, match=f'NOT held out: .*{re.escape(why)}'):
      imm.held_out(manifest, count=2, **args)
    studies, note, ok = imm.held_out(manifest, count=2, allow_in_sample=True, **args)
    assert not ok and note.startswith('IN-SAMPLE') and why in note and len(studies) == 2


def test_recorded_training_reads_the_exported_scale(tmp_path):
  from jaxsae.bridge import in_model_metrics as imm

  plain = write_dictionary_learning(str(tmp_path / 'plain'), random_torch_sae())
  assert imm.recorded_training(plain) == (None, None)  # weights from elsewhere: nothing recorded
  with open(os.path.join(plain, 'config.json'), 'w') as f:
    json.dump({'trainer': {'norm_factor': 2.5, 'held_out_fraction': 0.1}}, f)
  assert imm.recorded_training(plain) == (2.5, 0.1)


@pytest.mark.slow  # imports JAX beside torch
def test_summary_and_evaluate_count_dead_latents_alike():
  """Same SAE, same held-out rows: the training summary (JAX, scaled inputs) and evaluate's sums
  (torch, the exported raw-activation SAE) give the same dead latents over the same N tokens."""
  import jax
  from jaxsae import model, train_step, trainer, weights
  from jaxsae.bridge import in_model_metrics as imm
  from jaxsae.bridge.sae import TorchSAE
  from helpers import tiny_config

  rng = np.random.default_rng(0)
  x = (rng.standard_normal((300, 16)) * 3 + 1).astype(np.float32)

  class Rows:  # the held-out rows, as a source gives them
    held_out_note = 'test rows'

    def held_out(self, tokens):
      yield from (x[i : i + 64] for i in range(0, min(tokens, len(x)), 64))

  params = {k: np.asarray(v) for k, v in model.init_params(jax.random.PRNGKey(1), 16, 64).items()}
  params['b_enc'] = np.linspace(-2, 0.5, 64).astype(np.float32)
  params['b_enc'][:16] = -1e4  # never fire
  state, scale = {'params': params, 'threshold': np.float32(0.2)}, 2.0
  sc = train_step.StepConfig.from_config(tiny_config())
  summary = trainer.end_of_training_metrics(state, Rows(), scale, sc, 10**6)
  raw, threshold = weights.fold_scale(params, 0.2, scale)
  sae = TorchSAE(*(torch.tensor(raw[n]) for n in ('W_enc', 'b_enc', 'W_dec', 'b_dec')), threshold)
  sums = imm._Sums(64, 1)  # pylint: disable=protected-access
  sums.add(sae, torch.from_numpy(x))
  ev = sums.results(0.5)
  assert 0 < summary['dead_latents'] < 64
  for key in ('dead_latents', 'dead_fraction', 'dead_over_tokens'):
    assert ev[key] == summary[key], key
  assert ev['fvu'] == pytest.approx(summary['eval_fvu'], rel=1e-4)
  assert ev['l0'] == pytest.approx(summary['eval_l0'], rel=1e-6)


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
  evaluate = [
      sys.executable,
      '-m',
      'jaxsae.evaluate',
      *cfg,
      f'--weights={weights}',
      '--num_studies=2',
      f'--out={tmp_path / "eval"}',
  ]
  r = run_cli(evaluate)  # data.store_path does not exist: nothing shows the studies held out
  assert r.returncode == 2 and 'NOT held out' in r.stderr and '--allow_in_sample' in r.stderr
  assert not (tmp_path / 'eval').exists()
  r = run_cli(evaluate + ['--allow_in_sample'])
  assert r.returncode == 0, r.stderr[-3000:]
  with open(tmp_path / 'eval' / 'evaluation.json') as f:
    res = json.load(f)
  assert res['studies'] == 2 and len(res['prefix_fvu']) == 2 and 'loss_recovered' in res
  assert res['held_out'] is False and res['evaluated_on'].startswith('IN-SAMPLE')
  assert res['dead_over_tokens'] == res['tokens'] and 'IN-SAMPLE tokens' in r.stdout
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
  r = run_cli(
      [sys.executable, '-m', 'jaxsae.evaluate', *cfg, f'--weights={other}', '--allow_in_sample']
  )
  assert r.returncode == 2 and 'trained on layer 1' in r.stderr and 'model.layer=1' in r.stderr


def test_sweep_csv_counts_the_target_findings_mentions(tmp_path):
  """--target is a CheXpert finding: a report has it when the labeller calls it positive; the CSV
  has its label, its positive / negated / uncertain mention counts and all 14 labels."""
  from jaxsae.bridge import steering

  def gen(text):
    return steering.Generation(text, 5, True, grounding.parse(text))

  reports = [
      ('baseline', None, 'No pleural effusion.'),
      ('add', 1.0, 'Small pleural effusion. No pleural effusion on the left.'),
      ('add', 2.0, 'Large <obj>pleural effusion<box><x1><y1><x9><y9></box></obj>.'),
      ('add', 3.0, 'Possible effusion.'),
  ]
  rows = [
      steering.row('s1', mode, [7], alpha, 'all', False, gen(t), 'PLEURAL effusion')
      for mode, alpha, t in reports
  ]
  assert [r['target'] for r in rows] == ['Pleural Effusion'] * 4
  assert [
      (r['has_target'], r['target_label'], r['target_affirmed'], r['target_negated']) for r in rows
  ] == [(False, 0, 0, 1), (True, 1, 1, 1), (True, 1, 1, 0), (False, -1, 0, 0)]
  assert rows[3]['target_uncertain'] == 1
  summary = steering.summarise(rows)
  assert [(s['target_rate'], s['negated_rate']) for s in summary] == [
      (0.0, 1.0),
      (1.0, 0.0),
      (1.0, 0.0),
      (0.0, 0.0),
  ]
  csv_path, _, _ = steering.write_sweep(str(tmp_path), rows, 'test')
  with open(csv_path) as f:
    back = list(csv.DictReader(f))
  assert [(r['has_target'], r['target_affirmed'], r['Pleural Effusion']) for r in back] == [
      ('False', '0', '0'),
      ('True', '1', '1'),
      ('True', '1', '1'),
      ('False', '0', '-1'),
  ]
  untargeted = steering.row('s1', 'add', [7], 1.0, 'all', False, gen('x'), '')
  assert (untargeted['has_target'], untargeted['target_affirmed']) == ('', '')
  assert steering.summarise([untargeted])[0]['negated_rate'] is None
  with pytest.raises(steering.ConfigError, match='not a CheXpert observation.*Pleural Effusion'):
    steering.row('s1', 'add', [7], 1.0, 'all', False, gen('x'), 'effusion')


def test_bad_study_errors_suggest_what_steer_and_evaluate_offer(tmp_path):
  """steer and evaluate have --study, not --skip_bad (export_activations' flag): their errors
  for a bad manifest row or image say so."""
  from jaxsae.bridge import manifest, steering

  good, broken = tmp_path / 'good.png', tmp_path / 'broken.png'
  from PIL import Image  # pylint: disable=import-outside-toplevel

  Image.new('L', (8, 8)).save(good)
  broken.write_bytes(b'not a png')
  rows = [
      {'study_id': 'ok', 'frontal': 'good.png', 'findings': 'x'},
      {'study_id': 'gone', 'frontal': 'missing.png', 'findings': 'x'},
      {'study_id': 'torn', 'frontal': 'broken.png', 'findings': 'x'},
  ]
  path = tmp_path / 'manifest.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  with pytest.raises(manifest.BadStudyError) as missing:
    steering.studies(str(path), ['gone'], teacher_forcing=True)
  (torn,) = steering.studies(str(path), ['torn'])
  with pytest.raises(manifest.BadStudyError) as unreadable:
    torn.images()
  for e in (missing, unreadable):
    msg = str(e.value)
    assert '--study' in msg and '--skip_bad' not in msg, msg
  assert "study 'gone'" in str(missing.value) and 'missing.png' in str(missing.value)
  assert 'broken.png' in str(unreadable.value)
  export_view = manifest.read(str(path), True)  # export_activations does have --skip_bad
  assert '--skip_bad' in str(export_view[1])
  with pytest.raises(manifest.BadStudyError, match='--skip_bad'):
    export_view[2].images()
