"""How good the SAE is inside the model: reconstruction statistics and the report tokens' loss.

Each held-out study runs teacher-forced (findings as assistant text) three times, one study per
forward pass:
  clean   the model as is; the layer's output at the spliced positions is what the SAE sees,
          giving FVU, L0, dead and dense latents and per-prefix FVU;
  splice  the layer's output at those positions replaced by the SAE's reconstruction;
  zero    the same positions set to zero.
Cross-entropy is over the report tokens (kind `report`, predicted from the position before).
Loss recovered = (CE_zero - CE_splice) / (CE_zero - CE_clean), SAELens/SAEBench's definition:
1 when splicing costs nothing, 0 when it is as bad as deleting the layer's output. KL is
KL(clean || intervened) per report token, averaged.

The spliced positions default to the token kinds the SAE was trained on (export.keep_kinds):
an SAE never shown image tokens or the prompt boilerplate is not asked to reconstruct them.

The studies must be held out: outside the training split (jaxsae.formats.split) of the store the
SAE was trained on. `held_out` refuses (NotHeldOut) when that cannot be shown, unless the caller
allows in-sample studies, which are then labelled so. A dead latent is one that fires on none of
the evaluated tokens (jaxsae.metrics.dead_latents, the training summary's definition).
"""

from __future__ import annotations

import json
import math
import os
import textwrap
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from jaxsae.bridge import interventions as iv
from jaxsae.bridge import manifest, prompt
from jaxsae.bridge.steering import to_device
from jaxsae.config import ConfigError
from jaxsae.formats import split as split_lib
from jaxsae.formats import weights as weights_format
from jaxsae.formats.tokens import TOKEN_KINDS
from jaxsae.metrics import dead_latents


def _kinds_mask(kinds: np.ndarray, names: Sequence[str]) -> torch.Tensor:
  bad = [k for k in names if k not in TOKEN_KINDS]
  if bad or not names:
    raise ConfigError(
        f'splice kinds must be a non-empty subset of {TOKEN_KINDS}; got ' f'{tuple(names)}.'
    )
  return torch.from_numpy(np.isin(kinds, [TOKEN_KINDS.index(k) for k in names]))


def report_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
  """Per-token cross-entropy of `targets` under the rows of `logits` that predict them."""
  return F.cross_entropy(logits.float(), targets, reduction='none')


def kl(clean: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
  """Per-row KL(softmax(clean) || softmax(other))."""
  p, q = F.log_softmax(clean.float(), -1), F.log_softmax(other.float(), -1)
  return (p.exp() * (p - q)).sum(-1)


class _Sums:
  """Running sums over tokens for the reconstruction statistics (no [N, F] array is kept)."""

  def __init__(self, F_: int, G: int):
    self.n, self.sum_x, self.sum_sq = 0, 0.0, 0.0
    self.err = np.zeros(G)  # per prefix, the last is the full SAE
    self.fires = np.zeros(F_, np.int64)
    self.active = 0

  def add(self, sae, x: torch.Tensor) -> None:
    x = x.float()
    acts = sae.encode(x)
    prefixes = sae.prefix_reconstructions(acts)
    self.n += len(x)
    self.sum_x = self.sum_x + x.sum(0).double().cpu().numpy()
    self.sum_sq += float((x.double() ** 2).sum())
    self.err += ((x[None] - prefixes).double() ** 2).sum((1, 2)).cpu().numpy()
    fired = acts > 0
    self.fires += fired.sum(0).cpu().numpy()
    self.active += int(fired.sum())

  def results(self, dense_threshold: float) -> dict[str, Any]:
    var = self.sum_sq - float(np.sum(np.asarray(self.sum_x) ** 2)) / max(self.n, 1)
    fvu = (self.err / var).tolist() if var > 0 else [float('nan')] * len(self.err)
    freq = self.fires / max(self.n, 1)
    return {
        'tokens': self.n,
        'fvu': fvu[-1],
        'prefix_fvu': fvu,
        'l0': self.active / max(self.n, 1),
        **dead_latents(self.fires, self.n),
        'dense_fraction': float(np.mean(freq > dense_threshold)),
        'dense_latents': int(np.sum(freq > dense_threshold)),
        'dense_threshold': dense_threshold,
        'feature_frequency': freq,
    }


def evaluate(
    site: iv.Site,
    processor: Any,
    studies: Sequence[manifest.Study],
    splice_kinds: Sequence[str] = ('prompt', 'report'),
    dense_threshold: float = 0.1,
    progress=None,
) -> dict[str, Any]:
  """The results dict (see the module docstring); `feature_frequency` is a numpy array."""
  sae = site.require_sae()
  sums = _Sums(sae.F, len(sae.group_sizes))
  ce = {'clean': [], 'splice': [], 'zero': []}
  kls = {'splice': [], 'zero': []}
  per_study = []
  for i, study in enumerate(studies):
    p = prompt.prepare(processor, study, dict(study.images()), True, site.image_token_id)
    inputs = to_device(p.inputs, site.model)
    ids = p.input_ids.to(inputs['input_ids'].device)
    where = _kinds_mask(p.kinds, splice_kinds)
    targets = torch.from_numpy(np.nonzero(p.kinds == prompt.REPORT)[0])
    targets = targets[targets > 0].to(ids.device)
    if not len(targets):
      raise ConfigError(
          f'study {study.study_id!r} has no report tokens to score: its findings ' 'are empty.'
      )
    rows = targets - 1  # the positions whose logits predict the report tokens; only they are kept
    with torch.inference_mode():
      with iv.record(site) as out:
        clean = site.model(**inputs, use_cache=False).logits[0, rows]
      sums.add(sae, out[0][0][where.to(out[0].device)])
      del out
      with iv.splice(site, where=where):
        spliced = site.model(**inputs, use_cache=False).logits[0, rows]
      with iv.zero_ablate(site, where=where):
        zeroed = site.model(**inputs, use_cache=False).logits[0, rows]
    for name, logits in (('clean', clean), ('splice', spliced), ('zero', zeroed)):
      ce[name].append(report_loss(logits, ids[targets]).cpu())
    kls['splice'].append(kl(clean, spliced).cpu())
    kls['zero'].append(kl(clean, zeroed).cpu())
    per_study.append(
        {
            'study_id': study.study_id,
            'report_tokens': len(targets),
            'spliced_tokens': int(where.sum()),
            **{f'ce_{k}': float(v[-1].mean()) for k, v in ce.items()},
        }
    )
    if progress:
      progress(i + 1)
  mean = {k: float(torch.cat(v).mean()) for k, v in ce.items()}
  gap = mean['zero'] - mean['clean']
  out = sums.results(dense_threshold)
  warnings = []
  if gap <= 0:
    warnings.append(
        f'zero-ablating the layer does not raise the report loss (CE_zero '
        f'{mean["zero"]:.4g} <= CE_clean {mean["clean"]:.4g}): loss recovered is '
        'meaningless here. Is the model untrained (a random stand-in)?'
    )
  out.update(
      {
          'studies': len(studies),
          'report_tokens': int(sum(len(v) for v in ce['clean'])),
          'splice_kinds': list(splice_kinds),
          'group_sizes': list(sae.group_sizes),
          'ce_clean': mean['clean'],
          'ce_splice': mean['splice'],
          'ce_zero': mean['zero'],
          'loss_recovered': (mean['zero'] - mean['splice']) / gap if gap != 0 else float('nan'),
          'kl_splice': float(torch.cat(kls['splice']).mean()),
          'kl_zero': float(torch.cat(kls['zero']).mean()),
          'warnings': warnings,
          'per_study': per_study,
      }
  )
  return out


def write(out_dir: str, results: dict[str, Any], title: str = '') -> tuple[str, str]:
  """evaluation.json (everything but the per-latent frequencies) and evaluation.png."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  os.makedirs(out_dir, exist_ok=True)
  freq = np.asarray(results['feature_frequency'])
  json_path, png_path = (os.path.join(out_dir, f'evaluation.{e}') for e in ('json', 'png'))
  with open(json_path, 'w') as f:
    json.dump({k: v for k, v in results.items() if k != 'feature_frequency'}, f, indent=2)
  np.save(os.path.join(out_dir, 'feature_frequency.npy'), freq)

  fig, (ax_ce, ax_fvu, ax_freq) = plt.subplots(1, 3, figsize=(14, 4))
  names = ['clean', 'splice', 'zero']
  ax_ce.bar(names, [results[f'ce_{n}'] for n in names], color=['tab:green', 'tab:blue', 'tab:gray'])
  ax_ce.set_ylabel('cross-entropy of report tokens (nats)')
  ax_ce.set_title(
      f'loss recovered {results["loss_recovered"]:.3f}, '
      f'KL(clean||splice) {results["kl_splice"]:.3g}'
  )
  widths = np.cumsum(results['group_sizes'])
  ax_fvu.plot(widths, results['prefix_fvu'], 'o-')
  ax_fvu.set_xscale('log', base=2)
  ax_fvu.set_xlabel('Matryoshka prefix width (latents)')
  ax_fvu.set_ylabel('FVU')
  ax_fvu.set_title(f'FVU {results["fvu"]:.3f}, L0 {results["l0"]:.1f}')
  live = freq[freq > 0]
  ax_freq.hist(np.log10(live), bins=40)
  ax_freq.axvline(np.log10(results['dense_threshold']), color='tab:red', ls='--', lw=0.8)
  ax_freq.set_xlabel('log10 firing frequency')
  ax_freq.set_title(
      f'{results["dead_latents"]} dead (no firing on {results["dead_over_tokens"]:,} tokens), '
      f'{results["dense_latents"]} dense of {freq.size} latents',
      fontsize=9,
  )
  if title:
    fig.suptitle(textwrap.fill(title, 120), fontsize=9)
  fig.tight_layout()
  fig.savefig(png_path, dpi=110)
  plt.close(fig)
  return json_path, png_path


class NotHeldOut(ConfigError):
  """The studies to evaluate are, or may be, ones the SAE was trained on."""


def recorded_training(weights_dir: str) -> tuple[float | None, float | None]:
  """(activation scale, held-out fraction) that exported weights record of their training, each
  None where the files do not say (weights from elsewhere, or exported before it was recorded)."""
  layout = weights_format.detect(weights_dir)
  path = os.path.join(weights_dir, weights_format.FILES[layout][1])
  try:
    with open(path) as f:
      cfg = json.load(f)
  except (OSError, ValueError):
    return None, None  # the weights loader reports an unreadable config, naming it
  if layout == 'dictionary_learning':
    rec = cfg.get('trainer', {})
    return rec.get('norm_factor'), rec.get('held_out_fraction')
  rec = cfg.get('metadata', {}).get('jaxsae', {})
  return rec.get('activation_scale'), rec.get('held_out_fraction')


def _training_split(
    store_path: str, fraction: float, trained_scale: float | None
) -> tuple[split_lib.Split | None, str | None]:
  """The split of the SAE's training store, or why it cannot be known."""
  from jaxsae.formats import store as store_lib  # pylint: disable=import-outside-toplevel

  if not store_path or not store_lib.exists(store_path):
    return None, (
        f'there is no activation store at data.store_path={store_path!r}, so nothing shows '
        'which studies the SAE was trained on'
    )
  try:
    store = store_lib.open_store(store_path)
  except ConfigError as e:
    return None, f'the activation store at {store_path!r} cannot be read: {e}'
  # A scale of 1 is also what data.normalize=False records: then the scale cannot tell.
  if trained_scale is not None and trained_scale != 1.0:
    if not math.isclose(trained_scale, store.scale, rel_tol=1e-6):
      return None, (
          f'the SAE was trained on activations of scale {trained_scale:.6g} but the store at '
          f'{store_path!r} has scale {store.scale:.6g}: it is not the store the SAE was trained '
          'on (or it has grown since)'
      )
  return split_lib.split(store.studies(), fraction), None


def held_out(
    manifest_path: str,
    store_path: str,
    count: int,
    ids: Sequence[str] = (),
    fraction: float = 0.0,
    trained_scale: float | None = None,
    allow_in_sample: bool = False,
) -> tuple[list[manifest.Study], str, bool]:
  """(studies, where they come from, whether they are held out). Held out: not in the training
  split (`fraction`, jaxsae.formats.split) of the store at `store_path`, the SAE's training store
  (its recorded `trained_scale` must match). `ids` if given, else the manifest's first `count` such
  studies. When that cannot be shown: NotHeldOut, or with `allow_in_sample` the studies (`ids`, or
  the manifest's last `count`) labelled in-sample."""
  from jaxsae.bridge import steering  # pylint: disable=import-outside-toplevel

  sp, problem = _training_split(store_path, fraction, trained_scale)
  training = set(sp.training) if sp is not None else set()
  if ids:
    studies, note = steering.studies(manifest_path, ids, teacher_forcing=True), 'the studies named'
    seen = [i for i in ids if i in training]
    if problem is None and seen:
      problem = (
          f'{", ".join(map(repr, seen[:5]))}{" ..." if len(seen) > 5 else ""} '
          f'{"is" if len(seen) == 1 else "are"} in the training split of the activation store '
          f'{store_path} ({sp.describe()})'
      )
  else:
    usable = steering.studies(manifest_path, teacher_forcing=True)
    fresh = [s for s in usable if s.study_id not in training] if problem is None else []
    if problem is None and not fresh:
      problem = (
          f'every study of {manifest_path} is in the training split of the activation store '
          f'{store_path} ({sp.describe()})'
      )
    studies = fresh[:count] if fresh else usable[-count:]
    note = (
        f'{len(studies)} of the {len(fresh)} studies of {manifest_path} outside the training '
        f'split of the activation store {store_path} ({sp.describe()})'
        if fresh
        else f'the last {len(studies)} studies of {manifest_path}'
    )
  if problem is None:
    return studies, f'held out: {note}', True
  if not allow_in_sample:
    raise NotHeldOut(
        f'the studies to evaluate are NOT held out: {problem}. The SAE may have been trained on '
        'them, which makes FVU, L0 and dead latents in-sample. Point --config.data.store_path at '
        'the store the SAE was trained on, with --config.data.held_out_fraction as in training '
        '(its held-out studies are then chosen), or name held-out studies with --study; or pass '
        '--allow_in_sample to evaluate anyway, labelled in-sample.'
    )
  return studies, f'IN-SAMPLE, not held out ({problem}): {note}', False
