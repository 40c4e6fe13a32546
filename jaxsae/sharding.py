"""Where every array lives on the device mesh: the sharding rules, written once.

Tokens are split over the `data` axis and latents (F) over the `model` axis. A leaf of the training
state is placed by the last parameter name in its path (so Adam's mu/nu follow their parameter);
everything else (scalars, the threshold) is replicated.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Logical layout of each named array: which mesh axis each dimension is split over.
RULES: dict[str, P] = {
    'W_enc': P(None, 'model'),  # [d, F]
    'b_enc': P('model'),  # [F]
    'W_dec': P('model', None),  # [F, d]
    'b_dec': P(),  # [d]
    'tokens_since_fired': P('model'),  # [F]
    'batch': P('data', None),  # [B, d]
}


def make_mesh(c: ml_collections.ConfigDict, devices: list | None = None) -> Mesh:
  """A (data, model) mesh from config; -1 on `mesh.data` takes all remaining devices."""
  devices = devices if devices is not None else jax.devices()
  model = c.mesh.model
  data = c.mesh.data if c.mesh.data != -1 else len(devices) // model
  return jax.make_mesh(
      (data, model),
      ('data', 'model'),
      devices=devices,
      axis_types=(jax.sharding.AxisType.Auto,) * 2,
  )


def _spec_for(path: tuple, leaf: Any) -> P:
  for entry in reversed(path):
    name = getattr(entry, 'key', getattr(entry, 'name', None))
    if isinstance(name, str) and name in RULES:
      spec = RULES[name]
      return spec if len(spec) == getattr(leaf, 'ndim', 0) else P()
  return P()


def state_shardings(mesh: Mesh, abstract_state: Any) -> Any:
  """NamedShardings for a (possibly abstract) training-state pytree, by the rules above."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: NamedSharding(mesh, _spec_for(path, leaf)), abstract_state
  )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, RULES['batch'])
