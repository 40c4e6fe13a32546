"""python -m jaxsae.export_activations --config=experiments/X.py [--skip_bad] [--config.a.b=v ...]

Runs the model named in the config over the manifest's studies and writes the residual stream of
decoder layer `model.layer` to the activation store at `data.store_path`. Rerunning the same
command after a crash continues after the last committed study. Several processes (one per GPU):
start each with --config.export.processes=N --config.export.process_index=I (or $RANK set); each
exports its share of the manifest into its own part of the one store.
"""

import logging

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from jaxsae import cli

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment file (get_config()).', lock_config=True
)
_SKIP_BAD = flags.DEFINE_boolean(
    'skip_bad',
    None,
    'Skip studies with a missing field or an '
    'unreadable image (listed in the store); default export.skip_bad.',
)
flags.mark_flags_as_required(['config'])


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.basicConfig(level=logging.WARNING, format='%(levelname)s: %(message)s')
  from jaxsae.bridge import export  # pylint: disable=import-outside-toplevel  (torch)
  from jaxsae.formats import store  # pylint: disable=import-outside-toplevel

  c = _CONFIG.value
  meta = export.export(c, skip_bad=_SKIP_BAD.value)
  run = meta['run']
  index, count = run['process']
  where = c.data.store_path + (f' (part {index} of {count}: {run["path"]})' if count > 1 else '')
  print(
      f'activation store {where}: {meta["rows"]} rows x d={meta["d"]} '
      f'({meta["dtype"]}) from {meta["studies"] - meta["skipped"]} studies; token kinds '
      f'{meta["kind_counts"]}; activation scale {meta["scale"]} (E||x||^2 = d after dividing)'
  )
  print(
      f'this run: {run["studies"]} studies in {run["seconds"]:.1f} s '
      f'({run["studies_per_s"]:.2f} studies/s); the forward pass waited for input '
      f'{run["input_wait_share"]:.0%} of the time ({c.export.workers} workers)'
  )
  if c.export.max_norm_multiple is not None:
    median = (meta.get('export_state') or {}).get('norm_filter', {}).get('median')
    print(
        f'outlier tokens left out (norm > {c.export.max_norm_multiple:g} x the running median '
        f'norm, now {median if median is None else f"{median:.4g}"}): '
        f'{meta.get("dropped_counts")}'
    )
  if meta['skipped']:
    print(
        f'{meta["skipped"]} studies skipped, listed in ' f'{store.url(run["path"])}{store.REPORT}'
    )
  if count > 1:
    print(
        f'the {count} processes write one store: training and interpretation read '
        f'{c.data.store_path} whole once every process has finished'
    )


if __name__ == '__main__':
  cli.run(main)
