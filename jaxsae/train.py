"""python -m jaxsae.train --config=experiments/X.py --workdir=DIR [--config.a.b=v ...]

Trains an SAE; resumes automatically from the newest checkpoint in DIR.
"""

import logging
import sys

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from jaxsae import cli
from jaxsae import host_memory
from jaxsae import trainer

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment file (get_config()).', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and plots.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  host_memory.reuse_freed_memory()  # before JAX's thread pools start (see its docstring)
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax's per-save INFO lines
  logging.getLogger('jaxsae').setLevel(logging.INFO)
  try:
    summary = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except trainer.Interrupted as e:  # a checkpoint was saved; the exit status of SIGTERM
    print(e, file=sys.stderr)
    sys.exit(143)
  print('summary:', {k: v for k, v in summary.items()})


if __name__ == '__main__':
  cli.run(main, errors=(trainer.NonFiniteError,))
