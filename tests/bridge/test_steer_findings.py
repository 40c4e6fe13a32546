"""Clinically scored steering: target flips, off-target changes and well-formedness, on handmade
reports and on one sweep of the tiny stand-in model."""

import csv
import json
import sys

import numpy as np
import pytest

from jaxsae.bridge.maira2 import grounding
from jaxsae.findings.labels import OBSERVATIONS
from helpers import build_tiny, random_torch_sae, run_cli, write_dictionary_learning

pytestmark = pytest.mark.torch

PE_NAME = 'Pleural Effusion'
PE = OBSERVATIONS.index(PE_NAME)

# (baseline report, steered report) of five studies, steering towards a pleural effusion.
REPORTS = [
    ('No pleural effusion.', 'Small left pleural effusion.'),  # negated -> positive: a flip
    ('Heart size is normal.', 'Possible effusion.'),  # -> uncertain: not positive, no flip
    ('Small right pleural effusion.', 'No pleural effusion. Mild cardiomegaly.'),  # -> negated
    ('Large left pleural effusion.', 'Large left pleural effusion.'),  # unchanged
    ('Small pleural effusion.', 'Possible pleural effusion.'),  # -> uncertain: not negated
]


def _gen(steering, text, finished=True):
  return steering.Generation(text, len(text.split()), finished, grounding.parse(text))


def _rows(steering, pairs, target='pleural effusion', alpha=4.0):
  rows = []
  for i, (base, steered) in enumerate(pairs):
    for mode, a, text in (('baseline', None, base), ('add', alpha, steered)):
      rows.append(steering.row(f's{i}', mode, [3], a, 'all', True, _gen(steering, text), target))
  return rows


def test_flips_count_negation_and_uncertainty_as_the_labeller_reads_them():
  from jaxsae.bridge import steering

  summary = steering.summarise(_rows(steering, REPORTS))
  assert [s['alpha'] for s in summary] == ['baseline', 4.0] and summary[0]['findings'] is None
  f = summary[1]['findings']
  assert f['target'] == 'Pleural Effusion' and f['studies'] == 5
  assert (f['baseline_positive'], f['steered_positive']) == (3, 2)
  assert (f['to_positive'], f['to_positive_eligible']) == (1, 2)  # only the first study
  assert (f['to_negated'], f['to_negated_eligible']) == (1, 3)  # uncertain is no negation
  assert f['to_positive_share'] == f['to_negated_share'] == pytest.approx(0.2)
  # Off target: Cardiomegaly negative -> not mentioned (study 1), not mentioned -> positive (2).
  assert f['off_target']['Cardiomegaly'] == pytest.approx(0.4)
  assert f['off_target_counts']['Cardiomegaly'] == 2 and 'Pleural Effusion' not in f['off_target']
  assert f['off_target']['No Finding'] == pytest.approx(0.4)  # studies 0 and 1 gained a finding
  assert f['off_target']['Pneumothorax'] == 0.0
  assert f['off_target_mean'] == pytest.approx(2 / 5)  # No Finding left out
  assert f['off_target_positive_mean'] == pytest.approx(1 / 5)  # only study 2's cardiomegaly
  assert summary[0]['target_rate'] == pytest.approx(0.6) and summary[1]['target_rate'] == 0.4


def test_flips_on_label_arrays_with_and_without_a_target():
  from jaxsae.bridge import steering

  base = np.full((4, 14), -9, np.int8)
  steered = base.copy()
  base[:, PE] = [1, 1, 0, -1]
  steered[:, PE] = [-9, -1, 1, 1]  # positive -> not mentioned counts as negated
  steered[3, 2] = steered[3, 3] = 1
  f = steering.flips(base, steered, PE)
  assert (f['to_negated'], f['to_positive'], f['steered_positive']) == (1, 2, 2)
  assert f['off_target_mean'] == pytest.approx(0.5) and f['off_target']['Lung Opacity'] == 0.25
  untargeted = steering.flips(base, steered)
  assert 'to_positive' not in untargeted and untargeted['off_target']['Pleural Effusion'] == 1.0
  assert untargeted['off_target_mean'] == pytest.approx(6 / 4)
  empty = steering.flips(base[:0], steered[:0], PE)
  assert empty['to_positive_share'] is None and empty['off_target_mean'] is None
  with pytest.raises(ValueError, match='want \\[studies, 14\\]'):
    steering.flips(base[:, :3], steered[:, :3])


def test_well_formedness_and_target_names():
  from jaxsae.bridge import steering

  assert steering.ends_sentence('No effusion. Heart normal.')
  assert steering.ends_sentence('Is there an effusion? ') and steering.ends_sentence('(see above.)')
  assert not steering.ends_sentence('No effusion. Heart') and not steering.ends_sentence('')
  rows = _rows(steering, [('Normal chest.', ''), ('No effusion.', 'Small effusion and')])
  s = steering.summarise(rows)
  assert (s[0]['nonempty_rate'], s[0]['complete_sentence_rate']) == (1.0, 1.0)
  assert (s[1]['nonempty_rate'], s[1]['complete_sentence_rate']) == (0.5, 0.0)
  assert steering.finding('pleural EFFUSION') == steering.finding('Pleural_Effusion')
  with pytest.raises(steering.ConfigError, match='use one of: No Finding, .*Support Devices'):
    steering.finding('effusion')


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
  root = tmp_path_factory.mktemp('tiny')
  c = build_tiny(root, studies=3)
  return c, write_dictionary_learning(str(root / 'w'), random_torch_sae(seed=3))


def _steer(c, weights, out, *extra):
  return run_cli(
      [
          sys.executable,
          '-m',
          'jaxsae.steer',
          '--config=experiments/demo.py',
          f'--config.model.name={c.model.name}',
          f'--config.export.manifest={c.export.manifest}',
          f'--weights={weights}',
          '--feature=7',
          '--relative',
          '--max_new_tokens=12',
          f'--out={out}',
          *extra,
      ]
  )


def test_sweep_writes_figures_that_match_its_per_study_labels(weights, tmp_path):
  from jaxsae.bridge import steering
  from jaxsae.findings import labeller

  c, w = weights
  r = _steer(c, w, tmp_path / 'bad', '--alpha=0,30', '--target=effusion')
  assert r.returncode == 2 and "--target='effusion'" in r.stderr and 'Pleural Effusion' in r.stderr
  assert not (tmp_path / 'bad').exists()  # refused before loading anything
  out = tmp_path / 'sweep'
  r = _steer(c, w, out, '--alpha=0,60', '--num_studies=3', '--target=pleural effusion')
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'uncertain counts as not positive' in r.stdout and (out / 'steer_sweep.png').exists()
  with open(out / 'steer_sweep.json') as f:
    res = json.load(f)
  with open(out / 'steer_sweep.csv') as f:
    table = list(csv.DictReader(f))
  assert res['target'] == 'Pleural Effusion' and len(res['studies']) == 3 and len(table) == 3 * 3
  assert any('Uncertain counts as not positive' in n for n in res['notes'])
  # The CSV's labels are the labeller's reading of its reports, and the JSON's per-study labels.
  rows = iter(table)
  for study in res['studies']:
    for labels in [study['baseline'], *study['steered'].values()]:
      r = next(rows)
      assert r['study_id'] == study['study_id']
      assert {o: int(r[o]) for o in OBSERVATIONS} == labels
      assert labels == steering.label_dict(labeller.label(grounding.parse(r['report']).plain))
  assert res['summary'][0]['alpha'] == 'baseline' and res['summary'][0]['findings'] is None
  for s in res['summary'][1:]:  # the figures, recomputed from the per-study labels
    key = str(float(s['alpha']))
    pairs = [(st['baseline'], st['steered'][key]) for st in res['studies']]
    f, n = s['findings'], len(pairs)
    up = sum(b[PE_NAME] != 1 and a[PE_NAME] == 1 for b, a in pairs)
    down = sum(b[PE_NAME] == 1 and a[PE_NAME] in (0, -9) for b, a in pairs)
    assert (f['to_positive'], f['to_positive_share']) == (up, pytest.approx(up / n))
    assert (f['to_negated'], f['to_negated_share']) == (down, pytest.approx(down / n))
    assert f['to_negated_eligible'] == sum(b[PE_NAME] == 1 for b, _ in pairs)
    assert s['target_rate'] == pytest.approx(sum(a[PE_NAME] == 1 for _, a in pairs) / n)
    others = [o for o in OBSERVATIONS if o != PE_NAME]
    for o in others:
      assert f['off_target'][o] == pytest.approx(sum(b[o] != a[o] for b, a in pairs) / n)
    changed = [sum(b[o] != a[o] for o in others if o != 'No Finding') for b, a in pairs]
    assert f['off_target_mean'] == pytest.approx(np.mean(changed))
    reports = [t for t in table if t['alpha'] and float(t['alpha']) == s['alpha']]
    assert s['complete_sentence_rate'] == pytest.approx(
        np.mean([steering.ends_sentence(grounding.parse(t['report']).plain) for t in reports])
    )
  assert res['summary'][1]['findings']['to_positive'] == 0  # alpha 0 changes nothing
  assert res['summary'][1]['findings']['off_target_mean'] == 0
