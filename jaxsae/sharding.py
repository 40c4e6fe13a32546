"""Where every array lives on the device mesh: the sharding rules, written once.

Tokens are split over the `data` axis and latents (F) over the `model` axis. A leaf of the training
state is placed by the last parameter name in its path (so Adam's mu/nu follow their parameter);
everything else (scalars, the threshold) is replicated. With a sharded optimizer (ZeRO: no device
repeats the update) Adam's moments, and the gradients the update reads, are split over both axes
along F (`OPTIMIZER_RULES`); the parameters stay replicated over `data`, as the step reads them.
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


# A sharded optimizer's layout: F split over model, then data within each model shard. b_dec (d
# floats) stays replicated: every device updates it, as a replicated optimizer does everything.
OPTIMIZER_RULES: dict[str, P] = {
    'W_enc': P(None, ('model', 'data')),
    'b_enc': P(('model', 'data')),
    'W_dec': P(('model', 'data'), None),
    'b_dec': P(),
}
PARAMS = ('W_enc', 'b_enc', 'W_dec', 'b_dec')


def param_specs() -> dict[str, P]:
  """Where the step reads the parameters."""
  return {n: RULES[n] for n in PARAMS}


def update_specs(shard_optimizer: bool) -> dict[str, P]:
  """Where the gradients, Adam's moments and their update live."""
  return dict(OPTIMIZER_RULES) if shard_optimizer else param_specs()


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


def _name(entry) -> Any:
  return getattr(entry, 'key', getattr(entry, 'name', None))


def _spec_for(path: tuple, leaf: Any, shard_optimizer: bool = False) -> P:
  rules = RULES
  if shard_optimizer and any(_name(e) == 'opt_state' for e in path):
    rules = OPTIMIZER_RULES
  for entry in reversed(path):
    name = _name(entry)
    if isinstance(name, str) and name in rules:
      spec = rules[name]
      return spec if len(spec) == getattr(leaf, 'ndim', 0) else P()
  return P()


def tree_specs(tree: Any, shard_optimizer: bool = False, optimizer_state: bool = False) -> Any:
  """PartitionSpecs for a pytree by the rules above (`optimizer_state`: the whole tree is Adam's
  state, laid out as `update_specs` when the optimizer is sharded)."""
  prefix = (jax.tree_util.DictKey('opt_state'),) if optimizer_state else ()
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: _spec_for(prefix + path, leaf, shard_optimizer), tree
  )


def state_shardings(mesh: Mesh, abstract_state: Any, shard_optimizer: bool = False) -> Any:
  """NamedShardings for a (possibly abstract) training-state pytree, by the rules above."""
  return jax.tree.map(
      lambda spec: NamedSharding(mesh, spec),
      tree_specs(abstract_state, shard_optimizer),
      is_leaf=lambda x: isinstance(x, P),
  )


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, RULES['batch'])
