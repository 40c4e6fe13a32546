"""jaxsae's MAIRA-2 port against a tiny random checkpoint in the release's own on-disk layout.

The checkpoint (jaxsae.bridge.maira2.checkpoint) has the release's config fields, key names,
tokenizer ids, processor files and chat template; only widths and depths are small. These tests pin
the facts the port relies on: the keys rename onto today's LLaVA layout, 1369 image tokens per
image in the order frontal / lateral / prior, the prompt's token kinds, layer 15's output as the
hooked activation, grounded output decoded and its boxes mapped back to the original image.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import load_file

from helpers import REPO, build_tiny_maira2
from jaxsae.bridge import export, loading, manifest, prompt, steering
from jaxsae.bridge import interventions as iv
from jaxsae.bridge.maira2 import checkpoint, grounding, modeling, processing, smoke
from jaxsae.config import ConfigError
from jaxsae.formats import store

pytestmark = pytest.mark.torch

IMAGE, PROMPT, BOILERPLATE, REPORT = range(4)
PER_IMAGE = 1369  # (518 / 14)^2


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """(config, model, processor, studies) for 8 demo studies and the tiny MAIRA-2."""
  c = build_tiny_maira2(tmp_path_factory.mktemp('maira2'), studies=8)
  model, processor = loading.load(c)
  return c, model, processor, manifest.read(c.export.manifest, True)


def test_the_checkpoint_has_the_releases_layout(tiny):
  c, _, _, _ = tiny
  raw = json.load(open(os.path.join(c.model.name, 'config.json')))
  assert raw['model_type'] == 'maira2' and raw['architectures'] == [modeling.ARCHITECTURE]
  assert raw['projector_n_layers'] == 4 and raw['image_token_index'] == 32204
  assert raw['image_seq_length'] == PER_IMAGE and raw['text_config']['vocab_size'] == 32207
  assert raw['text_config']['rope_scaling'] == {'factor': 1.5, 'type': 'linear'}
  index = json.load(open(os.path.join(c.model.name, 'model.safetensors.index.json')))
  prefixes = {k.split('.')[0] for k in index['weight_map']}
  assert prefixes == {'language_model', 'vision_tower', 'multi_modal_projector'}
  assert 'language_model.model.layers.15.mlp.up_proj.weight' in index['weight_map']
  assert 'multi_modal_projector.layers.6.weight' in index['weight_map']
  files = set(os.listdir(c.model.name))
  assert {'preprocessor_config.json', 'processor_config.json', 'chat_template.json'} <= files
  assert {'tokenizer.json', 'tokenizer_config.json', 'added_tokens.json'} <= files


def test_every_released_tensor_lands_in_the_port_renamed(tiny):
  c, model, _, _ = tiny
  ours = model.state_dict()
  released = {}
  for f in sorted(os.listdir(c.model.name)):
    if f.endswith('.safetensors'):
      released.update(load_file(os.path.join(c.model.name, f)))
  assert len(released) == len(ours)
  for key, value in released.items():
    renamed = modeling.rename(key)
    np.testing.assert_array_equal(ours[renamed].numpy(), value, err_msg=key)
  assert isinstance(model, modeling.Maira2ForConditionalGeneration)
  assert isinstance(model.model.multi_modal_projector.layers[6], torch.nn.Linear)


def test_tokenizer_carries_maira2s_added_tokens(tiny):
  _, _, processor, _ = tiny
  tok = processor.tokenizer
  ids = tok.convert_tokens_to_ids(
      ['<obj>', '</obj>', '<x0>', '<y99>', '<box>', '</box>', '<image>']
  )
  assert ids == [32000, 32001, 32002, 32201, 32202, 32203, 32204]
  assert type(processor).__name__ == 'Maira2Processor'
  assert processor.num_additional_image_tokens == 1 and processor.patch_size == 14


def _study(c, studies, n_images):
  return next(
      s for s in studies if 1 + (s.lateral is not None) + (s.prior_frontal is not None) == n_images
  )


@pytest.mark.parametrize('n_images', [1, 2, 3])
def test_prompt_has_1369_tokens_per_image_and_labelled_kinds(tiny, n_images):
  c, model, processor, studies = tiny
  study = _study(c, studies, n_images)
  p = prompt.prepare(processor, study, dict(study.images()), True, model.config.image_token_id)
  ids = p.input_ids.numpy()
  assert int((ids == 32204).sum()) == PER_IMAGE * n_images == int((p.kinds == IMAGE).sum())
  roles = [0] + ([1] if study.lateral else []) + ([2] if study.prior_frontal else [])
  np.testing.assert_array_equal(p.image[p.kinds == IMAGE], np.repeat(roles, PER_IMAGE))
  np.testing.assert_array_equal(p.patch[p.kinds == IMAGE], np.tile(np.arange(PER_IMAGE), n_images))
  tok = processor.tokenizer
  text = lambda kind: tok.decode(ids[p.kinds == kind])  # noqa: E731
  assert text(REPORT).split() == study.findings.split()
  assert study.indication.split()[0] in text(PROMPT)
  boiler = text(BOILERPLATE)
  assert checkpoint.SYSTEM_PROMPT.split()[0] in boiler and 'INDICATION:' in boiler
  assert 'USER:' in boiler and 'ASSISTANT:' in boiler
  assert ('PRIOR_REPORT:' in boiler) == (study.prior_frontal is not None)


def test_the_prompt_text_is_maira2s():
  text = processing.reporting_messages(True, True, 'Cough.', None, 'Prior.', 'Old.', None, True)
  parts = [m['text'] if m['type'] == 'text' else '<image>' for m in text[0]['content']]
  rendered = ''.join(parts)
  assert rendered.startswith(
      'Given the current frontal image<image> the current lateral image<image> and the prior'
      ' frontal image<image> PRIOR_REPORT: Old. Provide a structured description of the findings'
      ' in the radiology study in comparison to the prior frontal image.'
  )
  assert 'with bounding boxes' in rendered
  assert rendered.endswith('INDICATION: Cough. TECHNIQUE: N/A COMPARISON: Prior.')


def test_mixed_batch_rows_equal_each_study_alone_at_layer_15(tiny):
  c, model, processor, studies = tiny
  batch = [_study(c, studies, n) for n in (3, 1, 2)]
  preps = [prompt.prepare(processor, s, dict(s.images()), True, 32204) for s in batch]
  path, module = loading.find_layer(model, c.model.hook_name, c.model.layer)
  assert path == 'model.language_model.layers.15'
  capture = export.Capture(module, stop=False)
  try:
    inputs = export.collate(preps, 0, torch.device('cpu'), torch.float32)
    batched = capture.run(model, inputs)
  finally:
    capture.remove()
  for i, p in enumerate(preps):
    with torch.inference_mode():
      out = model(**p.inputs, output_hidden_states=True)
    # Decoder layer 15's output is hidden_states[16] ([0] is the embeddings): the residual
    # stream after block 15, dictionary_learning's convention (the layer module's output).
    alone = out.hidden_states[16][0]
    np.testing.assert_allclose(batched[i, : len(p.input_ids)], alone, rtol=2e-4, atol=2e-4)


def test_export_writes_image_tokens_per_image(tiny, tmp_path):
  c, _, _, studies = tiny
  c = c.copy_and_resolve_references()
  c.data.store_path = str(tmp_path / 'acts')
  c.export.keep_kinds = ('image', 'prompt', 'report')
  c.export.batch_size = 3
  meta = export.export(c, progress=False)
  s = store.open_store(c.data.store_path)
  tokens = s.tokens()
  for record in s.studies():
    study = studies[record['manifest_index']]
    n = 1 + (study.lateral is not None) + (study.prior_frontal is not None)
    t = tokens[record['row_start'] : record['row_start'] + record['rows']]
    assert int((t[:, 3] == IMAGE).sum()) == PER_IMAGE * n
  assert meta['studies'] == len(studies)


class _Script:
  """Forces generation to emit given token ids (so decoding of grounded output is exercised
  through model.generate on a random model)."""

  def __init__(self, ids, start):
    self.ids, self.start = ids, start

  def __call__(self, input_ids, scores):
    step = input_ids.shape[1] - self.start
    forced = torch.full_like(scores, -float('inf'))
    forced[:, self.ids[min(step, len(self.ids) - 1)]] = 0.0
    return forced


def test_generation_decodes_grounded_output_and_boxes_map_to_the_original_image(tiny):
  c, model, processor, studies = tiny
  study = _study(c, studies, 1)
  frontal = Image.new('L', (400, 300), 30)  # landscape: the 518-px crop cut the sides
  inputs = processor.format_and_preprocess_reporting_input(
      frontal,
      None,
      None,
      study.indication,
      None,
      None,
      None,
      get_grounding=True,
      return_tensors='pt',
  )
  target = '<obj>Small left effusion<box><x10><y20><x50><y90></box></obj>'
  tok = processor.tokenizer
  ids = tok(target, add_special_tokens=False)['input_ids'] + [tok.eos_token_id]
  start = inputs['input_ids'].shape[1]
  with torch.inference_mode():
    out = model.generate(
        **inputs,
        max_new_tokens=len(ids) + 2,
        do_sample=False,
        logits_processor=[_Script(ids, start)],
        pad_token_id=tok.pad_token_id,
    )
  text = tok.decode(out[0, start:], skip_special_tokens=True).strip()
  assert text == target
  [(phrase, [box])] = processor.convert_output_to_plaintext_or_grounded_sequence(text)
  assert phrase == 'Small left effusion'
  np.testing.assert_allclose(box, (0.105, 0.205, 0.505, 0.905))
  # 400 x 300: the crop is the central 300 x 300, 50 px in from the left.
  x0, y0, x1, y1 = processor.adjust_box_for_original_image_size(box, width=400, height=300)
  assert (x0, y0, x1, y1) == (
      int(0.105 * 300 + 50) / 400,
      int(0.205 * 300) / 300,
      int(0.505 * 300 + 50) / 400,
      int(0.905 * 300) / 300,
  )
  with pytest.raises(ValueError, match='inside <obj>'):
    processor.convert_output_to_plaintext_or_grounded_sequence('<obj>a<obj>b</obj>')
  assert processor.convert_output_to_plaintext_or_grounded_sequence(' plain ') == 'plain'


def test_steering_generates_on_the_port(tiny, tmp_path):
  c, model, processor, studies = tiny
  site = iv.Site(model, None, c.model.layer, c.model.hook_name)
  s = steering.prepare(site, processor, studies[0], grounding=True)
  g = steering.generate(site, processor, s, max_new_tokens=4)
  assert g.tokens <= 4 and isinstance(g.parsed, grounding.Parsed)


def test_remote_code_is_refused_with_a_fix_on_new_transformers(tiny):
  c, _, _, _ = tiny
  c = c.copy_and_resolve_references()
  c.model.trust_remote_code = True
  with pytest.raises(ConfigError, match=r'>=4.48,<4.52.*trust_remote_code=False'):
    loading.load(c)


def test_an_absent_device_is_a_clear_error(tiny):
  c, _, _, _ = tiny
  c = c.copy_and_resolve_references()
  c.model.device = 'cuda:3'
  with pytest.raises(ConfigError, match='CUDA device'):
    loading.load(c)


@pytest.mark.slow
def test_the_smoke_tool_runs_on_the_maira2_layout(tiny):
  c, _, _, _ = tiny
  run = subprocess.run(
      [sys.executable, os.path.join(REPO, 'tools', 'maira2_smoke.py'), f'--model={c.model.name}']
      + ['--device=cpu', '--dtype=float32', '--max_new_tokens=3'],
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  report = json.loads(run.stdout)
  assert report['tokens']['image'] == 2 * PER_IMAGE
  assert report['hooked'] == 'model.language_model.layers.15' and report['width'] == 64
  assert report['token_ids'] == {'<obj>': 32000, '<box>': 32202, '<image>': 32204}
  assert report['report']['tokens'] <= 3 and 'grounded_report' in report
  assert report['after_load']['host_peak_rss_gb'] > 0


def test_the_smoke_tool_says_when_the_gpu_is_missing(tiny):
  c, _, _, _ = tiny
  run = subprocess.run(
      [sys.executable, os.path.join(REPO, 'tools', 'maira2_smoke.py'), f'--model={c.model.name}'],
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert run.returncode == 2 and 'CUDA device' in run.stderr


_PEAK = r"""
import sys, threading, time
from jaxsae.bridge import loading
from jaxsae.config import default_config

def anon():
  for line in open('/proc/self/status'):
    if line.startswith('RssAnon:'):
      return int(line.split()[1]) * 1024

peak, done = [anon()], []
def sample():
  while not done:
    peak.append(anon())
    time.sleep(0.002)

c = default_config()
c.model.name, c.model.device, c.model.dtype = sys.argv[1], 'cpu', sys.argv[2]
before = anon()
t = threading.Thread(target=sample)
t.start()
model, _ = loading.load(c)
done.append(1)
t.join()
size = sum(p.numel() * p.element_size() for p in model.parameters())
print(size, max(peak) - before)
"""


@pytest.mark.slow
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_loading_never_holds_a_second_copy_of_the_weights(tmp_path_factory, dtype):
  """A ~310 MB float32 checkpoint: host memory grows by about the model's size, not twice it
  (weights are read from the memory-mapped shards and placed once, cast on the way)."""
  root = tmp_path_factory.getbasetemp() / 'maira2_mid'
  if not (root / 'config.json').exists():
    checkpoint.build(str(root), ['the heart size is normal'], hidden=512, layers=17)
  run = subprocess.run(
      [sys.executable, '-c', _PEAK, str(root), dtype], capture_output=True, text=True, timeout=600
  )
  assert run.returncode == 0, run.stderr[-3000:]
  size, grew = map(int, run.stdout.split()[-2:])
  assert size > 150e6 if dtype == 'float32' else size > 75e6
  assert grew < 1.4 * size, f'host memory grew {grew / 1e6:.0f} MB for a {size / 1e6:.0f} MB model'


def test_image_features_are_the_backbones_layernormed_last_stage_without_cls(tiny):
  """MAIRA-2 reads the Dinov2 backbone's feature_maps (hidden states with its LayerNorm), not
  plain LLaVA's hidden_states; CLS is dropped ("default" strategy)."""
  _, model, processor, _ = tiny
  pixels = processor.image_processor(
      [processing.normalise_image(smoke.synthetic_radiograph(600, 520))], return_tensors='pt'
  )['pixel_values']
  assert tuple(pixels.shape[-2:]) == (518, 518)
  inner = model.model
  with torch.inference_mode():
    got = inner.get_image_features(pixels).pooler_output[0]
    hidden = inner.vision_tower(pixels, output_hidden_states=True).hidden_states[-1]
    want = inner.multi_modal_projector(inner.vision_tower.layernorm(hidden)[:, 1:])[0]
    plain = inner.multi_modal_projector(hidden[:, 1:])[0]
  assert got.shape == (PER_IMAGE, model.config.text_config.hidden_size)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The LayerNorm matters: without it the features differ by a large share of their size.
  assert float((got - plain).abs().max()) > 0.1 * float(got.abs().max())
