"""The Python API, for notebooks and scripts: load an SAE, encode, decode and inspect its features,
train and export, without the command line or the modules underneath (`jaxsae.weights`,
`jaxsae.model`, `jaxsae.trainer`). `import jaxsae` exposes these names lazily, so it stays cheap.

Train a quick SAE on planted features (experiments/synthetic.py), export it, load it and look at
what it does (run from the repository root; a Hub id such as hf://ORG/NAME/SUBFOLDER loads too):

>>> import numpy as np
>>> import jaxsae
>>> quick = {'train.steps': 20, 'optim.warmup_steps': 5, 'optim.decay_start': None,
...          'sae.threshold_start_step': 10}  # a few seconds; drop it for the full run
>>> summary = jaxsae.train('experiments/synthetic.py', 'runs/synthetic', quick)
>>> sae = jaxsae.load(jaxsae.export('runs/synthetic', 'runs/synthetic-sae'))
>>> x = np.random.default_rng(0).standard_normal((512, sae.d)).astype(np.float32)
>>> codes = sae.encode(x)  # [512, F]: JumpReLU codes; batch_topk=True keeps 512 * k
>>> x_hat = sae.decode(codes)  # the same as sae.reconstruct(x)
>>> top = sae.top_features(x, n=5)  # ids, mean and max activation, firing fraction
>>> u = sae.direction(int(top.ids[0]))  # that feature's unit decoder row, [d]

What came out (the run's own numbers vary; the shapes do not):

>>> summary['step'], sae.d, sae.F, sae.k, codes.shape, x_hat.shape, u.shape
(20, 128, 1024, 8, (512, 1024), (512, 128), (128,))
>>> bool(np.isclose(float(np.linalg.norm(u)), 1.0)), 0 < len(top.ids) <= 5
(True, True)
"""

from __future__ import annotations

import copy
import os
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from numpy.typing import ArrayLike

from jaxsae import config as config_lib
from jaxsae import model as model_lib
from jaxsae import weights as weights_lib
from jaxsae.errors import ConfigError

__all__ = ['SAE', 'TopFeatures', 'load', 'make_config', 'train', 'export']

_PARAM_NAMES = ('W_enc', 'b_enc', 'W_dec', 'b_dec')  # an SAE's arrays, as jaxsae.model names them


class TopFeatures(NamedTuple):
  """The features most active over a batch, most active first (numpy arrays, one entry each)."""

  ids: np.ndarray  # [n] int: the latents' indices
  mean: np.ndarray  # [n] mean activation over the tokens where the feature fires
  max: np.ndarray  # [n] largest activation in the batch
  firing_fraction: np.ndarray  # [n] share of the batch's tokens where it fires


class SAE:
  """A loaded SAE with the operations a notebook needs, on numpy or JAX arrays of any leading
  shape ([..., d] in, [..., F] codes out). The Flax module itself is `sae.model`.

  Built by hand here (d=2, F=3, threshold 0.5) to show what each method computes:

  >>> import numpy as np
  >>> from jaxsae.api import SAE
  >>> W_dec = np.array([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0]])
  >>> sae = SAE.from_params(
  ...     {'W_enc': W_dec.T, 'b_enc': np.zeros(3), 'W_dec': W_dec, 'b_dec': np.zeros(2)},
  ...     k=1, threshold=0.5)
  >>> sae
  SAE(d=2, F=3, k=1, group_sizes=(3,), threshold=0.5)
  >>> x = np.array([[0.25, 0.25], [1.0, 0.0]])
  >>> print(np.asarray(sae.encode(x)))  # kept where above the threshold
  [[0.   0.   1.75]
   [1.   0.   3.  ]]
  >>> print(np.asarray(sae.encode(x, batch_topk=True)))  # the batch's B*k = 2 largest
  [[0.   0.   1.75]
   [0.   0.   3.  ]]
  >>> print(np.asarray(sae.reconstruct(x)))
  [[ 5.25  7.  ]
   [10.   12.  ]]
  >>> top = sae.top_features(x, n=2)  # feature 2 fires on both tokens, feature 0 on one
  >>> print(top.ids, top.mean, top.max, top.firing_fraction)
  [2 0] [2.375 1.   ] [3. 1.] [1.  0.5]
  >>> print(np.asarray(sae.direction(2)))  # row [3, 4] over its norm 5
  [0.6 0.8]
  >>> sae.encode(np.zeros((4, 3)))  # doctest: +ELLIPSIS
  Traceback (most recent call last):
  ...
  ValueError: x has width 3 in its last axis (shape (4, 3)), but this SAE ... of width d=2. ...
  """

  def __init__(self, sae: model_lib.MatryoshkaSAE, config: dict[str, Any], source: str):
    self.model = sae
    self._config = config
    self.source = source

  @classmethod
  def from_params(
      cls,
      params: Mapping[str, ArrayLike],
      *,
      k: int,
      threshold: float | ArrayLike,
      group_sizes: Sequence[int] | None = None,
  ) -> SAE:
    """An SAE from its arrays (W_enc [d, F], b_enc [F], W_dec [F, d], b_dec [d]), acting on raw
    activations: for weights from elsewhere, and for examples. `group_sizes`: one group if None."""
    p = {n: jnp.asarray(np.asarray(params[n], np.float32)) for n in _PARAM_NAMES}
    F = int(p['W_enc'].shape[1])
    sizes = tuple(group_sizes) if group_sizes is not None else (F,)
    sae = model_lib.MatryoshkaSAE.from_params(p, int(k), sizes, np.asarray(threshold, np.float32))
    return cls(sae, {}, 'built from arrays')

  # ------------------------------------------------------------------------------------------------
  # What it is
  # ------------------------------------------------------------------------------------------------

  @property
  def d(self) -> int:
    """Activation width: the inputs' last axis."""
    return int(self.model.d)

  @property
  def F(self) -> int:
    """Dictionary size: the codes' last axis."""
    return int(self.model.F)

  @property
  def k(self) -> int:
    """The BatchTopK budget (mean active latents per token) that batch_topk=True keeps."""
    return int(self.model.k)

  @property
  def group_sizes(self) -> tuple[int, ...]:
    """The Matryoshka groups: latents [0, s0) are the first prefix, and so on."""
    return tuple(self.model.group_sizes)

  @property
  def threshold(self) -> float | np.ndarray:
    """The JumpReLU inference threshold (a float; [F] when the latents' thresholds differ)."""
    t = np.asarray(self.model.threshold.get_value())
    return float(t) if t.ndim == 0 else t

  @property
  def config(self) -> dict[str, Any]:
    """The config file read with the weights (config.json or cfg.json), as a dict."""
    return self._config

  def __repr__(self) -> str:
    t = self.threshold
    shown = f'{t:.6g}' if isinstance(t, float) else f'[{t.shape[0]} values]'
    return (
        f'SAE(d={self.d}, F={self.F}, k={self.k}, group_sizes={self.group_sizes}, '
        f'threshold={shown})'
    )

  # ------------------------------------------------------------------------------------------------
  # What it computes
  # ------------------------------------------------------------------------------------------------

  def encode(self, x: ArrayLike, *, batch_topk: bool = False) -> jax.Array:
    """Sparse codes [..., F]. By default the inference rule (JumpReLU: keep pre-activations above
    the learned threshold), so a token's code does not depend on its batch; batch_topk=True keeps
    the largest B*k over all B tokens given instead, as in training."""
    flat, lead = self._rows(x, self.d, 'x', 'encodes activations')
    return self.model.encode(flat, use_threshold=not batch_topk).reshape(*lead, self.F)

  def decode(self, codes: ArrayLike) -> jax.Array:
    """Activations [..., d] from codes [..., F]: codes @ W_dec + b_dec."""
    flat, lead = self._rows(codes, self.F, 'codes', 'decodes codes')
    return self.model.decode(flat).reshape(*lead, self.d)

  def reconstruct(self, x: ArrayLike, *, batch_topk: bool = False) -> jax.Array:
    """decode(encode(x)): what the SAE keeps of x (x - reconstruct(x) is the error term)."""
    return self.decode(self.encode(x, batch_topk=batch_topk))

  def top_features(self, x: ArrayLike, n: int = 10, *, batch_topk: bool = False) -> TopFeatures:
    """The n features with the largest total activation over x's tokens (frequency times
    strength), with their mean activation where they fire, max, and firing fraction. Features
    that fire on none of the tokens are left out, so fewer than n come back when fewer fire."""
    if int(n) < 1:
      raise ValueError(f'n={n}: top_features needs n >= 1 (the number of features to return).')
    codes = self.encode(x, batch_topk=batch_topk).reshape(-1, self.F)
    fires = np.asarray(jnp.sum(codes > 0, axis=0))
    total = np.asarray(jnp.sum(codes, axis=0))
    peak = np.asarray(jnp.max(codes, axis=0)) if codes.shape[0] else np.zeros(self.F, np.float32)
    order = np.argsort(-total, kind='stable')[: int(n)]
    ids = order[fires[order] > 0]
    tokens = max(codes.shape[0], 1)
    return TopFeatures(
        ids=ids,
        mean=(total[ids] / fires[ids]).astype(np.float32),
        max=peak[ids].astype(np.float32),
        firing_fraction=(fires[ids] / tokens).astype(np.float32),
    )

  def direction(self, feature: int) -> jax.Array:
    """The feature's decoder row scaled to unit norm, [d]: the direction it writes into the
    activations (for steering, or comparing with probes). A zero row comes back as zeros."""
    if not 0 <= int(feature) < self.F:
      raise IndexError(
          f'feature {feature} is out of range: this SAE has features 0 to {self.F - 1}.'
      )
    row = self.model.W_dec.get_value()[int(feature)]
    norm = jnp.linalg.norm(row)
    return jnp.where(norm > 0, row / jnp.where(norm > 0, norm, 1.0), 0.0)

  def _rows(self, a: ArrayLike, width: int, name: str, what: str) -> tuple[jax.Array, tuple]:
    """`a` as [N, width] rows in the parameters' dtype, and its leading shape; a clear error when
    its last axis is not `width`."""
    dtype = self.model.W_enc.get_value().dtype
    a = jnp.asarray(a, dtype)
    if a.ndim == 0 or a.shape[-1] != width:
      got = a.shape[-1] if a.ndim else 'none (a scalar)'
      symbol = 'd' if name == 'x' else 'F'
      raise ValueError(
          f'{name} has width {got} in its last axis (shape {tuple(a.shape)}), but this SAE '
          f'({self.source}) {what} of width {symbol}={width}. Pass an array of shape '
          f'[..., {width}]{" from the layer it was trained on" if name == "x" else ""}.'
      )
    return a.reshape(-1, width), tuple(a.shape[:-1])


# --------------------------------------------------------------------------------------------------
# Loading, training, exporting
# --------------------------------------------------------------------------------------------------


def load(path: str) -> SAE:
  """The SAE in an exported folder (dictionary_learning's ae.safetensors + config.json or
  SAELens's sae_weights.safetensors + cfg.json, checked against its manifest), or a Hub id
  hf://ORG/NAME[/SUBFOLDER][@REVISION] (from the Hugging Face cache, downloading if allowed)."""
  sae, cfg = weights_lib.load(os.fspath(path))
  return SAE(sae, cfg, os.fspath(path))


def make_config(
    config: ml_collections.ConfigDict | str, overrides: Mapping[str, Any] | None = None
) -> ml_collections.ConfigDict:
  """A training config: an experiment file (`path` or `path:arg`, as --config takes it) or a
  ConfigDict (copied, never changed), with `overrides` applied by dotted key ('train.steps': 200
  is --config.train.steps=200). Unknown keys fail here, naming the nearest known ones."""
  if isinstance(config, (str, os.PathLike)):
    spec = os.fspath(config)
    path, arg = spec, None
    if not os.path.isfile(spec) and ':' in spec:
      path, _, arg = spec.rpartition(':')
    c = config_lib.load_experiment(path, arg)
  elif isinstance(config, ml_collections.ConfigDict):
    c = copy.deepcopy(config)
  else:
    raise TypeError(
        f'config is a {type(config).__name__}; pass the path of an experiment file (such as '
        "'experiments/synthetic.py') or an ml_collections.ConfigDict "
        '(jaxsae.config.default_config()).'
    )
  known = config_lib.config_keys()
  for key, value in (overrides or {}).items():
    if key not in known:
      raise ConfigError(config_lib.unknown_key(key, ' in overrides'))
    *parents, leaf = key.split('.')
    node = c
    for p in parents:
      node = node[p]
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise ConfigError(
          f'overrides[{key!r}]={value!r} does not fit the key: {e} (its default is '
          f'{known[key]!r}).'
      ) from e
  return c


def train(
    config: ml_collections.ConfigDict | str,
    workdir: str,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
  """Train (resuming if `workdir` holds checkpoints) as `python -m jaxsae.train` does, and return
  the final summary (eval_fvu, eval_l0, dead latents, ...; also in workdir/summary.json).
  `config` and `overrides`: as make_config takes them."""
  from jaxsae import trainer  # pylint: disable=import-outside-toplevel (data pipeline, orbax: slow)

  return trainer.train_and_evaluate(make_config(config, overrides), os.fspath(workdir))


def export(
    workdir: str, out: str, format: str = 'dictionary_learning', step: int | None = None
) -> str:  # pylint: disable=redefined-builtin (the CLI's --format)
  """Write the newest (or `step`'s) checkpoint of `workdir` to folder `out` in `format`
  ('dictionary_learning' or 'saelens'), activation scale folded in, as `python -m
  jaxsae.export_weights` does; returns `out`, so that load(export(...)) reads it back."""
  weights_lib.export(os.fspath(workdir), os.fspath(out), format, step)
  return os.fspath(out)
