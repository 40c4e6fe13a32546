"""The sparse step on a (data, model) device mesh: every backend's kernels run per shard, inside
`jax.shard_map`, so nothing [B, F]-sized is gathered or replicated and a native or Pallas call
(which XLA cannot partition) sees only its own device's blocks.

Each device holds B/D tokens (`data` axis) and F/M latents (`model` axis) and computes its block
of the encoder, z [B/D, F/M], the one [B, F]-shaped array of the step. What crosses devices, per
step:

  selection   the exact global (B*k)-th largest value: each device collects its own candidates
              (entries that can be in the batch's top B*k), then 31 rounds of bisection total
              int32 counts over the mesh; the proof that the candidates hold every selected entry
              is one more count.
  decode      with latents split over `model`, each token's per-group partial decodes,
              [G, B/D, d] floats, are summed over `model` (the smallest exact form: every prefix's
              error needs the sum of every shard's part of it). The errors, the upstream signals
              and every gradient are then local again: W_enc/W_dec/b_enc gradients stay on the
              device that owns the latents.
  gradients   summed over `data` once per step: an all-reduce, or with a sharded optimizer
              (`mesh.shard_optimizer`) a reduce-scatter, after which each device updates 1/D of
              its latents' parameters and Adam moments and the parameters are all-gathered.
  AuxK        the per-token top dead latents: counts over `model` ([B/D] int32 per round), the
              dead-latent decode summed over `model` ([B/D, d]).
  statistics  scalars and the dead-latent firing flags ([F/M] int32 over `data`).

Backends: 'cpu' (the native kernels: local selection with the whole budget as capacity, so its
candidates always hold the selection; no fallback), 'xla' (each row's top candidates, as on one
device; the exact dense step when the candidate proof fails), 'pallas_gpu' / 'pallas_tpu' (the
same candidates; their fused kernels need all of a token's latents, so only on meshes with
mesh.model = 1). `dense` stays XLA's own partitioning of the reference loss (`kernels.dense`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxsae import model
from jaxsae import selection
from jaxsae import sharding
from jaxsae.kernels import common

DATA, MODEL = 'data', 'model'
AXES = (DATA, MODEL)
_F_AXIS = {'W_enc': 1, 'b_enc': 0, 'W_dec': 0}  # each split parameter's F axis (b_dec has none)


@dataclasses.dataclass(frozen=True)
class Grid:
  """The mesh as the per-shard code sees it: its axis sizes, the whole batch and dictionary."""

  data: int
  model: int
  batch: int  # B, tokens on the whole mesh
  F: int
  shard_optimizer: bool

  @property
  def F_local(self) -> int:
    return self.F // self.model

  def sum_model(self, a):
    return jax.lax.psum(a, MODEL) if self.model > 1 else a

  def sum_data(self, a):
    return jax.lax.psum(a, DATA) if self.data > 1 else a

  def sum_all(self, a):
    return jax.lax.psum(a, AXES)

  def model_index(self) -> jax.Array:
    return jax.lax.axis_index(MODEL) if self.model > 1 else jnp.zeros((), jnp.int32)

  def shard_ends(self, group_sizes) -> list[tuple[int, ...]]:
    """Each latent shard's group ends in its own latent ids (equal ends: groups it holds none of)."""
    ends = common.group_ends(group_sizes)
    n = self.F_local
    return [tuple(min(max(e - m * n, 0), n) for e in ends) for m in range(self.model)]

  def per_shard_ends(self, group_sizes, fn: Callable, *args):
    """fn(ends, *args) with this latent shard's (static) group ends: one branch per distinct set."""
    all_ends = self.shard_ends(group_sizes)
    distinct = sorted(set(all_ends), key=all_ends.index)
    if len(distinct) == 1:
      return fn(distinct[0], *args)
    which = jnp.asarray([distinct.index(e) for e in all_ends], jnp.int32)[self.model_index()]
    return jax.lax.switch(which, [functools.partial(fn, e) for e in distinct], *args)

  def reduce_grads(self, grads: model.Params) -> model.Params:
    """Sum this device's token share of the gradients over `data`: an all-reduce, or a
    reduce-scatter along F into the sharded optimizer's layout (`sharding.OPTIMIZER_RULES`)."""
    if not self.shard_optimizer:
      return {n: self.sum_data(g) for n, g in grads.items()}
    out = {'b_dec': self.sum_data(grads['b_dec'])}
    for name, dim in _F_AXIS.items():
      out[name] = jax.lax.psum_scatter(grads[name], DATA, scatter_dimension=dim, tiled=True)
    return out

  def gather_params(self, params: model.Params) -> model.Params:
    """The inverse of the sharded optimizer's split: parameters replicated over `data` again."""
    if not self.shard_optimizer:
      return params
    return {
        n: jax.lax.all_gather(p, DATA, axis=_F_AXIS[n], tiled=True) if n in _F_AXIS else p
        for n, p in params.items()
    }


def grid_for(sc: common.StepConfig, F: int, batch: int) -> Grid:
  return Grid(sc.mesh_data, sc.mesh_model, batch, F, sc.shard_optimizer)


# --------------------------------------------------------------------------------------------------
# Selection pieces
# --------------------------------------------------------------------------------------------------


def _smallest(vals: jax.Array, selected: jax.Array) -> jax.Array:
  """The smallest selected value over the whole mesh (inf if none), for the threshold EMA."""
  return jax.lax.pmin(jnp.min(jnp.where(selected, vals, jnp.inf)), AXES)


def _fired(grid: Grid, lat: jax.Array, selected: jax.Array) -> jax.Array:
  """[F/M]: whether each of this shard's latents fired anywhere in the batch (any data shard)."""
  local = jnp.zeros((grid.F_local,), jnp.int32).at[lat].max(selected.astype(jnp.int32))
  return grid.sum_data(local) > 0


def _auxk_denominator(grid: Grid, residual: jax.Array) -> jax.Array:
  """mean over the whole batch of ||r - mean(r)||^2 (AuxK's normaliser)."""
  mean = grid.sum_data(jnp.sum(residual, axis=0)) / grid.batch
  return grid.sum_data(jnp.sum((residual - mean) ** 2)) / grid.batch


# --------------------------------------------------------------------------------------------------
# 'cpu': the native kernels per shard
# --------------------------------------------------------------------------------------------------


def _keep(cpu, e, keep: jax.Array):
  """The CSR entries `e` restricted to `keep` (order kept, so latents still ascend per token)."""
  cap = e.lat.shape[0]
  keep = keep & e.valid()
  count = jnp.cumsum(keep.astype(jnp.int32))
  before = jnp.concatenate([jnp.zeros((1,), jnp.int32), count])
  pos = jnp.where(keep, count - 1, cap)
  put = lambda a: jnp.zeros_like(a).at[pos].set(a, mode='drop')  # noqa: E731
  return cpu.Entries(before[e.row_ptr], put(e.lat), put(e.val))


def _entry_tokens(e) -> jax.Array:
  B, cap = e.row_ptr.shape[0] - 1, e.lat.shape[0]
  return jnp.repeat(jnp.arange(B, dtype=jnp.int32), jnp.diff(e.row_ptr), total_repeat_length=cap)


def _cpu_l2(cpu, grid: Grid, params, xc, e, sc):
  """Loss pieces and this device's token share of the l2 gradients, by the native kernels."""
  coef = jnp.asarray(common.l2_coefficients(sc.group_weights, grid.batch), jnp.float32)
  W_dec = params['W_dec']
  if grid.model == 1:
    return cpu.l2_grads_kernel(xc, xc, W_dec, e, common.group_ends(sc.group_sizes), coef)

  # Collectives stay outside the per-shard branches: every device runs the same ones, in order.
  mine = grid.per_shard_ends(
      sc.group_sizes, lambda ends, W, e: cpu.decode_groups(W, e, ends), W_dec, e
  )  # [G, B/D, d]
  other = grid.sum_model(mine) - mine
  # Per-prefix targets: x - b_dec minus the other shards' decodes of every prefix (unrolled: a
  # cumsum over the few groups is a slow reduce-window on CPU).
  targets, acc = [], xc
  for g in range(len(sc.group_sizes)):
    acc = acc - other[g]
    targets.append(acc)
  return grid.per_shard_ends(
      sc.group_sizes,
      lambda ends, t, W, e: cpu.l2_grads_kernel(t, xc, W, e, ends, coef),
      jnp.stack(targets),
      W_dec,
      e,
  )


def _cpu_auxk(cpu, grid: Grid, params, z, c, xc, residual, dead, sc):
  """AuxK and its gradients (this device's token share) through the native kernels."""
  k_aux = min(sc.top_k_aux, grid.F)
  e = cpu.aux_select(z, c, dead, min(k_aux, grid.F_local))
  if grid.model > 1:
    # Each shard has its tokens' top k_aux dead latents; a token's k_aux-th over all shards.
    B_l = z.shape[0]
    k_loc = e.lat.shape[0] // B_l
    slot = e.row_ptr[:-1, None] + jnp.arange(k_loc)[None]
    valid = slot < e.row_ptr[1:, None]
    dense_vals = jnp.where(valid, e.val[jnp.minimum(slot, e.lat.shape[0] - 1)], 0.0)
    kth = selection._row_bisect(dense_vals, valid, k_aux, grid.sum_model)  # pylint: disable=protected-access
    e = _keep(cpu, e, e.val >= kth[_entry_tokens(e)])
  denom = _auxk_denominator(grid, residual)
  scale = jnp.where(denom > 0, 1.0 / denom, 0.0)
  coef = jnp.reshape(-2.0 * scale / grid.batch, (1,)).astype(jnp.float32)
  if grid.model == 1:
    r = cpu.l2_grads_kernel(residual, xc, params['W_dec'], e, (grid.F_local,), coef)
  else:
    mine = cpu.decode_groups(params['W_dec'], e, (grid.F_local,))
    target = residual[None] - (grid.sum_model(mine) - mine)
    r = cpu.l2_grads_kernel(target, xc, params['W_dec'], e, (grid.F_local,), coef)
  loss = jnp.nan_to_num(grid.sum_data(jnp.sum(r.sq)) / grid.batch * scale)
  return loss, {'W_enc': r.dW_enc, 'b_enc': r.db_enc, 'W_dec': r.dW_dec}


def _cpu_select(cpu, grid: Grid, z, c, k: int):
  """This shard's candidates (CSR, latents ascending per token) and the exact global (B*k)-th
  largest value tau.

  First each shard collects its top `small` entries, a few times its expected share of the
  budget. Every entry >= tau is then among them, unless some shard's own threshold is >= tau
  (it may have left entries >= tau out): then all shards collect again with room for the whole
  budget, which no shard can hold more of, so tau is exact (ties at it past the room are dropped
  and counted, as on one device).
  """
  B_l = z.shape[0]
  budget = grid.batch * k
  full = min(budget, B_l * grid.F_local)
  small = min(full, (2 if grid.model == 1 else 3) * common.cdiv(B_l * k, grid.model))
  cap = lambda room: room + max(room // 16, 16)  # noqa: E731

  def collect(room):
    sel = cpu.select(z, c, room, cap(room))
    return sel, selection.bisect_threshold(sel.entries.val, budget, grid.sum_all)

  if small == full:
    return collect(full)
  first, tau = collect(small)
  missed = grid.sum_all(((first.tau > 0) & (tau <= first.tau)).astype(jnp.int32)) > 0
  pad = lambda a: jnp.pad(a, (0, cap(full) - cap(small)))  # noqa: E731
  entries = first.entries._replace(lat=pad(first.entries.lat), val=pad(first.entries.val))
  padded = first._replace(entries=entries)
  return jax.lax.cond(missed, lambda: collect(full), lambda: (padded, tau))


def _cpu_local(params, x, tokens_since_fired, *, sc, grid: Grid):
  from jaxsae.kernels import cpu  # pylint: disable=import-outside-toplevel (registers on use)

  z, c = cpu.encoder_parts(params, x, sc.compute_dtype)
  x = x.astype(jnp.float32)
  sel, tau = _cpu_select(cpu, grid, z, c, sc.k)
  e = _keep(cpu, sel.entries, sel.entries.val >= tau)
  xc = x - params['b_dec']
  r = _cpu_l2(cpu, grid, params, xc, e, sc)
  valid = e.valid()
  fired = _fired(grid, e.lat, valid)
  silence = model.count_silence(tokens_since_fired, fired, grid.batch)
  dead = silence >= sc.dead_tokens_threshold
  grads = {'W_enc': r.dW_enc, 'b_enc': r.db_enc, 'W_dec': r.dW_dec}

  def with_aux():
    aux, g = _cpu_auxk(cpu, grid, params, z, c, xc, r.resid, dead, sc)
    return aux, {n: grads[n] + sc.auxk_alpha * g[n] for n in grads}

  any_dead = grid.sum_model(jnp.any(dead).astype(jnp.int32)) > 0
  aux, grads = jax.lax.cond(any_dead, with_aux, lambda: (jnp.zeros((), jnp.float32), grads))
  grads['b_dec'] = r.up0 - grid.sum_model(params['W_enc'] @ grads['b_enc'])
  sq_err = grid.sum_data(jnp.sum(r.sq, axis=0)) / grid.batch
  l2 = jnp.mean(sq_err * jnp.asarray(sc.group_weights, jnp.float32))
  ties = jnp.where(sel.tau == tau, sel.ties_dropped, 0)
  stats = common.StepStats(
      sq_err,
      l2,
      aux,
      grid.sum_all(e.count).astype(jnp.float32) / grid.batch,
      _smallest(e.val, valid),
      jnp.ones((), jnp.float32),
      grid.sum_all(ties).astype(jnp.float32),
  )
  return l2 + sc.auxk_alpha * aux, stats, silence, grid.reduce_grads(grads)


# --------------------------------------------------------------------------------------------------
# 'xla' and the Pallas kernels: each row's top candidates per shard
# --------------------------------------------------------------------------------------------------


def _dense_auxk(grid: Grid, params, x, pre, residual, dead, sc):
  """AuxK per shard on the pre-activation block, as `model.auxk_loss` (ties at a token's k-th
  value all kept), with its gradients written out (this device's token share)."""
  k_aux = min(sc.top_k_aux, grid.F)
  dead_bf = jnp.broadcast_to(dead[None], pre.shape)
  kth = selection._row_bisect(pre, dead_bf, k_aux, grid.sum_model)[:, None]  # pylint: disable=protected-access
  chosen = dead_bf & (pre >= kth)
  acts = jnp.where(chosen, pre, 0.0)
  W_dec = params['W_dec']
  err = residual - grid.sum_model(acts @ W_dec)
  denom = _auxk_denominator(grid, residual)
  scale = jnp.where(denom > 0, 1.0 / denom, 0.0)
  loss = jnp.nan_to_num(grid.sum_data(jnp.sum(err**2)) / grid.batch * scale)
  g_recon = (-2.0 * scale / grid.batch) * err
  g_pre = jnp.where(chosen & (pre > 0), g_recon @ W_dec.T, 0.0)
  g_b = jnp.sum(g_pre, axis=0)
  return loss, {
      'W_enc': x.T @ g_pre - jnp.outer(params['b_dec'], g_b),
      'b_enc': g_b,
      'W_dec': acts.T @ g_recon,
  }


def _candidates_local(params, x, tokens_since_fired, *, sc, grid: Grid, l2: Callable):
  """One shard's sparse step from each row's top candidates, and whether it is exact everywhere.
  `l2(params, x, vals, idx, offset)` returns the shard's (sq_err share, x_hat, gradient share
  with only b_dec's decode part, whether its selected entries fit the kernel's room)."""
  budget = grid.batch * sc.k
  kc = min(grid.F_local, sc.candidates_per_row * sc.k)
  pre = model.pre_activations(params, x, sc.compute_dtype)
  x = x.astype(jnp.float32)
  vals, idx, tau, proven = selection._candidates(pre, budget, kc, grid.sum_all)  # pylint: disable=protected-access
  low = vals.min(axis=1)
  incomplete = grid.sum_all(jnp.sum((low >= tau) & (low > 0)))
  complete = (proven & (incomplete == 0)) | (kc >= grid.F_local)
  sel = (vals >= tau) & (vals > 0)
  offset = grid.model_index() * grid.F_local
  sq_err, x_hat, grads, fits = l2(params, x, jnp.where(sel, vals, 0.0), idx, offset)
  complete = complete & (grid.sum_all((~fits).astype(jnp.int32)) == 0)
  fired = _fired(grid, idx.reshape(-1), sel.reshape(-1))
  silence = model.count_silence(tokens_since_fired, fired, grid.batch)
  dead = silence >= sc.dead_tokens_threshold
  residual = x - x_hat

  def with_aux():
    aux, g = _dense_auxk(grid, params, x, pre, residual, dead, sc)
    return aux, {n: grads[n] + sc.auxk_alpha * g[n] for n in g} | {'b_dec': grads['b_dec']}

  any_dead = grid.sum_model(jnp.any(dead).astype(jnp.int32)) > 0
  aux, grads = jax.lax.cond(any_dead, with_aux, lambda: (jnp.zeros((), jnp.float32), grads))
  # b_dec through the encoder: -W_enc @ db_enc, with AuxK's share of db_enc now included.
  grads['b_dec'] = grads['b_dec'] - grid.sum_model(params['W_enc'] @ grads['b_enc'])
  sq_err = grid.sum_data(sq_err)
  l2_loss = jnp.mean(sq_err * jnp.asarray(sc.group_weights, jnp.float32))
  stats = common.StepStats(
      sq_err,
      l2_loss,
      aux,
      grid.sum_all(jnp.sum(sel)).astype(jnp.float32) / grid.batch,
      _smallest(vals, sel),
      jnp.ones((), jnp.float32),
      jnp.zeros((), jnp.float32),
  )
  return (
      (l2_loss + sc.auxk_alpha * aux, stats, silence, grid.reduce_grads(grads)),
      complete,
  )


def _xla_l2(params, x, vals, idx, offset, *, sc, grid: Grid):
  from jaxsae.kernels import sparse, xla  # pylint: disable=import-outside-toplevel

  B_l, kc = vals.shape
  # A data shard's share of the selection varies around B/D * k: room for twice that (or, with
  # latents split, for all of its tokens' budget); a fuller shard sends the step to the dense path.
  room = sparse.entry_capacity(B_l, sc.k * (2 if grid.model == 1 else grid.model), kc)
  r = xla.l2_and_grads(
      params,
      x,
      vals,
      idx,
      sc.group_sizes,
      sc.group_weights,
      capacity=room,
      batch=grid.batch,
      latent_offset=offset,
      sum_model=grid.sum_model,
      b_dec_encoder_path=False,  # added by the caller, with AuxK's share
  )
  return r.sq_err, r.x_hat, r.grads, jnp.sum(vals > 0) <= room


def _whole_token_l2(kernel: Callable):
  """A single-device l2 kernel (Pallas) on a shard holding all of its tokens' latents: its loss
  is a mean over the shard's tokens, rescaled here to a share of the whole batch's mean."""

  def l2(params, x, vals, idx, offset, *, sc, grid: Grid):
    del offset  # mesh.model = 1
    r = kernel(params, x, vals, idx, sc.group_sizes, sc.group_weights)
    share = x.shape[0] / grid.batch  # exact when the data axis is a power of two
    grads = {n: g * share for n, g in r.grads.items()}
    grads['b_dec'] = grads['b_dec'] + params['W_enc'] @ grads['b_enc']
    return r.sq_err * share, r.x_hat, grads, jnp.ones((), bool)

  return l2


def _l2_for(name: str) -> Callable:
  # pylint: disable=import-outside-toplevel
  if name == 'xla':
    return _xla_l2
  if name == 'pallas_gpu':
    from jaxsae.kernels import pallas_gpu

    return _whole_token_l2(pallas_gpu.l2_and_grads)
  if name == 'pallas_tpu':
    from jaxsae.kernels import pallas_tpu

    return _whole_token_l2(pallas_tpu.l2_and_grads)
  raise ValueError(f'no per-shard sparse kernel {name!r}')


# --------------------------------------------------------------------------------------------------
# The backend: loss and gradients, projection and norm, update, each inside shard_map
# --------------------------------------------------------------------------------------------------


def _stats_specs():
  return common.StepStats(*([P()] * len(common.StepStats._fields)))


def loss_and_grads(
    params: model.Params, x: jax.Array, tokens_since_fired: jax.Array, sc: common.StepConfig
) -> common.LossAndGrads:
  """The sparse step of backend `sc.kernel` per shard on the current mesh (`jax.set_mesh`)."""
  grid = grid_for(sc, params['W_dec'].shape[0], x.shape[0])
  in_specs = (sharding.param_specs(), sharding.RULES['batch'], sharding.RULES['tokens_since_fired'])
  out_specs = (
      P(),
      _stats_specs(),
      sharding.RULES['tokens_since_fired'],
      sharding.update_specs(grid.shard_optimizer),
  )
  if sc.kernel == 'cpu':
    run = jax.shard_map(
        functools.partial(_cpu_local, sc=sc, grid=grid),
        in_specs=in_specs,
        out_specs=out_specs,
        check_vma=False,
    )
    return common.LossAndGrads(*run(params, x, tokens_since_fired))

  l2 = functools.partial(_l2_for(sc.kernel), sc=sc, grid=grid)
  run = jax.shard_map(
      functools.partial(_candidates_local, sc=sc, grid=grid, l2=l2),
      in_specs=in_specs,
      out_specs=(out_specs, P()),
      check_vma=False,
  )
  sparse_result, complete = run(params, x, tokens_since_fired)

  def dense_step():
    from jaxsae.kernels import dense  # pylint: disable=import-outside-toplevel

    r = dense.loss_and_grads(params, x, tokens_since_fired, sc)
    return r._replace(stats=r.stats._replace(sparse_path=jnp.zeros((), jnp.float32)))

  # The candidate proof failed somewhere (a token holds more than its candidates of the budget):
  # the exact dense step, partitioned by XLA, instead.
  return jax.lax.cond(complete, lambda: common.LossAndGrads(*sparse_result), dense_step)


def project_and_norm(
    params: model.Params, grads: model.Params, sc: common.StepConfig
) -> tuple[model.Params, jax.Array]:
  """The decoder-gradient projection (rows are whole on every layout) and the global norm."""
  specs = sharding.update_specs(sc.shard_optimizer)
  sharded_axes = AXES if sc.shard_optimizer else (MODEL,)

  def local(params, grads):
    if sc.kernel == 'cpu':
      from jaxsae.kernels import cpu  # pylint: disable=import-outside-toplevel

      g_dec, row_sq = cpu.project_rows(params['W_dec'], grads['W_dec'])
      dec_sq = jnp.sum(row_sq)
    else:
      g_dec = model.remove_parallel_component(params['W_dec'], grads['W_dec'])
      dec_sq = jnp.sum(g_dec**2)
    grads = {**grads, 'W_dec': g_dec}
    split = dec_sq + jnp.sum(grads['W_enc'] ** 2) + jnp.sum(grads['b_enc'] ** 2)
    total = jax.lax.psum(split, sharded_axes) + jnp.sum(grads['b_dec'] ** 2)
    return grads, jnp.sqrt(total)

  return jax.shard_map(local, in_specs=(specs, specs), out_specs=(specs, P()), check_vma=False)(
      params, grads
  )


def update(params, opt_state, grads, grad_norm, finite, sc, optimizer, schedule):
  """Clip + Adam + unit decoder rows on each device's slice (`cpu.leafwise_update`), with the
  global norm; with a sharded optimizer the new parameters are then all-gathered over `data`."""
  del optimizer  # its maths, leaf by leaf (optax's order of operations)
  from jaxsae.kernels import cpu  # pylint: disable=import-outside-toplevel

  grid = Grid(sc.mesh_data, sc.mesh_model, 0, params['W_dec'].shape[0], sc.shard_optimizer)
  specs = sharding.update_specs(sc.shard_optimizer)
  opt_specs = sharding.tree_specs(opt_state, sc.shard_optimizer, optimizer_state=True)

  def local(params, opt_state, grads, grad_norm, finite):
    new_params, new_opt = cpu.leafwise_update(
        params, opt_state, grads, grad_norm, finite, sc, schedule, native=sc.kernel == 'cpu'
    )
    return grid.gather_params(new_params), new_opt

  return jax.shard_map(
      local,
      in_specs=(specs, opt_specs, specs, P(), P()),
      out_specs=(sharding.param_specs(), opt_specs),
      check_vma=False,
  )(params, opt_state, grads, grad_norm, finite)


def supports(kernel: str, mesh_model: int) -> bool:
  """Whether `kernel` runs per shard on meshes with `mesh_model` latent shards."""
  return kernel in ('cpu', 'xla') or (kernel in ('pallas_gpu', 'pallas_tpu') and mesh_model == 1)
