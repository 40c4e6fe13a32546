"""A smoke test of MAIRA-2 for a user who has the weights: load, one study through layer 15, a
findings report and a grounded one, with the time and memory each step took.

It checks what the SAE pipeline relies on (1369 tokens per image, the grounding token ids, the
hooked layer's width) and prints what a person should eyeball (the reports, the boxes mapped to the
image, the activation norms per token kind: Vicuna's massive-norm tokens show up as a max far above
the median). It runs on the tiny MAIRA-2-layout checkpoint too, which is how it is tested.
"""

from __future__ import annotations

import os
import resource
import tempfile
import time
from typing import Any

import numpy as np
import torch
from PIL import Image

from jaxsae.bridge import export, loading, manifest, prompt, steering
from jaxsae.bridge import interventions as iv
from jaxsae.bridge.maira2 import grounding
from jaxsae.config import ConfigError, default_config

PER_IMAGE = 1369
KINDS = ('image', 'prompt', 'boilerplate', 'report')


def synthetic_radiograph(width: int = 2500, height: int = 3000, seed: int = 0) -> Image.Image:
  """An 8-bit portrait image of MIMIC-CXR's size with a bright body and two dark lungs."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  img = np.full((height, width), 20, np.float32)
  body = ((xx - width / 2) / (0.45 * width)) ** 2 + ((yy - height / 2) / (0.48 * height)) ** 2 < 1
  img[body] = 170
  for cx in (0.33, 0.67):
    lung = ((xx - cx * width) / (0.14 * width)) ** 2 + ((yy - 0.45 * height) / (0.3 * height)) ** 2
    img[lung < 1] = 60
  img += rng.normal(0, 6, img.shape)
  return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def _peak_memory(device: torch.device) -> dict[str, float]:
  out = {'host_peak_rss_gb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
  if device.type == 'cuda':
    out['gpu_peak_gb'] = torch.cuda.max_memory_allocated(device) / 2**30
  return out


def run(
    name: str,
    revision: str = '',
    device: str = 'cuda',
    dtype: str = 'bfloat16',
    layer: int = 15,
    images: dict[str, str] | None = None,
    indication: str = 'Shortness of breath.',
    max_new_tokens: int = 300,
) -> dict[str, Any]:
  """Load `name`, run one study, return the figures and texts (see the module docstring)."""
  c = default_config()
  c.model.name, c.model.revision, c.model.device, c.model.dtype = name, revision, device, dtype
  c.model.layer, c.model.hook_name = layer, ''
  report: dict[str, Any] = {'model': name, 'revision': revision or None, 'device': device}
  t = time.perf_counter()
  model, processor = loading.load(c)
  dev = next(model.parameters()).device
  report['load_s'] = round(time.perf_counter() - t, 2)
  report['after_load'] = _peak_memory(dev)
  tok = processor.tokenizer
  ids = dict(
      zip(('<obj>', '<box>', '<image>'), tok.convert_tokens_to_ids(['<obj>', '<box>', '<image>']))
  )
  report['token_ids'] = ids
  site = iv.Site(model, None, layer)
  report['hooked'] = site.path
  report['width'] = site.d
  if not images:  # two generated MIMIC-sized radiographs, written where the manifest reader looks
    folder = tempfile.mkdtemp(prefix='maira2_smoke_')
    images = {}
    for i, field in enumerate(('frontal', 'lateral')):
      images[field] = os.path.join(folder, f'{field}.png')
      synthetic_radiograph(seed=i).save(images[field])
  study = manifest.Study('smoke', 0, 'smoke test', indication=indication, **images)
  pictures = {f: im for f, im in study.images() if im is not None}
  p = prompt.prepare(processor, study, pictures, False, ids['<image>'])
  n_images = len(pictures)
  counts = np.bincount(p.kinds, minlength=len(KINDS))
  report['tokens'] = {k: int(n) for k, n in zip(KINDS, counts)}
  if counts[0] != PER_IMAGE * n_images:
    raise ConfigError(
        f'{counts[0]} image tokens for {n_images} images; MAIRA-2 has {PER_IMAGE} per image. '
        "Check the processor's num_additional_image_tokens (1) and the 518-px crop."
    )
  inputs = steering.to_device(dict(p.inputs), model)
  capture = export.Capture(site.module, stop=True)
  t = time.perf_counter()
  try:
    hidden = capture.run(model, inputs)[0].float().norm(dim=-1).cpu().numpy()
  finally:
    capture.remove()
  report['forward_to_layer_s'] = round(time.perf_counter() - t, 3)
  report['norms'] = {
      k: {
          'median': float(np.median(hidden[p.kinds == i])),
          'max': float(hidden[p.kinds == i].max()),
      }
      for i, k in enumerate(KINDS)
      if (p.kinds == i).any()
  }
  for grounded in (False, True):
    s = steering.prepare(site, processor, study, grounding=grounded)
    t = time.perf_counter()
    g = steering.generate(site, processor, s, max_new_tokens)
    key = 'grounded_report' if grounded else 'report'
    frontal = pictures['frontal']
    report[key] = {
        'text': g.text,
        'tokens': g.tokens,
        'seconds': round(time.perf_counter() - t, 2),
        'boxes_on_original_image': [
            [round(v, 4) for v in grounding.adjust_box(b, *frontal.size)]
            for ph in g.parsed.phrases
            for b in ph.boxes
        ],
        'problems': g.parsed.problems,
    }
  report['peak'] = _peak_memory(dev)
  return report
