"""The paper's setup (Bouzid et al. 2025): MAIRA-2 decoder layer 15 residual stream, d = 4096.

`--config=experiments/maira2_layer15.py:4` picks the expansion factor (2, 4 or 8; the paper
studies 4); experiments/maira2_layer15_ef{2,4,8}.py are the same with the factor fixed.
Values the paper does not state (k, group fractions, lr, batch size, tokens) are ours: override
them on the command line.
"""

from jaxsae.config import default_config


def get_config(expansion_factor: str = '4'):
  c = default_config()
  c.sae.d = 4096
  c.sae.expansion_factor = int(expansion_factor)
  c.sae.k = 64  # not stated in the paper
  c.sae.group_fractions = (1 / 16, 1 / 16, 1 / 8, 1 / 4, 1 / 2)  # Bussmann et al.
  c.data.source = 'store'
  c.data.store_path = 'outputs/maira2_layer15/activations'
  c.data.batch_size = 4096
  c.train.steps = 50_000  # ~200M tokens at B = 4096
  c.train.checkpoint_every = 1000
  c.model.name = 'microsoft/maira-2'
  c.model.layer = 15
  c.model.hook_name = 'language_model.model.layers.15'
  return c
