"""The one schema every experiment config follows, and its validation.

Experiment files in `experiments/` start from `default_config()` and override values; `validate`
runs before any compute, so a typo or an impossible setting fails in a second with a message that
names the key, not after an hour of training.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import numbers
import os
import re

import ml_collections

from jaxsae.errors import ConfigError  # noqa: F401 (raised here, and by callers as config.ConfigError)
from jaxsae.formats import hub
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
  # Share of the store's studies never trained on, for the held-out evaluation (by study id,
  # jaxsae.formats.split; 0: none). 5% costs little training data, and from a store of ~1.3M
  # tokens up it holds more than train.eval_tokens, so the evaluation is not starved.
  c.data.held_out_fraction = 0.05
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
  # Resume a checkpoint on data other than its own (another store, or other synthetic settings);
  # off, that is refused. Its activation scale is kept. A store that only grew needs no flag.
  c.train.allow_store_change = False
  # Held-out tokens the end-of-training evaluation (FVU, L0, dead latents) counts over. "Dead" is
  # "fires on none of these N tokens": a latent firing on a share p of tokens is missed with
  # probability (1-p)^N, under 0.2% for p >= 1e-4 at N = 65536 (8 batches of 2048 missed 20%).
  c.train.eval_tokens = 65_536
  c.train.progress_bar = True
  # Start from an exported or released SAE instead of a random one: a weights folder (either
  # layout) or hf://ORG/NAME[/SUBFOLDER][@REVISION] (the paper's: hf://microsoft/maira-2-sae/...).
  # Its d, F, group sizes and k must be the config's. Used only while the workdir has no checkpoint.
  c.train.init_from = ''
  # Weights & Biases logging (jaxsae/wandb_log.py), beside metrics.jsonl and TensorBoard: on when a
  # project is named. Needs pip install 'jaxsae[wandb]'. mode '' follows WANDB_MODE, else online;
  # 'offline' writes WORKDIR/wandb/ for a later `wandb sync`. name '': the workdir's name.
  c.train.wandb = ml_collections.ConfigDict()
  c.train.wandb.project = ''  # '': no W&B logging
  c.train.wandb.entity = ''  # '': the logged-in user's default entity
  c.train.wandb.name = ''
  c.train.wandb.mode = ''  # '' | 'online' | 'offline' | 'disabled'

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
  # ZeRO: Adam's state and update split over the data axis too (reduce-scatter the gradients,
  # update 1/D, all-gather the parameters) instead of repeated on every data shard. 'auto': on
  # GPUs and TPUs; off on CPU devices, where it measured slower (README, Sharding).
  c.mesh.shard_optimizer = 'auto'  # 'auto' | 'on' | 'off'

  # The model the activations come from (export_activations; provenance in exported weights).
  c.model = ml_collections.ConfigDict()
  c.model.name = 'synthetic'  # Hub name or local directory
  c.model.layer = 15  # decoder layer whose residual-stream output is captured
  c.model.hook_name = 'model.language_model.layers.15'  # its module path; '' = find it by layer
  c.model.dtype = 'float32'  # torch dtype of the forward pass
  c.model.device = 'cpu'
  c.model.revision = ''  # Hub commit/tag/branch to pin the weights to; '' = the default branch
  # True runs a checkpoint's own code (MAIRA-2's needs transformers <4.52); False: jaxsae's port
  c.model.trust_remote_code = False

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
  # The pipeline: worker processes read, decode and normalise studies ahead of the forward pass;
  # `bucket_window` studies at a time are sorted by token length into batches (less padding).
  c.export.workers = 2  # 0: prepare each study in the main process, one after another
  c.export.bucket_window = 16  # 1: batches in manifest order; the first window waits whole
  # Tokens whose norm exceeds this multiple of the running median norm are not written
  # (Llama-family massive activations); None keeps every token.
  c.export.max_norm_multiple = ml_collections.FieldReference(None, field_type=float)
  # Several processes (one per GPU or host) export disjoint shares of the manifest into one store.
  c.export.processes = 1
  c.export.process_index = -1  # -1: from $RANK or $SLURM_PROCID (0 when processes=1)

  # Clinical findings (jaxsae/findings): the 14 CheXpert observations per study, aligned with the
  # features by `interpret` and scored in steered reports by `steer`.
  c.findings = ml_collections.ConfigDict()
  c.findings.enabled = True  # alignment statistics in `interpret`
  c.findings.labels_file = ''  # CheXpert-format CSV; '': label the manifest's findings text
  c.findings.id_column = 'study_id'
  c.findings.id_prefix = ''  # put before the file's ids to match the manifest's (MIMIC: 's')
  c.findings.uncertain = 'exclude'  # an uncertain label in AUROC/probes: exclude|positive|negative
  c.findings.coverage_auroc = 0.9  # a finding is covered when a feature reaches this AUROC
  c.findings.probe_k = (1, 2, 5, 10, 20)  # sparse probes: top-k features by mean difference
  c.findings.probe_studies = 20000  # studies whose per-study feature maxima are kept for probes
  c.findings.probe_held_out = 0.2  # of those, held out (by study id hash) for probe accuracy
  c.findings.top_features = 20  # features listed per finding
  c.findings.min_positives = 5  # fewer positive studies: no AUROC or probe for that finding

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


def mesh_shape(c: ml_collections.ConfigDict, num_devices: int | None = None) -> tuple[int, int]:
  """(data, model) axis sizes; mesh.data=-1 takes the devices left (all of JAX's by default)."""
  if c.mesh.data != -1:
    return int(c.mesh.data), int(c.mesh.model)
  if num_devices is None:
    import jax  # pylint: disable=import-outside-toplevel (config stays importable without it)

    num_devices = jax.device_count()
  return num_devices // c.mesh.model, int(c.mesh.model)


def shard_optimizer(
    c: ml_collections.ConfigDict, num_devices: int | None = None, platform: str | None = None
) -> bool:
  """Whether the optimizer state is split over `data`: asked for (or 'auto' off the CPU), and a
  data axis exists."""
  if mesh_shape(c, num_devices)[0] == 1 or c.mesh.shard_optimizer == 'off':
    return False
  if c.mesh.shard_optimizer == 'on':
    return True
  if platform is None:
    import jax  # pylint: disable=import-outside-toplevel

    platform = jax.default_backend()
  return platform != 'cpu'


def learning_rate(c: ml_collections.ConfigDict) -> float:
  """2e-4 / sqrt(F / 2^14) (Bussmann et al.'s 1/sqrt(F) scaling law) unless set."""
  if c.optim.lr is not None:
    return float(c.optim.lr)
  return 2e-4 / math.sqrt(dict_size(c) / 2**14)


def top_k_aux(c: ml_collections.ConfigDict) -> int:
  return int(c.sae.top_k_aux) if c.sae.top_k_aux is not None else c.sae.d // 2


# --------------------------------------------------------------------------------------------------
# Validation: a rule per key (type and range), then the relations between keys
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Rule:
  """What one key accepts, so that the check and the error message come from one place."""

  kind: str  # int | float | bool | str | choice | ints | floats | subset
  lo: float | None = None
  hi: float | None = None
  lo_open: bool = False
  hi_open: bool = False
  choices: tuple = ()  # choice/subset: the allowed values; int: special values beside the range
  optional: bool = False  # None allowed: it stands for a derived default
  means: str = ''  # what None (or a special value) stands for
  pattern: str = ''  # str: a regular expression the whole value matches
  pattern_means: str = ''

  def allowed(self) -> str:
    """The allowed values, in words: 'a float in [0, 1)'."""
    if self.kind in ('choice', 'subset'):
      options = ', '.join(map(repr, self.choices))
      text = f'one of {options}' if self.kind == 'choice' else f'a non-empty tuple from {options}'
    elif self.kind == 'bool':
      text = 'True or False'
    elif self.kind == 'str':
      text = self.pattern_means or 'a string'
    else:
      noun = {'int': 'an int', 'float': 'a float', 'ints': 'a non-empty tuple of ints',
              'floats': 'a non-empty tuple of floats'}[self.kind]  # fmt: skip
      text = noun + self._range()
      if self.kind in ('int', 'float') and self.choices:
        text += ', or ' + ', '.join(map(repr, self.choices))
    if self.optional:
      text += ', or None'
    return text + (f' ({self.means})' if self.means else '')

  def _range(self) -> str:
    lo, hi = self.lo, self.hi
    if lo is not None and hi is not None:
      return f' in {"(" if self.lo_open else "["}{lo:g}, {hi:g}{")" if self.hi_open else "]"}'
    if lo is not None:
      return f' {">" if self.lo_open else ">="} {lo:g}'
    if hi is not None:
      return f' {"<" if self.hi_open else "<="} {hi:g}'
    return ''

  def problem(self, value: object) -> str | None:
    """Why `value` is not allowed ('is out of range', 'is a str'), or None when it is."""
    if value is None:
      return None if self.optional else 'cannot be None'
    if self.kind == 'bool':
      return None if isinstance(value, bool) else f'is a {type(value).__name__}'
    if self.kind in ('str', 'choice'):
      if not isinstance(value, str):
        return f'is a {type(value).__name__}'
      if self.kind == 'choice':
        return None if value in self.choices else 'is not one of the choices'
      return None if re.fullmatch(self.pattern or '.*', value, re.DOTALL) else 'is malformed'
    if self.kind in ('int', 'float'):
      return None if self.kind == 'int' and value in self.choices else self._number(value)
    if not isinstance(value, (tuple, list)) or not value:
      return 'is not a non-empty tuple'
    for item in value:
      if self.kind == 'subset':
        why = None if item in self.choices else 'is not one of the choices'
      else:
        why = self._number(item, 'int' if self.kind == 'ints' else 'float')
      if why:
        return f'has an entry {item!r} that {why}'
    return None

  def _number(self, value: object, kind: str | None = None) -> str | None:
    kind = kind or self.kind
    if isinstance(value, bool) or not isinstance(
        value, numbers.Integral if kind == 'int' else numbers.Real
    ):
      return f'is a {type(value).__name__}'
    if not math.isfinite(value):
      return 'is not finite'
    below = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
    above = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
    return 'is out of range' if below or above else None


def _int(lo: int | None = None, **kw) -> Rule:
  return Rule('int', lo=lo, **kw)


def _float(lo: float | None = None, hi: float | None = None, **kw) -> Rule:
  return Rule('float', lo=lo, hi=hi, **kw)


def _choice(*choices: str) -> Rule:
  return Rule('choice', choices=choices)


_BOOL, _TEXT = Rule('bool'), Rule('str')
_NONEMPTY = Rule('str', pattern=r'.+', pattern_means='a non-empty string')
_POSITIVE, _COUNT = _int(1), _int(0)  # >= 1; >= 0
_UNIT = _float(0, 1, hi_open=True)  # [0, 1): a decay rate, a fraction
_DTYPES = ('float32', 'bfloat16')

# Every key of default_config() and what it accepts (tests/training/test_config.py checks that no
# key lacks a rule). Relations between keys (k < F, warmup < steps, ...) are checked after these.
RULES: dict[str, Rule] = {
    'seed': _COUNT,
    'sae.d': _POSITIVE,
    'sae.expansion_factor': _POSITIVE,
    'sae.dict_size': _int(1, optional=True, means='None: expansion_factor * d'),
    'sae.k': _POSITIVE,
    'sae.group_fractions': Rule(
        'floats', lo=0, hi=1, lo_open=True, optional=True, means='None: use sae.group_sizes'
    ),
    'sae.group_sizes': Rule('ints', lo=1, optional=True, means='None: from sae.group_fractions'),
    'sae.group_weights': Rule('floats', lo=0, optional=True, means='None: 1/G each'),
    'sae.auxk_alpha': _float(0),
    'sae.top_k_aux': _int(1, optional=True, means='None: d // 2'),
    'sae.dead_tokens_threshold': _POSITIVE,
    'sae.threshold_beta': _UNIT,
    'sae.threshold_start_step': _COUNT,
    'sae.candidates_per_row': _POSITIVE,
    'sae.kernel': _choice(*KERNELS),
    'sae.dtype': _choice(*_DTYPES),
    'optim.lr': _float(0, lo_open=True, optional=True, means='None: 2e-4 / sqrt(F / 2^14)'),
    'optim.b1': _UNIT,
    'optim.b2': _UNIT,
    'optim.eps': _float(0, lo_open=True),
    'optim.warmup_steps': _COUNT,
    'optim.decay_start': _int(1, optional=True, means='None: no decay'),
    'optim.grad_clip': _float(0, lo_open=True),
    'data.source': _choice('synthetic', 'store'),
    'data.batch_size': _POSITIVE,
    'data.normalize': _BOOL,
    'data.scale_estimate_batches': _POSITIVE,
    'data.store_path': _TEXT,
    'data.store_dtype': _choice(*_DTYPES),
    'data.num_threads': _COUNT,
    'data.prefetch': _COUNT,
    'data.worker_processes': _COUNT,
    'data.held_out_fraction': _UNIT,
    'data.synthetic.n_features': _POSITIVE,
    'data.synthetic.mean_active': _float(0, lo_open=True),
    'data.synthetic.zipf_exponent': _float(0),
    'data.synthetic.n_parents': _COUNT,
    'data.synthetic.children_per_parent': _COUNT,
    'data.synthetic.noise_std': _float(0),
    'data.synthetic.seed': _COUNT,
    'train.steps': _POSITIVE,
    'train.log_every': _POSITIVE,
    'train.checkpoint_every': _POSITIVE,
    'train.keep_checkpoints': _POSITIVE,
    'train.async_checkpointing': _BOOL,
    'train.skip_nonfinite': _BOOL,
    'train.progress_bar': _BOOL,
    'train.eval_tokens': _POSITIVE,
    'train.allow_store_change': _BOOL,
    'train.init_from': Rule(
        'str',
        pattern=hub.SPEC_PATTERN,
        pattern_means="'' (random init), an SAE weights folder, or hf://ORG/NAME[/SUBFOLDER][@REV]",
    ),
    'train.wandb.project': Rule(
        'str',
        pattern=r'[^/\\#?%:]{0,128}',
        pattern_means="'' (no W&B logging) or a W&B project name (<= 128 chars, no / \\ # ? % :)",
    ),
    'train.wandb.entity': Rule(
        'str', pattern=r'[\w.-]*', pattern_means="'' (your default) or a W&B user or team name"
    ),
    'train.wandb.name': _TEXT,
    'train.wandb.mode': Rule(
        'choice',
        choices=('', 'online', 'offline', 'disabled'),
        means="'': WANDB_MODE if set, else 'online'",
    ),
    'distributed.enabled': _BOOL,
    'distributed.coordinator_address': Rule(
        'str', pattern=r'|[^\s:]+:\d+', pattern_means="host:port, or '' (JAX finds the cluster)"
    ),
    'distributed.num_processes': _POSITIVE,
    'distributed.process_id': _COUNT,
    'distributed.local_device_count': _COUNT,
    'distributed.cpu_collectives': _choice('gloo', 'mpi', 'megascale'),
    'mesh.data': _int(1, choices=(-1,), means='-1: all remaining devices'),
    'mesh.model': _POSITIVE,
    'mesh.shard_optimizer': _choice('auto', 'on', 'off'),
    'model.name': _NONEMPTY,
    'model.layer': _COUNT,
    'model.hook_name': _TEXT,
    'model.dtype': _choice('float32', 'bfloat16', 'float16'),
    'model.device': _NONEMPTY,
    'model.revision': _TEXT,
    'model.trust_remote_code': _BOOL,
    'export.manifest': _TEXT,
    'export.batch_size': _POSITIVE,
    'export.teacher_forcing': _BOOL,
    'export.keep_kinds': Rule('subset', choices=tuple(TOKEN_KINDS)),
    'export.rows_per_chunk': _POSITIVE,
    'export.rows_per_shard': _POSITIVE,
    'export.skip_bad': _BOOL,
    'export.stop_at_layer': _BOOL,
    'export.max_studies': _int(1, optional=True, means='None: every study'),
    'export.workers': _int(0),
    'export.bucket_window': _int(1),
    'export.max_norm_multiple': _float(1, lo_open=True, optional=True, means='None: keep all'),
    'export.processes': _int(1),
    'export.process_index': _int(0, choices=(-1,), means='-1: from $RANK or $SLURM_PROCID'),
    **{
        f'interpret.{key}': _POSITIVE
        for key in (
            'batch_size', 'top_examples', 'reservoir', 'n_quantiles', 'per_quantile',
            'histogram_bins_per_octave', 'checkpoint_every', 'negative_pool', 'score_batch',
            'llm.concurrency', 'llm.max_new_tokens',
        )  # fmt: skip
    },
    **{
        f'interpret.{key}': _COUNT
        for key in (
            'heatmaps', 'n_negatives', 'context_before', 'context_after', 'n_top', 'n_quantile',
            'seed', 'llm.max_retries',
        )  # fmt: skip
    },
    'interpret.row_capacity': _int(1, choices=(0,), means='0: 4 * sae.k'),
    'interpret.max_features': _int(1, optional=True, means='None: every feature'),
    'findings.enabled': _BOOL,
    'findings.labels_file': _TEXT,
    'findings.id_column': _NONEMPTY,
    'findings.id_prefix': _TEXT,
    'findings.uncertain': _choice('exclude', 'positive', 'negative'),
    'findings.coverage_auroc': _float(0.5, 1),
    'findings.probe_k': Rule('ints', lo=1),
    'findings.probe_studies': _int(10),
    'findings.probe_held_out': _float(0, 1, lo_open=True, hi_open=True),
    'findings.top_features': _int(1),
    'findings.min_positives': _int(1),
    'interpret.explain': _BOOL,
    'interpret.llm.backend': _choice('openai', 'local'),
    'interpret.llm.base_url': Rule(
        'str', pattern=r'https?://\S+', pattern_means='an http:// or https:// URL'
    ),
    'interpret.llm.model': _TEXT,
    'interpret.llm.api_key_env': Rule(
        'str',
        pattern=r'|[A-Za-z_][A-Za-z0-9_]*',
        pattern_means="an environment variable's name, or '' (no key)",
    ),
    'interpret.llm.timeout_s': _float(0, lo_open=True),
    'interpret.llm.device': _NONEMPTY,
}


def _flat_keys(c: ml_collections.ConfigDict, prefix: str = '') -> dict[str, object]:
  out = {}
  for key, value in c.items():
    name = f'{prefix}{key}'
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flat_keys(value, name + '.'))
    else:
      out[name] = value
  return out


def config_keys() -> dict[str, object]:
  """Every key of the schema ('sae.k', ...) with its default."""
  return _flat_keys(default_config())


def unknown_key(key: str, where: str = '') -> str:
  """The message for a key the schema lacks, with the nearest known keys."""
  keys = list(config_keys())
  ratio = {k: difflib.SequenceMatcher(None, key, k).ratio() for k in keys}
  best = max(ratio.values())
  near = [k for k in difflib.get_close_matches(key, keys, n=3) if ratio[k] > best - 0.05] or [
      k for k in keys if k.rsplit('.', 1)[-1] == key.rsplit('.', 1)[-1]
  ]
  hint = f"; did you mean {' or '.join(map(repr, near))}?" if near else '.'
  return (
      f'unknown config key {key!r}{where}{hint} The keys are those of '
      'jaxsae.config.default_config().'
  )


def flag_text(value: object) -> str:
  """A value as it is written after `--config.a.b=` (quoted where a shell needs it)."""
  if isinstance(value, (tuple, list)):
    return f'"{tuple(value)!r}"'
  if isinstance(value, str) and (not value or ' ' in value):
    return repr(value)
  return repr(value) if isinstance(value, float) else str(value)


def _check_rule(key: str, value: object, default: object) -> None:
  rule = RULES.get(key)
  if rule is None:
    raise ConfigError(f'config key {key!r} has no validation rule: add one to config.RULES.')
  why = rule.problem(value)
  if why is None:
    return
  fix = f'--config.{key}={flag_text(default)}'
  raise ConfigError(
      f'{key}={value!r} {why}: {key} must be {rule.allowed()}. Change it in the experiment '
      f'file or on the command line, e.g. {fix} (the default).'
  )


def _check_keys(c: ml_collections.ConfigDict, only: tuple[str, ...] | None = None) -> None:
  """Unknown keys, then every key's rule (or only those of `only`: keys, or sections ending
  in '.')."""
  known = config_keys()
  given = _flat_keys(c)
  for key in given:
    if key not in known:
      raise ConfigError(unknown_key(key))
  for key, value in given.items():
    if only is None or any(key == p or (p.endswith('.') and key.startswith(p)) for p in only):
      _check_rule(key, value, known[key])


def _check_sae(c: ml_collections.ConfigDict) -> None:
  F, k = dict_size(c), c.sae.k
  if not k < F:
    raise ConfigError(
        f'sae.k must satisfy 0 < k < F (dictionary size); got k={k}, F={F}. '
        'Lower sae.k or raise sae.expansion_factor / sae.dict_size.'
    )
  if c.sae.group_sizes is not None:
    sizes = group_sizes(c)
    if sum(sizes) != F:
      raise ConfigError(
          f'sae.group_sizes must be positive and sum to F={F}; got {sizes} (sum {sum(sizes)}). '
          'Fix the sizes, or set --config.sae.group_sizes=None to use sae.group_fractions.'
      )
  elif c.sae.group_fractions is None:
    raise ConfigError(
        'sae.group_fractions and sae.group_sizes are both None: set one of them (the default '
        f'is sae.group_fractions={flag_text(default_config().sae.group_fractions)}).'
    )
  else:
    fr = tuple(c.sae.group_fractions)
    if not math.isclose(sum(fr), 1.0, abs_tol=1e-6):
      raise ConfigError(
          f'sae.group_fractions must be positive and sum to 1; got {fr} (sum {sum(fr):.6g}).'
      )
    if any(s <= 0 for s in group_sizes(c)):
      raise ConfigError(
          f'sae.group_fractions {fr} give an empty group at F={F}: sizes {group_sizes(c)}. '
          'Use larger fractions for the small groups, or a larger dictionary.'
      )
  weights, G = group_weights(c), len(group_sizes(c))
  if len(weights) != G:
    raise ConfigError(
        f'sae.group_weights has {len(weights)} entries but there are {G} groups: give one '
        'weight per group, or None for 1/G each.'
    )
  if not sum(weights) > 0:
    raise ConfigError(f'sae.group_weights {weights} are all 0: at least one must be positive.')


def _check_optim(c: ml_collections.ConfigDict) -> None:
  w, ds, steps = c.optim.warmup_steps, c.optim.decay_start, c.train.steps
  if not w < steps:
    raise ConfigError(
        f'optim.warmup_steps must satisfy 0 <= warmup_steps < train.steps; got {w} and {steps}. '
        f'Lower it, e.g. --config.optim.warmup_steps={steps // 10}, or raise train.steps.'
    )
  if ds is not None and not w < ds < steps:
    raise ConfigError(
        f'optim.decay_start must satisfy warmup_steps < decay_start < train.steps; got {ds} '
        f'(warmup {w}, steps {steps}). Pass --config.optim.decay_start=None (no decay) or a step '
        f'between {w} and {steps}.'
    )


def _check_data(c: ml_collections.ConfigDict) -> None:
  if c.data.source == 'store' and not c.data.store_path:
    raise ConfigError(
        'data.source is "store" but data.store_path is empty: set it to the '
        'activation store written by `python -m jaxsae.export_activations`.'
    )
  s = c.data.synthetic
  if s.n_parents * (1 + s.children_per_parent) > s.n_features:
    raise ConfigError(
        f'data.synthetic: {s.n_parents} parents with {s.children_per_parent} children each need '
        f'{s.n_parents * (1 + s.children_per_parent)} features but n_features={s.n_features}; '
        'raise data.synthetic.n_features or lower n_parents / children_per_parent.'
    )


def _check_distributed(c: ml_collections.ConfigDict) -> None:
  n, i = c.distributed.num_processes, c.distributed.process_id
  if not i < n:
    raise ConfigError(
        f'distributed.process_id={i} must be below distributed.num_processes={n} (processes '
        'are numbered 0 .. num_processes-1).'
    )


def _check_export(c: ml_collections.ConfigDict) -> None:
  e = c.export
  if e.rows_per_shard % e.rows_per_chunk:
    raise ConfigError(
        'export.rows_per_shard must be a positive multiple of export.rows_per_chunk; '
        f'got {e.rows_per_shard} and {e.rows_per_chunk}.'
    )
  if e.process_index >= e.processes:
    raise ConfigError(
        f'export.process_index={e.process_index} must be below export.processes={e.processes} '
        '(processes are numbered 0 .. processes-1).'
    )


def _check_wandb(c: ml_collections.ConfigDict) -> None:
  """W&B logging needs its package: say so before any work, not when the first metric is due."""
  if c.train.wandb.project and importlib.util.find_spec('wandb') is None:
    raise ConfigError(
        f'train.wandb.project={c.train.wandb.project!r} asks for Weights & Biases logging, but '
        "the wandb package is not installed: pip install 'jaxsae[wandb]' (tools/install.sh "
        "does), or set --config.train.wandb.project=''."
    )


def _check_interpret(c: ml_collections.ConfigDict) -> None:
  i = c.interpret
  if i.explain and i.n_top + i.n_quantile == 0:
    raise ConfigError(
        'interpret.n_top and interpret.n_quantile are both 0: the explainer needs examples. '
        'Raise one of them, or set --config.interpret.explain=False.'
    )


def _check_mesh(c: ml_collections.ConfigDict, num_devices: int) -> None:
  B, F = c.data.batch_size, dict_size(c)
  data_axis = c.mesh.data if c.mesh.data != -1 else num_devices // c.mesh.model
  if data_axis < 1 or data_axis * c.mesh.model != num_devices:
    raise ConfigError(
        f'mesh {c.mesh.data}x{c.mesh.model} (data x model) does not use the '
        f'{num_devices} available devices; set mesh.data * mesh.model = {num_devices} '
        '(mesh.data=-1 takes the rest).'
    )
  if B % data_axis:
    raise ConfigError(
        f'data.batch_size={B} is not divisible by the {data_axis} devices on the '
        'data axis of the mesh; pick a multiple.'
    )
  if F % c.mesh.model:
    raise ConfigError(f'dictionary size F={F} is not divisible by mesh.model={c.mesh.model}.')
  if shard_optimizer(c, num_devices) and F % (data_axis * c.mesh.model):
    raise ConfigError(
        f'mesh.shard_optimizer splits the dictionary (F={F}) over all {num_devices} devices of '
        f'the {data_axis}x{c.mesh.model} mesh: F must be divisible by {num_devices}. Pick such '
        'an F, or set --config.mesh.shard_optimizer=off.'
    )


def validate(c: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
  """Raise ConfigError naming the first wrong key; cheap, runs before anything is allocated.
  Every key's type and range first (RULES), then the relations between keys; the mesh's only
  when the number of devices is known."""
  _check_keys(c)
  for check in (
      _check_sae,
      _check_optim,
      _check_data,
      _check_distributed,
      _check_export,
      _check_wandb,
  ):
    check(c)
  _check_interpret(c)
  if num_devices is not None:
    _check_mesh(c, num_devices)


def validate_export(c: ml_collections.ConfigDict) -> None:
  """The keys activation export reads (also checked by `validate`, so that a training config
  cannot carry bad ones)."""
  _check_keys(c, ('export.', 'model.', 'data.store_path', 'data.store_dtype', 'sae.d'))
  _check_export(c)


def validate_interpret(c: ml_collections.ConfigDict) -> None:
  """The interpret keys (also checked by `validate`)."""
  _check_keys(c, ('interpret.', 'data.store_path', 'sae.k'))
  _check_interpret(c)
