"""The one schema every experiment config follows, and its validation.

Experiment files in `experiments/` start from `default_config()` and override values; `validate`
runs before any compute, so a typo or an impossible setting fails in a second with a message that
names the key, not after an hour of training.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Sequence

import ml_collections

from jaxsae.errors import ConfigError  # noqa: F401 (raised here, and by callers as config.ConfigError)
from jaxsae.formats.tokens import TOKEN_KINDS

# sae.kernel: the implementations of the training step's selection, decode and gradients.
KERNELS = ('auto', 'dense', 'xla', 'pallas', 'cpu')


def load_experiment(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """The config of an experiment file (`experiments/X.py`'s `get_config([arg])`), as the commands'
  `--config=path[:arg]` flag reads it; for scripts and notebooks that have no flags."""
  if not os.path.isfile(path):
    raise ConfigError(
        f'no experiment file at {path!r}; pass the path of a file such as ' 'experiments/demo.py.'
    )
  spec = importlib.util.spec_from_file_location(
      f'jaxsae_experiment_{os.path.splitext(os.path.basename(path))[0]}', path
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)


def default_config() -> ml_collections.ConfigDict:
  """All keys with their defaults (dictionary_learning's MatryoshkaBatchTopKTrainer defaults)."""
  c = ml_collections.ConfigDict()

  c.seed = 0

  c.sae = ml_collections.ConfigDict()
  c.sae.d = 1024  # activation width (d_in)
  c.sae.expansion_factor = 8  # F = expansion_factor * d unless dict_size is set
  c.sae.dict_size = ml_collections.FieldReference(None, field_type=int)
  c.sae.k = 32  # mean active latents per token (BatchTopK budget B*k)
  # Nested prefix groups: give fractions (sum 1, rounding remainder to the last group) or sizes.
  c.sae.group_fractions = (1 / 16, 1 / 16, 1 / 8, 1 / 4, 1 / 2)
  c.sae.group_sizes = ml_collections.FieldReference(None, field_type=tuple)
  c.sae.group_weights = ml_collections.FieldReference(None, field_type=tuple)  # None: 1/G each
  c.sae.auxk_alpha = 1 / 32
  c.sae.top_k_aux = ml_collections.FieldReference(None, field_type=int)  # None: d // 2
  c.sae.dead_tokens_threshold = 10_000_000
  c.sae.threshold_beta = 0.999
  c.sae.threshold_start_step = 1000
  c.sae.candidates_per_row = 4  # per-row top-(c*k) candidates for exact BatchTopK selection
  c.sae.kernel = 'auto'  # 'dense' | 'xla' | 'pallas' | 'cpu' (jaxsae.kernels) | 'auto'
  c.sae.dtype = 'float32'

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = ml_collections.FieldReference(None, field_type=float)  # None: 2e-4/sqrt(F/2^14)
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.warmup_steps = 1000
  c.optim.decay_start = ml_collections.FieldReference(None, field_type=int)
  c.optim.grad_clip = 1.0

  c.data = ml_collections.ConfigDict()
  c.data.source = 'synthetic'  # 'synthetic' | 'store'
  c.data.batch_size = 2048
  c.data.normalize = True  # scale inputs so that E||x||^2 = d
  c.data.scale_estimate_batches = 16
  c.data.store_path = ''  # activation store: a directory or a TensorStore kvstore URL
  c.data.store_dtype = 'float32'  # or 'bfloat16': written by export, expected by training
  c.data.num_threads = 4  # grain reader threads (each reads whole batches)
  c.data.prefetch = 8  # batches read ahead
  c.data.worker_processes = 0  # >0: read in that many processes (grain mp_prefetch)
  c.data.synthetic = ml_collections.ConfigDict()
  c.data.synthetic.n_features = 4096
  c.data.synthetic.mean_active = 16.0  # expected number of active true features per token
  c.data.synthetic.zipf_exponent = 1.0  # feature frequency ~ rank^-exponent
  c.data.synthetic.n_parents = 0  # hierarchical: children fire only with their parent
  c.data.synthetic.children_per_parent = 4
  c.data.synthetic.noise_std = 0.01
  c.data.synthetic.seed = 1234

  c.train = ml_collections.ConfigDict()
  c.train.steps = 10_000
  c.train.log_every = 50
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 3
  c.train.async_checkpointing = True
  c.train.skip_nonfinite = False
  c.train.progress_bar = True

  # Several processes (hosts) training one SAE: jax.distributed.initialize before anything else.
  # With enabled and no coordinator_address, JAX detects the cluster (SLURM, MPI, TPU pods).
  c.distributed = ml_collections.ConfigDict()
  c.distributed.enabled = False
  c.distributed.coordinator_address = ''  # host:port of process 0
  c.distributed.num_processes = 1
  c.distributed.process_id = 0
  c.distributed.local_device_count = 0  # >0: simulate that many CPU devices per process
  c.distributed.cpu_collectives = 'gloo'  # cross-process collectives on CPU

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # -1: all remaining devices
  c.mesh.model = 1

  # The model the activations come from (export_activations; provenance in exported weights).
  c.model = ml_collections.ConfigDict()
  c.model.name = 'synthetic'  # Hub name or local directory
  c.model.layer = 15  # decoder layer whose residual-stream output is captured
  c.model.hook_name = 'model.language_model.layers.15'  # its module path; '' = find it by layer
  c.model.dtype = 'float32'  # torch dtype of the forward pass
  c.model.device = 'cpu'
  c.model.trust_remote_code = True  # MAIRA-2's processor and model classes are remote code

  # Activation export (python -m jaxsae.export_activations), writing to data.store_path.
  c.export = ml_collections.ConfigDict()
  c.export.manifest = ''  # JSONL or CSV, a study per row (jaxsae/bridge/manifest.py)
  c.export.batch_size = 4  # studies per forward pass
  c.export.teacher_forcing = True  # findings as assistant text; False: the prompt only
  # Token kinds kept (image, prompt, boilerplate, report). The paper filters out the image tokens
  # and the prompt boilerplate before training its SAE.
  c.export.keep_kinds = ('prompt', 'report')
  c.export.rows_per_chunk = 4  # the unit of a read: small, as training reads rows at random
  c.export.rows_per_shard = 4096  # one file per shard; also the rows buffered per commit
  c.export.skip_bad = False  # skip unreadable studies (listed in the store's report)
  c.export.stop_at_layer = True  # skip the layers after model.layer (not needed)
  c.export.max_studies = ml_collections.FieldReference(None, field_type=int)

  # Interpretation (python -m jaxsae.interpret): streaming feature statistics, explanations,
  # detection scores, the HTML browser.
  c.interpret = ml_collections.ConfigDict()
  c.interpret.batch_size = 4096  # store rows per step of the statistics pass
  c.interpret.row_capacity = 0  # firing latents read per token; 0: 4*sae.k (grows if short)
  c.interpret.top_examples = 20  # top-activating tokens kept per feature
  c.interpret.reservoir = 200  # uniform sample of firing tokens per feature (for quantiles)
  c.interpret.n_quantiles = 5  # activation quantile bins sampled for examples
  c.interpret.per_quantile = 4  # examples per quantile bin
  c.interpret.n_negatives = 20  # non-firing tokens per feature (for detection scoring)
  c.interpret.negative_pool = 2048  # random store rows the negatives are drawn from
  c.interpret.heatmaps = 2  # images with patch heatmaps per image-token feature
  c.interpret.context_before = 12  # tokens of context shown before an example's token
  c.interpret.context_after = 4
  c.interpret.histogram_bins_per_octave = 4
  c.interpret.checkpoint_every = 50  # statistics batches between resumable checkpoints
  c.interpret.max_features = ml_collections.FieldReference(None, field_type=int)  # explain first N
  c.interpret.seed = 0
  c.interpret.explain = True  # False: statistics and browser only
  c.interpret.n_top = 10  # top examples shown to the explainer
  c.interpret.n_quantile = 10  # quantile examples shown to the explainer
  c.interpret.score_batch = 10  # examples per scorer request
  c.interpret.llm = ml_collections.ConfigDict()
  c.interpret.llm.backend = 'openai'  # 'openai' (any OpenAI-compatible server) | 'local'
  c.interpret.llm.base_url = 'http://127.0.0.1:8000/v1'
  c.interpret.llm.model = ''  # served model name, or a local path for backend='local'
  c.interpret.llm.api_key_env = 'OPENAI_API_KEY'  # read from the environment, never logged
  c.interpret.llm.timeout_s = 120.0
  c.interpret.llm.max_retries = 6
  c.interpret.llm.concurrency = 8
  c.interpret.llm.max_new_tokens = 200
  c.interpret.llm.device = 'cpu'  # backend='local'
  return c


# --------------------------------------------------------------------------------------------------
# Derived values
# --------------------------------------------------------------------------------------------------


def dict_size(c: ml_collections.ConfigDict) -> int:
  return (
      int(c.sae.dict_size) if c.sae.dict_size is not None else int(c.sae.expansion_factor * c.sae.d)
  )


def group_sizes(c: ml_collections.ConfigDict) -> tuple[int, ...]:
  """Explicit sizes, or dictionary_learning's rule: int(f*F) per group, remainder to the last."""
  F = dict_size(c)
  if c.sae.group_sizes is not None:
    return tuple(int(s) for s in c.sae.group_sizes)
  fr = list(c.sae.group_fractions)
  sizes = [int(f * F) for f in fr[:-1]]
  return tuple(sizes + [F - sum(sizes)])


def group_weights(c: ml_collections.ConfigDict) -> tuple[float, ...]:
  G = len(group_sizes(c))
  if c.sae.group_weights is None:
    return tuple([1.0 / G] * G)
  return tuple(float(w) for w in c.sae.group_weights)


def learning_rate(c: ml_collections.ConfigDict) -> float:
  """2e-4 / sqrt(F / 2^14) (Bussmann et al.'s 1/sqrt(F) scaling law) unless set."""
  if c.optim.lr is not None:
    return float(c.optim.lr)
  return 2e-4 / math.sqrt(dict_size(c) / 2**14)


def top_k_aux(c: ml_collections.ConfigDict) -> int:
  return int(c.sae.top_k_aux) if c.sae.top_k_aux is not None else c.sae.d // 2


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _flat_keys(c: ml_collections.ConfigDict, prefix: str = '') -> dict[str, object]:
  out = {}
  for key, value in c.items():
    name = f'{prefix}{key}'
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flat_keys(value, name + '.'))
    else:
      out[name] = value
  return out


def _close(keys: Sequence[str], key: str) -> str:
  import difflib

  near = difflib.get_close_matches(key, keys, n=3)
  return f' Did you mean {", ".join(near)}?' if near else ''


def validate(c: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Raise ConfigError naming the first wrong key; cheap, runs before anything is allocated."""
  known = _flat_keys(default_config())
  given = _flat_keys(c)
  for key in given:
    if key not in known:
      raise ConfigError(
          f'unknown config key {key!r}.{_close(list(known), key)} '
          'Known keys are those of jaxsae.config.default_config().'
      )

  d, F, k = c.sae.d, dict_size(c), c.sae.k
  if d <= 0 or F <= 0:
    raise ConfigError(f'sae.d and the dictionary size must be positive, got d={d}, F={F}.')
  if not 0 < k < F:
    raise ConfigError(
        f'sae.k must satisfy 0 < k < F (dictionary size); got k={k}, F={F}. '
        'Lower sae.k or raise sae.expansion_factor / sae.dict_size.'
    )
  if c.sae.group_sizes is not None:
    sizes = group_sizes(c)
    if sum(sizes) != F or any(s <= 0 for s in sizes):
      raise ConfigError(
          f'sae.group_sizes must be positive and sum to F={F}; got {sizes} ' f'(sum {sum(sizes)}).'
      )
  else:
    fr = tuple(c.sae.group_fractions)
    if not fr or not math.isclose(sum(fr), 1.0, abs_tol=1e-6) or any(f <= 0 for f in fr):
      raise ConfigError(
          f'sae.group_fractions must be positive and sum to 1; got {fr} ' f'(sum {sum(fr):.6g}).'
      )
    if any(s <= 0 for s in group_sizes(c)):
      raise ConfigError(
          f'sae.group_fractions {fr} give an empty group at F={F}: ' f'sizes {group_sizes(c)}.'
      )
  weights = group_weights(c)
  if len(weights) != len(group_sizes(c)):
    raise ConfigError(
        f'sae.group_weights has {len(weights)} entries but there are '
        f'{len(group_sizes(c))} groups.'
    )
  if c.sae.candidates_per_row < 1:
    raise ConfigError(f'sae.candidates_per_row must be >= 1, got {c.sae.candidates_per_row}.')
  if not 0 < top_k_aux(c):
    raise ConfigError(f'sae.top_k_aux must be positive, got {top_k_aux(c)}.')
  if c.sae.kernel not in KERNELS:
    raise ConfigError(
        f"sae.kernel must be one of {', '.join(map(repr, KERNELS))}, " f'got {c.sae.kernel!r}.'
    )
  if c.sae.dtype not in ('float32', 'bfloat16'):
    raise ConfigError(f"sae.dtype must be 'float32' or 'bfloat16', got {c.sae.dtype!r}.")

  B, steps = c.data.batch_size, c.train.steps
  if B <= 0:
    raise ConfigError(f'data.batch_size must be positive, got {B}.')
  if c.data.source not in ('synthetic', 'store'):
    raise ConfigError(f"data.source must be 'synthetic' or 'store', got {c.data.source!r}.")
  if c.data.source == 'store' and not c.data.store_path:
    raise ConfigError(
        'data.source is "store" but data.store_path is empty: set it to the '
        'activation store written by `python -m jaxsae.export_activations`.'
    )
  if c.data.store_dtype not in ('float32', 'bfloat16'):
    raise ConfigError(
        "data.store_dtype must be 'float32' or 'bfloat16', got " f'{c.data.store_dtype!r}.'
    )
  if c.data.num_threads < 0 or c.data.prefetch < 0 or c.data.worker_processes < 0:
    raise ConfigError(
        'data.num_threads, data.prefetch and data.worker_processes must be >= 0; '
        f'got {c.data.num_threads}, {c.data.prefetch}, {c.data.worker_processes}.'
    )
  validate_export(c)
  if steps <= 0:
    raise ConfigError(f'train.steps must be positive, got {steps}.')
  w, ds = c.optim.warmup_steps, c.optim.decay_start
  if not 0 <= w < steps:
    raise ConfigError(
        f'optim.warmup_steps must satisfy 0 <= warmup_steps < train.steps; ' f'got {w} and {steps}.'
    )
  if ds is not None and not w < ds < steps:
    raise ConfigError(
        f'optim.decay_start must satisfy warmup_steps < decay_start < train.steps; '
        f'got {ds} (warmup {w}, steps {steps}).'
    )
  for key in ('log_every', 'checkpoint_every', 'keep_checkpoints'):
    if c.train[key] <= 0:
      raise ConfigError(f'train.{key} must be positive, got {c.train[key]}.')

  if num_devices is not None:
    data_axis = c.mesh.data if c.mesh.data != -1 else num_devices // max(c.mesh.model, 1)
    if data_axis * c.mesh.model != num_devices:
      raise ConfigError(
          f'mesh {c.mesh.data}x{c.mesh.model} (data x model) does not use the '
          f'{num_devices} available devices.'
      )
    if B % data_axis:
      raise ConfigError(
          f'data.batch_size={B} is not divisible by the {data_axis} devices on the '
          'data axis of the mesh; pick a multiple.'
      )
    if F % c.mesh.model:
      raise ConfigError(f'dictionary size F={F} is not divisible by mesh.model={c.mesh.model}.')


def validate_export(c: ml_collections.ConfigDict) -> None:
  """The export keys (also checked by `validate`, so a training config cannot carry bad ones)."""
  e = c.export
  bad = [k for k in e.keep_kinds if k not in TOKEN_KINDS]
  if bad or not e.keep_kinds:
    raise ConfigError(
        f'export.keep_kinds must be a non-empty subset of {TOKEN_KINDS}; got '
        f'{tuple(e.keep_kinds)}.'
    )
  if e.batch_size <= 0:
    raise ConfigError(f'export.batch_size must be positive, got {e.batch_size}.')
  if e.rows_per_chunk <= 0 or e.rows_per_shard <= 0 or e.rows_per_shard % e.rows_per_chunk:
    raise ConfigError(
        'export.rows_per_shard must be a positive multiple of export.rows_per_chunk; '
        f'got {e.rows_per_shard} and {e.rows_per_chunk}.'
    )
  if c.model.dtype not in ('float32', 'bfloat16', 'float16'):
    raise ConfigError(
        f"model.dtype must be 'float32', 'bfloat16' or 'float16', got " f'{c.model.dtype!r}.'
    )
