"""Trained SAEs from a JAX checkpoint to safetensors, and back into jaxsae.model.

The layouts themselves (dictionary_learning's and SAELens's file and tensor names, reading,
writing, checks) are jaxsae.formats.weights, shared with the torch bridge; this module adds the
JAX ends: the checkpoint read on export, the model built on load, conversion between the layouts,
and the parameters a run continuing from an exported SAE starts at (train.init_from). Wherever a
weights folder is read, a Hub id `hf://ORG/NAME[/SUBFOLDER][@REVISION]` works too
(jaxsae.formats.hub).

The activation scale s used in training (inputs divided by s so that E||x||^2 = d) is folded into
the biases and the threshold on export: relu((x - s b_dec) W_enc + s b_enc) = s relu((x/s - b_dec)
W_enc + b_enc), so the exported SAE works on raw activations, as the peers' loaders expect.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxsae import checkpointing
from jaxsae import config as config_lib
from jaxsae import model
from jaxsae import train_step
from jaxsae.config import ConfigError
from jaxsae.formats import hub
from jaxsae.formats import model_card
from jaxsae.formats import weights as weights_format
from jaxsae.formats.weights import DL_CONFIG, DL_WEIGHTS, SL_CONFIG, SL_WEIGHTS

__all__ = [
    'FORMATS',
    'DL_WEIGHTS',
    'DL_CONFIG',
    'SL_WEIGHTS',
    'SL_CONFIG',
    'fold_scale',
    'unfold_scale',
    'load_checkpoint',
    'export',
    'publish',
    'load',
    'convert',
    'read_for_init',
    'initial_params',
]

log = logging.getLogger(__name__)

FORMATS = weights_format.LAYOUTS


def fold_scale(params: model.Params, threshold: float, scale: float) -> tuple[dict, float]:
  """Parameters and threshold that act on raw activations (see the module docstring)."""
  p = {k: np.asarray(v, np.float32) for k, v in params.items()}
  p['b_enc'] = p['b_enc'] * scale
  p['b_dec'] = p['b_dec'] * scale
  return p, (threshold * scale if threshold >= 0 else threshold)


def unfold_scale(params: dict, threshold: float, scale: float) -> tuple[dict, float]:
  """`fold_scale` undone: parameters and threshold that act on activations divided by `scale`."""
  p = {k: np.asarray(v, np.float32) for k, v in params.items()}
  p['b_enc'] = p['b_enc'] / scale
  p['b_dec'] = p['b_dec'] / scale
  return p, (threshold / scale if threshold >= 0 else threshold)


def load_checkpoint(
    workdir: str, step: int | None = None
) -> tuple[int, dict, dict, ml_collections.ConfigDict]:
  """(step, state, meta, config) of the newest (or given) checkpoint in `workdir`, on one device."""
  ckpt = checkpointing.Checkpointer(workdir, every=1, keep=10**9, async_save=False)
  steps = ckpt.all_steps()
  if not steps:
    raise ConfigError(
        f'no checkpoint in {ckpt.directory}: train first with '
        f'`python -m jaxsae.train --config=... --workdir={workdir}`.'
    )
  if step is not None and step not in steps:
    raise ConfigError(f'no checkpoint for step {step} in {ckpt.directory}; it has {steps}.')
  meta = ckpt.restore_meta(step if step is not None else steps[-1])
  c = ml_collections.ConfigDict(json.loads(meta['config']))
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
      train_step.abstract_state(c),
  )
  restored = ckpt.restore(target, meta['shape'], step=step)
  ckpt.close()
  s, state, meta = restored
  return s, state, meta, c


def export(workdir: str, out: str, fmt: str, step: int | None = None) -> str:
  """Write the checkpoint's SAE to `out` in layout `fmt` (the folder appears complete or not at
  all, with a manifest that `load` verifies); returns the weights file's path."""
  weights_format.check_layout(fmt)
  weights_format.check_destination(out)  # before the checkpoint is read: nothing wasted
  s, state, meta, c = load_checkpoint(workdir, step)
  params, threshold = fold_scale(state['params'], float(state['threshold']), meta['scale'])
  return weights_format.write(out, fmt, params, threshold, _metadata(c, s, meta['scale']))


def publish(
    workdir: str,
    out: str,
    fmt: str,
    target: str,
    step: int | None = None,
    *,
    evaluation: str | None = None,
    license: str | None = None,  # pylint: disable=redefined-builtin (the Hub's field name)
    private: bool = False,
    dry_run: bool = False,
) -> model_card.Plan:
  """`export` with a model card (README.md, in the manifest), then the folder uploaded to the Hub
  repository and folder `target` (ORG/NAME[/SUBFOLDER]), created if absent; a dry run stops before
  anything is sent. The id, the licence, the evaluation file, the destination and (unless a dry
  run) a Hub token are checked before the checkpoint is read. The token is huggingface_hub's own
  (HF_TOKEN, or `hf auth login`'s), handed to it and never shown."""
  ref = model_card.parse_target(target)
  license = model_card.check_license(license)
  weights_format.check_layout(fmt)
  e = model_card.read_evaluation(evaluation) if evaluation else None
  weights_format.check_destination(out)
  token = _hub_token(ref, required=not dry_run)
  s, state, meta, c = load_checkpoint(workdir, step)
  params, threshold = fold_scale(state['params'], float(state['threshold']), meta['scale'])
  metadata = _metadata(c, s, meta['scale'])
  if e is not None:
    model_card.check_evaluation(e, evaluation, metadata.group_sizes)
  summary, summary_path = model_card.read_summary(workdir)
  flags = {'workdir': workdir, 'out': out, 'format': fmt, 'step': s, 'push_to_hub': target}
  flags.update(evaluation=evaluation, license=license, private=private)
  card = model_card.Card(
      target=ref,
      layout=fmt,
      d=int(params['W_enc'].shape[0]),
      F=int(params['W_enc'].shape[1]),
      k=metadata.k,
      group_sizes=metadata.group_sizes,
      threshold=threshold,
      scale=float(meta['scale']),
      step=s,
      batch_size=int(c.data.batch_size),
      model_name=metadata.model_name,
      layer=metadata.layer,
      hook_name=metadata.hook_name,
      data=_data_description(c),
      training=metadata.training,
      config=c.to_dict(),
      command=model_card.command_line('jaxsae.export_weights', flags),
      license=license,
      summary=summary,
      summary_path=summary_path,
      evaluation=e,
      evaluation_path=evaluation,
  )
  text = model_card.render(card).encode()
  weights_format.write(out, fmt, params, threshold, metadata, extra={model_card.CARD: text})
  files = tuple((n, os.path.getsize(os.path.join(out, n))) for n in sorted(os.listdir(out)))
  plan = model_card.Plan(ref, out, files, private, dry_run, token is not None)
  if dry_run:
    return plan
  return dataclasses.replace(plan, commit_url=_upload(ref, out, private, token, s))


def _data_description(c: ml_collections.ConfigDict) -> str:
  if c.data.source == 'store':
    return f'activation store {c.data.store_path}'
  return 'synthetic activations (planted features, experiments/synthetic.py)'


def _hub_token(ref: hub.HubRef, required: bool) -> str | None:
  """huggingface_hub's token (HF_TOKEN, else the saved login), or a ConfigError when a push needs
  one and there is none, or the Hub is switched off (offline mode)."""
  import huggingface_hub  # pylint: disable=import-outside-toplevel (only when publishing)

  if required and huggingface_hub.is_offline_mode():
    raise ConfigError(
        f'cannot push to {ref.repo_id}: offline mode is on (HF_HUB_OFFLINE). Unset it, or write '
        'the folder without sending it with --dry_run.'
    )
  token = huggingface_hub.get_token()
  if token is None and required:
    raise ConfigError(
        f'no Hugging Face token to push to {ref.repo_id} with: log in with `hf auth login`, or '
        'set HF_TOKEN to a token with write access to it (huggingface.co/settings/tokens). '
        'Nothing was written or sent; --dry_run writes the folder without a token.'
    )
  return token


def _upload(ref: hub.HubRef, folder: str, private: bool, token: str, step: int) -> str | None:
  """Create the repository if absent and upload `folder` into its folder in one commit, deleting
  the export files a previous push left there (the other layout's weights would be read first);
  the commit's URL. Hub failures are ConfigErrors saying what to do; the export stays on disk."""
  import huggingface_hub  # pylint: disable=import-outside-toplevel (only when publishing)
  from huggingface_hub import errors as hf_errors  # pylint: disable=import-outside-toplevel

  import httpx  # pylint: disable=import-outside-toplevel (huggingface_hub's HTTP client)

  stale = {n for names in weights_format.WEIGHT_FILES.values() for n in names}
  stale |= {config for _, config in weights_format.FILES.values()}
  stale = sorted(stale | {weights_format.MANIFEST, model_card.CARD})
  again = f'The export is at {folder}; run the command again to retry the push.'
  api = huggingface_hub.HfApi(token=token)
  try:
    api.create_repo(ref.repo_id, repo_type='model', private=private, exist_ok=True)
    info = api.upload_folder(
        repo_id=ref.repo_id,
        folder_path=folder,
        path_in_repo=ref.subfolder or None,
        repo_type='model',
        commit_message=f'jaxsae: SAE export of step {step}'
        + (f' into {ref.subfolder}' if ref.subfolder else ''),
        delete_patterns=stale,
    )
  except hf_errors.HfHubHTTPError as e:
    status = getattr(getattr(e, 'response', None), 'status_code', None)
    why = (
        'the token is not allowed to write there (a read-only token, or a repository or '
        'organisation this account cannot write to); use a token with write access'
        if status in (401, 403)
        else f'the Hub refused it: {_first_line(e)}'
    )
    raise ConfigError(f'cannot push to {ref.repo_id}: {why}. {again}') from None
  except (hf_errors.OfflineModeIsEnabled, httpx.TransportError, OSError) as e:  # no network
    raise ConfigError(
        f'cannot push to {ref.repo_id}: the Hub cannot be reached ({_first_line(e)}). {again}'
    ) from None
  return getattr(info, 'commit_url', None)


def _first_line(error: Exception) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def _metadata(c: ml_collections.ConfigDict, step: int, scale: float) -> weights_format.Metadata:
  """What the files record beside the tensors, from the training config."""
  training = {
      'group_weights': list(config_lib.group_weights(c)),
      'lr': config_lib.learning_rate(c),
      'auxk_alpha': c.sae.auxk_alpha,
      'warmup_steps': c.optim.warmup_steps,
      'decay_start': c.optim.decay_start,
      'threshold_beta': c.sae.threshold_beta,
      'threshold_start_step': c.sae.threshold_start_step,
      'top_k_aux': config_lib.top_k_aux(c),
      'seed': c.seed,
  }
  if c.train.init_from:
    training['init_from'] = c.train.init_from
  return weights_format.Metadata(
      k=c.sae.k,
      group_sizes=tuple(config_lib.group_sizes(c)),
      step=step,
      scale=scale,
      layer=c.model.layer,
      model_name=c.model.name,
      hook_name=c.model.hook_name,
      training=training,
  )


def load(path: str) -> tuple[model.MatryoshkaSAE, dict[str, Any]]:
  """An exported SAE (either layout, detected from the files in `path`, checked against its
  manifest when it has one) and its config dict. `path`: a folder, or a Hub id (hf://...)."""
  w = weights_format.read(hub.resolve(path))
  k = w.k if w.k is not None else 1  # only BatchTopK encoding uses k; SAELens files may lack it
  return model.MatryoshkaSAE.from_params(w.params, k, w.group_sizes, w.threshold), w.cfg


# --------------------------------------------------------------------------------------------------
# Conversion between the layouts (python -m jaxsae.convert_weights)
# --------------------------------------------------------------------------------------------------


def convert(src: str, out: str, fmt: str) -> str:
  """Write the SAE at `src` (a folder of either layout, or a Hub id) to `out` in layout `fmt`;
  returns the weights file's path. The tensors, k, groups, threshold, layer and hook carry over,
  and what the source records of its training (dictionary_learning's trainer config) goes under
  `training`. Files on disk already act on raw activations: no scale is folded or unfolded."""
  weights_format.check_layout(fmt)
  weights_format.check_destination(out)  # before anything is downloaded or read
  location = hub.locate(src)
  if os.path.realpath(location.dir) == os.path.realpath(out):
    raise ConfigError(
        f'--out={out} is the folder of the SAE being converted; the conversion would replace it. '
        'Choose another output folder.'
    )
  w = weights_format.read(location.dir)
  if w.threshold.ndim:
    raise ConfigError(
        f'{_weights_file(w)}: the SAE has a threshold per latent, which the exports of jaxsae '
        'hold as one value; it cannot be converted without changing its codes.'
    )
  if w.k is None and fmt == 'dictionary_learning':
    raise ConfigError(
        f'{_weights_file(w)} does not record k (the BatchTopK budget), which dictionary_learning '
        "files must hold; convert to --format=saelens, or add k to the source's config."
    )
  recorded = _recorded_training(w)
  meta = weights_format.Metadata(
      k=w.k,
      group_sizes=tuple(w.group_sizes),
      step=recorded['steps'],
      scale=recorded['scale'],
      layer=w.layer,
      model_name=recorded['model_name'],
      hook_name=w.hook_name,
      training=recorded['training'],
  )
  return weights_format.write(out, fmt, w.params, float(w.threshold), meta)


def _recorded_training(w: weights_format.SAEWeights) -> dict[str, Any]:
  """What a source's config records of its training: steps, activation scale (provenance only: the
  tensors are raw), model name, and the trainer config itself."""
  if w.layout == 'saelens':
    j = w.cfg.get('metadata', {}).get('jaxsae', {})
    steps, scale, name, training = (
        j.get('trained_steps'),
        j.get('activation_scale'),
        w.cfg.get('model_name'),
        j.get('training', {}),
    )
  else:  # dictionary_learning's config.json: {'trainer': {...}}
    t = w.cfg.get('trainer', {})
    steps, scale, name, training = t.get('steps'), t.get('norm_factor'), t.get('lm_name'), t
  return {
      'steps': int(steps) if _number(steps) else 0,
      'scale': float(scale) if _number(scale) and scale > 0 else 1.0,
      'model_name': name if isinstance(name, str) else None,
      'training': dict(training) if isinstance(training, dict) else {},
  }


def _number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _weights_file(w: weights_format.SAEWeights) -> str:
  """The file an SAE was read from, for messages (its folder if none of the known names)."""
  names = weights_format.FILES.get(w.layout, ('',))[:1] + ('ae.pt',)
  found = [os.path.join(w.path, n) for n in names if n and os.path.exists(os.path.join(w.path, n))]
  return found[0] if found else w.path


# --------------------------------------------------------------------------------------------------
# Continuing training from an exported or released SAE (train.init_from)
# --------------------------------------------------------------------------------------------------

# Decoder rows further than this from unit norm are renormalised (bfloat16 files, other trainers).
ROW_NORM_TOLERANCE = 1e-5


def read_for_init(
    c: ml_collections.ConfigDict, spec: str
) -> tuple[weights_format.SAEWeights, hub.Location]:
  """The SAE at `spec` (a folder or a Hub id), checked against the config before any work: d, F
  and the Matryoshka group sizes must be the config's, and so must k (as for resuming a
  checkpoint: the features and the threshold were learned for that budget; a file that records no
  k takes the config's). A mismatch is a ConfigError naming the file, each field, expected vs got,
  and the --config flags that make the config fit."""
  location = hub.locate(spec)
  w = weights_format.read(location.dir)
  want = {
      'd': c.sae.d,
      'F': config_lib.dict_size(c),
      'group_sizes': tuple(config_lib.group_sizes(c)),
      'k': c.sae.k,
  }
  got = {'d': w.d, 'F': w.F, 'group_sizes': tuple(w.group_sizes), 'k': w.k}
  fixes = {
      'd': f'--config.sae.d={w.d}',
      'F': f'--config.sae.dict_size={w.F}',
      'group_sizes': f'--config.sae.group_sizes={config_lib.flag_text(got["group_sizes"])}',
      'k': f'--config.sae.k={w.k}',
  }
  what = {
      'd': 'd (activation width)',
      'F': 'F (dictionary size)',
      'group_sizes': 'group_sizes',
      'k': 'k (BatchTopK budget)',
  }
  wrong = [f for f in want if got[f] is not None and got[f] != want[f]]
  if wrong:
    problems = '; '.join(
        f'{what[f]} expected {_shown(want[f])} (the config), got {_shown(got[f])}' for f in wrong
    )
    data_note = f' (and activations of width {w.d})' if 'd' in wrong else ''
    raise ConfigError(
        f'{_weights_file(w)}: the SAE of --config.train.init_from={spec} does not fit the config: '
        f'{problems}. To continue training it, pass {" ".join(fixes[f] for f in wrong)}'
        f'{data_note}; or train from scratch with --config.train.init_from="".'
    )
  if w.k is None:
    log.warning('%s records no k; continuing with sae.k=%d from the config', spec, c.sae.k)
  return w, location


def initial_params(
    w: weights_format.SAEWeights, location: hub.Location, scale: float
) -> tuple[dict[str, np.ndarray], float, dict[str, Any]]:
  """(params, threshold, record) a run starts at from SAE `w`: its biases and threshold unfolded
  by the run's own activation scale (training sees x / scale; files act on raw x), decoder rows
  made unit norm where they are not, and a JSON record of where it all came from (the checkpoint
  meta keeps it). A per-latent threshold cannot be one scalar: it is dropped and learned again
  from threshold_start_step, with a warning."""
  theta = np.asarray(w.threshold, np.float32)
  if theta.ndim:
    log.warning(
        '%s has a threshold per latent; training keeps one for all latents, so it is learned '
        'again from sae.threshold_start_step on.',
        location.spec,
    )
    raw_threshold = -1.0
  else:
    raw_threshold = float(theta)
  params, threshold = unfold_scale(w.params, raw_threshold, scale)
  norms = np.linalg.norm(params['W_dec'].astype(np.float64), axis=1)
  off = np.abs(norms - 1.0) > ROW_NORM_TOLERANCE
  if off.any():
    n = np.where(norms > 0, norms, 1.0).astype(np.float32)
    params['W_dec'] = params['W_dec'] / n[:, None]
    params['W_enc'] = params['W_enc'] * n[None, :]  # the codes grow as the rows shrink:
    params['b_enc'] = params['b_enc'] * n  # reconstructions stay the same
    log.warning(
        '%s: %d of %d decoder rows were not unit norm (norms %.6g to %.6g); renormalised them, '
        'scaling their encoder columns and b_enc to match so the reconstructions are unchanged.',
        location.spec,
        int(off.sum()),
        len(norms),
        float(norms.min()),
        float(norms.max()),
    )
  record = {
      'from': location.spec,
      'dir': os.path.abspath(location.dir),
      'commit': location.commit,
      'layout': w.layout,
      'k': w.k,
      'group_sizes': [int(s) for s in w.group_sizes],
      'threshold': raw_threshold,
      'unfolded_by_scale': float(scale),
      'renormalised_rows': int(off.sum()),
  }
  return params, threshold, record


def _shown(value: Any) -> str:
  return str(list(value)) if isinstance(value, tuple) else str(value)
