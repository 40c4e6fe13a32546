"""Baseline vs steered report generation, and alpha sweeps scored clinically.

Generation is greedy, one study at a time (no padding, so positions are the prompt's own). A
steered report differs from the baseline only by the hook on layer L (jaxsae.bridge.interventions);
the baseline runs with no hook at all. Reports are parsed into phrases and boxes by
jaxsae.bridge.maira2.grounding (MAIRA-2's grounded markup), and labelled with the 14 CheXpert
observations by the rule labeller (jaxsae.findings.labeller), the same one for baseline and steered
reports, so a sweep reports what steering does to the findings: the target finding appearing or
disappearing, and the other findings changing beside it.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
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
from jaxsae.findings import labels as labels_lib
from jaxsae.findings.labels import NEGATIVE, NOT_MENTIONED, OBSERVATIONS, POSITIVE, UNCERTAIN

MODES = ('add', 'clamp')
NO_FINDING = OBSERVATIONS.index('No Finding')
LABEL_VALUES = {POSITIVE: 'positive', NEGATIVE: 'negative', UNCERTAIN: 'uncertain'}
LABEL_VALUES[NOT_MENTIONED] = 'not mentioned'
NOTES = (
    'Flips of the target: absent -> positive counts studies whose baseline report is not positive '
    'for it (negative, uncertain or not mentioned) and whose steered report is positive; '
    'positive -> negated counts studies whose baseline is positive and whose steered report is '
    'negative or does not mention it. Uncertain counts as not positive, and is neither a flip to '
    'positive nor a negation. Shares are of all studies; "eligible" is how many could flip.',
    'Off-target: per other finding, the share of studies whose label (any of positive, negative, '
    'uncertain, not mentioned) changed; the mean number of other findings changed per study leaves '
    'out No Finding (derived from the others).',
)


def finding(name: str) -> str:
  """The CheXpert name of a finding given in any case ('pleural effusion' -> 'Pleural Effusion');
  a ConfigError listing the 14 names otherwise."""
  return OBSERVATIONS[labels_lib.observation(name)]


def _labeller():
  from jaxsae.findings import labeller  # pylint: disable=import-outside-toplevel (spaCy: slow)

  return labeller


def labeller_check() -> None:
  """A ConfigError saying what to install when the rule labeller's spaCy/negspacy are missing."""
  _labeller().label('')


@functools.lru_cache(maxsize=1)
def labeller_available() -> bool:
  """Whether the rule labeller's dependencies (spaCy, negspacy) are installed."""
  try:
    _labeller().label('')
  except ConfigError:
    return False
  return True


def distinct_ngrams(text: str, n: int = 3) -> float:
  """Share of distinct word n-grams (1.0: no repetition; near 0: a loop), 1.0 if too short."""
  w = text.split()
  grams = [tuple(w[i : i + n]) for i in range(len(w) - n + 1)]
  return len(set(grams)) / len(grams) if grams else 1.0


_SENTENCE_END = re.compile(r'[.!?]["\')\]]*$')


def ends_sentence(text: str) -> bool:
  """Whether a report ends with a complete sentence (., ! or ?, perhaps closed by a quote or a
  bracket): one cut at max_new_tokens mid-sentence, or looping, usually does not."""
  return bool(_SENTENCE_END.search(text.strip()))


def _share(count: int, total: int) -> float | None:
  return float(count) / total if total else None


def flips(baseline: np.ndarray, steered: np.ndarray, target: int | None = None) -> dict[str, Any]:
  """What steering did to the findings: baseline and steered labels ([n, 14], row i the same
  study) -> counts and shares of studies (see NOTES); target flips only with a `target` column."""
  base, st = np.asarray(baseline), np.asarray(steered)
  if base.shape != st.shape or base.ndim != 2 or base.shape[1] != len(OBSERVATIONS):
    raise ValueError(f'labels {base.shape} and {st.shape}: want [studies, {len(OBSERVATIONS)}]')
  n = len(base)
  out: dict[str, Any] = {'studies': n}
  if target is not None:
    was, now = base[:, target] == POSITIVE, st[:, target] == POSITIVE
    gone = np.isin(st[:, target], (NEGATIVE, NOT_MENTIONED))
    up, down = int((~was & now).sum()), int((was & gone).sum())
    out.update(
        target=OBSERVATIONS[target],
        baseline_positive=int(was.sum()),
        steered_positive=int(now.sum()),
        to_positive=up,
        to_positive_eligible=int((~was).sum()),
        to_positive_share=_share(up, n),
        to_negated=down,
        to_negated_eligible=int(was.sum()),
        to_negated_share=_share(down, n),
    )
  others = [i for i in range(len(OBSERVATIONS)) if i != target]
  changed = base != st
  became = (base == POSITIVE) != (st == POSITIVE)
  counted = [i for i in others if i != NO_FINDING]
  out['off_target'] = {OBSERVATIONS[i]: _share(int(changed[:, i].sum()), n) for i in others}
  out['off_target_counts'] = {OBSERVATIONS[i]: int(changed[:, i].sum()) for i in others}
  out['off_target_mean'] = float(changed[:, counted].sum(1).mean()) if n else None
  out['off_target_positive_mean'] = float(became[:, counted].sum(1).mean()) if n else None
  return out


def label_dict(values: np.ndarray) -> dict[str, int]:
  """Labels [14] as {finding: value} (1 positive, 0 negative, -1 uncertain, -9 not mentioned)."""
  return {o: int(v) for o, v in zip(OBSERVATIONS, values)}


def label_array(rows: Sequence[dict[str, int]]) -> np.ndarray:
  """{finding: value} dicts back as labels [n, 14]."""
  return np.array([[d[o] for o in OBSERVATIONS] for d in rows], np.int8).reshape(-1, 14)


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
    'nonempty',
    'ends_sentence',
    'target',
    'has_target',
    'target_label',
    'target_affirmed',
    'target_negated',
    'target_uncertain',
    'phrases',
    'boxes',
    'distinct_3grams',
    *OBSERVATIONS,
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
    target: str = '',
    labelled: bool | None = None,
) -> dict[str, Any]:
  """One report as a sweep row; `labels` {finding: value} when `labelled` (default: when a target
  is given or the labeller is installed), and the target finding's label and mention counts."""
  target = finding(target) if target else ''
  if labelled is None:
    labelled = bool(target) or labeller_available()
  found = _labeller().mentions(g.parsed.plain) if labelled or target else []
  values = _labeller().combine(found) if labelled or target else None
  status = [m.status for m in found if m.observation == target]
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
      'nonempty': bool(g.parsed.plain.strip()),
      'ends_sentence': ends_sentence(g.parsed.plain),
      'target': target,
      # Positive only: uncertain and negated mentions do not count.
      'has_target': bool(values[OBSERVATIONS.index(target)] == POSITIVE) if target else '',
      'target_label': int(values[OBSERVATIONS.index(target)]) if target else '',
      'target_affirmed': status.count(POSITIVE) if target else '',
      'target_negated': status.count(NEGATIVE) if target else '',
      'target_uncertain': status.count(UNCERTAIN) if target else '',
      'phrases': len(g.parsed.phrases),
      'boxes': g.parsed.boxes,
      'distinct_3grams': round(distinct_ngrams(g.parsed.plain), 4),
      'report': g.text,
      'labels': label_dict(values) if labelled else None,
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
  """One baseline (mode 'baseline', no hook) and one steered report per study and alpha, each
  labelled with the CheXpert findings (`target`: a finding, validated before generating)."""
  target = finding(target) if target else ''
  labelled = bool(target) or labeller_available()
  if target:
    labeller_check()  # spaCy missing: say so before generating
  rows = []
  for s in batch:
    g = generate(site, processor, s, max_new_tokens)
    sid, rel = s.study.study_id, norm is not None
    rows.append(row(sid, 'baseline', features, None, where, rel, g, target, labelled))
    for alpha in alphas:
      with intervention(site, mode, features, alpha, where, s.prompt_ids, norm):
        g = generate(site, processor, s, max_new_tokens)
      rows.append(row(sid, mode, features, alpha, where, rel, g, target, labelled))
      if progress:
        progress(len(rows))
  return rows


def paired(rows: Sequence[dict[str, Any]]) -> dict[Any, list[tuple[dict, dict]]]:
  """{alpha: [(baseline row, steered row) per study]}: a study's steered rows follow its
  baseline row (as `sweep` writes them); one with no baseline before it is left out."""
  out: dict[Any, list[tuple[dict, dict]]] = {}
  base = None
  for r in rows:
    if r['mode'] == 'baseline':
      base = r
    elif base is not None:
      out.setdefault(r['alpha'], []).append((base, r))
  return out


def summarise(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per alpha (baseline first): studies; share of reports positive / negative for the target
  finding; well-formedness (well-formed, finished, non-empty, ending with a complete sentence,
  distinct 3-grams); and for steered alphas, when the rows are labelled, `findings`: the flips
  of the target and the off-target changes against the same studies' baselines (`flips`)."""
  groups: dict[Any, list] = {}
  for r in rows:
    groups.setdefault('baseline' if r['mode'] == 'baseline' else r['alpha'], []).append(r)
  target = rows[0]['target'] if rows else ''
  t = OBSERVATIONS.index(target) if target else None
  pairs = paired(rows)
  out = []
  for key, rs in groups.items():

    def rate(field, rs=rs):
      return float(np.mean([bool(r[field]) for r in rs]))

    s = {
        'alpha': key,
        'studies': len(rs),
        'target': target or None,
        'target_rate': rate('has_target') if target else None,
        'negated_rate': (
            float(np.mean([r['target_label'] == NEGATIVE for r in rs])) if target else None
        ),
        'well_formed_rate': rate('well_formed'),
        'finished_rate': rate('finished'),
        'nonempty_rate': rate('nonempty'),
        'complete_sentence_rate': rate('ends_sentence'),
        'distinct_3grams': float(np.mean([r['distinct_3grams'] for r in rs])),
        'findings': None,
    }
    pp = pairs.get(key) if key != 'baseline' else None
    if pp and all(b['labels'] and r['labels'] for b, r in pp):
      base = label_array([b['labels'] for b, _ in pp])
      s['findings'] = flips(base, label_array([r['labels'] for _, r in pp]), t)
    out.append(s)
  return out


def per_study(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Each study's labels: {'study_id', 'baseline': {finding: value}, 'steered': {alpha: {...}}}
  (alpha as str(float)), in the rows' order."""
  out = []
  for r in rows:
    if r['mode'] == 'baseline':
      out.append({'study_id': r['study_id'], 'baseline': r['labels'], 'steered': {}})
    elif out:
      out[-1]['steered'][str(float(r['alpha']))] = r['labels']
  return out


def write_sweep(out_dir: str, rows: Sequence[dict[str, Any]], title: str) -> tuple[str, str, str]:
  """steer_sweep.csv (one row per report, its 14 labels as columns), steer_sweep.json (per-alpha
  figures, notes, per-study labels) and steer_sweep.png (rates, flips and off-target changes per
  alpha). Returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  csv_path, json_path, png_path = (
      os.path.join(out_dir, f'steer_sweep.{e}') for e in ('csv', 'json', 'png')
  )
  with open(csv_path, 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=CSV_FIELDS, restval='', extrasaction='ignore')
    w.writeheader()
    w.writerows({**r, **(r['labels'] or {})} for r in rows)
  summary = summarise(rows)
  labelled = bool(rows) and all(r['labels'] for r in rows)
  result = {
      'what': title,
      'target': (rows[0]['target'] or None) if rows else None,
      'notes': list(NOTES) if labelled else ['reports not labelled: the labeller is not installed'],
      'findings': list(OBSERVATIONS),
      'label_values': {str(k): v for k, v in LABEL_VALUES.items()},
      'summary': summary,
      'studies': per_study(rows) if labelled else [],
  }
  with open(json_path, 'w') as f:
    json.dump(result, f, indent=1)
  _plot(png_path, summary, result['target'], labelled, title)
  return csv_path, json_path, png_path


def _plot(path: str, summary: list[dict[str, Any]], target, labelled: bool, title: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  base = next(s for s in summary if s['alpha'] == 'baseline')
  steered = [s for s in summary if s['alpha'] != 'baseline']
  alphas = [float(s['alpha']) for s in steered]
  panels = 2 if labelled and steered else 1
  fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.2), squeeze=False)
  ax = axes[0, 0]
  series = [
      ('well_formed_rate', 'well-formed', 'tab:blue'),
      ('complete_sentence_rate', 'ends with a complete sentence', 'tab:green'),
  ]
  if target:
    series.insert(0, ('target_rate', f'{target} positive', 'tab:red'))
  for key, label, colour in series:
    ax.plot(alphas, [s[key] for s in steered], 'o-', color=colour, label=label)
    ax.axhline(base[key], color=colour, ls='--', lw=0.8, label=f'{label} (baseline)')
  ax.set_xlabel('alpha')
  ax.set_ylabel(f'share of {base["studies"]} reports')
  ax.set_ylim(-0.05, 1.05)
  ax.set_title('reports', fontsize=9)
  ax.legend(fontsize=7)
  if panels == 2:
    ax = axes[0, 1]
    found = [s['findings'] for s in steered]
    if target:
      for key, label, colour in (
          ('to_positive_share', f'{target}: absent -> positive', 'tab:red'),
          ('to_negated_share', f'{target}: positive -> negated', 'tab:purple'),
      ):
        ax.plot(alphas, [f[key] for f in found], 'o-', color=colour, label=label)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel('alpha')
    ax.set_ylabel('share of studies (uncertain = not positive)')
    twin = ax.twinx()
    twin.plot(
        alphas,
        [f['off_target_mean'] for f in found],
        's--',
        color='tab:grey',
        label='other findings changed per study (mean)',
    )
    twin.set_ylabel('other findings changed per study')
    means = [f['off_target_mean'] or 0 for f in found]
    twin.set_ylim(0, max(1.0, 1.1 * max(means)))
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc='upper left')
    ax.set_title("findings vs the same studies' baselines", fontsize=9)
  fig.suptitle(textwrap.fill(title, 110), fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
