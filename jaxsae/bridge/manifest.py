"""The study manifest (JSONL or CSV) and its images, checked so that a bad row names itself.

One row per study. Fields: `study_id`, `frontal` (image path) and, when the findings are used as
teacher-forced assistant text, `findings` are required; `lateral`, `prior_frontal`, `indication`,
`technique`, `comparison` and `prior_report` may be absent or empty (MAIRA-2 writes "N/A" for
missing sections). Relative image paths are relative to the manifest's directory.
"""

from __future__ import annotations

import dataclasses
import os

from PIL import Image

from jaxsae.config import ConfigError
from jaxsae.formats import manifest_rows

IMAGE_FIELDS = ('frontal', 'lateral', 'prior_frontal')
TEXT_FIELDS = ('indication', 'technique', 'comparison', 'prior_report', 'findings')
# What to do about a bad row depends on the command: only export_activations can skip studies.
EXPORT_FIX = (
    'Fix the manifest row, or rerun with --skip_bad to skip such studies (they are listed in the '
    "store's skipped_studies.json)."
)
CHOOSE_FIX = 'Fix the manifest row, or choose other studies with --study.'


class BadStudyError(ConfigError):
  """One study cannot be used; says which study, field and file, and `fix`: what the command
  that read the manifest offers (EXPORT_FIX, CHOOSE_FIX)."""

  def __init__(
      self,
      study: str,
      field: str,
      file: str | None,
      problem: str,
      where: str,
      fix: str = EXPORT_FIX,
  ):
    self.study, self.field, self.file, self.problem = study, field, file, problem
    self.where, self.fix = where, fix
    what = f"field '{field}'" + (f', file {file!r}' if file else '')
    super().__init__(f'study {study!r} ({where}): {what}: {problem}. {fix}')

  def __reduce__(self):  # crosses from an export worker process to the main one intact
    return type(self), (self.study, self.field, self.file, self.problem, self.where, self.fix)

  def record(self) -> dict:
    return {'field': self.field, 'file': self.file, 'error': self.problem}


@dataclasses.dataclass(frozen=True)
class Study:
  study_id: str
  index: int  # row in the manifest (0-based): the store's `study` column
  where: str  # "manifest.jsonl line 8", for messages
  frontal: str
  lateral: str | None = None
  prior_frontal: str | None = None
  indication: str | None = None
  technique: str | None = None
  comparison: str | None = None
  prior_report: str | None = None
  findings: str | None = None
  fix: str = dataclasses.field(default=EXPORT_FIX, repr=False, compare=False)  # for BadStudyError

  def images(self) -> list[tuple[str, Image.Image | None]]:
    """(field, greyscale image) for frontal, lateral, prior_frontal; None where absent."""
    out = []
    for field in IMAGE_FIELDS:
      path = getattr(self, field)
      out.append((field, None if path is None else _load_image(self, field, path)))
    return out


def _load_image(study: Study, field: str, path: str) -> Image.Image:
  try:
    with Image.open(path) as im:
      im.load()
      return im.convert('L')
  except FileNotFoundError:
    raise BadStudyError(
        study.study_id, field, path, 'image file does not exist', study.where, study.fix
    )
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many types)
    raise BadStudyError(
        study.study_id,
        field,
        path,
        f'cannot be read as an image ({type(e).__name__}: {e})',
        study.where,
        study.fix,
    )


def read(path: str, teacher_forcing: bool, fix: str = EXPORT_FIX) -> list[Study | BadStudyError]:
  """Every manifest row as a Study, or as the error that makes it unusable (missing field, missing
  image file) — so that with skip_bad a bad row is skipped, and without it the first one stops
  the export before the model is loaded. Unreadable image content shows up when it is loaded.
  `fix` ends the message of each such error (what the calling command lets the user do)."""
  if not path:
    raise ConfigError(
        'export.manifest is empty: set it to a JSONL or CSV file with one study per '
        'row (study_id, frontal, lateral, prior_frontal, indication, technique, '
        'comparison, prior_report, findings).'
    )
  if not os.path.exists(path):
    raise ConfigError(f'export.manifest={path!r} does not exist.')
  base = os.path.dirname(os.path.abspath(path))
  required = ('study_id', 'frontal') + (('findings',) if teacher_forcing else ())
  out, seen = [], {}
  for index, (where, row) in enumerate(manifest_rows.rows(path)):
    sid = str(row.get('study_id') or f'<row {index}>')
    if sid in seen:
      raise ConfigError(
          f'{path}: study_id {sid!r} appears twice ({seen[sid]} and {where}); '
          'study ids must be unique.'
      )
    seen[sid] = where
    values = {k: (str(v) if v not in (None, '') else None) for k, v in row.items()}
    missing = [f for f in required if values.get(f) is None]
    if missing:
      absent = missing[0] not in row
      out.append(
          BadStudyError(
              sid, missing[0], None, 'missing from the row' if absent else 'is empty', where, fix
          )
      )
      continue
    for field in IMAGE_FIELDS:
      if values.get(field) is not None:
        values[field] = os.path.join(base, values[field])
    bad = next((f for f in IMAGE_FIELDS if values.get(f) and not os.path.exists(values[f])), None)
    if bad:
      out.append(BadStudyError(sid, bad, values[bad], 'image file does not exist', where, fix))
      continue
    out.append(
        Study(
            study_id=sid,
            index=index,
            where=where,
            fix=fix,
            **{f: values.get(f) for f in IMAGE_FIELDS + TEXT_FIELDS},
        )
    )
  return out
