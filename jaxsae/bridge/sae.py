"""An exported SAE as a small torch module, for use inside the model (steering, splicing).

Reads either layout that `jaxsae.weights` writes (dictionary_learning's `ae.safetensors` +
`config.json`, or SAELens's `sae_weights.safetensors` + `cfg.json`) without importing JAX: the
bridge runs where the model runs, which need not have JAX. The math is `jaxsae.model`'s inference
path, so encode/decode agree with `jaxsae.weights.load(dir)` to float tolerance
(tests/test_bridge_sae.py):

    encode(x) = JumpReLU_theta(relu((x - b_dec) @ W_enc + b_enc)),  keep a > theta
    decode(a) = a @ W_dec + b_dec

theta is a scalar (dictionary_learning) or one value per latent (SAELens).
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
import torch
from safetensors.torch import load_file

from jaxsae.config import ConfigError

# The file names of jaxsae.weights (not imported from there: that module imports JAX).
DL_WEIGHTS, DL_CONFIG = 'ae.safetensors', 'config.json'
SL_WEIGHTS, SL_CONFIG = 'sae_weights.safetensors', 'cfg.json'
PARAMS = ('W_enc', 'b_enc', 'W_dec', 'b_dec')


class TorchSAE(torch.nn.Module):
  """A Matryoshka BatchTopK SAE at inference: JumpReLU encoder, linear decoder, nested prefixes."""

  def __init__(self, W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor,
               b_dec: torch.Tensor, threshold: torch.Tensor | float, k: int | None = None,
               group_sizes: Sequence[int] | None = None, layer: int | None = None,
               hook_name: str | None = None, source: str = ''):
    super().__init__()
    d, F = W_enc.shape
    if W_dec.shape != (F, d) or b_enc.shape != (F,) or b_dec.shape != (d,):
      raise ConfigError(f'{source or "SAE"}: inconsistent shapes W_enc {tuple(W_enc.shape)}, '
                        f'b_enc {tuple(b_enc.shape)}, W_dec {tuple(W_dec.shape)}, b_dec '
                        f'{tuple(b_dec.shape)}; expected [d, F], [F], [F, d], [d].')
    threshold = torch.as_tensor(threshold, dtype=W_enc.dtype)
    if threshold.ndim not in (0, 1) or (threshold.ndim == 1 and threshold.shape != (F,)):
      raise ConfigError(f'{source or "SAE"}: threshold has shape {tuple(threshold.shape)}; '
                        f'expected a scalar or [F={F}].')
    sizes = [F] if group_sizes is None else [int(s) for s in group_sizes]
    if sum(sizes) != F:
      raise ConfigError(f'{source or "SAE"}: group sizes {sizes} sum to {sum(sizes)}, not F={F}.')
    for name, value in zip(PARAMS + ('threshold',), (W_enc, b_enc, W_dec, b_dec, threshold)):
      self.register_buffer(name, value.contiguous())
    self.d, self.F, self.k = int(d), int(F), k
    self.group_sizes = tuple(sizes)
    self.layer, self.hook_name, self.source = layer, hook_name, source

  def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
    return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

  def encode(self, x: torch.Tensor) -> torch.Tensor:
    """Sparse codes [..., F]: pre-activations above the learned threshold."""
    pre = self.pre_activations(x)
    return torch.where(pre > self.threshold, pre, torch.zeros_like(pre))

  def decode(self, acts: torch.Tensor) -> torch.Tensor:
    return acts @ self.W_dec + self.b_dec

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.decode(self.encode(x))

  def prefix_reconstructions(self, acts: torch.Tensor) -> torch.Tensor:
    """x_hat of every Matryoshka prefix, [G, ..., d]: b_dec + the first i groups' decodes."""
    ends = np.cumsum(self.group_sizes).tolist()
    parts = [acts[..., a:b] @ self.W_dec[a:b] for a, b in zip([0] + ends[:-1], ends)]
    return self.b_dec + torch.cumsum(torch.stack(parts), dim=0)

  def check_features(self, features: Sequence[int]) -> list[int]:
    """`features` as ints, or a ConfigError naming the first one out of range."""
    out = [int(f) for f in features]
    bad = [f for f in out if not 0 <= f < self.F]
    if bad:
      raise ConfigError(f'feature {bad[0]} is out of range: this SAE ({self.source or "in memory"})'
                        f' has F={self.F} latents, numbered 0..{self.F - 1}. Pick a feature in '
                        'that range.')
    return out

  def extra_repr(self) -> str:
    theta = 'per-latent' if self.threshold.ndim else f'{float(self.threshold):.4g}'
    return (f'd={self.d}, F={self.F}, k={self.k}, groups={self.group_sizes}, layer={self.layer}, '
            f'threshold={theta}')


def load(path: str, device: str | torch.device = 'cpu',
         dtype: torch.dtype = torch.float32) -> TorchSAE:
  """The SAE exported to directory `path` (layout detected from its files)."""
  tensors, cfg, layout = _read(path)
  missing = [n for n in PARAMS if n not in tensors]
  if missing:
    raise ConfigError(f'{path}: the weights file lacks {missing}; it holds {sorted(tensors)}.')
  F = tensors['W_enc'].shape[1]
  if layout == 'dictionary_learning':
    trainer = cfg.get('trainer', {})
    k = int(tensors['k']) if 'k' in tensors else trainer.get('k')
    sizes = (tensors['group_sizes'].tolist() if 'group_sizes' in tensors
             else trainer.get('group_sizes', [F]))
    threshold = tensors.get('threshold', torch.tensor(-1.0))
    layer, hook = trainer.get('layer'), trainer.get('submodule_name')
  else:
    extra = cfg.get('metadata', {}).get('jaxsae', {})
    k, sizes = extra.get('k'), extra.get('group_sizes', [F])
    threshold = tensors['threshold']
    if threshold.numel() and bool((threshold == threshold[0]).all()):
      threshold = threshold[0]  # one value for all latents, as jaxsae.weights.load reads it
    layer, hook = extra.get('layer'), cfg.get('hook_name')
  params = [tensors[n].to(dtype) for n in PARAMS]
  sae = TorchSAE(*params, threshold=threshold.to(dtype), k=None if k is None else int(k),
                 group_sizes=sizes, layer=None if layer is None else int(layer), hook_name=hook,
                 source=path)
  return sae.to(device).eval()


def _read(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
  if os.path.exists(os.path.join(path, DL_WEIGHTS)):
    return (load_file(os.path.join(path, DL_WEIGHTS)), _json(os.path.join(path, DL_CONFIG)),
            'dictionary_learning')
  if os.path.exists(os.path.join(path, SL_WEIGHTS)):
    cfg = _json(os.path.join(path, SL_CONFIG))
    if cfg.get('architecture') != 'jumprelu':
      raise ConfigError(f'{path}/{SL_CONFIG}: architecture {cfg.get("architecture")!r} is not '
                        'supported; the bridge loads SAELens "jumprelu" SAEs (what jaxsae '
                        'exports).')
    return load_file(os.path.join(path, SL_WEIGHTS)), cfg, 'saelens'
  raise ConfigError(f'no SAE weights in {path!r}: expected {DL_WEIGHTS} (dictionary_learning) or '
                    f'{SL_WEIGHTS} (SAELens). Export them with `python -m jaxsae.export_weights '
                    '--workdir=... --out=DIR --format=dictionary_learning`.')


def _json(path: str) -> dict:
  if not os.path.exists(path):
    raise ConfigError(f'{path} is missing: exported weights come with their config file.')
  with open(path) as f:
    return json.load(f)
