"""Edits of decoder layer L's output (the residual stream the SAE saw), as context managers.

    site = Site(model, sae, layer=15)
    with add(site, [1234], alpha=8.0, where='generated', prompt_ids=ids):
      model.generate(...)

Each context manager registers one forward hook on the layer and removes it on exit; nothing else
about the model changes (no parameter is touched, outputs are edited out of place), so the model is
bit-identical once the block exits, even after an exception.

`where` chooses the positions edited: 'all', 'prompt' (positions of `prompt_ids`), 'generated'
(positions after it), 'image' (the prompt's image tokens), a sequence of positions, or a boolean
mask over positions. Positions are absolute: with a KV cache the hook learns how many tokens came
before the current call from the cache, so the same edit applies to a prompt pass, to each
generated token, and to one forward over the whole sequence alike. A batch shares one mask.
"""

from __future__ import annotations

import contextlib
import numbers
from typing import Any, Callable, Iterator, Sequence

import ml_collections
import numpy as np
import torch

from jaxsae.bridge import loading
from jaxsae.bridge.sae import TorchSAE
from jaxsae.config import ConfigError

WHERE = ('all', 'prompt', 'generated', 'image')
Where = str | Sequence[int] | torch.Tensor | np.ndarray


def hidden_size(model: torch.nn.Module) -> int:
  config = getattr(model.config, 'text_config', None) or model.config
  return int(config.hidden_size)


def image_token_id(model: torch.nn.Module) -> int | None:
  for key in ('image_token_id', 'image_token_index'):
    value = getattr(model.config, key, None)
    if value is not None:
      return int(value)
  return None


class Site:
  """Decoder layer `layer` of `model` and, optionally, an SAE of the same width trained there."""

  def __init__(self, model: torch.nn.Module, sae: TorchSAE | None, layer: int, hook_name: str = ''):
    self.model, self.sae, self.layer = model, sae, layer
    self.path, self.module = loading.find_layer(model, hook_name, layer)  # ConfigError if unknown
    self.d = hidden_size(model)
    if sae is not None and sae.d != self.d:
      raise ConfigError(
          f'the SAE has d={sae.d} but {type(model).__name__} layer {self.path} has '
          f'width {self.d}: these weights ({sae.source or "in memory"}) were trained '
          'on another model or site. Use weights exported for this model.'
      )
    # The KV cache's index of this layer (tells a hook how many positions came before).
    self.cache_index = getattr(getattr(self.module, 'self_attn', None), 'layer_idx', layer)
    self.image_token_id = image_token_id(model)

  def require_sae(self) -> TorchSAE:
    if self.sae is None:
      raise ConfigError('this intervention needs an SAE: build the Site with one.')
    return self.sae


def _start(site: Site, kwargs: dict, T: int) -> int:
  """Absolute position of the first token in this call (0 without a cache)."""
  # position_ids is what the layer itself uses (rotary embeddings); transformers versions rename
  # the cache argument ('past_key_value' -> 'past_key_values' -> 'cache'), so it is the fallback.
  position_ids = kwargs.get('position_ids')
  if position_ids is not None:
    return int(position_ids.reshape(-1, position_ids.shape[-1])[0, 0])
  cache = next(
      (
          kwargs[k]
          for k in ('cache', 'past_key_values', 'past_key_value')
          if kwargs.get(k) is not None
      ),
      None,
  )
  if cache is not None and hasattr(cache, 'get_seq_length'):
    return max(int(cache.get_seq_length(site.cache_index)) - T, 0)  # updated by this layer already
  position = kwargs.get('cache_position')
  return int(position[0]) if position is not None else 0


def positions_mask(
    site: Site, where: Where, prompt_ids: torch.Tensor | None, start: int, T: int
) -> torch.Tensor | None:
  """Boolean [T] mask of the positions start..start+T-1 selected by `where` (None: all)."""
  if isinstance(where, str):
    if where not in WHERE:
      raise ConfigError(
          f'where={where!r} is not a position set; use one of {WHERE}, a list of '
          'positions or a boolean mask.'
      )
    if where == 'all':
      return None
    if prompt_ids is None:
      raise ConfigError(
          f"where={where!r} needs prompt_ids (the prompt's input_ids) to know which "
          'positions are the prompt.'
      )
    ids = prompt_ids.reshape(-1)
    pos = torch.arange(start, start + T)
    if where == 'prompt':
      return pos < len(ids)
    if where == 'generated':
      return pos >= len(ids)
    if site.image_token_id is None:
      raise ConfigError("where='image' but the model's config names no image token id.")
    image = torch.zeros(start + T, dtype=torch.bool)
    n = min(len(ids), start + T)
    image[:n] = ids[:n].cpu() == site.image_token_id
    return image[start:]
  if isinstance(where, np.ndarray):
    where = torch.from_numpy(where)
  if isinstance(where, torch.Tensor) and where.dtype == torch.bool:
    full = torch.zeros(start + T, dtype=torch.bool)
    n = min(len(where), start + T)
    full[:n] = where[:n].cpu()
    return full[start:]
  pos = torch.as_tensor(list(where), dtype=torch.long)
  return ((pos[None, :] - start) == torch.arange(T)[:, None]).any(1)


def edit(
    site: Site,
    fn: Callable[[torch.Tensor], torch.Tensor],
    where: Where = 'all',
    prompt_ids: torch.Tensor | None = None,
) -> contextlib.AbstractContextManager:
  """Replace the layer's output rows x at the chosen positions by fn(x), float32 [n, d] -> [n, d]."""
  positions_mask(site, where, prompt_ids, 0, 0)  # a bad `where` fails here, not inside the model

  def hook(module, args, kwargs, output):
    x = output[0] if isinstance(output, tuple) else output
    mask = positions_mask(site, where, prompt_ids, _start(site, kwargs, x.shape[-2]), x.shape[-2])
    if mask is None:
      new = fn(x.float()).to(x.dtype)
    else:
      idx = mask.nonzero().squeeze(1).to(x.device)
      new = x.clone()
      if len(idx):
        new[..., idx, :] = fn(x[..., idx, :].float()).to(x.dtype)
    return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

  return _hooked(site.module, hook)


@contextlib.contextmanager
def _hooked(module: torch.nn.Module, hook) -> Iterator[None]:
  handle = module.register_forward_hook(hook, with_kwargs=True)
  try:
    yield
  finally:
    handle.remove()


def _alphas(features: Sequence[int], alpha: float | Sequence[float]) -> list[float]:
  if isinstance(alpha, numbers.Real):
    return [float(alpha)] * len(features)
  if len(alpha) != len(features):
    raise ConfigError(
        f'{len(features)} features but {len(alpha)} alphas; give one alpha, or one ' 'per feature.'
    )
  return [float(a) for a in alpha]


def steering_vector(
    site: Site, features: Sequence[int], alpha: float | Sequence[float], norm: float | None = None
) -> torch.Tensor:
  """sum_f alpha_f W_dec[f] (absolute), or sum_f alpha_f * norm * W_dec[f]/|W_dec[f]| (relative:
  alpha in units of the residual norm `norm`)."""
  sae = site.require_sae()
  features = sae.check_features(features)
  rows = sae.W_dec[features]
  coef = torch.tensor(_alphas(features, alpha), dtype=rows.dtype, device=rows.device)
  if norm is not None:
    coef = coef * float(norm) / rows.norm(dim=1)
  return coef @ rows


def add(
    site: Site,
    features: Sequence[int],
    alpha: float | Sequence[float],
    where: Where = 'all',
    prompt_ids: torch.Tensor | None = None,
    norm: float | None = None,
):
  """x <- x + sum_f alpha_f W_dec[f] at the chosen positions (see `steering_vector` for `norm`)."""
  v = steering_vector(site, features, alpha, norm)
  return edit(site, lambda x: x + v.to(x.device), where, prompt_ids)


def clamp(
    site: Site,
    features: Sequence[int],
    value: float | Sequence[float],
    where: Where = 'all',
    prompt_ids: torch.Tensor | None = None,
):
  """Set features to `value` and keep the SAE's error term: decode(a') + (x - decode(a)).

  Written as x + (a' - a) @ W_dec, the same sum without the round trip through x_hat, so that
  clamping a feature to the value it already has returns x exactly.
  """
  sae = site.require_sae()
  features = sae.check_features(features)
  values = _alphas(features, value)

  def fn(x):
    acts = sae.encode(x)
    new = acts.clone()
    for f, v in zip(features, values):
      new[..., f] = v
    delta = new[..., features] - acts[..., features]
    return x + delta @ sae.W_dec[features]

  return edit(site, fn, where, prompt_ids)


def splice(
    site: Site,
    keep_error: bool = False,
    where: Where = 'all',
    prompt_ids: torch.Tensor | None = None,
):
  """Replace x by the SAE's reconstruction x_hat (keep_error: x_hat + (x - x_hat))."""
  sae = site.require_sae()

  def fn(x):
    x_hat = sae(x)
    return x_hat + (x - x_hat) if keep_error else x_hat

  return edit(site, fn, where, prompt_ids)


def zero_ablate(site: Site, where: Where = 'all', prompt_ids: torch.Tensor | None = None):
  """Replace x by zeros: the floor of the loss-recovered score."""
  return edit(site, torch.zeros_like, where, prompt_ids)


@contextlib.contextmanager
def record(site: Site) -> Iterator[list[torch.Tensor]]:
  """Collect the layer's output of every forward call made inside the block (after any edit
  registered before this one)."""
  outputs: list[torch.Tensor] = []

  def hook(module, args, output):
    outputs.append((output[0] if isinstance(output, tuple) else output).detach().clone())

  handle = site.module.register_forward_hook(hook)
  try:
    yield outputs
  finally:
    handle.remove()


def load_site(c: ml_collections.ConfigDict, weights: str) -> tuple[Site, Any]:
  """(Site for c.model's layer with the SAE in `weights`, processor): the model and processor
  named in the config, the SAE on the model's device, its recorded layer checked."""
  from jaxsae.bridge import sae as sae_lib  # pylint: disable=import-outside-toplevel

  sae = sae_lib.load(weights)  # fails fast, before the model loads
  if sae.layer is not None and sae.layer != c.model.layer:
    raise ConfigError(
        f'the SAE in {weights} was trained on layer {sae.layer} (its config says so) '
        f'but the config hooks layer {c.model.layer}; pass '
        f'--config.model.layer={sae.layer} and a matching --config.model.hook_name '
        '(or "" to find the layer by number).'
    )
  model, processor = loading.load(c)
  sae = sae.to(next(model.parameters()).device)
  return Site(model, sae, c.model.layer, c.model.hook_name), processor
