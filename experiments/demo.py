"""The offline demo: a tiny random model on synthetic studies.

    python tools/make_demo_data.py                                  # studies + tiny model
    python -m jaxsae.export_activations --config=experiments/demo.py  # -> activation store
    python -m jaxsae.train --config=experiments/demo.py --workdir=outputs/demo/train
(tools/demo.sh runs all of it.) Paths are relative to the repository root.

`--config=experiments/demo.py:maira2` (with `make_demo_data.py --model=maira2`, or
`DEMO_MODEL=maira2 bash tools/demo.sh`) uses a tiny MAIRA-2 in the real checkpoint's layout
(jaxsae.bridge.maira2.checkpoint: 1369 tokens per image, 17 decoder layers, hooked at layer 15 as
the paper does) instead of the default small LLaVA, which is ~10x faster (56-px images, 4 layers).
"""

from jaxsae.config import default_config

MODELS = ('llava', 'maira2')


def get_config(model: str = 'llava'):
  if model not in MODELS:
    raise ValueError(f'experiments/demo.py:{model}: choose one of {MODELS}.')
  c = default_config()
  c.model.name = 'outputs/demo/data/model'  # written by tools/make_demo_data.py
  c.model.layer = 2 if model == 'llava' else 15  # of 4 (LLaVA) or 17 (MAIRA-2) decoder layers
  c.model.hook_name = f'model.language_model.layers.{c.model.layer}'
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
