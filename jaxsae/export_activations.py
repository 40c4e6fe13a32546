"""python -m jaxsae.export_activations --config=experiments/X.py [--skip_bad] [--config.a.b=v ...]

Runs the model named in the config over the manifest's studies and writes the residual stream of
decoder layer `model.layer` to the activation store at `data.store_path`. Rerunning the same
command after a crash continues after the last committed study.
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
  print(
      f'activation store {c.data.store_path}: {meta["rows"]} rows x d={meta["d"]} '
      f'({meta["dtype"]}) from {meta["studies"] - meta["skipped"]} studies; token kinds '
      f'{meta["kind_counts"]}; activation scale {meta["scale"]} (E||x||^2 = d after dividing)'
  )
  if meta['skipped']:
    print(
        f'{meta["skipped"]} studies skipped, listed in '
        f'{store.url(c.data.store_path)}{store.REPORT}'
    )


if __name__ == '__main__':
  cli.run(main)
