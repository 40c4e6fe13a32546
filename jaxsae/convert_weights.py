"""python -m jaxsae.convert_weights --weights=DIR_OR_HF_ID --out=DIR
       [--format=dictionary_learning|saelens]

Rewrites an SAE in one of jaxsae's layouts: a released one (e.g.
--weights=hf://microsoft/maira-2-sae/SUBFOLDER, fetched into the Hugging Face cache) or any export.
The tensors, k, group sizes, threshold, layer and hook name carry over, and the source's trainer
config is kept under `training`; no activation scale is applied (weights on disk act on raw
activations). The folder at --out appears complete or not at all, with a checksum manifest.
"""

from absl import flags
from absl import logging as absl_logging

from jaxsae import cli, weights

_WEIGHTS = flags.DEFINE_string(
    'weights', None, 'SAE folder (either layout) or hf://ORG/NAME[/SUBFOLDER][@REVISION].'
)
_OUT = flags.DEFINE_string('out', None, 'Output directory.')
_FORMAT = flags.DEFINE_enum('format', 'dictionary_learning', list(weights.FORMATS), 'Layout.')
flags.mark_flags_as_required(['weights', 'out'])


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)
  path = weights.convert(_WEIGHTS.value, _OUT.value, _FORMAT.value)
  print(f'wrote {path}')


if __name__ == '__main__':
  cli.run(main)
