"""The model card of a published SAE: metadata the Hub reads, figures taken from the files (never
invented), the push target checked before any work, and the card kept in the export's manifest."""

import json
import os

import numpy as np
import pytest

from helpers import card_parts, card_row, write_sae
from jaxsae import weights
from jaxsae.config import ConfigError
from jaxsae.formats import hub
from jaxsae.formats import model_card
from jaxsae.formats import weights as weights_format

SUMMARY = {
    'eval_tokens': 65536,
    'eval_on': 'held-out studies',
    'eval_fvu': 0.123456789,
    'eval_l0': 31.98765,
    'dead_fraction': 0.0625,
    'dead_latents': 4,
    'dead_over_tokens': 65536,
    'step': 1000,
}
EVALUATION = {
    'loss_recovered': 0.91234567,
    'ce_clean': 1.5,
    'ce_splice': 1.6,
    'ce_zero': 2.7,
    'kl_splice': 0.0123,
    'kl_zero': 1.1,
    'fvu': 0.2,
    'l0': 30.5,
    'studies': 16,
    'tokens': 4000,
    'report_tokens': 900,
    'held_out': True,
    'evaluated_on': '16 held-out studies',
    'group_sizes': [4, 4, 8, 16, 32],
    'warnings': [],
}


def card(**overrides):
  fields = dict(
      target=hub.HubRef('org/name', 'layer15'),
      layout='dictionary_learning',
      d=16,
      F=64,
      k=4,
      group_sizes=(4, 4, 8, 16, 32),
      threshold=0.5,
      scale=2.0,
      step=1000,
      batch_size=2048,
      model_name='microsoft/maira-2',
      layer=15,
      hook_name='model.language_model.layers.15',
      data='activation store /data/store',
      training={'lr': 2e-4, 'seed': 0},
      config={'sae': {'k': 4}},
      command='python -m jaxsae.export_weights --workdir=run --out=out --push_to_hub=org/name',
      license=None,
      summary=SUMMARY,
      summary_path='run/summary.json',
  )
  fields.update(overrides)
  return model_card.Card(**fields)


def test_front_matter_has_the_hub_fields():
  meta, body = card_parts(model_card.render(card(license='mit')))
  assert meta['library_name'] == 'jaxsae'
  assert meta['base_model'] == 'microsoft/maira-2'
  assert meta['license'] == 'mit'
  assert set(model_card.TAGS) <= set(meta['tags'])
  assert {'microsoft/maira-2', 'dictionary-learning'} <= set(meta['tags'])
  assert '`mit`, as declared by the publisher' in body


def test_synthetic_and_local_models_have_no_base_model(tmp_path):
  meta, body = card_parts(model_card.render(card(model_name='synthetic', layout='saelens')))
  assert 'base_model' not in meta and {'synthetic', 'saelens'} <= set(meta['tags'])
  assert 'SAE.load_from_disk' in body
  local = tmp_path / 'model'
  local.mkdir()
  meta, body = card_parts(model_card.render(card(model_name=str(local))))
  assert 'base_model' not in meta and str(local) not in meta['tags']
  assert 'a local model, not a Hub id' in body


def test_undeclared_licence_is_other_and_said_so():
  meta, body = card_parts(model_card.render(card()))
  assert meta['license'] == 'other'
  assert 'Not declared by the publisher' in body and '--license=ID' in body


def test_card_states_shape_training_and_held_out_figures():
  _, body = card_parts(model_card.render(card()))
  assert card_row(body, 'activation width d') == '16'
  assert card_row(body, 'latents F').startswith('64 (expansion factor 4)')
  assert card_row(body, 'Matryoshka groups').startswith('5, sizes [4, 4, 8, 16, 32]')
  assert card_row(body, 'training tokens').startswith('2,048,000 ')  # 1000 steps x 2048
  assert float(card_row(body, 'FVU (fraction of variance unexplained)')) == float(
      '%.4g' % 0.123456789
  )
  assert float(card_row(body, 'L0 (active latents per token)')) == float('%.4g' % 31.98765)
  assert card_row(body, 'dead latents').startswith('4 of 64 (6.25 %), no firing on 65,536 tokens')
  assert 'on 65,536 held-out tokens (held-out studies)' in body
  assert "weights.load('hf://org/name/layer15')" in body
  assert "allow_patterns=['layer15/*']" in body and 'load_dictionary' in body
  assert card().command in body


def test_missing_figures_are_stated_as_not_measured():
  _, body = card_parts(model_card.render(card(summary=None)))
  assert 'Not measured: the training folder has no summary.json (run/summary.json)' in body
  assert 'Not measured: no evaluation.json was given' in body
  assert 'FVU' not in body.split('## Held-out')[1].split('##')[0]
  _, body = card_parts(model_card.render(card(step=500)))  # the summary is of step 1000
  assert 'Not measured for this checkpoint: run/summary.json describes step 1000' in body
  empty = {**SUMMARY, 'eval_tokens': 0, 'eval_fvu': None, 'eval_on': 'no held-out rows'}
  _, body = card_parts(model_card.render(card(summary=empty)))
  assert 'Not measured: no held-out rows (no held-out rows)' in body


def test_evaluation_figures_come_from_the_file():
  _, body = card_parts(
      model_card.render(card(evaluation=EVALUATION, evaluation_path='e/evaluation.json'))
  )
  assert float(card_row(body, 'loss recovered')) == float('%.4g' % 0.91234567)
  assert card_row(body, 'cross-entropy clean / SAE spliced / layer zeroed') == '1.5 / 1.6 / 2.7'
  assert float(card_row(body, 'KL(clean ‖ spliced)')) == 0.0123
  assert '16 studies, 4,000 spliced tokens, 900 report tokens scored' in body
  in_sample = {**EVALUATION, 'held_out': False, 'warnings': ['loss recovered is meaningless']}
  _, body = card_parts(model_card.render(card(evaluation=in_sample, evaluation_path='e.json')))
  assert 'IN-SAMPLE' in body and '- loss recovered is meaningless' in body


def test_read_evaluation_refuses_files_it_cannot_show(tmp_path):
  with pytest.raises(ConfigError, match=r'--evaluation=.*no such file.*jaxsae.evaluate'):
    model_card.read_evaluation(str(tmp_path / 'absent.json'))
  path = tmp_path / 'evaluation.json'
  path.write_text(json.dumps({'fvu': 0.1}))
  with pytest.raises(ConfigError, match=r"lacks the numbers \['loss_recovered'"):
    model_card.read_evaluation(str(path))
  path.write_text('{"loss_recovered": ')
  with pytest.raises(ConfigError, match='not valid JSON'):
    model_card.read_evaluation(str(path))
  path.write_text(json.dumps(EVALUATION))
  e = model_card.read_evaluation(str(path))
  with pytest.raises(ConfigError, match=r'group sizes \[4, 4, 8, 16, 32\].*has \[8, 8\]'):
    model_card.check_evaluation(e, str(path), (8, 8))


@pytest.mark.parametrize(
    'spec, repo_id, sub',
    [
        ('org/name', 'org/name', ''),
        ('org/name/', 'org/name', ''),
        ('hf://org/name/layer_15/ef4', 'org/name', 'layer_15/ef4'),
        ('My-Org/sae.v2/resid_post', 'My-Org/sae.v2', 'resid_post'),
    ],
)
def test_parse_target(spec, repo_id, sub):
  assert model_card.parse_target(spec) == hub.HubRef(repo_id, sub)


@pytest.mark.parametrize(
    'spec, message',
    [
        ('', 'is empty'),
        ('name', r'does not name a repository \(ORG/NAME\)'),
        ('org/name@v1', 'a revision'),
        ('org/-name', "'-name' is not a valid Hub user or repository name"),
        ('org/na--me', 'not a valid Hub'),
        ('org/name.', 'not a valid Hub'),
        ('o rg/name', 'not a valid Hub'),
        ('org/name/../x', "folder name '..' is not allowed"),
        ('org/name//x', "folder name '' is not allowed"),
        ('org/name/.hidden', 'is not allowed'),
    ],
)
def test_parse_target_refuses_malformed_ids(spec, message):
  with pytest.raises(ConfigError, match=message) as e:
    model_card.parse_target(spec)
  assert 'ORG/NAME/SUBFOLDER' in str(e.value)


def test_check_license():
  assert model_card.check_license(None) is None and model_card.check_license(' ') is None
  assert model_card.check_license('apache-2.0') == 'apache-2.0'
  with pytest.raises(ConfigError, match='not a Hub licence id'):
    model_card.check_license('MIT License')


def test_command_line_quotes_and_drops_unset_flags():
  line = model_card.command_line('m', {'a': 'x y', 'b': None, 'c': True, 'd': False, 'e': 3})
  assert line == "python -m m '--a=x y' --c --e=3"


def test_card_in_the_manifest_loads_and_is_checked(tmp_path):
  """An extra file goes through the export's atomic write and manifest: loads verify it, and a
  later export may replace the folder; a README.md the manifest does not list is someone else's."""
  out = tmp_path / 'sae'
  params = write_sae(out)
  w = weights_format.read(str(out))
  meta = weights_format.Metadata(k=4, group_sizes=w.group_sizes, step=1, scale=1.0, layer=15,
                                 model_name='m', hook_name='h')  # fmt: skip
  weights_format.write(str(out), 'saelens', params, 0.3, meta, extra={'README.md': b'# card\n'})
  assert sorted(os.listdir(out)) == [
      'README.md',
      'cfg.json',
      'manifest.json',
      'sae_weights.safetensors',
  ]
  listed = json.loads((out / 'manifest.json').read_text())['files']
  assert listed['README.md']['bytes'] == 7
  sae, _ = weights.load(str(out))
  np.testing.assert_allclose(np.asarray(sae.W_dec[...]), params['W_dec'])
  (out / 'README.md').write_text('# changed\n')
  with pytest.raises(ConfigError, match=r'README.md does not match .*manifest.json'):
    weights.load(str(out))
  write_sae(out)  # replaces the export, card included
  assert 'README.md' not in os.listdir(out)
  (out / 'README.md').write_text('notes of the user')
  with pytest.raises(ConfigError, match='holds README.md, which is not part of an SAE export'):
    write_sae(out)
  with pytest.raises(ValueError, match='would replace one of the export'):
    weights_format.write(str(tmp_path / 'x'), 'saelens', params, 0.3, meta, extra={'cfg.json': b''})
