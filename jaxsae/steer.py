"""python -m jaxsae.steer --config=experiments/X.py --weights=DIR --feature=F --alpha=A
       [--study=ID] [--mode=add|clamp] [--where=all|prompt|generated|image] [--relative]

Greedy baseline and steered reports for the same study, side by side, grounded phrases and boxes
parsed. Several alphas (--alpha=0,2,4,8) make a sweep over --num_studies studies (or --study=A,B):
OUT/steer_sweep.csv (one report per row, with its affirmed and negated mentions of --target:
"no pleural effusion" negates, see steering.mentions) and OUT/steer_sweep.png (share of reports
affirming --target, and share well-formed, per alpha, baseline dashed).
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
_TARGET = flags.DEFINE_string('target', '', 'Phrase whose presence a sweep counts.')
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
      _TARGET.value,
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
    with open(os.path.join(_OUT.value, 'steer.json'), 'w') as f:
      json.dump({'what': what, 'reports': rows}, f, indent=2)
    print(f'\nreports: {os.path.join(_OUT.value, "steer.json")}')
    return
  csv_path, png_path = steering.write_sweep(_OUT.value, rows, _TARGET.value, what)
  print(
      f'{"alpha":>9} {"studies":>7} {"target":>7} {"negated":>7} {"well-formed":>11} '
      f'{"finished":>8} {"distinct 3-grams":>16}'
  )
  for s in steering.summarise(rows):
    t, n = ('-' if s[k] is None else f'{s[k]:.2f}' for k in ('target_rate', 'negated_rate'))
    print(
        f'{s["alpha"]!s:>9} {s["studies"]:>7} {t:>7} {n:>7} {s["well_formed_rate"]:>11.2f} '
        f'{s["finished_rate"]:>8.2f} {s["distinct_3grams"]:>16.2f}'
    )
  print(f'sweep: {csv_path}, {png_path}')


def _generation(steering, r):
  """A CSV row back as a Generation, for the side-by-side view."""
  return steering.Generation(r['report'], r['tokens'], r['finished'], grounding.parse(r['report']))


if __name__ == '__main__':
  cli.run(main)
