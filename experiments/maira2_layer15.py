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
  c.data.store_dtype = 'bfloat16'  # half the disk and read time; the SAE trains in float32
  c.model.name = 'microsoft/maira-2'  # gated: accept its licence on the Hub, then `hf auth login`
  c.model.revision = (
      '795a2b1cd4a310624b4e3d14b5a23e41fd273deb'  # the snapshot this port was read against
  )
  c.model.layer = 15
  # jaxsae's port; under the release's remote code: 'language_model.model.layers.15'
  c.model.hook_name = 'model.language_model.layers.15'
  c.model.dtype = 'bfloat16'  # ~14 GB on one GPU (the Hub weights are float32, ~27 GB)
  c.model.device = 'cuda'  # loaded straight onto the GPU; override with --config.model.device=cpu
  # Vicuna-7B's residual stream has a few massive-norm tokens (the first "." / newline after BOS,
  # hundreds of times the median norm): left in, they set the activation scale and dominate the
  # loss. 10x the running median removes them and keeps every ordinary token (their norms stay
  # within a few times the median); dictionary_learning suggests the same multiple.
  c.export.max_norm_multiple = 10.0
  # Preparing a study (2-3 JPEGs of ~2.5k x 3k, decoded and resized) takes ~0.1-0.5 s of one core;
  # a GPU forwards 15-20 studies/s through layer 15: about 8 workers keep it busy.
  c.export.workers = 8
  return c
