"""`python -m jaxsae.interpret`, stage by stage: statistics -> feature records -> explanations and
detection scores -> the HTML browser. Every stage leaves its output in `out` and a rerun reuses
what is finished: the statistics pass resumes from its checkpoint, the records are rebuilt only
when the statistics changed, and explained features are read from the JSONL cache.

Layout of `out`:
  stats_checkpoints/   the statistics pass (Orbax; resumable)
  stats.npz            per-feature count, density, mean, max, kind counts, histogram
  alignment.json       features vs the studies' clinical findings (AUROC, precision/recall,
                       sparse probes, coverage; jaxsae/interpret/alignment.py), when
                       findings.enabled
  features.jsonl       one FeatureRecord per feature (jaxsae/interpret/records.py)
  explanations.jsonl   one Explanation per explained feature (the cache)
  explain_errors.jsonl {"feature", "error"} per feature the last run could not explain (retried
                       by the next run; absent when none failed)
  images/              the X-rays that heatmaps are drawn over, one file per study and image,
                       named by jaxsae.formats.names.encode(study id) (`..` or `/` stay inside)
  index.html, features/, static/   the feature browser (open index.html)
  summary.json         what was done, with the statistics throughput
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import ml_collections
import numpy as np
from PIL import Image

from jaxsae import config as config_lib
from jaxsae import weights
from jaxsae.formats import hub, names, store
from jaxsae.config import ConfigError
from jaxsae.interpret import alignment as alignment_lib
from jaxsae.interpret import browser, examples, explain, llm, records, stats

log = logging.getLogger(__name__)

IMAGES = 'images'
ALIGNMENT = 'alignment.json'
ERRORS = 'explain_errors.jsonl'  # why each feature of the last run failed (absent: none did)


def validate(c: ml_collections.ConfigDict) -> None:
  """The interpret settings' types and ranges (`config.validate_interpret`), then what only this
  command needs before any work: an LLM to ask, and the store."""
  config_lib.validate_interpret(c)
  i = c.interpret
  if i.explain and i.llm.backend == 'openai' and not i.llm.model:
    raise ConfigError(
        'interpret.llm.model is empty: name the model the server at '
        f'interpret.llm.base_url={i.llm.base_url!r} serves (or set '
        '--config.interpret.explain=False for statistics and the browser only).'
    )
  local = i.llm.model or c.model.name
  if i.explain and i.llm.backend == 'local' and not os.path.isdir(local) and local.count('/') != 1:
    raise ConfigError(
        f'interpret.llm.backend=local: the model {local!r} (interpret.llm.model, '
        'else model.name) is neither a local directory nor a Hub id (org/name).'
    )
  if not c.data.store_path or not store.exists(c.data.store_path):
    raise ConfigError(
        f'no activation store at data.store_path={c.data.store_path!r}; export '
        'one with `python -m jaxsae.export_activations` first.'
    )


def chat_model(c: ml_collections.ConfigDict) -> llm.ChatModel:
  """The configured LLM: an OpenAI-compatible server, or a local transformers model (bridge)."""
  l = c.interpret.llm
  if l.backend == 'local':
    from jaxsae.bridge import local_llm  # pylint: disable=import-outside-toplevel  (torch)

    return local_llm.LocalChat(
        l.model or c.model.name, device=l.device, max_new_tokens=l.max_new_tokens
    )
  return llm.OpenAIChat(
      l.base_url,
      l.model,
      api_key_env=l.api_key_env,
      timeout_s=l.timeout_s,
      max_retries=l.max_retries,
  )


def _weights_label(weights: str) -> str:
  """The weights as the summary names them: a Hub id as given, a folder by its absolute path."""
  return weights if hub.is_hub(weights) else os.path.abspath(weights)


def _weights_name(weights: str) -> str:
  """The short name of the weights: their folder's (a Hub id's subfolder, or its repository)."""
  if hub.is_hub(weights):
    ref = hub.parse(weights)
    return ref.subfolder.rpartition('/')[2] or ref.repo_id
  return os.path.basename(os.path.abspath(weights))


def _sae_params(weights_dir: str) -> tuple[dict[str, np.ndarray], dict]:
  sae, cfg = weights.load(weights_dir)
  params = {k: np.asarray(v, np.float32) for k, v in sae.params().items()}
  F = params['b_enc'].shape[0]
  params['threshold'] = np.broadcast_to(
      np.asarray(sae.threshold.get_value(), np.float32), (F,)
  ).copy()
  return params, cfg


class _Images:
  """The study images that heatmaps are drawn over, copied into `out/images` as the model saw
  them (shortest side resized, centre-cropped square, as CLIP/DINO processors do)."""

  def __init__(self, c: ml_collections.ConfigDict, out: str, size: int = 320):
    self.out, self.size, self.studies = out, size, {}
    if c.export.manifest and os.path.exists(c.export.manifest):
      from jaxsae.bridge import manifest  # pylint: disable=import-outside-toplevel  (PIL only)

      for s in manifest.read(c.export.manifest, teacher_forcing=False):
        if not isinstance(s, manifest.BadStudyError):
          self.studies[s.study_id] = s
    else:
      log.warning(
          'export.manifest %r not found: heatmaps are drawn without their X-ray', c.export.manifest
      )

  def __call__(self, study: dict, image: int) -> str:
    s = self.studies.get(study['study_id'])
    path = getattr(s, examples.IMAGE_FIELDS[image], None) if s is not None else None
    if not path or not os.path.exists(path):
      return ''
    name = image_name(study['study_id'], image)
    target = os.path.join(self.out, name)
    if not os.path.exists(target):
      os.makedirs(os.path.dirname(target), exist_ok=True)
      with Image.open(path) as im:
        im = im.convert('L')
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        tmp = target + '.tmp'  # renamed into place whole: a killed run leaves no torn PNG
        im.crop((left, top, left + side, top + side)).resize((self.size, self.size)).save(
            tmp, format='PNG'
        )
        os.replace(tmp, target)
    return name


def image_name(study_id: str, image: int) -> str:
  """`images/<study id as a safe file name>_<image>.png`, relative to `out` (never outside it)."""
  return os.path.join(IMAGES, f'{names.encode(study_id)}_{int(image)}.png')


def _stats_npz(out: str, r: stats.Result) -> None:
  """Fixed dtypes: tables fresh from the pass and restored from its checkpoint differ in theirs."""
  count = r.get('count').astype(np.int64)
  path = os.path.join(out, 'stats.npz')
  with open(path + '.tmp', 'wb') as f:  # renamed into place whole, like every output here
    np.savez(
        f,
        count=count,
        density=count / max(r.tokens, 1),
        mean=np.where(count > 0, r.get('total').astype(np.float64) / np.maximum(count, 1), 0.0),
        max=r.get('max').astype(np.float32),
        kind_counts=r.get('kinds').astype(np.int64),
        histogram=r.get('hist').astype(np.int64),
        histogram_edges=stats.histogram_edges(r.sizes),
        tokens=r.tokens,
    )
  os.replace(path + '.tmp', path)


def run(
    c: ml_collections.ConfigDict, weights_dir: str, out: str, progress: bool = True
) -> dict[str, Any]:
  """Every stage; returns (and writes to out/summary.json) what was done."""
  validate(c)
  os.makedirs(out, exist_ok=True)
  params, sae_cfg = _sae_params(weights_dir)
  source = store.open_store(c.data.store_path)
  F = params['b_enc'].shape[0]

  # ---- statistics (and, in the same pass, their alignment with the finding labels) ------------
  labels = _finding_labels(c, source)
  result = stats.compute(
      c, source, params, os.path.join(out, 'stats_checkpoints'), progress, labels=labels
  )
  _stats_npz(out, result)
  rate = result.tokens / max(result.seconds, 1e-9)
  log.info('statistics: %d tokens in %.1f s (%.0f tokens/s)', result.tokens, result.seconds, rate)
  alignment = _alignment(c, out, result, params)

  # ---- feature records (rebuilt only when the statistics changed) ------------------------------
  features = os.path.join(out, records.FEATURES)
  settings = c.interpret.to_dict()
  for k in ('llm', 'explain', 'n_top', 'n_quantile', 'score_batch', 'max_features'):
    settings.pop(k)  # these change explanations, not records
  stamp = {
      'tokens': result.tokens,
      'sae': stats.fingerprint(params),
      'interpret': settings,
      'model': c.model.name,
      'manifest': c.export.manifest,
  }
  stamp_path = features + '.stamp.json'
  fresh = os.path.exists(features) and _read_json(stamp_path) == json.loads(json.dumps(stamp))
  if not fresh:
    t0 = time.perf_counter()
    tokenizer = examples.load_tokenizer(c.model.name)
    U = examples.load_unembedding(c.model.name)
    promoted = None
    if U is not None and U.shape[1] == params['W_dec'].shape[1]:
      promoted = examples.promoted_tokens(params['W_dec'], U, tokenizer)
    tmp = features + '.tmp'
    with open(tmp, 'w') as f:
      for rec in examples.build(c, source, params, result, tokenizer, _Images(c, out), promoted):
        f.write(json.dumps(rec) + '\n')
    os.replace(tmp, features)
    _write_json(stamp_path, stamp)
    log.info('feature records: %d in %.1f s', F, time.perf_counter() - t0)

  # ---- explanations and detection scores -------------------------------------------------------
  explained: dict[int, records.Explanation] = {}
  failed: list[int] = []
  if c.interpret.explain:
    model = chat_model(c)
    limit = c.interpret.max_features

    def todo():
      for rec in records.read_jsonl(features):
        if limit is None or rec['feature'] < limit:
          yield rec

    done = explain.run(
        todo(),
        model,
        model,
        os.path.join(out, records.EXPLANATIONS),
        concurrency=c.interpret.llm.concurrency,
        n_top=c.interpret.n_top,
        n_quantile=c.interpret.n_quantile,
        score_batch=c.interpret.score_batch,
        seed=c.interpret.seed,
        max_tokens=c.interpret.llm.max_new_tokens,
    )
    explained = {e['feature']: e for e in done.explanations}
    failed = list(done.failed)
    _write_errors(os.path.join(out, ERRORS), done.errors)
  else:
    explained = {
        e['feature']: e for e in records.read_jsonl(os.path.join(out, records.EXPLANATIONS))
    }

  # ---- browser --------------------------------------------------------------------------------
  count = result.get('count')
  scores = [e['score']['balanced_accuracy'] for e in explained.values() if e.get('score')]
  summary = {
      'weights': _weights_label(weights_dir),
      'store': os.path.abspath(c.data.store_path),
      'features': F,
      **stats.held_out_dead(c, source, params),
      'never_fired_in_store': int((count == 0).sum()),
      'tokens': result.tokens,
      'statistics_seconds': round(result.seconds, 2),
      'statistics_tokens_per_s': round(rate, 1),
      'redone_batches': result.redone_batches,
      'explained': len(explained),
      'failed': failed,
      'errors': os.path.abspath(os.path.join(out, ERRORS)) if failed else None,
      'mean_detection_score': float(np.mean(scores)) if scores else None,
      'llm': (
          f'{c.interpret.llm.backend}:{c.interpret.llm.model or c.model.name}'
          if c.interpret.explain
          else None
      ),
  }
  index = browser.write_site(
      out,
      records.read_jsonl(features),
      explained,
      title=f'SAE features: {_weights_name(weights_dir)}',
      meta={k: v for k, v in summary.items() if k not in ('failed', 'errors')},
      alignment=alignment,
  )
  if alignment is not None:
    summary['alignment'] = os.path.abspath(os.path.join(out, ALIGNMENT))
    summary['coverage'] = alignment['coverage']
    summary['findings_summary'] = alignment_lib.summary_line(alignment)
  summary['index'] = os.path.abspath(index)
  summary['sae_config'] = {
      k: sae_cfg.get(k) for k in ('k', 'dict_size', 'activation_dim') if k in sae_cfg
  }
  _write_json(os.path.join(out, 'summary.json'), summary)
  return summary


def _finding_labels(c: ml_collections.ConfigDict, source: Any) -> Any:
  """The store's studies' finding labels (jaxsae.findings.source), or None when
  findings.enabled is False."""
  if not c.findings.enabled:
    return None
  from jaxsae.findings import source as findings_source  # pylint: disable=import-outside-toplevel

  ids = [r['study_id'] for r in source.studies() if not r.get('skipped')]
  return findings_source.study_labels(c, ids)


def _alignment(
    c: ml_collections.ConfigDict, out: str, result: stats.Result, params: dict[str, np.ndarray]
) -> dict | None:
  """out/alignment.json from the pass's alignment statistics; reused while the statistics, the
  SAE and the findings settings are those it was made from."""
  if result.alignment is None:
    return None
  path = os.path.join(out, ALIGNMENT)
  stamp = {
      'tokens': result.tokens,
      'sae': stats.fingerprint(params),
      'findings': c.findings.to_dict(),
      'labels': alignment_lib.labels_digest(
          result.alignment.labels, np.arange(len(result.alignment.labels))
      ),
  }
  stamp = json.loads(json.dumps(stamp))
  cached = _read_json(path)
  if cached is not None and _read_json(path + '.stamp.json') == stamp:
    return cached
  t0 = time.perf_counter()
  report = alignment_lib.report(result.alignment, c.findings)
  _write_json(path, report)
  _write_json(path + '.stamp.json', stamp)
  log.info('alignment with findings: %.1f s; %s', time.perf_counter() - t0,
           alignment_lib.summary_line(report))  # fmt: skip
  return report


def _write_errors(path: str, errors: dict[int, str]) -> None:
  """The last run's failures, replacing an earlier run's (none: the file goes)."""
  if not errors:
    if os.path.exists(path):
      os.remove(path)
    return
  with open(path + '.tmp', 'w') as f:
    for feature in sorted(errors):
      f.write(json.dumps({'feature': feature, 'error': errors[feature]}) + '\n')
  os.replace(path + '.tmp', path)


def _read_json(path: str) -> Any:
  """The file's JSON, or None when it is missing or damaged (then the stage is redone)."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _write_json(path: str, obj: Any) -> None:
  """Written whole or not at all (a killed run never leaves half a file)."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)
