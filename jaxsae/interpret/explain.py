"""Explain SAE features with an LLM, and score each explanation by detection.

The explainer sees a feature's top examples and part of its quantile samples, with the activating
tokens marked. The scorer sees the quantile examples the explainer did not see, mixed with
non-activating ones and unmarked, and says which ones the explanation predicts the feature fires
on. The balanced accuracy of those answers (detection scoring, as in OpenAI's and EleutherAI
delphi's auto-interpretability) measures how much of the feature the explanation captures, also
at low activations, where a top-examples-only check would flatter it.

`run` is resumable: each finished feature is appended to a JSONL cache at once, and a rerun skips
what the cache holds. Features whose LLM calls still fail after the client's retries are left out
of the cache (so the next run retries them) and are reported in `RunResult.failed`.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import os
import random
import re
from typing import Callable, Iterable, Sized

from jaxsae.interpret.llm import ChatModel, LLMConfigError, LLMError
from jaxsae.interpret.records import (
    Example,
    Explanation,
    FeatureRecord,
    Score,
    append_jsonl,
    drop_torn_tail,
    read_jsonl,
)

log = logging.getLogger(__name__)

OPEN, CLOSE = '<<', '>>'
_SPACE_MARKS = ('\u2581', '\u0120', ' ')  # SentencePiece '▁', byte-level BPE 'Ġ', decoded ' '
_NEWLINES = frozenset({'<0x0A>', '\u010a', '\n', '\n\n'})  # shown as a space: one line each

EXPLAINER_SYSTEM = (
    'You are a meticulous interpretability researcher studying one feature of a sparse '
    'autoencoder trained on the activations of a radiology report generation model (chest X-ray '
    'prompts and reports). You will see text examples in which the feature activates. In each '
    f'example the tokens where it activates are marked {OPEN}like this{CLOSE}, and the line after '
    'the example lists those tokens with the activation strength from 1 to 10 (10 = the '
    "feature's strongest activation).\n"
    'Find what the marked tokens, and the text around them, have in common; weigh the strongest '
    'activations most. Be concise and specific, and do not list the examples.\n'
    'Answer with one sentence in the form "Explanation: <your explanation>".'
)

SCORER_SYSTEM = (
    'You are a meticulous interpretability researcher. You will see an explanation of a feature '
    'of a radiology report generation model and a numbered list of text examples. The feature '
    'activates on tokens of some examples and on no token of the others. For each example, '
    'decide whether the feature, as the explanation describes it, activates anywhere in it.\n'
    'Answer with only a JSON list with one number per example, in order: 1 if it activates, 0 if '
    'not. For instance, for 4 examples: [1, 0, 0, 1]'
)


# --------------------------------------------------------------------------------------------------
# Rendering examples
# --------------------------------------------------------------------------------------------------


def _pieces(tokens: list[str]) -> list[tuple[str, str]]:
  """(leading space, text) per token: tokenizer space markers become spaces; plain word tokens
  (no markers anywhere) are joined with spaces."""
  marked = any(t.startswith(_SPACE_MARKS) for t in tokens if t not in _NEWLINES)
  out = []
  for i, t in enumerate(tokens):
    if t in _NEWLINES:
      out.append((' ', ''))
    elif marked:
      out.append((' ', t[1:]) if t.startswith(_SPACE_MARKS) else ('', t))
    else:
      out.append((' ' if i else '', t))
  return out


def token_text(token: str) -> str:
  """A token as a reader sees it (tokenizer space markers removed)."""
  return _pieces([token])[0][1].strip() or token


def render(tokens: list[str], acts: list[float] | None = None) -> str:
  """The context as one line of text; with `acts`, runs of tokens with act > 0 go in <<...>>."""
  if acts is not None and len(acts) != len(tokens):
    raise ValueError(
        f'an example has {len(tokens)} tokens but {len(acts)} activations; the '
        'features file is damaged. Rerun the examples stage.'
    )
  out, inside = [], False
  for i, (space, text) in enumerate(_pieces(tokens)):
    active = acts is not None and acts[i] > 0
    if active and not inside:
      out.append(space + OPEN + text)
    elif not active and inside:
      out.append(CLOSE + space + text)
    else:
      out.append(space + text)
    inside = active
  if inside:
    out.append(CLOSE)
  return ' '.join(''.join(out).split())


def _key(ex: Example) -> tuple:
  return (ex['study_id'], ex['row'], ex['position'])


def _fires(ex: Example) -> bool:
  """Ground truth for detection: does the feature fire anywhere in the shown context?"""
  return ex['activation'] > 0 or any(a > 0 for a in ex['acts'])


def _check_counts(n_top: int, n_quantile: int) -> None:
  if n_top < 0 or n_quantile < 0 or n_top + n_quantile == 0:
    raise ValueError(
        f'interpret.n_top={n_top} and interpret.n_quantile={n_quantile} must be >= 0 '
        'and not both 0 (the explainer needs examples).'
    )


def split_examples(
    record: FeatureRecord, n_top: int, n_quantile: int
) -> tuple[list[Example], list[Example]]:
  """(examples shown to the explainer, held-out activating examples for the scorer).

  The explainer gets the `n_top` top examples plus up to `n_quantile` quantile samples drawn
  round-robin, highest bin first, from every other sample of each bin (positions 0, 2, 4, ...).
  The scorer gets every quantile sample the explainer did not see (so every bin is represented on
  both sides). Deterministic, so a rerun scores on the same split.
  """
  _check_counts(n_top, n_quantile)
  shown = list(record.get('top', [])[:n_top])
  bins = [list(b[0::2]) for b in reversed(record.get('quantiles', []))]
  picked: list[Example] = []
  while len(picked) < n_quantile and any(bins):
    for b in bins:
      if b and len(picked) < n_quantile:
        picked.append(b.pop(0))
  shown += picked
  seen = {_key(ex) for ex in shown}
  held = [ex for b in record.get('quantiles', []) for ex in b if _key(ex) not in seen]
  return shown, held


def _scale(record: FeatureRecord, examples: list[Example]) -> float:
  """The activation that maps to 10: the feature's max (or the examples' if that is larger)."""
  m = max([record.get('max', 0.0)] + [a for ex in examples for a in ex['acts']], default=0.0)
  return m if m > 0 else 1.0


def explainer_messages(record: FeatureRecord, n_top: int, n_quantile: int) -> list[dict]:
  """The explainer's chat: marked examples, each followed by its activations scaled to 1-10."""
  shown, _ = split_examples(record, n_top, n_quantile)
  if not shown:
    raise ValueError(
        f'feature {record["feature"]} has no examples to explain (dead feature); ' 'skip it.'
    )
  scale = _scale(record, shown)
  parts = []
  for i, ex in enumerate(shown, 1):
    acts = [
        f'{token_text(t)} ({max(1, round(10 * a / scale))})'
        for t, a in zip(ex['tokens'], ex['acts'])
        if a > 0
    ]
    parts.append(
        f'Example {i}: {render(ex["tokens"], ex["acts"])}\n'
        f'Activations: {", ".join(acts) or "none"}'
    )
  user = 'Examples where the feature activates:\n\n' + '\n\n'.join(parts)
  return [{'role': 'system', 'content': EXPLAINER_SYSTEM}, {'role': 'user', 'content': user}]


# --------------------------------------------------------------------------------------------------
# Parsing answers
# --------------------------------------------------------------------------------------------------

_PREFIX = re.compile(r'^\[?(?:the\s+)?(?:feature\s+)?explanation\]?\s*[:\-]\s*', re.I)
_QUOTES = {'"': '"', "'": "'", '\u201c': '\u201d', '\u2018': '\u2019', '`': '`'}
_SENTENCE_END = re.compile(r'(?:(?<=[.!?])|(?<=[.!?]["\u201d\']))\s+(?=[A-Z"\u201c(])')


def _unquote(text: str) -> str:
  """Drop one pair of quotes around the whole text (not quotes that belong to it)."""
  text = text.strip()
  while len(text) >= 2 and _QUOTES.get(text[0]) == text[-1]:
    text = text[1:-1].strip()
  return text


def _strip_thinking(text: str) -> str:
  """Drop a reasoning model's <think>...</think> (an unclosed one: everything after it)."""
  text = re.sub(r'<think>.*?</think>', '', text, flags=re.S)
  return text.split('<think>')[0]


MAX_EXPLANATION = 300  # characters; a rambling answer is cut


def parse_explanation(text: str | None) -> str:
  """The first non-empty sentence of the answer, without an 'Explanation:' label, markdown or
  quotes; '' for an empty answer."""
  for line in _strip_thinking(text or '').splitlines():
    line = line.strip().strip('*_#>\u2022- ').strip()
    line = _unquote(_PREFIX.sub('', line).strip().strip('*_'))
    if line:
      line = _unquote(_SENTENCE_END.split(line)[0])
      return (
          line if len(line) <= MAX_EXPLANATION else line[: MAX_EXPLANATION - 1].rstrip() + '\u2026'
      )
  return ''


_BITS = {'0': 0, '1': 1, 'false': 0, 'true': 1, 'no': 0, 'yes': 1, '0.0': 0, '1.0': 1}


def _bits(text: str, n: int) -> list[int] | None:
  parts = [p for p in re.split(r'[\s,;"\'`]+', text.strip().lower()) if p]
  bits = [_BITS.get(p) for p in parts]
  return bits if len(bits) == n and None not in bits else None  # type: ignore[return-value]


def parse_labels(text: str | None, n: int) -> list[int] | None:
  """The scorer's n 0/1 answers from '[1, 0, 1]', '1, 0, 1', a fenced JSON list, or a line
  'Answer: 1 0 1'; None when unreadable or not exactly n long."""
  text = _strip_thinking(text or '')
  candidates = re.findall(r'\[([^\[\]]*)\]', text)[::-1]  # the last list is the final answer
  lines = [l for l in text.splitlines() if l.strip()]
  candidates += [text] + lines[::-1] + [l.rsplit(':', 1)[1] for l in lines[::-1] if ':' in l]
  for c in candidates:
    bits = _bits(c, n)
    if bits is not None:
      return bits
  return None


# --------------------------------------------------------------------------------------------------
# Scoring and explaining one feature
# --------------------------------------------------------------------------------------------------


def balanced_accuracy(tp: int, fp: int, tn: int, fn: int) -> float:
  """(TPR + TNR) / 2: chance is 0.5 whatever the mix of positives and negatives."""
  if tp + fn == 0 or tn + fp == 0:
    raise ValueError(
        f'balanced accuracy needs positives and negatives; got tp={tp} fn={fn} ' f'tn={tn} fp={fp}.'
    )
  return (tp / (tp + fn) + tn / (tn + fp)) / 2


def scorer_messages(explanation: str, texts: list[str]) -> list[dict]:
  """The scorer's chat: the explanation and the numbered, unmarked examples."""
  examples = '\n'.join(f'Example {i}: {t}' for i, t in enumerate(texts, 1))
  user = (
      f'Explanation: {explanation}\n\n{examples}\n\nAnswer with a JSON list of {len(texts)} '
      'numbers (0 or 1).'
  )
  return [{'role': 'system', 'content': SCORER_SYSTEM}, {'role': 'user', 'content': user}]


def detection_score(
    record: FeatureRecord,
    explanation: str,
    scorer: ChatModel,
    *,
    n_top: int,
    n_quantile: int,
    score_batch: int,
    seed: int,
    max_tokens: int = 256,
) -> Score | None:
  """Balanced accuracy of the scorer's detection answers; None with < 2 positives or negatives.

  Positives are the held-out quantile examples, negatives the record's non-activating ones; the
  label is whether the feature fires anywhere in the context shown. They are shuffled with a
  per-feature seeded RNG and sent `score_batch` at a time. An unreadable or wrong-length answer
  counts its whole batch as `unparsed` and wrong.
  """
  if score_batch < 1:
    raise ValueError(f'interpret.score_batch={score_batch} must be >= 1.')
  _, held = split_examples(record, n_top, n_quantile)
  items = [(ex, int(_fires(ex))) for ex in held + list(record.get('negatives', []))]
  positives = sum(label for _, label in items)
  if positives < 2 or len(items) - positives < 2:
    return None
  random.Random(seed * 1_000_003 + record['feature']).shuffle(items)
  tp = fp = tn = fn = unparsed = 0
  for start in range(0, len(items), score_batch):
    batch = items[start : start + score_batch]
    messages = scorer_messages(explanation, [render(ex['tokens']) for ex, _ in batch])
    answer = scorer.complete(
        messages, max_tokens=max(max_tokens, 8 * len(batch) + 16), temperature=0.0
    )
    guesses = parse_labels(answer, len(batch))
    if guesses is None:
      unparsed += len(batch)
      guesses = [1 - label for _, label in batch]  # counted as wrong
    for (_, label), guess in zip(batch, guesses):
      if label and guess:
        tp += 1
      elif label:
        fn += 1
      elif guess:
        fp += 1
      else:
        tn += 1
  return Score(
      balanced_accuracy=balanced_accuracy(tp, fp, tn, fn),
      tp=tp,
      fp=fp,
      tn=tn,
      fn=fn,
      unparsed=unparsed,
  )


def explain_feature(
    record: FeatureRecord,
    explainer: ChatModel,
    scorer: ChatModel,
    *,
    n_top: int,
    n_quantile: int,
    score_batch: int,
    seed: int,
    max_tokens: int = 256,
) -> Explanation:
  """Explain one feature and score the explanation (an empty explanation is kept, unscored)."""
  answer = explainer.complete(
      explainer_messages(record, n_top, n_quantile), max_tokens=max_tokens, temperature=0.0
  )
  text = parse_explanation(answer)
  if not text:
    log.warning(
        'feature %d: the explainer gave no explanation (answer %r); recorded as empty.',
        record['feature'],
        (answer or '')[:200],
    )
  score = None
  if text:
    score = detection_score(
        record,
        text,
        scorer,
        n_top=n_top,
        n_quantile=n_quantile,
        score_batch=score_batch,
        seed=seed,
        max_tokens=max_tokens,
    )
  return Explanation(
      feature=record['feature'],
      explanation=text,
      score=score,
      explainer=explainer.name,
      scorer=scorer.name,
  )


# --------------------------------------------------------------------------------------------------
# The resumable runner
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunResult:
  """What `run` did; `failed` features are not in the cache, so a rerun retries them."""

  explanations: list[Explanation]  # cached + new, for the given records, by feature id
  cached: int  # features found in the cache (no requests made)
  new: int  # features explained by this run
  dead: int  # features skipped for having no top examples
  failed: list[int]  # features whose LLM calls failed after retries
  errors: dict[int, str] = dataclasses.field(default_factory=dict)  # failed feature -> message


def run(
    records: Iterable[FeatureRecord],
    explainer: ChatModel,
    scorer: ChatModel,
    cache_path: str,
    *,
    concurrency: int = 4,
    n_top: int = 10,
    n_quantile: int = 10,
    score_batch: int = 10,
    seed: int = 0,
    max_tokens: int = 256,
    progress: Callable[[int, int | None], None] | None = None,
) -> RunResult:
  """Explain and score every live feature not yet in `cache_path`, `concurrency` at a time.

  Each finished feature is appended to the cache from this (the main) thread as it completes, so
  a killed run loses only in-flight features. A feature whose LLM calls fail after the client's
  retries is logged and listed in `failed`; the run goes on. A refused key, URL or model
  (`LLMConfigError`) aborts the run, since every other feature would fail alike. `progress`, if
  given, is called with (features finished, features to do or None if unknown).
  """
  if concurrency < 1:
    raise ValueError(f'interpret.llm.concurrency={concurrency} must be >= 1.')
  if score_batch < 1:
    raise ValueError(f'interpret.score_batch={score_batch} must be >= 1.')
  _check_counts(n_top, n_quantile)
  if os.path.dirname(cache_path):
    os.makedirs(os.path.dirname(cache_path), exist_ok=True)
  drop_torn_tail(cache_path)
  cache = {e['feature']: e for e in read_jsonl(cache_path)}
  results: dict[int, Explanation] = {}
  counts = {'cached': 0, 'dead': 0}

  def todo():
    for r in records:
      if r['feature'] in cache:
        results[r['feature']] = cache[r['feature']]
        counts['cached'] += 1
      elif not r.get('top'):
        counts['dead'] += 1
      else:
        yield r

  total = None
  if isinstance(records, Sized):
    total = sum(1 for r in records if r['feature'] not in cache and r.get('top'))
  pending_records = todo()
  kw = dict(
      n_top=n_top, n_quantile=n_quantile, score_batch=score_batch, seed=seed, max_tokens=max_tokens
  )
  errors: dict[int, str] = {}
  new = finished = 0
  pool = cf.ThreadPoolExecutor(concurrency, thread_name_prefix='explain')
  futures: dict[cf.Future, int] = {}
  clean = False
  try:
    while True:
      while len(futures) < 2 * concurrency:  # a bounded window: records are read lazily
        r = next(pending_records, None)
        if r is None:
          break
        futures[pool.submit(explain_feature, r, explainer, scorer, **kw)] = r['feature']
      if not futures:
        break
      done, _ = cf.wait(futures, return_when=cf.FIRST_COMPLETED)
      for fut in done:
        feature = futures.pop(fut)
        try:
          explanation = fut.result()
        except LLMConfigError:
          raise
        except LLMError as e:
          log.warning(
              'feature %d failed: %s It is left out of %s; rerun to retry it.',
              feature,
              e,
              cache_path,
          )
          errors[feature] = str(e)
        else:
          append_jsonl(cache_path, dict(explanation))
          results[feature] = explanation
          new += 1
        finished += 1
        if progress is not None:
          progress(finished, total)
    clean = True
  finally:
    pool.shutdown(wait=clean, cancel_futures=True)
  failed = sorted(errors)
  if failed:
    log.warning(
        '%d feature(s) failed and are not in %s; rerun to retry them: %s',
        len(failed),
        cache_path,
        failed[:20],
    )
  return RunResult(
      explanations=[results[f] for f in sorted(results)],
      cached=counts['cached'],
      new=new,
      dead=counts['dead'],
      failed=failed,
      errors={f: errors[f] for f in failed},
  )
