"""python -m jaxsae.steer --config=experiments/X.py --weights=DIR --feature=F --alpha=A
       [--study=ID] [--mode=add|clamp] [--where=all|prompt|generated|image] [--relative]
       [--target=FINDING]

Greedy baseline and steered reports for the same study, side by side, grounded phrases and boxes
parsed. Several alphas (--alpha=0,2,4,8) make a sweep over --num_studies studies (or --study=A,B),
scored clinically: every baseline and steered report is labelled with the 14 CheXpert findings by
the same rule labeller (jaxsae.findings.labeller), and per alpha the sweep reports how often the
--target finding (e.g. 'pleural effusion', any case) flips absent -> positive and positive ->
negated, which other findings change (off-target), and whether reports stay well-formed.
Uncertain ("possible effusion") counts as not positive. Outputs: OUT/steer_sweep.csv (one report
per row, its labels as columns), OUT/steer_sweep.json (figures per alpha and each study's baseline
and steered labels) and OUT/steer_sweep.png.
"""

import json
import os
import sys

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from jaxsae import cli
from jaxsae.bridge.maira2 import grounding
from jaxsae.config import ConfigError
from jaxsae.findings import labels

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment file (get_config()).', lock_config=True
)
_WEIGHTS = flags.DEFINE_string('weights', None, 'Exported SAE (either safetensors layout).')
_FEATURE = cli.define_int_list('feature', None, 'Latent(s) to steer with, e.g. 12 or 12,40.')
_ALPHA = cli.define_float_list(
    'alpha',
    None,
    'Strength(s), finite numbers; several make a sweep. add: coefficient of W_dec[f]; clamp: the '
    'value the feature is set to.',
)
_MODE = flags.DEFINE_enum(
    'mode',
    'add',
    ['add', 'clamp'],
    'Add the decoder direction, or clamp ' 'the feature (keeping the SAE error term).',
)
_WHERE = flags.DEFINE_enum(
    'where', 'all', ['all', 'prompt', 'generated', 'image'], 'Positions edited.'
)
_RELATIVE = flags.DEFINE_boolean(
    'relative',
    False,
    'add: alpha in units of the mean residual norm '
    "at the layer (over the studies' prompt text tokens).",
)
_STUDY = flags.DEFINE_list('study', [], "Study id(s); default the manifest's first.")
_NUM_STUDIES = flags.DEFINE_integer(
    'num_studies', 8, 'Studies in a sweep (without --study).', lower_bound=1
)
_TARGET = flags.DEFINE_string(
    'target',
    '',
    "CheXpert finding whose flips a sweep counts, any case (e.g. 'pleural effusion'); "
    'without it a sweep still reports off-target changes and well-formedness.',
)
_GROUNDING = flags.DEFINE_boolean('grounding', False, "MAIRA-2's grounded reporting prompt.")
_MAX_NEW = flags.DEFINE_integer(
    'max_new_tokens', None, 'Default 300 (450 with --grounding).', lower_bound=1
)
_OUT = flags.DEFINE_string('out', 'outputs/steer', 'Output folder.')
_MANIFEST = flags.DEFINE_string('manifest', None, 'Studies; default config export.manifest.')
flags.mark_flags_as_required(['config', 'weights', 'feature', 'alpha'])


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  try:  # before importing torch: a wrong name fails fast
    target = labels.OBSERVATIONS[labels.observation(_TARGET.value)] if _TARGET.value else ''
  except ConfigError as e:
    print(f'error: --target={_TARGET.value!r}: {e}', file=sys.stderr)
    sys.exit(2)
  from jaxsae.bridge import interventions, steering  # pylint: disable=import-outside-toplevel

  c = _CONFIG.value
  try:
    features = [int(f) for f in _FEATURE.value]
    alphas = [float(a) for a in _ALPHA.value]
  except ValueError as e:
    print(f'error: --feature takes integers and --alpha numbers ({e}).', file=sys.stderr)
    sys.exit(2)
  if _RELATIVE.value and _MODE.value != 'add':
    print(
        'error: --relative scales the added direction; with --mode=clamp alpha is the value the '
        "feature is set to (in the SAE's units). Drop --relative or use --mode=add.",
        file=sys.stderr,
    )
    sys.exit(2)
  sweep = len(alphas) > 1
  try:
    if target:
      steering.labeller_check()
    site, processor = interventions.load_site(c, _WEIGHTS.value)
    site.sae.check_features(features)
    studies = steering.studies(
        _MANIFEST.value or c.export.manifest, _STUDY.value, _NUM_STUDIES.value if sweep else 1
    )
    batch = [steering.prepare(site, processor, s, _GROUNDING.value) for s in studies]
    norm = steering.mean_residual_norm(site, batch) if _RELATIVE.value else None
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  max_new = _MAX_NEW.value or (450 if _GROUNDING.value else 300)
  what = f'{_MODE.value} feature(s) {features} at {_WHERE.value} positions of layer {site.path}'
  if norm:
    what += f', alpha in units of the mean residual norm {norm:.4g}'
  print(what)
  rows = steering.sweep(
      site,
      processor,
      batch,
      features,
      alphas,
      _MODE.value,
      _WHERE.value,
      norm,
      target,
      max_new,
  )
  os.makedirs(_OUT.value, exist_ok=True)
  if not sweep:
    for base, steered in zip(rows[0::2], rows[1::2]):
      text = steering.side_by_side(
          f'baseline ({base["study_id"]})',
          _generation(steering, base),
          f'{_MODE.value} {features} alpha={alphas[0]:g}',
          _generation(steering, steered),
      )
      print('\n' + text)
      if target:
        print(f'{target}: baseline {_status(steering, base)}, steered {_status(steering, steered)}')
    with open(os.path.join(_OUT.value, 'steer.json'), 'w') as f:
      json.dump({'what': what, 'reports': rows}, f, indent=2)
    print(f'\nreports: {os.path.join(_OUT.value, "steer.json")}')
    return
  paths = steering.write_sweep(_OUT.value, rows, what)
  summary = steering.summarise(rows)
  print(
      f'{"alpha":>9} {"studies":>7} {"positive":>8} {"->pos":>9} {"->neg":>9} '
      f'{"other/study":>11} {"well-formed":>11} {"complete":>8} {"3-grams":>7}'
  )
  for s in summary:
    f = s['findings'] or {}
    positive = '-' if s['target_rate'] is None else f'{s["target_rate"]:.2f}'
    up, down = (
        f'{f[k]}/{f[k + "_eligible"]}' if k in f else '-' for k in ('to_positive', 'to_negated')
    )
    other = '-' if f.get('off_target_mean') is None else f'{f["off_target_mean"]:.2f}'
    print(
        f'{s["alpha"]!s:>9} {s["studies"]:>7} {positive:>8} {up:>9} {down:>9} {other:>11} '
        f'{s["well_formed_rate"]:>11.2f} {s["complete_sentence_rate"]:>8.2f} '
        f'{s["distinct_3grams"]:>7.2f}'
    )
  for s in summary:
    changed = sorted(
        ((v, k) for k, v in (s['findings'] or {}).get('off_target', {}).items() if v), reverse=True
    )
    if changed:
      print(f'off-target at alpha {s["alpha"]}: ' + ', '.join(f'{k} {v:.2f}' for v, k in changed))
  if summary and summary[-1]['findings'] is not None:
    if target:
      print(
          f'positive: share of reports positive for {target}; ->pos / ->neg: studies flipping '
          'absent -> positive / positive -> negated or not mentioned, of those that could; '
          'uncertain counts as not positive.'
      )
    print(
        'other/study: other findings whose label changed, mean per study (No Finding left out); '
        'off-target: share of studies whose label changed.'
    )
  else:
    print('reports not labelled (no --target and spaCy/negspacy not installed).')
  print('sweep: ' + ', '.join(paths))


def _status(steering, r) -> str:
  return steering.LABEL_VALUES[r['target_label']]


def _generation(steering, r):
  """A CSV row back as a Generation, for the side-by-side view."""
  return steering.Generation(r['report'], r['tokens'], r['finished'], grounding.parse(r['report']))


if __name__ == '__main__':
  cli.run(main)
