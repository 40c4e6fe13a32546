"""Exporting activations from a tiny LLaVA (MAIRA-2's stand-in): values, token kinds, the MAIRA-2
prompt, resume after kill -9, and bad studies."""

import json
import os
import random
import shutil
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
from jaxsae.formats import store
from jaxsae.bridge import export, manifest, prompt
from jaxsae.bridge.maira2 import processing
from jaxsae.config import ConfigError

pytestmark = pytest.mark.torch

IMAGE, PROMPT, BOILERPLATE, REPORT = range(4)


def test_rows_are_the_layer_output_and_tokens_are_labelled(demo, tmp_path):
  demo_dir, rows = demo
  c = config(
      demo_dir,
      tmp_path / 'acts',
      **{'export.keep_kinds': ('image', 'prompt', 'boilerplate', 'report'), 'export.batch_size': 3},
  )
  meta = export.export(c, progress=False)
  s = store.open_store(str(tmp_path / 'acts'))
  tokens = s.tokens()
  assert meta['rows'] == s.rows == len(tokens) and meta['studies'] == 16
  assert meta['kind_counts'] == {
      k: int(np.sum(tokens[:, 3] == i))
      for i, k in enumerate(('image', 'prompt', 'boilerplate', 'report'))
  }
  model = transformers.AutoModelForImageTextToText.from_pretrained(str(demo_dir / 'model')).eval()
  processor = transformers.AutoProcessor.from_pretrained(str(demo_dir / 'model'))
  studies = manifest.read(c.export.manifest, True)
  # Batched, padded and hooked == each study alone through output_hidden_states.
  for record in s.studies()[:4]:
    study = studies[record['manifest_index']]
    p = prompt.prepare(processor, study, dict(study.images()), True, model.config.image_token_id)
    with torch.inference_mode():
      out = model(**p.inputs, output_hidden_states=True)
    expected = out.hidden_states[c.model.layer + 1][0].numpy()  # [0] is the embeddings
    lo, hi = record['row_start'], record['row_start'] + record['rows']
    t = tokens[lo:hi]
    assert record['rows'] == record['tokens'] == len(p.input_ids)  # every token kept
    np.testing.assert_array_equal(t[:, 0], study.index)
    np.testing.assert_array_equal(t[:, 1], np.arange(len(p.input_ids)))
    np.testing.assert_array_equal(t[:, 2], p.input_ids.numpy())
    np.testing.assert_allclose(s.read_range(lo, hi), expected, rtol=1e-5, atol=1e-5)
    # Kinds: findings are the report, the study's sections the prompt, images are patches 0..15.
    row = rows[study.index]
    decode = lambda kind: processor.tokenizer.decode(t[t[:, 3] == kind, 2])  # noqa: E731
    assert decode(REPORT) == ' '.join(w for w, _ in _words(row['findings']))
    assert ' '.join(w for w, _ in _words(row['indication'])) in decode(PROMPT)
    assert 'provide a structured description' in decode(BOILERPLATE)
    images = t[t[:, 3] == IMAGE]
    n_images = 1 + (row['lateral'] is not None) + (row['prior_frontal'] is not None)
    assert len(images) == 16 * n_images
    np.testing.assert_array_equal(images[:, 4], np.tile(np.arange(16), n_images))
    roles = [0] + ([1] if row['lateral'] else []) + ([2] if row['prior_frontal'] else [])
    np.testing.assert_array_equal(images[:, 5], np.repeat(roles, 16))
    assert np.all(t[t[:, 3] != IMAGE][:, 4:] == -1)


def _words(text):
  from tokenizers import normalizers, pre_tokenizers

  return pre_tokenizers.Whitespace().pre_tokenize_str(normalizers.Lowercase().normalize_str(text))


def test_paper_filter_and_prompt_only_mode(demo, tmp_path):
  demo_dir, _ = demo
  export.export(config(demo_dir, tmp_path / 'paper', **{'export.max_studies': 5}), progress=False)
  kinds = store.open_store(str(tmp_path / 'paper')).tokens()[:, 3]
  assert set(kinds) == {PROMPT, REPORT}  # no image tokens, no boilerplate
  export.export(
      config(
          demo_dir,
          tmp_path / 'prompt_only',
          **{'export.max_studies': 5, 'export.teacher_forcing': False},
      ),
      progress=False,
  )
  s = store.open_store(str(tmp_path / 'prompt_only'))
  assert set(s.tokens()[:, 3]) == {PROMPT} and s.meta['info']['teacher_forcing'] is False


def test_the_prompt_is_maira2s():
  """Word for word the example in Maira2Processor._construct_chat_messages_reporting."""
  messages = processing.reporting_messages(
      has_lateral=True,
      has_prior=True,
      indication='indication text from report goes here',
      technique='technique text from report goes here',
      comparison='comparison text from report goes here',
      prior_report='prior reporting text goes here',
  )
  assert messages == [
      {
          'role': 'user',
          'content': [
              {'index': None, 'text': 'Given the current frontal image', 'type': 'text'},
              {'index': 0, 'text': None, 'type': 'image'},
              {'index': None, 'text': ' the current lateral image', 'type': 'text'},
              {'index': 1, 'text': None, 'type': 'image'},
              {'index': None, 'text': ' and the prior frontal image', 'type': 'text'},
              {'index': 2, 'text': None, 'type': 'image'},
              {
                  'index': None,
                  'text': ' PRIOR_REPORT: prior reporting text goes here',
                  'type': 'text',
              },
              {
                  'index': None,
                  'text': ' Provide a structured description of the findings in the radiology '
                  'study in comparison to the prior frontal image. INDICATION: indication text from report '
                  'goes here TECHNIQUE: technique text from report goes here COMPARISON: comparison text from '
                  'report goes here',
                  'type': 'text',
              },
          ],
      }
  ]
  only = processing.reporting_messages(False, False, None, '', None, None, assistant_text='Clear.')
  assert only[0]['content'][0]['text'] == 'Given the current frontal image only'
  assert only[0]['content'][-1]['text'].endswith('INDICATION: N/A TECHNIQUE: N/A COMPARISON: N/A')
  assert only[1] == {
      'role': 'assistant',
      'content': [{'index': None, 'text': 'Clear.', 'type': 'text'}],
  }


def test_prepare_uses_the_processors_own_reporting_input(demo, monkeypatch):
  """A MAIRA-2 processor renders the prompt itself (once per study) and the result is what the
  stand-in's chat-template path produces from the same messages and images."""
  demo_dir, _ = demo
  plain = transformers.AutoProcessor.from_pretrained(str(demo_dir / 'model'))
  maira = processing.Maira2Processor(
      image_processor=plain.image_processor,
      tokenizer=plain.tokenizer,
      patch_size=14,
      vision_feature_select_strategy='default',
      num_additional_image_tokens=1,
      chat_template=plain.tokenizer.chat_template,
  )
  calls = []
  render = processing.Maira2Processor.format_reporting_input
  monkeypatch.setattr(
      processing.Maira2Processor,
      'format_reporting_input',
      lambda self, *a, **k: calls.append(1) or render(self, *a, **k),
  )
  for study in manifest.read(str(demo_dir / 'manifest.jsonl'), True)[:4]:
    a = prompt.prepare(plain, study, dict(study.images()), True, 4)
    b = prompt.prepare(maira, study, dict(study.images()), True, 4)
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(a.inputs['pixel_values'], b.inputs['pixel_values'])
    np.testing.assert_array_equal(a.kinds, b.kinds)
  assert len(calls) == 4


@pytest.mark.slow
def test_kill_minus_9_and_resume_has_no_duplicates_and_no_gaps(demo, tmp_path, faults):
  demo_dir, _ = demo
  path, ids = repeated_manifest(demo_dir, tmp_path, 20)  # 320 studies, a few seconds of work
  small = {
      'export.manifest': str(path),
      'export.rows_per_shard': 64,
      'export.rows_per_chunk': 8,
      'export.batch_size': 2,
  }  # a commit every ~2 batches
  export.export(config(demo_dir, tmp_path / 'clean', **small), progress=False)
  killed = tmp_path / 'killed'
  args = [
      sys.executable,
      '-m',
      'jaxsae.export_activations',
      f'--config={REPO}/experiments/demo.py',
      f'--config.model.name={demo_dir / "model"}',
      f'--config.data.store_path={killed}',
  ] + [f'--config.{k}={v}' for k, v in small.items()]
  progress = []

  def committed():  # kill at a random moment after this run's first commit
    try:
      n = json.load(open(killed / store.COMMIT))['studies']
    except (OSError, ValueError):  # none yet, or (never: written atomically) half written
      return False
    if not progress or n > progress[-1]:
      progress.append(n)
      return True
    return False

  kills = kill_repeatedly(args, committed, 3, random.Random(1), window=(0.0, 0.5))
  print(f'killed {kills} times; committed studies seen: {progress}')
  assert kills >= 2 and progress[-1] < len(ids), f'not killed mid-export: {kills} kills, {progress}'
  faults.inject('kill -9 during export_activations', kills)
  r = run_cli(args)
  assert r.returncode == 0, r.stderr[-3000:]
  a, b = store.open_store(str(tmp_path / 'clean')), store.open_store(str(killed))
  assert [s['study_id'] for s in b.studies()] == ids
  assert a.studies() == b.studies()
  np.testing.assert_array_equal(a.tokens(), b.tokens())  # same tokens, same order: no dup, no gap
  np.testing.assert_allclose(a.read_range(0, a.rows), b.read_range(0, b.rows), rtol=1e-6, atol=1e-7)
  assert b.mean_sq_norm == pytest.approx(a.mean_sq_norm, rel=1e-6)
  time.sleep(1)  # the killed exports' preparing workers exited with them
  assert not processes_naming(str(killed))


def _bad_manifest(demo_dir, tmp_path):
  """Five demo studies: a missing image file, a corrupt one, a row without findings."""
  lines = [json.loads(l) for l in open(demo_dir / 'manifest.jsonl')][:5]
  for line in lines:
    for f in manifest.IMAGE_FIELDS:
      if line[f]:
        line[f] = str(demo_dir / line[f])
  lines[1]['frontal'] = str(tmp_path / 'gone.png')
  (tmp_path / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n not really')
  lines[2]['frontal'] = str(tmp_path / 'corrupt.png')
  del lines[3]['findings']
  path = tmp_path / 'bad.jsonl'
  path.write_text(''.join(json.dumps(l) + '\n' for l in lines))
  return path, [l['study_id'] for l in lines]


def test_bad_studies_stop_the_export_naming_study_field_and_file(demo, tmp_path):
  demo_dir, _ = demo
  path, ids = _bad_manifest(demo_dir, tmp_path)
  c = config(demo_dir, tmp_path / 'acts', **{'export.manifest': str(path)})
  with pytest.raises(
      ConfigError,
      match=rf"study '{ids[1]}' \(bad.jsonl line 2\): field "
      r"'frontal', file '.*gone.png': image file does not "
      r'exist.*--skip_bad',
  ):
    export.export(c, progress=False)
  assert not os.path.exists(tmp_path / 'acts')  # stopped before the model or the store
  c.export.manifest = str(tmp_path / 'only_corrupt.jsonl')
  (tmp_path / 'only_corrupt.jsonl').write_text(path.read_text().splitlines()[2] + '\n')
  with pytest.raises(
      ConfigError,
      match=rf"study '{ids[2]}' .*field 'frontal', file "
      r"'.*corrupt.png': cannot be read as an image",
  ):
    export.export(c, progress=False)
  c.export.manifest = str(tmp_path / 'only_missing_field.jsonl')
  (tmp_path / 'only_missing_field.jsonl').write_text(path.read_text().splitlines()[3] + '\n')
  with pytest.raises(
      ConfigError, match=rf"study '{ids[3]}' .*line 1\): field 'findings': " 'missing from the row'
  ):
    export.export(c, progress=False)


@pytest.mark.slow
def test_skip_bad_skips_and_reports_them(demo, tmp_path):
  demo_dir, _ = demo
  path, ids = _bad_manifest(demo_dir, tmp_path)
  out = tmp_path / 'acts'
  r = run_cli(
      [
          sys.executable,
          '-m',
          'jaxsae.export_activations',
          f'--config={REPO}/experiments/demo.py',
          f'--config.model.name={demo_dir / "model"}',
          f'--config.export.manifest={path}',
          f'--config.data.store_path={out}',
          '--skip_bad',
      ]
  )
  assert r.returncode == 0, r.stderr[-3000:]
  assert '3 studies skipped, listed in' in r.stdout and store.REPORT in r.stdout
  report = json.load(open(out / store.REPORT))
  assert [(s['study_id'], s['skipped']['field']) for s in report] == [
      (ids[1], 'frontal'),
      (ids[2], 'frontal'),
      (ids[3], 'findings'),
  ]
  assert report[0]['skipped']['file'].endswith('gone.png')
  assert 'cannot be read as an image' in report[1]['skipped']['error']
  s = store.open_store(str(out))
  assert set(s.tokens()[:, 0]) == {0, 4}  # rows from the two good studies only
  assert [x['study_id'] for x in s.studies()] == ids


def test_mismatches_fail_before_compute(demo, tmp_path):
  demo_dir, _ = demo
  with pytest.raises(
      ConfigError,
      match=r'layer model.language_model.layers.2 has width 64 but '
      r'sae.d=128; set --config.sae.d=64',
  ):
    export.export(config(demo_dir, tmp_path / 'a', **{'sae.d': 128}), progress=False)
  with pytest.raises(
      ConfigError,
      match=r"model.hook_name='model.decoder.layers.2' is not a module"
      r'.*decoder layers are model.language_model.layers.0 .. '
      r'model.language_model.layers.3',
  ):
    export.export(
        config(demo_dir, tmp_path / 'a', **{'model.hook_name': 'model.decoder.layers.2'}),
        progress=False,
    )
  with pytest.raises(
      ConfigError,
      match=r"model.name='/nonexistent/model' is neither a local " 'directory nor a Hub id',
  ):
    export.export(
        config(demo_dir, tmp_path / 'a', **{'model.name': '/nonexistent/model'}), progress=False
    )
  # A store begun from another manifest is not continued.
  export.export(config(demo_dir, tmp_path / 'b', **{'export.max_studies': 2}), progress=False)
  other = tmp_path / 'other.jsonl'
  other.write_text(''.join(l for i, l in enumerate(open(demo_dir / 'manifest.jsonl')) if i != 1))
  shutil.copytree(demo_dir / 'images', tmp_path / 'images')
  with pytest.raises(
      ConfigError,
      match=r"has 2 studies, the last 'demo-001', but the manifest "
      'does not list that study at row 2',
  ):
    export.export(
        config(demo_dir, tmp_path / 'b', **{'export.manifest': str(other)}), progress=False
    )
