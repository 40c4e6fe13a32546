"""Where a run's finding labels come from: a CheXpert-format file, or the manifest's reports."""

from __future__ import annotations

import logging
from typing import Sequence

import ml_collections

from jaxsae.errors import ConfigError
from jaxsae.findings import labels as labels_lib

log = logging.getLogger(__name__)


def study_labels(
    c: ml_collections.ConfigDict, study_ids: Sequence[str]
) -> labels_lib.FindingLabels:
  """The labels of `study_ids`, in that order: from `findings.labels_file` when set, else the rule
  labeller over each study's findings text in `export.manifest`. Studies the source does not list
  get NOT_MENTIONED everywhere (and are counted in a warning)."""
  ids = [str(s) for s in study_ids]
  if c.findings.labels_file:
    table = labels_lib.read_chexpert(
        c.findings.labels_file, c.findings.id_column, c.findings.id_prefix
    )
  else:
    if not c.export.manifest:
      raise ConfigError(
          'finding labels need a source: set --config.findings.labels_file to a CheXpert-format '
          'labels file, or --config.export.manifest to the manifest whose findings texts the '
          'rule labeller reads (or --config.findings.enabled=False to skip them).'
      )
    from jaxsae.findings import labeller  # pylint: disable=import-outside-toplevel  (spaCy)
    from jaxsae.formats import manifest_rows  # pylint: disable=import-outside-toplevel

    texts = manifest_rows.findings_texts(c.export.manifest)
    wanted = [s for s in ids if s in texts]
    table = labeller.label_reports(wanted, [texts[s] for s in wanted])
  values, listed = table.aligned(ids)
  if not listed.all():
    source = c.findings.labels_file or c.export.manifest
    log.warning(
        '%d of %d studies have no finding labels in %s (counted as not mentioned)',
        int((~listed).sum()),
        len(ids),
        source,
    )
  return labels_lib.FindingLabels(tuple(ids), values)
