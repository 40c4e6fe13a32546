"""python -m jaxsae.evaluate --config=experiments/X.py --weights=DIR [--out=DIR] [--num_studies=N]

The SAE inside the model on held-out studies: FVU, L0, dead and dense latents and per-prefix FVU
of the layer's activations, and the cross-entropy of the report tokens clean, with the SAE spliced
in and with the layer zero-ablated -> loss recovered, KL to the clean distribution.
Writes OUT/evaluation.json, OUT/evaluation.png and OUT/feature_frequency.npy.

Held out means outside the training split of data.store_path (data.held_out_fraction); when that
cannot be shown the command stops with an error, or with --allow_in_sample evaluates anyway and
labels the results in-sample.
"""

import os
import sys

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from jaxsae import cli
from jaxsae.config import ConfigError
from jaxsae.formats import hub

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment file (get_config()).', lock_config=True
)
_WEIGHTS = flags.DEFINE_string(
    'weights', None, 'Exported SAE folder (either layout) or hf://ORG/NAME[/SUBFOLDER][@REVISION].'
)
_OUT = flags.DEFINE_string('out', 'outputs/evaluate', 'Output folder.')
_NUM_STUDIES = flags.DEFINE_integer(
    'num_studies', 16, 'Held-out studies to evaluate on.', lower_bound=1
)
_STUDY = flags.DEFINE_list('study', [], 'Evaluate on these study ids instead.')
_MANIFEST = flags.DEFINE_string('manifest', None, 'Studies; default config export.manifest.')
_SPLICE_KINDS = flags.DEFINE_list(
    'splice_kinds',
    None,
    'Token kinds spliced and ablated; default ' 'export.keep_kinds (what the SAE was trained on).',
)
_DENSE = flags.DEFINE_float(
    'dense_threshold',
    0.1,
    'A latent firing on more than this share of tokens counts as dense.',
    lower_bound=0.0,
    upper_bound=1.0,
)
_ALLOW_IN_SAMPLE = flags.DEFINE_bool(
    'allow_in_sample',
    False,
    'Evaluate even when the studies are not shown to be held out (labelled in-sample).',
)
flags.mark_flags_as_required(['config', 'weights'])


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  from jaxsae.bridge import in_model_metrics, interventions  # pylint: disable=import-outside-toplevel

  c = _CONFIG.value
  kinds = _SPLICE_KINDS.value or list(c.export.keep_kinds)
  try:
    weights_dir = hub.resolve(_WEIGHTS.value)  # a Hub id: its folder in the Hugging Face cache
    scale, fraction = in_model_metrics.recorded_training(weights_dir)
    studies, source, is_held_out = in_model_metrics.held_out(
        _MANIFEST.value or c.export.manifest,
        c.data.store_path,
        _NUM_STUDIES.value,
        _STUDY.value,
        fraction=c.data.held_out_fraction if fraction is None else fraction,
        trained_scale=scale,
        allow_in_sample=_ALLOW_IN_SAMPLE.value,
    )
    if not is_held_out:
      print(f'warning: evaluating on {source}', file=sys.stderr)
    site, processor = interventions.load_site(c, weights_dir)
    print(f'evaluating {_label(_WEIGHTS.value)} at {site.path} on {source}')
    if site.sae.threshold.ndim == 0 and float(site.sae.threshold) < 0:
      print(
          'warning: the SAE has no inference threshold yet (trained for fewer than '
          'threshold_start_step steps): every positive pre-activation counts.',
          file=sys.stderr,
      )
    results = in_model_metrics.evaluate(
        site,
        processor,
        studies,
        kinds,
        _DENSE.value,
        progress=lambda i: print(
            f'\revaluate: {i}/{len(studies)} studies', end='', file=sys.stderr, flush=True
        ),
    )
  except ConfigError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  print(file=sys.stderr)
  results['held_out'] = is_held_out
  results['evaluated_on'] = source
  results['weights'] = _label(_WEIGHTS.value)
  results['site'] = site.path
  json_path, png_path = in_model_metrics.write(_OUT.value, results, f'{c.model.name} {site.path}')
  print(
      f'{results["studies"]} studies, {results["tokens"]} tokens spliced ({", ".join(kinds)}), '
      f'{results["report_tokens"]} report tokens scored'
  )
  where = 'held-out' if is_held_out else 'IN-SAMPLE'
  print(
      f'FVU {results["fvu"]:.4f}  L0 {results["l0"]:.2f}  dead {results["dead_latents"]} '
      f'dense {results["dense_latents"]} of {len(results["feature_frequency"])} latents '
      f'(dead: no firing on the {results["dead_over_tokens"]} {where} tokens)'
  )
  print('per-prefix FVU ' + ' '.join(f'{v:.4f}' for v in results['prefix_fvu']))
  print(
      f'CE clean {results["ce_clean"]:.4f}  splice {results["ce_splice"]:.4f}  zero '
      f'{results["ce_zero"]:.4f}  -> loss recovered {results["loss_recovered"]:.4f}'
  )
  print(f'KL(clean||splice) {results["kl_splice"]:.4g}  KL(clean||zero) {results["kl_zero"]:.4g}')
  for warning in results['warnings']:
    print(f'warning: {warning}', file=sys.stderr)
  print(f'results: {json_path}, {png_path}')


def _label(weights: str) -> str:
  """The weights as results name them: a Hub id as given, a folder by its absolute path."""
  return weights if hub.is_hub(weights) else os.path.abspath(weights)


if __name__ == '__main__':
  cli.run(main)
