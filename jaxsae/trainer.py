"""The training program, top to bottom: config -> mesh -> data -> model & optimizer -> restore or
initialise -> compiled step -> loop with logging and checkpoints -> final evaluation and plots.

A fresh run starts from random parameters (b_dec at the first batch's geometric median), or, with
train.init_from, from an exported or released SAE (a folder or an hf:// id): its parameters and
threshold, unfolded by this run's activation scale, checked against the config before any work.
Once the workdir has a checkpoint, that is resumed and train.init_from is not read.

`python -m jaxsae.train` is a thin wrapper around `train_and_evaluate`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental import multihost_utils
import numpy as np

from jaxsae import checkpointing
from jaxsae import config as config_lib
from jaxsae import data
from jaxsae import distributed
from jaxsae import metrics as metrics_lib
from jaxsae import model
from jaxsae import sharding
from jaxsae import train_step
from jaxsae import wandb_log
from jaxsae import weights as weights_lib

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
  """A batch (or the loss it produced) was NaN/Inf and train.skip_nonfinite is off."""


class Interrupted(RuntimeError):
  """SIGTERM or Ctrl-C: a checkpoint was saved and the run stopped cleanly."""


def sae_shape(c: ml_collections.ConfigDict) -> dict[str, Any]:
  """What a checkpoint must agree on to be resumed under this config."""
  return {
      'd': c.sae.d,
      'F': config_lib.dict_size(c),
      'k': c.sae.k,
      'group_sizes': list(config_lib.group_sizes(c)),
  }


class _StopFlag:
  """Turns SIGTERM / SIGINT into a flag the loop checks between steps."""

  def __init__(self):
    self.signal: int | None = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    self.signal = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def train_and_evaluate(c: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Train (resuming from `workdir` if it has checkpoints) and return the final summary."""
  # ------------------------------------------------------------------------------------------------
  # Config and mesh.
  # ------------------------------------------------------------------------------------------------
  distributed.maybe_initialize(c)  # multi-host: must precede any other use of JAX
  config_lib.validate(c, num_devices=jax.device_count())
  mesh = sharding.make_mesh(c)
  os.makedirs(workdir, exist_ok=True)
  d, F = c.sae.d, config_lib.dict_size(c)
  ckpt = checkpointing.Checkpointer(
      workdir, c.train.checkpoint_every, c.train.keep_checkpoints, c.train.async_checkpointing
  )
  # A released SAE to start from: read and checked against the config before any work, unless a
  # checkpoint will be resumed instead.
  init_sae = None
  if c.train.init_from and not ckpt.all_steps():
    init_sae = weights_lib.read_for_init(c, c.train.init_from)

  # ------------------------------------------------------------------------------------------------
  # Input pipeline.
  # ------------------------------------------------------------------------------------------------
  source = data.open_source(c)
  batches = data.batches(source)  # a grain iterator: its position is saved with every checkpoint
  batch_sharding = sharding.batch_sharding(mesh)

  # ------------------------------------------------------------------------------------------------
  # Model and optimizer, as shapes first: shardings are derived before anything is allocated.
  # ------------------------------------------------------------------------------------------------
  optimizer = train_step.make_optimizer(c)
  schedule = train_step.lr_schedule(c)
  sc = train_step.StepConfig.from_config(c)
  init_key = jax.random.PRNGKey(c.seed)
  abstract_state = train_step.abstract_state(c)
  state_shardings = sharding.state_shardings(mesh, abstract_state, sc.shard_optimizer)

  # ------------------------------------------------------------------------------------------------
  # Restore the newest checkpoint, or initialise: from train.init_from, else randomly with b_dec the
  # geometric median of the first batch.
  # ------------------------------------------------------------------------------------------------
  target = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state,
      state_shardings,
  )
  data_record = checkpointing.data_identity(c)  # the checkpoint's data must be this, or grown
  restored = ckpt.restore(  # also moves `batches`
      target,
      sae_shape(c),
      data_iterator=batches,
      data=data_record,
      allow_data_change=c.train.allow_store_change,
  )
  if restored is not None:
    start, state, meta = restored
    _check_held_out_split(meta, c)
    scale = meta['scale']
    init_record = meta.get('init_from')  # where the run began, whatever the config says now
    log.info('resumed from %s at step %d', ckpt.directory, start)
    if c.train.init_from:
      log.info(
          'train.init_from=%s not read: the run continues from its checkpoint', c.train.init_from
      )
  else:
    start = 0
    scale = (
        data.activation_scale(source, c.data.scale_estimate_batches) if c.data.normalize else 1.0
    )
    if c.train.init_from:
      if init_sae is None:  # every checkpoint there was unreadable (moved aside): a fresh start
        init_sae = weights_lib.read_for_init(c, c.train.init_from)
      params, threshold, init_record = weights_lib.initial_params(*init_sae, scale)
      state = _state_from(params, threshold, optimizer, state_shardings)
      log.info('initialised from %s (scale %.6g)', c.train.init_from, scale)
    else:
      init_record = None

      @functools.partial(jax.jit, out_shardings=state_shardings)
      def init(first_batch):
        params = model.init_params(init_key, d, F)
        params['b_dec'] = model.geometric_median(first_batch.astype(jnp.float32))
        return train_step.init_state(params, optimizer)

      state = init(data.to_device(source.batch(0), batch_sharding) / scale)
  meta = {
      'shape': sae_shape(c),
      'scale': scale,
      'data': {**data_record, **_held_out_split(c)},
      'config': c.to_json_best_effort(),
      'init_from': init_record,
  }

  # ------------------------------------------------------------------------------------------------
  # The compiled update step. The state's buffers are donated: updated in place.
  # ------------------------------------------------------------------------------------------------
  def step_on_raw(state, raw_batch):
    return train_step.train_step(
        state, raw_batch / scale, sc=sc, optimizer=optimizer, schedule=schedule
    )

  step_fn = jax.jit(
      step_on_raw,
      in_shardings=(state_shardings, batch_sharding),
      out_shardings=(state_shardings, None),
      donate_argnums=0,
  )

  # ------------------------------------------------------------------------------------------------
  # Training loop.
  # ------------------------------------------------------------------------------------------------
  writer = (
      metrics_lib.MetricWriter(workdir, resume_step=start)
      if distributed.is_primary()
      else metrics_lib.NullWriter()
  )
  wandb_run = wandb_log.open_run(c, workdir, distributed.is_primary())  # train.wandb.project
  prefix_names = train_step.fvu_prefix_names(sc.group_sizes)
  progress = _progress(c, start)

  def check_finite(state):
    bad = int(state['nonfinite_count'])
    if bad and not c.train.skip_nonfinite:
      good = [s for s in ckpt.all_steps() if s <= int(state['first_nonfinite_step'])]
      resume = (
          f'the last checkpoint before it is step {good[-1]} in {ckpt.directory}'
          if good
          else 'no checkpoint precedes it'
      )
      raise NonFiniteError(
          f'non-finite values (NaN/Inf) in the batch or loss at step '
          f'{int(state["first_nonfinite_step"])} (data batch index {int(state["first_nonfinite_step"])}); '
          f'{resume}. Fix the data and rerun to resume, or set '
          '--config.train.skip_nonfinite=True to skip and count such batches.'
      )
    return bad

  def save(step, state, force=False):
    if force or step % c.train.checkpoint_every == 0:
      check_finite(state)
      ckpt.save(step, state, meta, force=True, data_iterator=batches)

  last_time, last_step = time.perf_counter(), start
  in_flight = None
  with _StopFlag() as stop, jax.set_mesh(mesh):  # the mesh lets the selection shard_map itself
    for step in range(start, c.train.steps):
      x = data.to_device(next(batches), batch_sharding)
      state, m = step_fn(state, x)
      # At most two steps in flight: bounds host run-ahead, and XLA:CPU's simulated multi-device
      # collectives deadlock when many cross-device programs are queued at once.
      if in_flight is not None:
        jax.block_until_ready(in_flight)
      in_flight = m['loss']
      done = step + 1
      if done % c.train.log_every == 0 or done == c.train.steps:
        m = jax.device_get(m)
        now = time.perf_counter()
        scalars = {k: v for k, v in m.items() if k not in ('fvu', 'finite')}
        # AuxK's counters, not the summary's held-out "dead": the name says whose notion it is.
        scalars['auxk_dead_fraction'] = scalars.pop('dead_fraction')
        scalars.update(zip(prefix_names, m['fvu']))
        scalars['tokens_per_s'] = (done - last_step) * c.data.batch_size / (now - last_time)
        scalars['nonfinite_batches'] = check_finite(state)
        writer.write(done, scalars)
        wandb_run.write(done, scalars)
        progress.set_postfix(
            loss=f'{scalars["loss"]:.4g}', l0=f'{scalars["l0"]:.1f}', fvu=f'{m["fvu"][-1]:.3g}'
        )
        last_time, last_step = now, done
      progress.update(1)
      save(done, state)
      if stop.signal is not None:
        save(done, state, force=True)
        ckpt.wait()
        raise Interrupted(
            f'stopped by signal {stop.signal} after step {done}; checkpoint saved '
            f'in {ckpt.directory}. Rerun the same command to resume.'
        )
    if ckpt.latest_step() != c.train.steps:
      save(c.train.steps, state, force=True)
  progress.close()
  batches.close()
  ckpt.wait()
  ckpt.close()
  writer.close()

  # ------------------------------------------------------------------------------------------------
  # Final evaluation on held-out batches, plots and summary.
  # ------------------------------------------------------------------------------------------------
  state = {key: state[key] for key in ('params', 'threshold', 'step')}
  if jax.process_count() > 1:  # every process gets the whole (possibly sharded) SAE, on the host
    state = multihost_utils.process_allgather(state, tiled=True)
  summary = end_of_training_metrics(state, source, scale, sc, c.train.eval_tokens)
  if source.features is not None:  # planted ground truth: how much of it was recovered
    summary.update(_synthetic_recovery(state, source))
  summary['step'] = int(state['step'])
  if distributed.is_primary():
    summary['plot'] = metrics_lib.save_plots(
        workdir, summary['feature_density'], summary['eval_tokens']
    )
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump({k: v for k, v in summary.items() if k != 'feature_density'}, f, indent=2)
    wandb_run.finish(summary, summary['plot'])
  summary.pop('feature_density')
  return summary


def _state_from(
    params: dict[str, np.ndarray], threshold: float, optimizer, state_shardings: dict
) -> train_step.TrainState:
  """The initial training state around given host parameters and threshold, laid out by
  `state_shardings` (each process supplies its own part of the arrays: multi-host safe)."""

  def put(a: np.ndarray, sharding) -> jax.Array:
    return jax.make_array_from_callback(a.shape, sharding, lambda index: a[index])

  shardings = state_shardings['params']
  params = {n: put(np.asarray(v, np.float32), shardings[n]) for n, v in params.items()}
  theta = put(np.asarray(threshold, np.float32), state_shardings['threshold'])

  @functools.partial(jax.jit, out_shardings=state_shardings)
  def init(params, theta):
    return {**train_step.init_state(params, optimizer), 'threshold': theta}

  return init(params, theta)


def end_of_training_metrics(
    state: dict,
    source: data.ActivationSource,
    scale: float,
    sc: train_step.StepConfig,
    tokens: int,
) -> dict[str, Any]:
  """Inference-mode (learned threshold) FVU, L0, dead latents and per-feature firing density over
  the first `tokens` held-out rows (`source.held_out`: rows no training batch holds). With none,
  the figures are None and `eval_on` says why: nothing in-sample is passed off as held out."""
  params, threshold = state['params'], state['threshold']
  use_threshold = float(threshold) >= 0  # before threshold_start_step there is none yet

  @jax.jit
  def stats(params, threshold, x):
    x = x / scale
    pre = model.pre_activations(params, x)
    acts = model.jumprelu(pre, threshold) if use_threshold else model.batch_topk(pre, sc.k)
    err = jnp.sum((x - model.decode(params, acts)) ** 2)
    centred = x - params['b_dec']  # near the data's centre: the variance below cancels little
    return err, jnp.sum(centred, 0), jnp.sum(centred**2), jnp.sum(acts > 0, axis=0)

  n, err, sum_x, sum_sq, fires = 0, 0.0, 0.0, 0.0, 0
  for x in source.held_out(tokens):
    e, sx, sq, f = jax.device_get(stats(params, threshold, x))
    n += len(x)
    err, sum_sq = err + float(e), sum_sq + float(sq)
    sum_x, fires = sum_x + sx.astype(np.float64), fires + f.astype(np.int64)
  out = {'eval_tokens': n, 'eval_on': source.held_out_note, 'threshold': float(threshold)}
  if not n:
    log.warning('no held-out rows (%s): the summary has no evaluation', source.held_out_note)
    none = ('eval_fvu', 'eval_l0', 'dead_fraction', 'dead_latents', 'dead_over_tokens')
    return {**out, **dict.fromkeys(none), 'feature_density': None}
  var = sum_sq - float(np.sum(sum_x**2)) / n  # about the held-out rows' mean, as evaluate's
  density = fires / n
  return {
      **out,
      'eval_fvu': float(err / var) if var > 0 else float('nan'),
      'eval_l0': float(density.sum()),
      **metrics_lib.dead_latents(fires, n),
      'feature_density': density,
  }


def _held_out_split(c: ml_collections.ConfigDict) -> dict[str, float]:
  """What a checkpoint records of the split: the store's training rows depend on it."""
  return {'held_out_fraction': float(c.data.held_out_fraction)} if c.data.source == 'store' else {}


def _check_held_out_split(meta: dict, c: ml_collections.ConfigDict) -> None:
  """Refuse to resume with another held-out fraction: the new held-out studies may have been
  trained on, and the batch positions would fall on other rows. Checkpoints from before the split
  existed trained on every study: fraction 0."""
  if c.data.source != 'store':
    return
  was = float(meta.get('data', {}).get('held_out_fraction', 0.0))
  if was != float(c.data.held_out_fraction):
    raise config_lib.ConfigError(
        f'the checkpoint was trained with data.held_out_fraction={was:g} but the config says '
        f'{c.data.held_out_fraction:g}: the studies held out now may have been trained on, and '
        f'the saved data position would point at other rows. Resume with '
        f'--config.data.held_out_fraction={was:g} (its held-out split is then the honest one), '
        'or train from scratch in a new --workdir.'
    )


def _synthetic_recovery(state: dict, source) -> dict[str, float]:
  from jaxsae.data import synthetic

  return synthetic.recovery(state['params']['W_dec'], source.features)


def _progress(c: ml_collections.ConfigDict, start: int):
  from tqdm import tqdm

  return tqdm(
      total=c.train.steps,
      initial=start,
      disable=not c.train.progress_bar,
      dynamic_ncols=True,
      desc='train',
  )
