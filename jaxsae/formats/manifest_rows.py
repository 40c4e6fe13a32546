"""The study manifest's rows as written (JSONL or CSV), before any checking: what both the torch
bridge (which loads the studies) and the JAX side (which reads their report texts for finding
labels) need from the file. jaxsae.bridge.manifest checks the rows and loads the images."""

from __future__ import annotations

import csv
import json
import os

from jaxsae.errors import ConfigError


def rows(path: str) -> list[tuple[str, dict]]:
  """(where, row) per study row: "manifest.jsonl line 8" and the row's fields."""
  name = os.path.basename(path)
  if path.endswith('.csv'):
    with open(path, newline='') as f:
      return [(f'{name} row {i + 2}', row) for i, row in enumerate(csv.DictReader(f))]
  out = []
  with open(path) as f:
    for i, line in enumerate(f):
      if line.strip():
        try:
          out.append((f'{name} line {i + 1}', json.loads(line)))
        except json.JSONDecodeError as e:
          raise ConfigError(f'{path} line {i + 1} is not valid JSON: {e}') from e
  return out


def findings_texts(path: str) -> dict[str, str | None]:
  """study_id -> its findings text (None when empty) of every row that has a study id."""
  if not os.path.isfile(path):
    raise ConfigError(f'export.manifest={path!r} does not exist.')
  return {
      str(row['study_id']): (str(row['findings']) if row.get('findings') else None)
      for _, row in rows(path)
      if row.get('study_id') not in (None, '')
  }
