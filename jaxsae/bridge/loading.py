"""Load the model and processor named in the config, and find the decoder layer to hook.

A MAIRA-2 checkpoint (config.json `model_type` "maira2") loads into jaxsae's own port
(jaxsae.bridge.maira2: today's LLaVA layout, the release's key names renamed on load) unless
`model.trust_remote_code` asks for the release's remote code, which runs only under transformers
>=4.48,<4.52. Anything else loads through the Auto classes (`AutoModelForCausalLM`, or
`AutoModelForImageTextToText` for a plain LLaVA such as the offline stand-in).

Weights go straight to `model.device` in `model.dtype` (`device_map`: built on the meta device,
each tensor read from the memory-mapped shards, cast and placed once), so a 7B model never exists
twice in host memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

import ml_collections
import torch
import transformers

from jaxsae.bridge.maira2 import modeling as maira2_modeling
from jaxsae.bridge.maira2 import processing as maira2_processing
from jaxsae.config import ConfigError

_TRANSFORMERS = tuple(int(x) for x in re.findall(r'\d+', transformers.__version__)[:2])

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


# from_pretrained's dtype argument: `dtype` from transformers 4.56, `torch_dtype` before.
_DTYPE_ARG = 'dtype' if _TRANSFORMERS >= (4, 56) else 'torch_dtype'
_REMOTE_CODE_RANGE = ((4, 48), (4, 52))  # MAIRA-2's released code: >=4.48, <4.52


def device_of(name: str) -> torch.device:
  """`name` as a torch device, or a ConfigError when this machine has no such device."""
  try:
    dev = torch.device(name)
  except RuntimeError as e:
    raise ConfigError(f'model.device={name!r} is not a torch device ({e}).') from None
  if dev.type == 'cuda':
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0 or (dev.index or 0) >= count:
      raise ConfigError(
          f'model.device={name!r} but this machine has {count} CUDA device(s) (torch '
          f'{torch.__version__}, CUDA build: {torch.version.cuda}). Run on a GPU machine, or set '
          '--config.model.device=cpu (and --config.model.dtype=float32: CPUs are slow in bfloat16).'
      )
  elif dev.type == 'mps' and not torch.backends.mps.is_available():
    raise ConfigError(f'model.device={name!r} but MPS is not available on this machine.')
  return dev


def read_config(name: str, revision: str | None = None) -> dict[str, Any]:
  """The checkpoint's config.json as a dict (local directory or Hub, cached), unparsed: which
  classes to build depends on it."""
  path = transformers.utils.cached_file(name, 'config.json', revision=revision)
  with open(path) as f:
    return json.load(f)


def load(c: ml_collections.ConfigDict) -> tuple[torch.nn.Module, Any]:
  """(model in eval mode on c.model.device with c.model.dtype, processor)."""
  return load_model(
      c.model.name,
      revision=c.model.revision,
      dtype=c.model.dtype,
      device=c.model.device,
      trust_remote_code=c.model.trust_remote_code,
  )


def load_model(
    name: str,
    revision: str = '',
    dtype: str = 'float32',
    device: str = 'cpu',
    trust_remote_code: bool = False,
) -> tuple[torch.nn.Module, Any]:
  """(model in eval mode on `device` in `dtype`, its processor or tokenizer), MAIRA-2 into
  jaxsae's port unless `trust_remote_code` (see the module docstring)."""
  _check_name(name)
  dev = device_of(device)
  revision = revision or None
  transformers.utils.logging.disable_progress_bar()
  is_maira2 = maira2_modeling.is_maira2(read_config(name, revision))
  if (
      is_maira2
      and trust_remote_code
      and not (_REMOTE_CODE_RANGE[0] <= _TRANSFORMERS < _REMOTE_CODE_RANGE[1])
  ):
    raise ConfigError(
        "model.trust_remote_code=True runs MAIRA-2's released code, which needs transformers "
        f'>=4.48,<4.52; this environment has {transformers.__version__}. Set '
        "--config.model.trust_remote_code=False to use jaxsae's port of MAIRA-2 (same weights, "
        'same outputs), or install transformers==4.51.3 in a separate environment.'
    )
  kw = {
      'revision': revision,
      'trust_remote_code': trust_remote_code,
      _DTYPE_ARG: getattr(torch, dtype),
      'device_map': str(dev),
  }
  if is_maira2 and not trust_remote_code:
    processor = maira2_processing.Maira2Processor.from_pretrained(
        name, revision=revision, trust_remote_code=False
    )
    model = maira2_modeling.Maira2ForConditionalGeneration.from_pretrained(
        name, key_mapping=maira2_modeling.CHECKPOINT_KEY_MAPPING, **kw
    )
    return model.eval(), processor
  processor = transformers.AutoProcessor.from_pretrained(
      name, revision=revision, trust_remote_code=trust_remote_code
  )
  try:
    model = transformers.AutoModelForCausalLM.from_pretrained(name, **kw)
  except ValueError as e:
    if 'Unrecognized configuration class' not in str(e):
      raise
    model = transformers.AutoModelForImageTextToText.from_pretrained(name, **kw)
  return model.eval(), processor


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
