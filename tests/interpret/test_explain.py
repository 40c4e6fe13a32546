"""Explainer prompts, answer parsing, detection scoring and the resumable runner."""

import json
import logging
import os
import subprocess
import sys

import pytest

from helpers import REPO
from jaxsae.interpret import explain, llm
from jaxsae.interpret.records import read_jsonl
from openai_server import FakeOpenAI, make_responder

FILLER = 'the patient has a small left right basal opacity with no acute change seen'.split()


def example(row, words, target=None, act=0.0):
  """An Example whose context is `words`, firing `act` at index `target` only."""
  acts = [0.0] * len(words)
  if target is not None:
    acts[target] = act
  return {
      'study_id': f's{row}',
      'row': row,
      'position': target or 0,
      'kind': 'report',
      'activation': act,
      'tokens': list(words),
      'acts': acts,
      'target': target or 0,
  }


def make_record(
    feature, word='effusion', n_top=4, n_bins=3, per_bin=4, negatives=None, max_act=5.0
):
  """A feature that fires on `word`: top/quantile contexts contain it, negatives do not."""
  row = feature * 1000

  def pos(act, k):
    nonlocal row
    row += 1
    words = [FILLER[(k + j) % len(FILLER)] for j in range(6)]
    words.insert(3, word)
    return example(row, words, 3, act)

  top = [pos(max_act * (1 - 0.1 * i), i) for i in range(n_top)]
  quantiles = [
      [pos(max_act * (b + 1) / (n_bins + 2), b * per_bin + i) for i in range(per_bin)]
      for b in range(n_bins)
  ]
  if negatives is None:
    negatives = []
    for i in range(6):
      row += 1
      negatives.append(
          example(
              row,
              [
                  FILLER[(i + j) % len(FILLER)]
                  for j in range(1, 8)
                  if FILLER[(i + j) % len(FILLER)] != 'left'
              ],
          )
      )
  return {
      'feature': feature,
      'density': 0.01,
      'count': 10,
      'mean': 2.0,
      'max': max_act,
      'kind_counts': {'report': 10},
      'histogram': {'edges': [0, 1], 'counts': [1]},
      'top': top,
      'quantiles': quantiles,
      'negatives': negatives,
      'heatmaps': [],
      'promoted_tokens': [],
  }


def dead_record(feature):
  r = make_record(feature)
  r.update(top=[], quantiles=[], negatives=[], count=0, max=0.0)
  return r


class Scripted:
  """An in-process ChatModel: answers through a responder and keeps the prompts it saw."""

  def __init__(self, responder, name='fake:model'):
    self.responder, self.name, self.seen = responder, name, []

  def complete(self, messages, *, max_tokens, temperature):
    self.seen.append(messages)
    return self.responder(messages)


KW = dict(n_top=4, n_quantile=3, score_batch=4, seed=0)


# --------------------------------------------------------------------------------------------------
# Prompts and parsing
# --------------------------------------------------------------------------------------------------


def test_render_marks_runs_and_handles_tokenizer_spaces():
  assert (
      explain.render(['a', 'small', 'pleural', 'effusion', 'here'], [0, 0, 1.0, 2.0, 0])
      == 'a small <<pleural effusion>> here'
  )
  sp = ['\u2581the', '\u2581pleural', '\u2581eff', 'usion', '<0x0A>', '\u2581seen']
  assert explain.render(sp, [0, 0, 1, 1, 0, 2]) == 'the pleural <<effusion>> <<seen>>'
  assert explain.render(sp) == 'the pleural effusion seen'
  assert explain.render(['the', 'patient', '\n', 'has']) == 'the patient has'
  assert explain.token_text('\u0120lung') == 'lung'
  with pytest.raises(ValueError, match='2 tokens but 1 activations'):
    explain.render(['a', 'b'], [0.0])


def test_split_is_deterministic_disjoint_and_covers_every_bin():
  r = make_record(0)
  shown, held = explain.split_examples(r, 4, 3)
  assert shown[:4] == r['top']
  assert [ex['row'] for ex in shown[4:]] == [r['quantiles'][b][0]['row'] for b in (2, 1, 0)]
  assert {ex['row'] for ex in shown}.isdisjoint(ex['row'] for ex in held)
  assert len(held) == 3 * 4 - 3
  assert all(any(ex in b for ex in held) for b in r['quantiles'])
  assert explain.split_examples(r, 4, 3) == (shown, held)
  _, held_all_evens = explain.split_examples(r, 4, 100)
  assert held_all_evens == [ex for b in r['quantiles'] for ex in b[1::2]]  # "every other"


def test_explainer_prompt_has_marked_tokens_and_scaled_activations():
  r = make_record(7, word='effusion', max_act=5.0)
  system, user = explain.explainer_messages(r, n_top=4, n_quantile=3)
  assert system['role'] == 'system' and 'one sentence' in system['content']
  text = user['content']
  assert text.count('<<effusion>>') == 7  # 4 top + 3 quantile examples
  assert 'Activations: effusion (10)' in text  # the max activation
  assert 'Activations: effusion (9)' in text  # 4.5 of 5
  assert 'Activations: effusion (2)' in text  # lowest bin shown: 5 * 1/5 = 1 of 5
  assert '<<the>>' not in text and 'the (' not in text  # zero activations are not shown
  with pytest.raises(ValueError, match='dead feature'):
    explain.explainer_messages(dead_record(3), 4, 3)


@pytest.mark.parametrize(
    'answer, expected',
    [
        ('Explanation: the word "effusion".', 'the word "effusion".'),
        ('"The word effusion." It also fires on fluid.', 'The word effusion.'),
        ('**Explanation:** mentions of pleural fluid. Mostly nouns.', 'mentions of pleural fluid.'),
        ('\n\nExplanation:\n  the word effusion\nmore', 'the word effusion'),
        ('[EXPLANATION]: negation words such as "no"', 'negation words such as "no"'),
        ('<think>Let me look. The marked...</think>\nExplanation: laterality', 'laterality'),
        ('<think>truncated reasoning', ''),
        ('', ''),
        (None, ''),
        ('  \n "" \n', ''),
    ],
)
def test_parse_explanation(answer, expected):
  assert explain.parse_explanation(answer) == expected


@pytest.mark.parametrize(
    'answer, n, expected',
    [
        ('[1, 0, 1]', 3, [1, 0, 1]),
        ('1, 0, 1', 3, [1, 0, 1]),
        ('```json\n[1,0,1]\n```', 3, [1, 0, 1]),
        ('Answer: 1 0 1', 3, [1, 0, 1]),
        ('["yes", "no", "yes"]', 3, [1, 0, 1]),
        ('First guess [1, 1, 1], but final answer: [0, 0, 1]', 3, [0, 0, 1]),
        ('<think>[1, 1]</think>[0, 1]', 2, [0, 1]),
        ('[1, 0]', 3, None),
        ('[1, 0, 2]', 3, None),
        ('I think the first one activates', 3, None),
        ('', 1, None),
    ],
)
def test_parse_labels(answer, n, expected):
  assert explain.parse_labels(answer, n) == expected


def test_balanced_accuracy():
  assert explain.balanced_accuracy(tp=3, fp=2, tn=2, fn=1) == pytest.approx((3 / 4 + 2 / 4) / 2)
  with pytest.raises(ValueError, match='positives and negatives'):
    explain.balanced_accuracy(0, 1, 1, 0)


# --------------------------------------------------------------------------------------------------
# Detection scoring
# --------------------------------------------------------------------------------------------------


def score(record, scorer_mode='perfect', **kw):
  scorer = Scripted(make_responder(scorer_mode, **kw))
  return explain.detection_score(record, 'the word effusion', scorer, **KW), scorer


def test_perfect_scorer_scores_1_and_sees_no_markings():
  s, scorer = score(make_record(1))
  assert s == {'balanced_accuracy': 1.0, 'tp': 9, 'fp': 0, 'tn': 6, 'fn': 0, 'unparsed': 0}
  assert len(scorer.seen) == 4  # 15 examples in batches of 4
  for messages in scorer.seen:
    user = messages[-1]['content']
    assert '<<' not in user and '(10)' not in user
    assert user.startswith('Explanation: the word effusion\n')


def test_all_ones_scores_one_half_and_a_known_mixed_case():
  s, _ = score(make_record(1), 'all1')
  assert (s['balanced_accuracy'], s['tp'], s['fp'], s['tn'], s['fn']) == (0.5, 9, 6, 0, 0)
  # A scorer that also says 1 for 'left', which 2 of 6 negatives contain: TPR 1, TNR 4/6.
  r = make_record(1)
  negs = [
      example(9000 + i, ['no', 'acute', 'change'] + (['left'] if i < 2 else [])) for i in range(6)
  ]
  r['negatives'] = negs
  s, _ = score(r, also_positive='left')
  assert (s['tp'], s['fn'], s['tn'], s['fp']) == (9, 0, 4, 2)
  assert s['balanced_accuracy'] == pytest.approx((1 + 4 / 6) / 2)


@pytest.mark.parametrize('mode', ['garbage', 'short'])
def test_unreadable_answers_count_as_unparsed_and_wrong(mode):
  s, _ = score(make_record(1), mode)
  assert s == {'balanced_accuracy': 0.0, 'tp': 0, 'fp': 6, 'tn': 0, 'fn': 9, 'unparsed': 15}


def test_shuffle_is_seeded_per_feature():
  orders = []
  for seed in (0, 0, 1):
    scorer = Scripted(make_responder())
    explain.detection_score(make_record(1), 'the word effusion', scorer, **{**KW, 'seed': seed})
    orders.append([m[-1]['content'] for m in scorer.seen])
  assert orders[0] == orders[1] and orders[0] != orders[2]
  # positives and negatives are mixed within batches, not sent in blocks
  batches = [[l.split()[2:] for l in o.splitlines() if l.startswith('Example ')] for o in orders[0]]
  assert any(len({'effusion' in ex for ex in b}) == 2 for b in batches)


def test_too_few_positives_or_negatives_is_unscored():
  r = make_record(1, negatives=[example(99, ['no', 'change'])])
  assert score(r)[0] is None
  r = make_record(1, per_bin=1)  # 3 quantile samples, all shown to the explainer
  assert score(r)[0] is None


def test_empty_explanation_is_recorded_unscored():
  explainer = Scripted(lambda m: '   ')
  scorer = Scripted(make_responder())
  e = explain.explain_feature(make_record(2), explainer, scorer, **KW)
  assert e == {
      'feature': 2,
      'explanation': '',
      'score': None,
      'explainer': 'fake:model',
      'scorer': 'fake:model',
  }
  assert not scorer.seen


# --------------------------------------------------------------------------------------------------
# The runner against the loopback server
# --------------------------------------------------------------------------------------------------

WORDS = ['effusion', 'pneumothorax', 'cardiomegaly', 'edema', 'consolidation']


def models(server, max_retries=1):
  kw = dict(api_key_env='JAXSAE_TEST_NO_KEY', timeout_s=5, max_retries=max_retries, backoff_s=0.001)
  return (
      llm.OpenAIChat(server.url, 'explainer-model', **kw),
      llm.OpenAIChat(server.url, 'scorer-model', **kw),
  )


def features(words=WORDS):
  return [make_record(i, w) for i, w in enumerate(words)] + [dead_record(len(words))]


def run(server, path, recs, **kw):
  explainer, scorer = models(server)
  return explain.run(recs, explainer, scorer, str(path), **{**KW, 'concurrency': 2, **kw})


def test_run_explains_scores_caches_and_resumes(tmp_path):
  path = tmp_path / 'sub' / 'explanations.jsonl'
  calls = []
  with FakeOpenAI(delay_s=0.03) as server:
    result = run(server, path, features(), progress=lambda i, n: calls.append((i, n)))
    assert server.max_concurrent == 2  # concurrency=2: used, and never exceeded
    n_requests = len(server.requests)
  assert (result.new, result.cached, result.dead, result.failed) == (5, 0, 1, [])
  assert calls == [(i, 5) for i in range(1, 6)]
  assert n_requests == 5 * (1 + 4)  # one explanation + 4 scorer batches per feature
  assert [e['feature'] for e in result.explanations] == [0, 1, 2, 3, 4]
  for e, word in zip(result.explanations, WORDS):
    assert e['explanation'] == f'the word {word}.'
    assert e['score']['balanced_accuracy'] == 1.0
    assert (e['explainer'], e['scorer']) == ('openai:explainer-model', 'openai:scorer-model')
  assert sorted(read_jsonl(str(path)), key=lambda e: e['feature']) == result.explanations

  with FakeOpenAI() as server:  # second run: everything is cached
    again = run(server, path, features())
    assert server.requests == []
  assert (again.new, again.cached, again.explanations) == (0, 5, result.explanations)


def test_torn_final_line_is_redone(tmp_path):
  path = tmp_path / 'explanations.jsonl'
  with FakeOpenAI() as server:
    first = run(server, path, features(), concurrency=1)
  lines = path.read_bytes().splitlines(keepends=True)
  torn_feature = json.loads(lines[-1])['feature']
  path.write_bytes(b''.join(lines[:-1]) + lines[-1][:25])  # killed mid-write
  with FakeOpenAI() as server:
    again = run(server, path, features())
    explained = server.bodies('explain')
  assert len(explained) == 1 and WORDS[torn_feature] in explained[0]['messages'][-1]['content']
  assert (again.new, again.cached) == (1, 4)
  assert again.explanations == first.explanations
  rows = list(read_jsonl(str(path)))
  assert sorted(e['feature'] for e in rows) == [0, 1, 2, 3, 4]  # no duplicate, no torn bytes
  assert path.read_bytes().endswith(b'\n')


def test_permanently_failing_feature_is_left_out_and_retried_next_run(tmp_path, caplog):
  path = tmp_path / 'explanations.jsonl'
  words = ['effusion', 'poison', 'edema']
  with FakeOpenAI(make_responder(fail_word='poison')) as server:
    with caplog.at_level(logging.WARNING):
      result = run(server, path, features(words))
  assert result.failed == [1] and result.new == 2
  assert [e['feature'] for e in result.explanations] == [0, 2]
  assert sorted(e['feature'] for e in read_jsonl(str(path))) == [0, 2]
  assert 'feature 1 failed' in caplog.text and 'rerun' in caplog.text
  with FakeOpenAI() as server:  # the server recovers: only feature 1 is requested
    again = run(server, path, features(words))
    assert len(server.bodies('explain')) == 1
  assert (again.failed, again.new, again.cached) == ([], 1, 2)
  assert [e['feature'] for e in again.explanations] == [0, 1, 2]


def test_refused_key_aborts_the_run(tmp_path):
  path = tmp_path / 'explanations.jsonl'
  with FakeOpenAI(lambda m: 401) as server:
    with pytest.raises(llm.LLMConfigError, match='HTTP 401'):
      run(server, path, features())
  assert list(read_jsonl(str(path))) == []


def test_run_rejects_bad_settings(tmp_path):
  with FakeOpenAI() as server:
    with pytest.raises(ValueError, match='concurrency'):
      run(server, tmp_path / 'e.jsonl', features(), concurrency=0)
    with pytest.raises(ValueError, match='score_batch'):
      run(server, tmp_path / 'e.jsonl', features(), score_batch=0)


def test_interpret_never_imports_torch():
  code = (
      'import sys; import jaxsae.interpret.explain, jaxsae.interpret.llm; '
      'assert not [m for m in sys.modules if m.startswith(("torch", "transformers"))]'
  )
  r = subprocess.run(
      [sys.executable, '-c', code],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=60,
      env={**os.environ, 'PYTHONPATH': REPO},
  )
  assert r.returncode == 0, r.stderr
