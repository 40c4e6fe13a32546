"""The offline demo: a tiny random LLaVA model (MAIRA-2's stand-in) on synthetic studies.

    python tools/make_demo_data.py                                  # studies + tiny model
    python -m jaxsae.export_activations --config=experiments/demo.py  # -> activation store
    python -m jaxsae.train --config=experiments/demo.py --workdir=outputs/demo/train
(tools/demo.sh runs all of it.) Paths are relative to the repository root.
"""

from jaxsae.config import default_config


def get_config():
  c = default_config()
  c.model.name = 'outputs/demo/data/model'  # written by tools/make_demo_data.py
  c.model.layer = 2  # of 4 decoder layers
  c.model.hook_name = 'model.language_model.layers.2'
  c.export.manifest = 'outputs/demo/data/manifest.jsonl'
  c.export.batch_size = 8
  c.export.keep_kinds = ('prompt', 'report')  # the paper's: no image tokens, no boilerplate
  c.export.rows_per_shard = 1024
  c.data.source = 'store'
  c.data.store_path = 'outputs/demo/activations'
  c.data.store_dtype = 'float32'
  c.data.batch_size = 256
  c.sae.d = 64  # the tiny model's width
  c.sae.expansion_factor = 4
  c.sae.k = 8
  c.sae.dead_tokens_threshold = 50_000
  c.sae.threshold_start_step = 100
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 50
  c.optim.decay_start = 300
  c.train.steps = 400
  c.train.log_every = 50
  c.train.checkpoint_every = 100
  return c
