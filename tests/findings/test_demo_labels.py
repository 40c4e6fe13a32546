"""The demo's labels.csv, written from the conditions its reports were made from, is what the rule
labeller reads in those reports: both sources of labels give the same table."""

import json
import os
import sys

import numpy as np

from helpers import REPO, TOOLS
from jaxsae.findings import labeller, labels
from jaxsae.findings.labels import OBSERVATIONS, POSITIVE, UNCERTAIN


def test_the_labeller_reproduces_the_demo_labels(tmp_path):
  sys.path.insert(0, TOOLS)
  sys.path.insert(0, REPO)
  import make_demo_data  # pylint: disable=import-outside-toplevel

  rows = make_demo_data.make_studies(str(tmp_path), 60, seed=0)
  table = labels.read_chexpert(str(tmp_path / 'labels.csv'))
  assert table.study_ids == tuple(r['study_id'] for r in rows)
  read = labeller.label_reports(table.study_ids, [r['findings'] for r in rows])
  differ = np.flatnonzero((read.values != table.values).any(1))
  assert not len(differ), [
      (rows[i]['findings'], table.values[i].tolist(), read.values[i].tolist()) for i in differ
  ]
  # the reports say things several ways: negated, hedged, positive
  for name in ('Pleural Effusion', 'Atelectasis', 'Pneumonia'):
    assert (table.values[:, OBSERVATIONS.index(name)] == UNCERTAIN).any(), name
  assert ((table.values == POSITIVE).sum(0) >= 5)[[0, 2, 3, 8, 10, 13]].all()
  manifest = [json.loads(line) for line in open(os.path.join(tmp_path, 'manifest.jsonl'))]
  assert [m['findings'] for m in manifest] == [r['findings'] for r in rows]
