"""Planted ground-truth features, no torch: does training recover a known dictionary?

python -m jaxsae.train --config=experiments/synthetic.py --workdir=/tmp/synthetic
Reports MMCS (mean max cosine similarity of true features to decoder rows) in summary.json.
"""

from jaxsae.config import default_config


def get_config():
  c = default_config()
  c.sae.d = 128
  c.sae.expansion_factor = 8  # F = 1024 latents for 512 planted features
  c.sae.k = 8
  c.data.source = 'synthetic'
  c.data.batch_size = 1024
  c.data.synthetic.n_features = 512
  c.data.synthetic.mean_active = 8.0
  c.data.synthetic.zipf_exponent = 0.5
  c.data.synthetic.n_parents = 16  # 16 parents x 4 children: a hierarchy to keep apart
  c.data.synthetic.children_per_parent = 4
  c.data.synthetic.noise_std = 0.01
  c.sae.dead_tokens_threshold = 100_000  # ~100 steps: AuxK revives latents early in a short run
  c.sae.threshold_start_step = 200
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 100
  c.optim.decay_start = 2400
  c.train.steps = 3000
  c.train.log_every = 100
  c.train.checkpoint_every = 1000
  return c
