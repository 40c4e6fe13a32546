"""python -m jaxsae.export_weights --workdir=DIR --out=DIR --format=dictionary_learning|saelens [--step=N]
    [--push_to_hub=ORG/NAME[/SUBFOLDER] [--dry_run] [--evaluation=FILE] [--license=ID] [--private]]

Writes a trained checkpoint's SAE as safetensors (activation scale folded in). The folder at --out
appears complete or not at all, with a manifest of its files' checksums that the loaders verify:
a previous export there is replaced in one step, and a kill or a full disk leaves it intact.

With --push_to_hub the folder also holds a generated model card (README.md: the SAE, its training,
the held-out figures of the run's summary.json, loss recovered from --evaluation's evaluation.json,
how to load it, this command) and is uploaded to that Hub repository and folder, created if absent,
with the token of `hf auth login` or HF_TOKEN. --dry_run writes the same folder and prints what
would be uploaded where, without a token or the network.
"""

from absl import flags
from absl import logging as absl_logging

from jaxsae import cli, weights
from jaxsae.formats import model_card

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training directory (with checkpoints/).')
_OUT = flags.DEFINE_string('out', None, 'Output directory.')
_FORMAT = flags.DEFINE_enum('format', 'dictionary_learning', list(weights.FORMATS), 'Layout.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the newest).')
_PUSH = flags.DEFINE_string(
    'push_to_hub', None, 'Also upload the export, with a model card, to ORG/NAME[/SUBFOLDER].'
)
_DRY_RUN = flags.DEFINE_bool(
    'dry_run',
    False,
    'With --push_to_hub: write the folder and say what would be sent; send nothing.',
)
_EVALUATION = flags.DEFINE_string(
    'evaluation', None, 'evaluation.json of `python -m jaxsae.evaluate`, for the card.'
)
_LICENSE = flags.DEFINE_string(
    'license', None, "The card's licence id (mit, apache-2.0, ...); default: none declared."
)
_PRIVATE = flags.DEFINE_bool('private', False, 'Create the Hub repository as private.')
flags.mark_flags_as_required(['workdir', 'out'])


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  if _PUSH.value is None:
    used = [f.name for f in (_DRY_RUN, _EVALUATION, _LICENSE, _PRIVATE) if f.present]
    if used:
      cli.fail(f'--{", --".join(used)} only apply with --push_to_hub=ORG/NAME[/SUBFOLDER].')
    path = weights.export(_WORKDIR.value, _OUT.value, _FORMAT.value, _STEP.value)
    print(f'wrote {path}')
    return
  plan = weights.publish(
      _WORKDIR.value,
      _OUT.value,
      _FORMAT.value,
      _PUSH.value,
      _STEP.value,
      evaluation=_EVALUATION.value,
      license=_LICENSE.value,
      private=_PRIVATE.value,
      dry_run=_DRY_RUN.value,
  )
  print(f'wrote {plan.folder}')
  print('\n'.join(model_card.describe(plan)))


if __name__ == '__main__':
  cli.run(main)
