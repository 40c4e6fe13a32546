"""python -m jaxsae.interpret --config=experiments/X.py --weights=DIR --out=DIR

Feature statistics over the activation store (density, mean/max activation, top and quantile
examples in context, image-patch heatmaps), LLM explanations with detection scores, and a static
HTML feature browser (OUT/index.html). Rerunning resumes every stage; see
jaxsae/interpret/pipeline.py for what lands in OUT.
"""

import json
import logging
import sys

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from jaxsae import cli, host_memory
from jaxsae.interpret import llm, pipeline

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment file (get_config()).', lock_config=True
)
_WEIGHTS = flags.DEFINE_string(
    'weights', None, 'Exported SAE folder (either layout) or hf://ORG/NAME[/SUBFOLDER][@REVISION].'
)
_OUT = flags.DEFINE_string('out', 'outputs/interpret', 'Output folder (resumed if it exists).')
flags.mark_flags_as_required(['config', 'weights'])


def main(argv):
  del argv
  host_memory.reuse_freed_memory()  # before JAX's thread pools start (see its docstring)
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger('jaxsae').setLevel(logging.INFO)
  summary = pipeline.run(_CONFIG.value, _WEIGHTS.value, _OUT.value)
  shown = ('sae_config', 'findings_summary')
  print(json.dumps({k: v for k, v in summary.items() if k not in shown}, indent=1))
  if summary.get('findings_summary'):
    print(summary['findings_summary'])
  print(f'feature browser: {summary["index"]}')
  return _failures(summary)


def _failures(summary: dict) -> int:
  """Exit status: 1 when features were tried and none got an explanation, else 0; failures
  are counted either way, with where their errors are."""
  failed = len(summary['failed'])
  if not failed:
    return 0
  tried = failed + summary['explained']
  where = f'errors in {summary["errors"]}; '
  if summary['explained']:
    print(
        f'{failed} of {tried} features could not be explained (LLM errors; {where}rerun to '
        'retry them).',
        file=sys.stderr,
    )
    return 0
  print(
      f'error: all {failed} features failed to get an explanation ({where}check the LLM '
      'server and interpret.llm.*, then rerun: finished stages are kept).',
      file=sys.stderr,
  )
  return 1


if __name__ == '__main__':
  cli.run(main, errors=(llm.LLMConfigError,))
