"""python -m jaxsae.export_weights --workdir=DIR --out=DIR --format=dictionary_learning|saelens [--step=N]

Writes a trained checkpoint's SAE as safetensors (activation scale folded in). The folder at --out
appears complete or not at all, with a manifest of its files' checksums that the loaders verify:
a previous export there is replaced in one step, and a kill or a full disk leaves it intact.
"""

from absl import flags
from absl import logging as absl_logging

from jaxsae import cli, weights

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training directory (with checkpoints/).')
_OUT = flags.DEFINE_string('out', None, 'Output directory.')
_FORMAT = flags.DEFINE_enum('format', 'dictionary_learning', list(weights.FORMATS), 'Layout.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest).')
flags.mark_flags_as_required(['workdir', 'out'])


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  path = weights.export(_WORKDIR.value, _OUT.value, _FORMAT.value, _STEP.value)
  print(f'wrote {path}')


if __name__ == '__main__':
  cli.run(main)
