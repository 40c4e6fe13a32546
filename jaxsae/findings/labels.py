"""The finding labels of studies: one row per study, one column per CheXpert observation.

Values follow the CheXpert labeller's convention: 1 positive, 0 negative, -1 uncertain, and
blank (here NOT_MENTIONED) when the report does not mention the observation. MIMIC-CXR ships its
labels as such a file (mimic-cxr-2.0.0-chexpert.csv: subject_id, study_id and the 14 columns, in
any order); `read_chexpert` reads it, `write_chexpert` writes one, and the rule labeller
(jaxsae.findings.labeller) produces the same table from report text.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from typing import Iterable, Sequence

import numpy as np

from jaxsae.errors import ConfigError

# CheXpert's own column order.
OBSERVATIONS = (
    'No Finding',
    'Enlarged Cardiomediastinum',
    'Cardiomegaly',
    'Lung Opacity',
    'Lung Lesion',
    'Edema',
    'Consolidation',
    'Pneumonia',
    'Atelectasis',
    'Pneumothorax',
    'Pleural Effusion',
    'Pleural Other',
    'Fracture',
    'Support Devices',
)
POSITIVE, NEGATIVE, UNCERTAIN, NOT_MENTIONED = 1, 0, -1, -9
_TEXT = {POSITIVE: '1.0', NEGATIVE: '0.0', UNCERTAIN: '-1.0', NOT_MENTIONED: ''}


def observation(name: str) -> int:
  """The column of an observation, by its CheXpert name in any case ('pleural effusion')."""
  by_name = {o.lower(): i for i, o in enumerate(OBSERVATIONS)}
  key = ' '.join(name.replace('_', ' ').split()).lower()
  if key not in by_name:
    raise ConfigError(
        f'{name!r} is not a CheXpert observation; use one of: {", ".join(OBSERVATIONS)}.'
    )
  return by_name[key]


@dataclasses.dataclass(frozen=True)
class FindingLabels:
  """Labels of `study_ids` (int8 [n, len(OBSERVATIONS)], values POSITIVE .. NOT_MENTIONED)."""

  study_ids: tuple[str, ...]
  values: np.ndarray

  def __post_init__(self):
    if self.values.shape != (len(self.study_ids), len(OBSERVATIONS)):
      raise ValueError(f'labels {self.values.shape} for {len(self.study_ids)} studies')

  def index(self) -> dict[str, int]:
    return {s: i for i, s in enumerate(self.study_ids)}

  def get(self, study_id: str) -> np.ndarray | None:
    """One study's labels, or None if the table does not list it."""
    i = self.index().get(str(study_id))
    return None if i is None else self.values[i]

  def aligned(self, study_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(labels [len(study_ids), 14], listed [len(study_ids)] bool) in the order asked; studies
    the table does not list get NOT_MENTIONED everywhere and listed=False."""
    where = self.index()
    rows = np.array([where.get(str(s), -1) for s in study_ids], np.int64)
    out = np.full((len(rows), len(OBSERVATIONS)), NOT_MENTIONED, np.int8)
    out[rows >= 0] = self.values[rows[rows >= 0]]
    return out, rows >= 0


def _value(text: str, where: str, column: str) -> int:
  text = text.strip()
  if text == '':
    return NOT_MENTIONED
  try:
    v = float(text)
  except ValueError:
    v = math.nan
  if v not in (1.0, 0.0, -1.0):
    raise ConfigError(
        f'{where}, column {column!r}: {text!r} is not a CheXpert label; expected 1, 0, -1 or '
        'blank (not mentioned).'
    )
  return int(v)


def read_chexpert(path: str, id_column: str = 'study_id', id_prefix: str = '') -> FindingLabels:
  """A CheXpert-format labels CSV: a study id column and the 14 observation columns (any order,
  other columns ignored). `id_prefix` is put before each id so that they match the manifest's
  (MIMIC-CXR's file has numbers, 50414267; manifests often say s50414267)."""
  if not os.path.isfile(path):
    raise ConfigError(f'findings.labels_file={path!r} does not exist.')
  name = os.path.basename(path)
  with open(path, newline='') as f:
    reader = csv.DictReader(f)
    header = reader.fieldnames or []
    missing = [c for c in (id_column, *OBSERVATIONS) if c not in header]
    if missing:
      raise ConfigError(
          f'{path} lacks the column(s) {", ".join(map(repr, missing))}: a CheXpert-format labels '
          f'file has {id_column!r} and the 14 observations ({", ".join(OBSERVATIONS)}). Its '
          f'header is {header}.'
      )
    ids, rows, seen = [], [], {}
    for i, row in enumerate(reader):
      where = f'{name} row {i + 2}'
      sid = id_prefix + str(row[id_column]).strip()
      if sid in seen:
        raise ConfigError(f'{path}: study {sid!r} is listed twice ({seen[sid]} and {where}).')
      seen[sid] = where
      ids.append(sid)
      rows.append([_value(row[o] or '', where, o) for o in OBSERVATIONS])
  values = np.array(rows, np.int8).reshape(-1, len(OBSERVATIONS))
  return FindingLabels(tuple(ids), values)


def write_chexpert(path: str, labels: FindingLabels, id_column: str = 'study_id') -> None:
  """The table as a CheXpert-format CSV (what `read_chexpert` reads back)."""
  with open(path, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow([id_column, *OBSERVATIONS])
    for sid, row in zip(labels.study_ids, labels.values):
      w.writerow([sid, *(_TEXT[int(v)] for v in row)])


def from_rows(study_ids: Iterable[str], rows: Iterable[Sequence[int]]) -> FindingLabels:
  ids = tuple(str(s) for s in study_ids)
  return FindingLabels(ids, np.array(list(rows), np.int8).reshape(len(ids), len(OBSERVATIONS)))
