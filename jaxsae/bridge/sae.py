"""An exported SAE as a small torch module, for use inside the model (steering, splicing).

Reads either layout that `jaxsae.weights` writes through `jaxsae.formats.weights` (which documents
them), the same reader the JAX side uses, so the two cannot disagree on a file; that reader speaks
numpy, and this module only turns its arrays into torch tensors. Nothing here imports JAX: the
bridge runs where the model runs, which need not have JAX. The math is `jaxsae.model`'s inference
path, so encode/decode agree with `jaxsae.weights.load(dir)` to float tolerance
(tests/bridge/test_torch_sae.py):

    encode(x) = JumpReLU_theta(relu((x - b_dec) @ W_enc + b_enc)),  keep a > theta
    decode(a) = a @ W_dec + b_dec

theta is a scalar (dictionary_learning) or one value per latent (SAELens).
"""

from __future__ import annotations

from typing import Sequence

import ml_dtypes
import numpy as np
import torch

from jaxsae.errors import ConfigError
from jaxsae.formats import hub
from jaxsae.formats import weights as weights_format
from jaxsae.formats.weights import PARAMS


class TorchSAE(torch.nn.Module):
  """A Matryoshka BatchTopK SAE at inference: JumpReLU encoder, linear decoder, nested prefixes."""

  def __init__(
      self,
      W_enc: torch.Tensor,
      b_enc: torch.Tensor,
      W_dec: torch.Tensor,
      b_dec: torch.Tensor,
      threshold: torch.Tensor | float,
      k: int | None = None,
      group_sizes: Sequence[int] | None = None,
      layer: int | None = None,
      hook_name: str | None = None,
      source: str = '',
  ):
    super().__init__()
    threshold = torch.as_tensor(threshold, dtype=W_enc.dtype)
    sizes = None if group_sizes is None else [int(s) for s in group_sizes]
    d, F = weights_format.check_shapes(
        {n: t.shape for n, t in zip(PARAMS, (W_enc, b_enc, W_dec, b_dec))},
        threshold.shape,
        sizes,
        source or 'SAE',
    )
    for name, value in zip(PARAMS + ('threshold',), (W_enc, b_enc, W_dec, b_dec, threshold)):
      self.register_buffer(name, value.contiguous())
    self.d, self.F, self.k = int(d), int(F), k
    self.group_sizes = (int(F),) if sizes is None else tuple(sizes)
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
      raise ConfigError(
          f'feature {bad[0]} is out of range: this SAE ({self.source or "in memory"})'
          f' has F={self.F} latents, numbered 0..{self.F - 1}. Pick a feature in '
          'that range.'
      )
    return out

  def extra_repr(self) -> str:
    theta = 'per-latent' if self.threshold.ndim else f'{float(self.threshold):.4g}'
    return (
        f'd={self.d}, F={self.F}, k={self.k}, groups={self.group_sizes}, layer={self.layer}, '
        f'threshold={theta}'
    )


def load(
    path: str, device: str | torch.device = 'cpu', dtype: torch.dtype = torch.float32
) -> TorchSAE:
  """The SAE exported to directory `path` (layout detected from its files), or at a Hugging Face
  Hub id `hf://ORG/NAME[/SUBFOLDER][@REVISION]` (fetched into the Hub cache)."""
  w = weights_format.read(hub.resolve(path))
  params = [_tensor(w.params[n], dtype) for n in PARAMS]
  sae = TorchSAE(
      *params,
      threshold=_tensor(w.threshold, dtype),
      k=w.k,
      group_sizes=w.group_sizes,
      layer=w.layer,
      hook_name=w.hook_name,
      source=path,
  )
  return sae.to(device).eval()


def _tensor(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
  if a.dtype == ml_dtypes.bfloat16:  # numpy's bfloat16 (ml_dtypes) is not one torch shares
    a = a.astype(np.float32)
  return torch.from_numpy(a).to(dtype)
