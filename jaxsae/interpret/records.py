"""The feature records that the interpretation stages pass to each other, as plain JSON.

`stats` + `examples` write one record per feature to `features.jsonl` (features that never fired
are listed too, with empty example lists); `explain` reads them and appends one result per
feature to `explanations.jsonl`; `browser` reads both. Keeping them plain dicts (TypedDicts for
the reader) means every stage can be rerun on its own and the files can be read without jaxsae.
"""

from __future__ import annotations

import json
import os
from typing import Iterator, TypedDict

FEATURES = 'features.jsonl'
EXPLANATIONS = 'explanations.jsonl'


class Example(TypedDict):
  """One activating (or non-activating) token in its context."""

  study_id: str
  row: int  # row in the activation store
  position: int  # token position in the model's input sequence
  kind: str  # one of config.TOKEN_KINDS
  activation: float  # the feature's activation at this token
  tokens: list[str]  # the context's token strings, in order
  acts: list[float]  # the feature's activation at each context token (same length)
  target: int  # index in `tokens` of the token this example is about


class Heatmap(TypedDict):
  """A feature's activation over one image's patch grid (image-token features)."""

  study_id: str
  image: int  # which image of the study (0 = current frontal)
  image_file: str  # the image, relative to the interpretation's out dir ('' if absent)
  grid: list[list[float]]  # [rows][cols] activation per patch
  max: float


class Histogram(TypedDict):
  edges: list[float]  # len(counts) + 1 bin edges over the non-zero activations
  counts: list[int]


class FeatureRecord(TypedDict):
  feature: int
  density: float  # fraction of tokens on which the feature fires (activation > 0)
  count: int  # tokens on which it fires
  mean: float  # mean activation over the tokens where it fires (0 if never)
  max: float
  kind_counts: dict[str, int]  # firing tokens per token kind
  histogram: Histogram
  top: list[Example]  # the top-N activating tokens, highest first
  quantiles: list[list[Example]]  # samples per activation quantile bin, lowest bin first
  negatives: list[Example]  # random tokens where the feature does not fire (for scoring)
  heatmaps: list[Heatmap]
  promoted_tokens: list[tuple[str, float]]  # top tokens of W_dec[f] @ unembedding ([] if no model)


class Score(TypedDict):
  balanced_accuracy: float
  tp: int
  fp: int
  tn: int
  fn: int
  unparsed: int  # scorer answers that could not be read (counted as wrong)


class Explanation(TypedDict):
  feature: int
  explanation: str
  score: Score | None  # None when there were too few examples to score
  explainer: str  # backend:model that wrote the explanation
  scorer: str


def read_jsonl(path: str) -> Iterator[dict]:
  """Records of a JSONL file; a torn last line (a run killed mid-write) is skipped."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = f.readlines()
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      yield json.loads(line)
    except json.JSONDecodeError:
      if i == len(lines) - 1:
        return  # torn final write; the stage that owns the file redoes that record
      raise ValueError(
          f'{path}: line {i + 1} is not JSON; the file is damaged. Delete it to ' 'recompute.'
      ) from None


def append_jsonl(path: str, record: dict) -> None:
  """Append one record and make it durable before returning (so a rerun can trust it)."""
  with open(path, 'a') as f:
    f.write(json.dumps(record) + '\n')
    f.flush()
    os.fsync(f.fileno())


def drop_torn_tail(path: str) -> None:
  """Cut a final line left without its newline by a killed writer, so appends start clean."""
  if not os.path.exists(path):
    return
  with open(path, 'rb+') as f:
    data = f.read()
    if data and not data.endswith(b'\n'):
      f.truncate(data.rfind(b'\n') + 1)
