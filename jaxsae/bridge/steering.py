"""Baseline vs steered report generation, and alpha sweeps.

Generation is greedy, one study at a time (no padding, so positions are the prompt's own). A
steered report differs from the baseline only by the hook on layer L (jaxsae.bridge.interventions);
the baseline runs with no hook at all. Reports are parsed into phrases and boxes by
jaxsae.bridge.maira2.grounding (MAIRA-2's grounded markup).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
import textwrap
from typing import Any, Sequence

import numpy as np
import torch

from jaxsae.bridge import interventions as iv
from jaxsae.bridge import manifest, prompt
from jaxsae.bridge.maira2.grounding import Parsed, parse
from jaxsae.config import ConfigError

MODES = ('add', 'clamp')


def contains(text: str, target: str) -> bool:
  """Case- and whitespace-insensitive substring test (negated mentions count: see `mentions`)."""
  return _norm(target) in _norm(text)


def _norm(s: str) -> str:
  return ' '.join(s.lower().split())


# Negation of a target phrase, in the spirit of NegEx (Chapman et al. 2001) with the clause as
# scope: a mention is negated when a PRE cue comes before it, or a POST cue after it, in the same
# clause. Clauses end at . ; : ! ? (not a decimal point), a blank line, or a TERMINATION term.
# PSEUDO phrases contain cue words but negate nothing ("no change in the effusion" keeps it); they
# are blanked out before cues are looked for. Hedged mentions ("cannot be excluded", "possible")
# count as mentions: the report raises the finding. Words match whole (`no` is not in `nodule`).
NEGATION_PRE = (
    'no',
    'not',
    'without',
    'absent',
    'absence of',
    'negative for',
    'free of',
    'resolved',
    'resolution of',
    'ruled out',
)
NEGATION_POST = (
    'not seen',
    'not identified',
    'not present',
    'not visualized',
    'not visualised',
    'not demonstrated',
    'not appreciated',
    'not evident',
    'absent',
    'no longer',
    'resolved',
    'has cleared',
    'have cleared',
    'ruled out',
    'excluded',
)
NEGATION_PSEUDO = (
    'no change',
    'no interval change',
    'no significant change',
    'no increase',
    'no significant increase',
    'not only',
    'not changed',
    'not resolved',
    'not fully resolved',
    'not completely resolved',
    'partially resolved',
    'partly resolved',
    'incompletely resolved',
    'nearly resolved',
    'almost resolved',
    'cannot be excluded',
    'can not be excluded',
    'not be excluded',
    'not excluded',
    'cannot be ruled out',
    'not be ruled out',
    'not ruled out',
    'not seen on prior',
    'not present on prior',
    'not seen previously',
    'not previously seen',
)
NEGATION_TERMINATION = (
    'but',
    'however',
    'although',
    'though',
    'whereas',
    'yet',
    'nevertheless',
    'except',
    'aside from',
    'apart from',
    'which',
    'there is',
    'there are',
    'there has been',
)


def _words(phrases: Sequence[str]) -> re.Pattern:
  """Any of `phrases` as whole words, longest first."""
  alts = '|'.join(re.escape(p) for p in sorted(phrases, key=len, reverse=True))
  return re.compile(rf'(?<![\w-])(?:{alts})(?![\w-])')


_PRE, _POST, _PSEUDO = _words(NEGATION_PRE), _words(NEGATION_POST), _words(NEGATION_PSEUDO)
_CLAUSE_END = re.compile(r'[.;:!?](?!\d)|\n\s*\n|' + _words(NEGATION_TERMINATION).pattern)


def mentions(text: str, target: str) -> tuple[int, int]:
  """(affirmed, negated) mentions of `target` in `text`, case- and whitespace-insensitive; a
  mention is the target at a word start ("pleural effusion" also finds "pleural effusions")."""
  want = _norm(target)
  if not want:
    return 0, 0
  found = re.compile(rf'(?<![\w-]){re.escape(want)}')
  affirmed = negated = 0
  for clause in _CLAUSE_END.split(text.lower()):
    clause = _norm(clause)
    cues = _PSEUDO.sub(lambda m: '_' * len(m.group()), clause)  # same length: offsets hold
    pre = [m.end() for m in _PRE.finditer(cues)]
    post = [m.start() for m in _POST.finditer(cues)]
    for m in found.finditer(clause):
      if any(p <= m.start() for p in pre) or any(q >= m.end() for q in post):
        negated += 1
      else:
        affirmed += 1
  return affirmed, negated


def distinct_ngrams(text: str, n: int = 3) -> float:
  """Share of distinct word n-grams (1.0: no repetition; near 0: a loop), 1.0 if too short."""
  w = text.split()
  grams = [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]
  return len(set(grams)) / len(grams) if grams else 1.0


# --------------------------------------------------------------------------------------------------
# Inputs and generation
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class StudyInputs:
  study: manifest.Study
  inputs: dict[str, torch.Tensor]  # on the model's device, pixel values in its dtype
  prompt_ids: torch.Tensor  # [T] on the CPU


def studies(
    path: str, ids: Sequence[str] = (), count: int | None = None, teacher_forcing: bool = False
) -> list[manifest.Study]:
  """The manifest's studies named in `ids` (in that order), else its first `count` usable ones.
  A bad study's error suggests --study (steer and evaluate have no --skip_bad)."""
  rows = manifest.read(path, teacher_forcing, manifest.CHOOSE_FIX)
  if ids:
    by_id = {(r.study if isinstance(r, manifest.BadStudyError) else r.study_id): r for r in rows}
    unknown = [i for i in ids if i not in by_id]
    if unknown:
      raise ConfigError(
          f'study {unknown[0]!r} is not in {path}; it has '
          f'{len(rows)} studies, e.g. {list(by_id)[:3]}.'
      )
    out = [by_id[i] for i in ids]
    bad = next((r for r in out if isinstance(r, manifest.BadStudyError)), None)
    if bad is not None:
      raise bad
    return out
  good = [r for r in rows if isinstance(r, manifest.Study)]
  if not good:
    raise ConfigError(f'{path} has no usable study.')
  return good[:count] if count else good


def to_device(inputs: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
  device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
  return {
      k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()
  }


def prepare(
    site: iv.Site, processor: Any, study: manifest.Study, grounding: bool = False
) -> StudyInputs:
  """Prompt-only model inputs for `study` (MAIRA-2's grounded prompt if `grounding`)."""
  images = dict(study.images())
  if grounding:
    if not hasattr(processor, 'format_and_preprocess_reporting_input'):
      raise ConfigError(
          f"--grounding needs MAIRA-2's processor (it builds the grounded reporting "
          f'prompt); {type(processor).__name__} has none. Drop --grounding.'
      )
    inputs = processor.format_and_preprocess_reporting_input(
        current_frontal=images.get('frontal'),
        current_lateral=images.get('lateral'),
        prior_frontal=images.get('prior_frontal'),
        indication=study.indication,
        technique=study.technique,
        comparison=study.comparison,
        prior_report=study.prior_report,
        get_grounding=True,
        return_tensors='pt',
    )
    inputs = dict(inputs)
  else:
    inputs = prompt.prepare(processor, study, images, False, site.image_token_id).inputs
  return StudyInputs(study, to_device(inputs, site.model), inputs['input_ids'][0].cpu())


@dataclasses.dataclass
class Generation:
  text: str
  tokens: int
  finished: bool  # ended with the end-of-sequence token before max_new_tokens
  parsed: Parsed

  @property
  def well_formed(self) -> bool:
    """Finished, not empty, and its grounding markup parses without a problem."""
    return self.finished and bool(self.parsed.plain.strip()) and not self.parsed.problems


def generate(site: iv.Site, processor: Any, s: StudyInputs, max_new_tokens: int) -> Generation:
  """Greedy decoding of one report (under whatever interventions are active)."""
  tok = processor.tokenizer
  eos = site.model.generation_config.eos_token_id
  if eos is None:
    eos = tok.eos_token_id
  eos = set(eos if isinstance(eos, (list, tuple)) else [eos])
  with torch.inference_mode():
    out = site.model.generate(
        **s.inputs,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=tok.pad_token_id,
    )
  new = out[0, s.inputs['input_ids'].shape[1] :].tolist()
  end = next((i for i, t in enumerate(new) if t in eos), None)
  ids = new if end is None else new[:end]
  text = tok.decode(ids, skip_special_tokens=False)  # MAIRA-2's <obj>/<box> tokens are special
  for special in (tok.bos_token, tok.pad_token):
    if special:
      text = text.replace(special, '')
  return Generation(text.strip(), len(ids), end is not None, parse(text))


def intervention(
    site: iv.Site,
    mode: str,
    features: Sequence[int],
    alpha: float,
    where: iv.Where,
    prompt_ids: torch.Tensor,
    norm: float | None,
):
  """`add` alpha * W_dec[f] (alpha in units of `norm` if given), or `clamp` f to alpha."""
  if mode == 'add':
    return iv.add(site, features, alpha, where, prompt_ids, norm)
  if mode == 'clamp':
    return iv.clamp(site, features, alpha, where, prompt_ids)
  raise ConfigError(f'--mode={mode!r}: use one of {MODES}.')


def mean_residual_norm(site: iv.Site, batch: Sequence[StudyInputs]) -> float:
  """Mean |x| at the layer over the prompts' text tokens: image tokens and the first position
  (an attention sink, often with an outsized norm) are left out."""
  total, count = 0.0, 0
  for s in batch:
    with iv.record(site) as out, torch.inference_mode():
      site.model(**s.inputs, use_cache=False)
    keep = torch.ones(len(s.prompt_ids), dtype=torch.bool)
    keep[0] = False
    if site.image_token_id is not None:
      keep &= s.prompt_ids != site.image_token_id
    norms = out[0][0].float().norm(dim=-1).cpu()[keep]
    total, count = total + float(norms.sum()), count + len(norms)
  return total / max(count, 1)


# --------------------------------------------------------------------------------------------------
# Side by side, and the sweep
# --------------------------------------------------------------------------------------------------


def describe(g: Generation) -> list[str]:
  """A report as lines: its text, then its phrases with boxes (if any), then any problems."""
  lines = [g.text or '(empty)', '']
  for p in g.parsed.phrases:
    if p.boxes:
      lines.append(
          f'- {p.text}: ' + '; '.join('(' + ', '.join(f'{v:.3f}' for v in b) + ')' for b in p.boxes)
      )
  lines.append(
      f'[{g.tokens} tokens, {"finished" if g.finished else "cut at max_new_tokens"}, '
      f'{len(g.parsed.phrases)} phrases, {g.parsed.boxes} boxes'
      + (f', problems: {"; ".join(g.parsed.problems)}' if g.parsed.problems else '')
      + ']'
  )
  return lines


def side_by_side(
    left_title: str, left: Generation, right_title: str, right: Generation, width: int = 60
) -> str:
  def column(title, g):
    out = [title, '-' * min(width, max(len(title), 1))]
    for line in describe(g):
      out += textwrap.wrap(line, width) or ['']
    return out

  a, b = column(left_title, left), column(right_title, right)
  a += [''] * (len(b) - len(a))
  b += [''] * (len(a) - len(b))
  return '\n'.join(f'{x:<{width}} | {y}' for x, y in zip(a, b))


CSV_FIELDS = (
    'study_id',
    'mode',
    'features',
    'alpha',
    'where',
    'relative',
    'tokens',
    'finished',
    'markup_ok',
    'well_formed',
    'has_target',
    'target_affirmed',
    'target_negated',
    'phrases',
    'boxes',
    'distinct_3grams',
    'report',
)


def row(
    study_id: str,
    mode: str,
    features: Sequence[int],
    alpha: float | None,
    where: iv.Where,
    relative: bool,
    g: Generation,
    target: str,
) -> dict[str, Any]:
  affirmed, negated = mentions(g.parsed.plain, target) if target else ('', '')
  return {
      'study_id': study_id,
      'mode': mode,
      'features': ' '.join(map(str, features)),
      'alpha': '' if alpha is None else alpha,
      'where': where,
      'relative': relative,
      'tokens': g.tokens,
      'finished': g.finished,
      'markup_ok': not g.parsed.problems,
      'well_formed': g.well_formed,
      'has_target': bool(affirmed) if target else '',  # negated mentions do not count
      'target_affirmed': affirmed,
      'target_negated': negated,
      'phrases': len(g.parsed.phrases),
      'boxes': g.parsed.boxes,
      'distinct_3grams': round(distinct_ngrams(g.parsed.plain), 4),
      'report': g.text,
  }


def sweep(
    site: iv.Site,
    processor: Any,
    batch: Sequence[StudyInputs],
    features: Sequence[int],
    alphas: Sequence[float],
    mode: str = 'add',
    where: iv.Where = 'all',
    norm: float | None = None,
    target: str = '',
    max_new_tokens: int = 300,
    progress=None,
) -> list[dict[str, Any]]:
  """One baseline (mode 'baseline', no hook) and one steered report per study and alpha."""
  rows = []
  for s in batch:
    g = generate(site, processor, s, max_new_tokens)
    rows.append(
        row(s.study.study_id, 'baseline', features, None, where, norm is not None, g, target)
    )
    for alpha in alphas:
      with intervention(site, mode, features, alpha, where, s.prompt_ids, norm):
        g = generate(site, processor, s, max_new_tokens)
      rows.append(row(s.study.study_id, mode, features, alpha, where, norm is not None, g, target))
      if progress:
        progress(len(rows))
  return rows


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per alpha (baseline first): studies, share affirming the target phrase, share with a
  negated mention of it, share well-formed."""
  groups: dict[Any, list] = {}
  for r in rows:
    groups.setdefault('baseline' if r['mode'] == 'baseline' else r['alpha'], []).append(r)
  out = []
  for key, rs in groups.items():
    out.append(
        {
            'alpha': key,
            'studies': len(rs),
            'target_rate': (
                float(np.mean([bool(r['has_target']) for r in rs]))
                if rs[0]['has_target'] != ''
                else None
            ),
            'negated_rate': (
                float(np.mean([bool(r['target_negated']) for r in rs]))
                if rs[0]['has_target'] != ''
                else None
            ),
            'well_formed_rate': float(np.mean([bool(r['well_formed']) for r in rs])),
            'finished_rate': float(np.mean([bool(r['finished']) for r in rs])),
            'distinct_3grams': float(np.mean([r['distinct_3grams'] for r in rs])),
        }
    )
  return out


def write_sweep(
    out_dir: str, rows: Sequence[dict[str, Any]], target: str, title: str
) -> tuple[str, str]:
  """steer_sweep.csv (one row per report) and steer_sweep.png (rates per alpha)."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  os.makedirs(out_dir, exist_ok=True)
  csv_path, png_path = (os.path.join(out_dir, f'steer_sweep.{e}') for e in ('csv', 'png'))
  with open(csv_path, 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
    w.writeheader()
    w.writerows(rows)
  summary = summarise(rows)
  base = next(s for s in summary if s['alpha'] == 'baseline')
  steered = [s for s in summary if s['alpha'] != 'baseline']
  alphas = [float(s['alpha']) for s in steered]
  fig, ax = plt.subplots(figsize=(6.5, 4))
  series = [('well_formed_rate', 'well-formed', 'tab:blue')]
  if target:
    series.insert(0, ('target_rate', f'mentions "{target}" (not negated)', 'tab:red'))
  for key, label, colour in series:
    ax.plot(alphas, [s[key] for s in steered], 'o-', color=colour, label=label)
    ax.axhline(base[key], color=colour, ls='--', lw=0.8, label=f'{label} (baseline)')
  ax.set_xlabel('alpha')
  ax.set_ylabel(f'share of {base["studies"]} studies')
  ax.set_ylim(-0.05, 1.05)
  ax.set_title(textwrap.fill(title, 70), fontsize=8)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(png_path, dpi=110)
  plt.close(fig)
  return csv_path, png_path
