"""Load the model and processor named in the config, and find the decoder layer to hook.

MAIRA-2 loads through `AutoModelForCausalLM` / `AutoProcessor` with `trust_remote_code` (its
config's auto_map names its classes); a plain LLaVA checkpoint, such as the offline stand-in, is
not a causal-LM class and loads through `AutoModelForImageTextToText` instead.
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Any

import ml_collections
import torch
import transformers

from jaxsae.config import ConfigError

# transformers 4.x nested LLaVA's decoder as language_model.model; 5.x as model.language_model.
_RENAMES = (
    (r'^language_model\.model\.layers\.', 'model.language_model.layers.'),
    (r'^model\.language_model\.layers\.', 'language_model.model.layers.'),
)


def _check_name(name: str) -> None:
  """A path that is not a directory must look like a Hub id (org/name), or it is a typo."""
  if os.path.isdir(name):
    return
  if name.startswith(('.', '/', '~')) or name.count('/') != 1:
    raise ConfigError(
        f'model.name={name!r} is neither a local directory nor a Hub id '
        '(org/name). For the offline demo model, run tools/make_demo_data.py first.'
    )


def load(c: ml_collections.ConfigDict) -> tuple[torch.nn.Module, Any]:
  """(model in eval mode on c.model.device with c.model.dtype, processor)."""
  name = c.model.name
  _check_name(name)
  transformers.utils.logging.disable_progress_bar()
  kw = dict(trust_remote_code=c.model.trust_remote_code)
  processor = transformers.AutoProcessor.from_pretrained(name, **kw)
  dtype = getattr(torch, c.model.dtype)
  try:
    model = transformers.AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kw)
  except ValueError as e:
    if 'Unrecognized configuration class' not in str(e):
      raise
    model = transformers.AutoModelForImageTextToText.from_pretrained(name, dtype=dtype, **kw)
  return model.to(torch.device(c.model.device)).eval(), processor


def fingerprint(name: str) -> str:
  """A short hash of a local model's small files (config, tokenizer, processor), so that a resumed
  export notices a different model under the same path; Hub ids are their own fingerprint."""
  if not os.path.isdir(name):
    return name
  h = hashlib.sha256()
  for f in sorted(os.listdir(name)):
    path = os.path.join(name, f)
    if f.endswith(('.json', '.jinja', '.model', '.txt')) and os.path.getsize(path) < 2**26:
      h.update(f.encode())
      with open(path, 'rb') as fh:
        h.update(fh.read())
  return h.hexdigest()[:16]


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
  """The language model's list of decoder layers (not the vision tower's)."""
  lists = [
      (n, m)
      for n, m in model.named_modules()
      if isinstance(m, torch.nn.ModuleList) and n.endswith('layers') and 'vision' not in n
  ]
  lists.sort(key=lambda nm: 'language_model' not in nm[0])
  if not lists:
    raise ConfigError(
        f'{type(model).__name__} has no decoder layer list; set model.hook_name to '
        'the module whose output to capture.'
    )
  return lists[0]


def find_layer(model: torch.nn.Module, hook_name: str, layer: int) -> tuple[str, torch.nn.Module]:
  """(path, module) of the hooked layer: `hook_name` if set (or its transformers-4/5 rename),
  else decoder layer number `layer`."""
  path, layers = decoder_layers(model)
  if not hook_name:
    if not 0 <= layer < len(layers):
      raise ConfigError(
          f'model.layer={layer} but {type(model).__name__} has {len(layers)} '
          f'decoder layers ({path}.0 .. {path}.{len(layers) - 1}).'
      )
    return f'{path}.{layer}', layers[layer]
  match = re.search(r'layers\.(\d+)$', hook_name)
  if match and int(match.group(1)) != layer:
    raise ConfigError(
        f'model.hook_name={hook_name!r} is layer {match.group(1)} but '
        f'model.layer={layer}; make them agree.'
    )
  for candidate in [hook_name] + [re.sub(a, b, hook_name) for a, b in _RENAMES]:
    try:
      return candidate, model.get_submodule(candidate)
    except AttributeError:
      continue
  raise ConfigError(
      f'model.hook_name={hook_name!r} is not a module of {type(model).__name__}; '
      f'its decoder layers are {path}.0 .. {path}.{len(layers) - 1}. Set '
      'model.hook_name to one of them, or to "" to use model.layer.'
  )
