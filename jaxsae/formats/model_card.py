"""A published SAE's model card (README.md), the Hub id it goes to, and what a push would do.

`python -m jaxsae.export_weights --push_to_hub=ORG/NAME[/SUBFOLDER]` writes the export with this
card beside the weights (listed in its manifest like them, so `jaxsae.weights.load` still verifies
the folder) and uploads the folder. The card is generated from what the export knows: the SAE's
shape and site from the checkpoint, the held-out figures from the training folder's summary.json,
loss recovered from an evaluation.json when one is given. A figure that was not measured is
written as not measured, never filled in; every number shown is the file's, rounded for reading.

Metadata (YAML front matter, the Hub's model-card fields): library_name jaxsae; base_model only
when the model is a Hub id (not 'synthetic', not a local folder); tags: the method's, the layout's
and the model's; license as the publisher declares it with --license, else 'other' and a line in
the card saying that none was declared (the SAE's terms cannot be inferred: they may follow the
model's). The Hub shows a repository's root README.md as its card; one pushed to a subfolder
documents that SAE only.

Pure: no JAX, no torch, no network.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shlex
from typing import Any, Mapping, Sequence

from jaxsae.errors import ConfigError
from jaxsae.formats import hub
from jaxsae.formats import weights as weights_format

__all__ = [
    'CARD',
    'TAGS',
    'UNDECLARED_LICENSE',
    'EVALUATION_FIELDS',
    'Card',
    'Plan',
    'parse_target',
    'check_license',
    'base_model',
    'read_summary',
    'read_evaluation',
    'check_evaluation',
    'command_line',
    'render',
    'describe',
]

CARD = 'README.md'
TAGS = ('sparse-autoencoder', 'matryoshka', 'batchtopk', 'jax', 'interpretability')
LAYOUT_TAGS = {'dictionary_learning': 'dictionary-learning', 'saelens': 'saelens'}
UNDECLARED_LICENSE = 'other'  # the Hub's value for "not one of its list"; the card says why
# What `python -m jaxsae.evaluate` writes that the card shows; the first six must be there.
EVALUATION_FIELDS = ('loss_recovered', 'ce_clean', 'ce_splice', 'ce_zero', 'kl_splice', 'kl_zero')

# Hub user and repository names (as hf:// ids, plus the Hub's own limits), and subfolder parts.
_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9._-]{0,95}')
_FOLDER = re.compile(r'[A-Za-z0-9_][A-Za-z0-9._+=-]*')
_LICENSE = re.compile(r'[a-z0-9][a-z0-9.+-]*')
_HOW = 'Write it as ORG/NAME or ORG/NAME/SUBFOLDER (e.g. my-org/maira2-sae/layer15_ef4).'


@dataclasses.dataclass(frozen=True)
class Card:
  """What the card states; None where a figure or a fact is not known."""

  target: hub.HubRef
  layout: str
  d: int
  F: int
  k: int
  group_sizes: tuple[int, ...]
  threshold: float  # on raw activations; < 0: none learned yet
  scale: float
  step: int
  batch_size: int
  model_name: str | None
  layer: int | None
  hook_name: str | None
  data: str  # where the training activations came from, in words
  training: Mapping[str, Any]
  config: Mapping[str, Any]  # the training config as the checkpoint records it
  command: str  # the command that writes this folder (and pushes it)
  license: str | None
  summary: Mapping[str, Any] | None
  summary_path: str
  evaluation: Mapping[str, Any] | None = None
  evaluation_path: str | None = None


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a push uploads: the files of `folder` (name, bytes) into `target`."""

  target: hub.HubRef
  folder: str
  files: tuple[tuple[str, int], ...]
  private: bool
  dry_run: bool
  token_found: bool
  commit_url: str | None = None


def parse_target(spec: str) -> hub.HubRef:
  """The repository and folder of `--push_to_hub=ORG/NAME[/SUBFOLDER...]` (an `hf://` prefix is
  allowed), or a ConfigError saying what is wrong; checked before any work."""
  text = (spec or '').strip()
  rest = text[len(hub.PREFIX) :] if hub.is_hub(text) else text
  if not rest:
    raise ConfigError(f'--push_to_hub is empty. {_HOW}')
  if '@' in rest:
    raise ConfigError(
        f'--push_to_hub={spec}: a revision ("@...") cannot be pushed to; exports go to the main '
        f'branch. {_HOW}'
    )
  parts = rest.strip('/').split('/')
  if len(parts) < 2:
    raise ConfigError(f'--push_to_hub={spec} does not name a repository (ORG/NAME). {_HOW}')
  for p in parts[:2]:
    if not _NAME.fullmatch(p) or '--' in p or '..' in p or p[-1] in '.-' or p.endswith('.git'):
      raise ConfigError(
          f'--push_to_hub={spec}: {p!r} is not a valid Hub user or repository name (letters, '
          "digits, '-', '_', '.', at most 96, not starting or ending with '-' or '.', no '--' or "
          f"'..'). {_HOW}"
      )
  for p in parts[2:]:
    if not _FOLDER.fullmatch(p):
      raise ConfigError(
          f"--push_to_hub={spec}: folder name {p!r} is not allowed (letters, digits, '_', '.', "
          f"'-', '+', '='; not empty, not starting with '.'). {_HOW}"
      )
  return hub.HubRef('/'.join(parts[:2]), '/'.join(parts[2:]))


def check_license(value: str | None) -> str | None:
  """A Hub licence id (e.g. mit, apache-2.0, cc-by-4.0, other), or None when none is declared."""
  if value is None or not value.strip():
    return None
  if not _LICENSE.fullmatch(value.strip()):
    raise ConfigError(
        f'--license={value!r} is not a Hub licence id (lowercase, like mit, apache-2.0, '
        'cc-by-4.0, other); see https://huggingface.co/docs/hub/repositories-licenses.'
    )
  return value.strip()


def base_model(model_name: str | None) -> str | None:
  """The model's Hub id, if it is one: not 'synthetic' and not a folder on this machine."""
  if not model_name or model_name == 'synthetic' or os.path.isdir(model_name):
    return None
  parts = model_name.split('/')
  ok = len(parts) == 2 and all(_NAME.fullmatch(p) for p in parts)
  return model_name if ok else None


def read_summary(workdir: str) -> tuple[dict[str, Any] | None, str]:
  """(summary.json of a training folder, or None when training wrote none, its path)."""
  path = os.path.join(workdir, 'summary.json')
  if not os.path.exists(path):
    return None, path
  return (
      weights_format.read_json(path, 'Train to the end again to rewrite it, or move it away.'),
      path,
  )


def read_evaluation(path: str) -> dict[str, Any]:
  """The evaluation.json of `python -m jaxsae.evaluate`, checked for the figures the card shows."""
  redo = 'Write it with `python -m jaxsae.evaluate --config=... --weights=<this export>`.'
  if not os.path.isfile(path):
    raise ConfigError(f'--evaluation={path}: there is no such file. {redo}')
  e = weights_format.read_json(path, redo)
  missing = [f for f in EVALUATION_FIELDS if not _is_number(e.get(f))]
  if missing:
    raise ConfigError(
        f'{path} lacks the numbers {missing} (got {sorted(e)}); it is not an evaluation.json of '
        f'`python -m jaxsae.evaluate`. {redo}'
    )
  return e


def check_evaluation(e: Mapping[str, Any], path: str, group_sizes: Sequence[int]) -> None:
  """An evaluation of another SAE (other Matryoshka groups, hence another F) is refused."""
  got = e.get('group_sizes')
  if got is not None and [int(s) for s in got] != [int(s) for s in group_sizes]:
    raise ConfigError(
        f'{path} evaluates an SAE with group sizes {list(got)}, but this export has '
        f'{list(group_sizes)}: it is the evaluation of another SAE. Evaluate this one with '
        '`python -m jaxsae.evaluate --config=... --weights=<this export>`.'
    )


def command_line(module: str, flags: Mapping[str, Any]) -> str:
  """`python -m module --flag=value ...`, quoted for a POSIX shell; None values are left out,
  True is a bare flag and False is left out."""
  args = ['python', '-m', module]
  for name, value in flags.items():
    if value is None or value is False:
      continue
    args.append(f'--{name}' if value is True else f'--{name}={value}')
  return ' '.join(shlex.quote(a) for a in args)


# --------------------------------------------------------------------------------------------------
# The card
# --------------------------------------------------------------------------------------------------


def render(card: Card) -> str:
  """README.md: YAML front matter, then what the SAE is, how it was trained, what was measured,
  its files, how to load it and how to make it again."""
  sections = [
      _front_matter(card),
      _overview(card),
      _architecture(card),
      _training(card),
      _held_out(card),
      _in_model(card),
      _files(card),
      _loading(card),
      _reproducing(card),
      _licence(card),
  ]
  return '\n\n'.join(s.strip('\n') for s in sections) + '\n'


def _front_matter(card: Card) -> str:
  tags = [*TAGS, LAYOUT_TAGS[card.layout]]
  model_tag = base_model(card.model_name) or ('synthetic' if card.model_name == 'synthetic' else '')
  if model_tag:
    tags.append(model_tag)
  lines = ['---', 'library_name: jaxsae', f'license: {_yaml(card.license or UNDECLARED_LICENSE)}']
  if base_model(card.model_name):
    lines.append(f'base_model: {_yaml(card.model_name)}')
  lines.append('tags:')
  lines += [f'- {_yaml(t)}' for t in tags]
  lines.append('---')
  return '\n'.join(lines)


def _yaml(value: str) -> str:
  """A YAML scalar: a JSON string is a valid YAML double-quoted one, so nothing is misread."""
  return json.dumps(str(value))


def _model(card: Card) -> str:
  if card.model_name == 'synthetic':
    return 'synthetic activations with planted features (no model)'
  if card.model_name is None:
    return 'a model the export does not name'
  where = '' if base_model(card.model_name) else ' (a local model, not a Hub id)'
  return f'`{card.model_name}`{where}'


def _overview(card: Card) -> str:
  site = ''
  if card.model_name != 'synthetic':
    layer = f'decoder layer {card.layer}' if card.layer is not None else 'an unrecorded layer'
    hook = f' (`{card.hook_name}`)' if card.hook_name else ''
    site = f' on the residual-stream output of {layer}{hook} of'
  else:
    site = ' on'
  return (
      f'# Matryoshka BatchTopK SAE: {_title(card)}\n\n'
      f'A sparse autoencoder (Matryoshka BatchTopK, Bussmann et al. 2025) with {card.F:,} latents'
      f'{site} {_model(card)}, trained with jaxsae (JAX) and exported in '
      f"{_layout_name(card.layout)}'s layout. Repository folder: "
      f'`{card.target.subfolder or "(root)"}`.'
  )


def _title(card: Card) -> str:
  if card.model_name == 'synthetic':
    return f'synthetic data, d={card.d}, F={card.F}'
  layer = f' layer {card.layer}' if card.layer is not None else ''
  return f'{card.model_name}{layer}, F={card.F}'


def _layout_name(layout: str) -> str:
  return {'dictionary_learning': 'dictionary_learning', 'saelens': 'SAELens'}[layout]


def _architecture(card: Card) -> str:
  widths = [sum(card.group_sizes[: i + 1]) for i in range(len(card.group_sizes))]
  theta = (
      f'{_num(card.threshold)} (JumpReLU: a latent is active where its pre-activation exceeds it)'
      if card.threshold >= 0
      else 'none learned yet (trained for fewer than threshold_start_step steps): every positive '
      'pre-activation counts'
  )
  rows = [
      ('activation width d', f'{card.d:,}'),
      ('latents F', f'{card.F:,} (expansion factor {_num(card.F / card.d)})'),
      ('k (BatchTopK: active latents per token in training, on average)', f'{card.k}'),
      (
          'Matryoshka groups',
          f'{len(card.group_sizes)}, sizes {list(card.group_sizes)} (nested prefixes of '
          f'{widths} latents)',
      ),
      ('inference threshold θ (raw activations)', theta),
      ('site', _site(card)),
      (
          'activation scale',
          f'{_num(card.scale)}, folded into b_enc, b_dec and θ: the files act on raw activations',
      ),
  ]
  return (
      '## The SAE\n\n'
      + _table(rows)
      + '\n\nencode(x) = a · [a > θ] with a = relu((x − b_dec) W_enc + b_enc); '
      'decode(a) = a W_dec + b_dec. The latents up to any group boundary form a smaller SAE on '
      'their own (the Matryoshka prefixes).'
  )


def _site(card: Card) -> str:
  if card.model_name == 'synthetic':
    return 'synthetic activations (experiments/synthetic.py)'
  layer = str(card.layer) if card.layer is not None else 'not recorded'
  hook = f'`{card.hook_name}`' if card.hook_name else 'not recorded'
  return f'model {_model(card)}, layer {layer}, module {hook}'


def _training(card: Card) -> str:
  rows = [
      ('steps', f'{card.step:,}'),
      ('batch size', f'{card.batch_size:,} tokens'),
      ('training tokens', f'{card.step * card.batch_size:,} (steps × batch size)'),
      ('data', card.data),
  ]
  rows += [(f'`{k}`', _value(v)) for k, v in card.training.items()]
  return '## Training\n\n' + _table(rows)


def _held_out(card: Card) -> str:
  head = '## Held-out reconstruction\n\n'
  s = card.summary
  if s is None:
    return head + (
        f'Not measured: the training folder has no summary.json ({card.summary_path}); '
        '`python -m jaxsae.train` writes it when training reaches its last step.'
    )
  if s.get('step') != card.step:
    return head + (
        f'Not measured for this checkpoint: {card.summary_path} describes step {s.get("step")}, '
        f'and this export is of step {card.step}.'
    )
  if not s.get('eval_tokens'):
    return head + f'Not measured: no held-out rows ({s.get("eval_on", "reason not recorded")}).'
  dead = s.get('dead_latents')
  dead_text = (
      f'{dead:,} of {card.F:,} ({_num(100 * s["dead_fraction"])} %), no firing on '
      f'{s.get("dead_over_tokens", s["eval_tokens"]):,} tokens'
      if _is_number(dead) and _is_number(s.get('dead_fraction'))
      else 'not measured'
  )
  rows = [
      ('FVU (fraction of variance unexplained)', _num(s.get('eval_fvu'))),
      ('L0 (active latents per token)', _num(s.get('eval_l0'))),
      ('dead latents', dead_text),
  ]
  if _is_number(s.get('mmcs')):
    rows.append(('MMCS to the planted features', _num(s['mmcs'])))
  return head + (
      f'At the end of training, with the learned threshold, on {s["eval_tokens"]:,} held-out '
      f'tokens ({s.get("eval_on", "held-out rows")}), from summary.json:\n\n' + _table(rows)
  )


def _in_model(card: Card) -> str:
  head = '## In the model: loss recovered\n\n'
  e = card.evaluation
  if e is None:
    return head + (
        'Not measured: no evaluation.json was given. Measure it with `python -m jaxsae.evaluate '
        f'--config=... --weights={card.target}` and publish again with '
        '`--evaluation=OUT/evaluation.json`.'
    )
  where = 'held-out' if e.get('held_out') else 'IN-SAMPLE (not shown to be held out)'
  rows = [
      ('loss recovered', _num(e['loss_recovered'])),
      (
          'cross-entropy clean / SAE spliced / layer zeroed',
          ' / '.join(_num(e[f]) for f in ('ce_clean', 'ce_splice', 'ce_zero')),
      ),
      ('KL(clean ‖ spliced)', _num(e['kl_splice'])),
      ('KL(clean ‖ zeroed)', _num(e['kl_zero'])),
  ]
  for name, key in (('FVU', 'fvu'), ('L0', 'l0'), ('dead latents', 'dead_latents')):
    if _is_number(e.get(key)):
      rows.append((f'{name} on the spliced tokens', _num(e[key])))
  counts = ', '.join(
      f'{_value(e[k])} {w}'
      for k, w in (
          ('studies', 'studies'),
          ('tokens', 'spliced tokens'),
          ('report_tokens', 'report tokens scored'),
      )
      if _is_number(e.get(k))
  )
  text = (
      f'From `python -m jaxsae.evaluate` ({os.path.basename(card.evaluation_path or "")}), '
      f'{where}: {counts or "counts not recorded"}; evaluated on '
      f'{e.get("evaluated_on", "data not recorded")}.\n\n' + _table(rows)
  )
  warnings = [w for w in e.get('warnings', []) if isinstance(w, str)]
  if warnings:
    text += '\n\nWarnings of the evaluation:\n' + '\n'.join(f'- {w}' for w in warnings)
  return head + text


def _files(card: Card) -> str:
  about = {
      weights_format.DL_WEIGHTS: 'the state dict (W_enc [d, F], b_enc, W_dec [F, d], b_dec, k, '
      'threshold, group_sizes), safetensors',
      weights_format.DL_TORCH: "the same state dict as torch.save writes it (dictionary_learning's "
      'load_dictionary and SAEBench read it)',
      weights_format.DL_CONFIG: "dictionary_learning's trainer config (k, groups, layer, hook, "
      'training hyper-parameters)',
      weights_format.SL_WEIGHTS: 'W_enc [d, F], b_enc, W_dec [F, d], b_dec, threshold [F], '
      'safetensors',
      weights_format.SL_CONFIG: "SAELens's config (architecture jumprelu, d_in, d_sae, hook_name; "
      'k and groups under metadata.jaxsae)',
  }
  names = [*weights_format.WEIGHT_FILES[card.layout], weights_format.FILES[card.layout][1]]
  rows = [(f'`{n}`', about[n]) for n in names]
  rows.append(
      (
          f'`{weights_format.MANIFEST}`',
          'size and SHA-256 of every file here, this card '
          'included; `jaxsae.weights.load` checks them',
      )
  )
  rows.append((f'`{CARD}`', 'this card'))
  return '## Files\n\n' + _table(rows, ('file', 'what it holds'))


def _loading(card: Card) -> str:
  ref, sub = card.target, card.target.subfolder
  folder = f"f'{{folder}}/{sub}'" if sub else 'folder'
  pattern = f"allow_patterns=['{sub}/*']" if sub else "allow_patterns=['*']"
  fetch = f"folder = snapshot_download('{ref.repo_id}', {pattern})\n"
  if card.layout == 'dictionary_learning':
    other = (
        'With dictionary_learning (reads `ae.pt` and `config.json`):\n\n```python\n'
        'from dictionary_learning.utils import load_dictionary\n'
        'from huggingface_hub import snapshot_download\n\n'
        + fetch
        + f"ae, config = load_dictionary({folder}, device='cpu')\n```"
    )
  else:
    other = (
        'With SAELens (a JumpReLU SAE; the BatchTopK k is in `cfg.json` under metadata.jaxsae):\n\n'
        '```python\nfrom huggingface_hub import snapshot_download\nfrom sae_lens import SAE\n\n'
        + fetch
        + f"sae = SAE.load_from_disk({folder}, device='cpu')\n```"
    )
  return (
      '## Loading\n\n'
      'With jaxsae (checks the manifest; any command taking `--weights` takes the id too):\n\n'
      '```python\nfrom jaxsae import weights\n\n'
      f"sae, cfg = weights.load('{ref}')\n```\n\n" + other
  )


def _reproducing(card: Card) -> str:
  config = json.dumps(card.config, indent=2, sort_keys=True, default=str)
  return (
      '## Reproducing\n\n'
      'This folder, card included, was written (and pushed) by the command below from the training '
      'folder of `python -m jaxsae.train`, whose summary.json holds the held-out figures above:\n\n'
      f'```sh\n{card.command}\n```\n\n'
      '<details><summary>The training config, as the checkpoint records it</summary>\n\n'
      f'```json\n{config}\n```\n\n</details>'
  )


def _licence(card: Card) -> str:
  model = base_model(card.model_name)
  also = (
      f' The SAE was trained on activations of `{model}`; its terms may apply as well.'
      if model
      else ''
  )
  if card.license:
    return f'## Licence\n\n`{card.license}`, as declared by the publisher.{also}'
  return (
      '## Licence\n\nNot declared by the publisher (the metadata says `other`): ask them before '
      f're-using these weights. Publish with `--license=ID` to declare one.{also}'
  )


def describe(plan: Plan) -> list[str]:
  """What a push uploads (or, in a dry run, would), for the console; never the token."""
  ref = plan.target
  where = f'folder {ref.subfolder}/' if ref.subfolder else 'the root'
  verb = 'would upload' if plan.dry_run else 'uploaded'
  size = sum(n for _, n in plan.files)
  lines = [
      f'{verb} {plan.folder} ({len(plan.files)} files, {_bytes(size)}) to {where} of the '
      f'{"private" if plan.private else "public"} model repository '
      f'https://huggingface.co/{ref.repo_id} (created if absent), replacing the export files '
      'already there:'
  ]
  lines += [
      f'  {ref.subfolder + "/" if ref.subfolder else ""}{n}  ({_bytes(b)})' for n, b in plan.files
  ]
  if plan.dry_run:
    lines.append('dry run: nothing was sent.')
    if not plan.token_found:
      lines.append(
          'note: no Hugging Face token is set here; the real push needs one with write access '
          '(`hf auth login`, or HF_TOKEN).'
      )
  if plan.commit_url:
    lines.append(f'commit: {plan.commit_url}')
  lines.append(f"load it with jaxsae.weights.load('{ref}')")
  return lines


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def _table(rows: Sequence[tuple[str, str]], head: tuple[str, str] = ('', 'value')) -> str:
  lines = [f'| {head[0]} | {head[1]} |', '| --- | --- |']
  lines += [f'| {a} | {str(b).replace("|", "/")} |' for a, b in rows]
  return '\n'.join(lines)


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _num(v: Any) -> str:
  """A figure for reading: 4 significant digits; an integer as is; None as not measured."""
  if v is None:
    return 'not measured'
  if isinstance(v, bool) or not _is_number(v):
    return str(v)
  if isinstance(v, int):
    return f'{v:,}'
  if math.isnan(v):
    return 'NaN (not measurable)'
  return f'{v:.4g}'


def _value(v: Any) -> str:
  if isinstance(v, (list, tuple)):
    return '[' + ', '.join(_value(x) for x in v) + ']'
  if isinstance(v, str):
    return f'`{v}`' if v else '""'
  return _num(v)


def _bytes(n: int) -> str:
  for unit in ('bytes', 'KiB', 'MiB', 'GiB'):
    if n < 1024 or unit == 'GiB':
      return f'{n} {unit}' if unit == 'bytes' else f'{n:.1f} {unit}'
    n /= 1024
  return f'{n:.1f} TiB'
