"""Finding labels from report text: spaCy target rules for the 14 CheXpert observations, negspacy's
NegEx scoping for negation, and a second NegEx pass with hedging cues for uncertainty.

A report is split into sentences; every mention of an observation (its CheXpert name or a common
synonym, `TARGETS`) is negated when a negation cue scopes over it ("no", "without", "resolution
of", "... is within normal limits") and uncertain when a hedge does ("may represent", "cannot be
excluded", "possible"). Per observation, CheXpert's rule combines the mentions: positive if any is
positive, else uncertain if any is, else negative if any is; not mentioned otherwise. No Finding is
positive when no other observation but Support Devices is positive or uncertain (CheXpert's
definition), negative otherwise.

Needs spaCy and negspacy (`pip install 'jaxsae[findings]'`); only a blank English pipeline is
built, so nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from jaxsae.errors import ConfigError
from jaxsae.findings import labels as labels_lib
from jaxsae.findings.labels import NEGATIVE, NOT_MENTIONED, OBSERVATIONS, POSITIVE, UNCERTAIN

# Each observation's phrases (lower case, as words), beside its CheXpert name.
TARGETS: dict[str, tuple[str, ...]] = {
    'Enlarged Cardiomediastinum': (
        'enlarged cardiomediastinum',
        'cardiomediastinal silhouette',
        'cardiomediastinal contour',
        'cardiomediastinal contours',
        'mediastinal widening',
        'widened mediastinum',
        'widening of the mediastinum',
        'mediastinal silhouette',
        'mediastinal contour',
        'mediastinal contours',
        'mediastinum is widened',
        'mediastinum is enlarged',
        'mediastinal enlargement',
    ),
    'Cardiomegaly': (
        'cardiomegaly',
        'heart is enlarged',
        'heart is mildly enlarged',
        'heart is moderately enlarged',
        'heart is severely enlarged',
        'enlarged heart',
        'enlarged cardiac silhouette',
        'cardiac enlargement',
        'heart size is enlarged',
        'heart size',
        'size of the heart',
        'cardiac size',
        'cardiac silhouette',
        'cardiac contour',
    ),
    'Lung Opacity': (
        'lung opacity',
        'opacity',
        'opacities',
        'opacification',
        'opacifications',
        'infiltrate',
        'infiltrates',
        'infiltration',
        'airspace disease',
        'air space disease',
        'haziness',
        'density',
        'densities',
    ),
    'Lung Lesion': (
        'lung lesion',
        'lesion',
        'lesions',
        'nodule',
        'nodules',
        'mass',
        'masses',
        'tumor',
        'tumour',
        'neoplasm',
        'malignancy',
        'carcinoma',
        'cancer',
        'metastasis',
        'metastases',
        'metastatic disease',
        'cavitary lesion',
    ),
    'Edema': (
        'edema',
        'oedema',
        'pulmonary edema',
        'interstitial edema',
        'vascular congestion',
        'pulmonary vascular congestion',
        'heart failure',
        'chf',
        # Septal lines are edema, not a support device's line.
        'kerley b lines',
        'kerley lines',
        'septal lines',
    ),
    'Consolidation': ('consolidation', 'consolidations', 'consolidative'),
    'Pneumonia': ('pneumonia', 'pneumonias', 'infection', 'infectious process'),
    'Atelectasis': ('atelectasis', 'atelectatic', 'collapse', 'volume loss'),
    'Pneumothorax': ('pneumothorax', 'pneumothoraces', 'pneumothoraxes'),
    'Pleural Effusion': (
        'pleural effusion',
        'pleural effusions',
        'effusion',
        'effusions',
        'pleural fluid',
        'hydrothorax',
    ),
    'Pleural Other': (
        'pleural thickening',
        'pleural plaque',
        'pleural plaques',
        'pleural scarring',
        'fibrothorax',
        'pleural calcification',
    ),
    'Fracture': ('fracture', 'fractures', 'fractured'),
    'Support Devices': (
        'support device',
        'support devices',
        'endotracheal tube',
        'et tube',
        'ett',
        'tracheostomy tube',
        'enteric tube',
        'nasogastric tube',
        'ng tube',
        'feeding tube',
        'orogastric tube',
        'chest tube',
        'tube',
        'tubes',
        'catheter',
        'catheters',
        'central venous catheter',
        'central line',
        'picc',
        'picc line',
        'line',
        'lines',
        'pacemaker',
        'pacer',
        'icd',
        'defibrillator',
        'leads',
        'lead',
        'wire',
        'wires',
        'sternotomy wires',
        'stent',
        'valve replacement',
        'port',
        'drain',
    ),
}

# Phrases that are neutral alone ("heart size") and say normal with a prefix ("normal heart
# size"): the prefixed forms are targets too, negated by negspacy's chunk prefixes (a bare
# preceding "normal" cue would also negate "... and small left effusion" after it).
_NEUTRAL = {
    'Enlarged Cardiomediastinum': (
        'cardiomediastinal silhouette',
        'cardiomediastinal contour',
        'cardiomediastinal contours',
        'mediastinal silhouette',
        'mediastinal contour',
        'mediastinal contours',
        'mediastinum',
    ),
    'Cardiomegaly': ('heart size', 'heart', 'cardiac size', 'cardiac silhouette'),
}
_NORMAL_PREFIXES = ('normal', 'unremarkable', 'top normal', 'top-normal')
# "The heart is ..." (the state follows: "... normal in size", "... markedly enlarged").
_TOKEN_TARGETS = {
    'Cardiomegaly': [[{'LOWER': 'heart'}, {'LOWER': {'IN': ['is', 'appears', 'remains']}}]],
}

# Cues beside negspacy's clinical termset: radiology's ways of saying absent. A cue listed both
# as preceding and following scopes over the whole clause, so "resolved" is only a following one
# ("... has resolved, and there is new consolidation").
_NEGATION = {
    'preceding_negations': [
        'resolution of',
        'interval removal of',
        'removal of',
        'clear of',
        'free of',
    ],
    'following_negations': [
        'within normal limits',
        'is normal',
        'are normal',
        'appears normal',
        'appear normal',
        'remains normal',
        'normal in size',
        'top normal',
        'top-normal',
        'is unremarkable',
        'are unremarkable',
        'appears unremarkable',
        'has resolved',
        'have resolved',
        'resolved',
        'removed',
        'has been removed',
        'have been removed',
        'not seen',
        'not identified',
        'not visualized',
        'not appreciated',
        'not evident',
        'not present',
        'no longer seen',
        'no longer visualized',
        'no longer present',
        'is absent',
        'are absent',
        'absent',
        'no longer visible',
        'no longer identified',
    ],
    # Hedged absence is uncertainty, not negation: NegEx must not read "cannot" as "not" ...
    'pseudo_negations': [
        'cannot exclude',
        'cannot be excluded',
        'can not be excluded',
        'cannot be entirely excluded',
        'cannot be completely excluded',
        'not excluded',
        'not be excluded',
        'cannot rule out',
        'cannot be ruled out',
        'not be ruled out',
        # ... and an unchanged finding is present.
        'without change',
        'without interval change',
        'no significant increase',
        'partially resolved',
    ],
    # A semicolon or a new device's placement ends a negation's scope.
    'termination': [';', 'placement', 'insertion', 'there is', 'there are'],
}
# ... and of hedging, read by a second NegEx pass into its own attribute.
_UNCERTAINTY = {
    'preceding_negations': [
        'possible',
        'possibly',
        'probable',
        'probably',
        'likely',
        'may represent',
        'may reflect',
        'may be',
        'might represent',
        'could represent',
        'could be',
        'suspicious for',
        'concerning for',
        'concern for',
        'may indicate',
        'might be',
        'possibility of',
        'suggestive of',
        'suggesting',
        'questionable',
        'question of',
        'cannot exclude',
        'cannot rule out',
        'differential includes',
        'borderline',
        'equivocal',
        'indeterminate',
        'versus',
        'vs',
    ],
    'following_negations': [
        'cannot be excluded',
        'can not be excluded',
        'cannot be entirely excluded',
        'cannot be completely excluded',
        'not be excluded',
        'is not excluded',
        'not excluded',
        'cannot be ruled out',
        'not ruled out',
        'is possible',
        'is likely',
        'is suspected',
        'suspected',
        'borderline',
        'versus',
        'vs',
    ],
    'pseudo_negations': [],
}


@dataclasses.dataclass(frozen=True)
class Mention:
  """One mention of an observation in a text: where, and how it is stated."""

  observation: str
  start: int  # character offsets in the text
  end: int
  status: int  # POSITIVE, NEGATIVE or UNCERTAIN


def _termsets() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
  from negspacy.termsets import termset  # pylint: disable=import-outside-toplevel

  base = termset('en_clinical').get_patterns()
  negation = {k: list(dict.fromkeys(base[k] + _NEGATION.get(k, []))) for k in base}
  uncertainty = {k: list(v) for k, v in _UNCERTAINTY.items()}
  uncertainty['termination'] = list(negation['termination'])
  return negation, uncertainty


def _patterns() -> list[dict]:
  """The entity ruler's patterns: every observation's name and synonyms (No Finding is derived,
  never matched), the normal-prefixed neutral phrases and the token patterns."""
  out = [
      {'label': name, 'pattern': phrase}
      for name in OBSERVATIONS[1:]
      for phrase in (name.lower(),) + TARGETS.get(name, ())
  ]
  out += [
      {'label': name, 'pattern': f'{prefix} {phrase}'}
      for name, phrases in _NEUTRAL.items()
      for phrase in phrases
      for prefix in _NORMAL_PREFIXES
  ]
  out += [{'label': name, 'pattern': p} for name, ps in _TOKEN_TARGETS.items() for p in ps]
  return out


@contextlib.contextmanager
def _torch_blocked() -> Iterator[None]:
  """spaCy's thinc imports torch when it can (an optional backend the rule labeller never uses);
  the JAX side (interpret) must not load it, so `import torch` fails while spaCy loads, unless
  torch is already there (the bridge's steering)."""
  if 'torch' in sys.modules:
    yield
    return
  sys.modules['torch'] = None  # type: ignore[assignment]  (makes `import torch` raise)
  try:
    yield
  finally:
    if sys.modules.get('torch', 0) is None:
      del sys.modules['torch']


@functools.lru_cache(maxsize=1)
def _pipeline() -> Any:
  with _torch_blocked():
    return _build()


def _build() -> Any:
  try:
    import spacy  # pylint: disable=import-outside-toplevel
    import negspacy.negation  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError as e:
    raise ConfigError(
        'labelling findings from report text needs spaCy and negspacy: pip install '
        "'jaxsae[findings]' (tools/install.sh does), or give a CheXpert-format labels file with "
        '--config.findings.labels_file=PATH.'
    ) from e
  nlp = spacy.blank('en')
  nlp.add_pipe('sentencizer')
  ruler = nlp.add_pipe('entity_ruler', config={'phrase_matcher_attr': 'LOWER'})
  ruler.add_patterns(_patterns())
  negation, uncertainty = _termsets()
  nlp.add_pipe(
      'negex',
      name='negation',
      config={'neg_termset': negation, 'chunk_prefix': [p + ' ' for p in _NORMAL_PREFIXES]},
  )
  nlp.add_pipe(
      'negex',
      name='uncertainty',
      config={'neg_termset': uncertainty, 'extension_name': 'uncertain'},
  )
  return nlp


def _found(doc: Any) -> list[Mention]:
  # Hedging wins over negation: "cannot be excluded" is not an absence.
  return [
      Mention(
          e.label_,
          e.start_char,
          e.end_char,
          UNCERTAIN if e._.uncertain else NEGATIVE if e._.negex else POSITIVE,
      )
      for e in doc.ents
  ]


def mentions(text: str) -> list[Mention]:
  """Every mention of an observation in `text`, with its status."""
  return _found(_pipeline()(text or ''))


def combine(found: Iterable[Mention]) -> np.ndarray:
  """CheXpert's rule: per observation positive > uncertain > negative > not mentioned; No Finding
  from the others."""
  out = np.full(len(OBSERVATIONS), NOT_MENTIONED, np.int8)
  rank = {POSITIVE: 3, UNCERTAIN: 2, NEGATIVE: 1, NOT_MENTIONED: 0}
  for m in found:
    i = OBSERVATIONS.index(m.observation)
    if rank[m.status] > rank[int(out[i])]:
      out[i] = m.status
  pathology = [i for i, o in enumerate(OBSERVATIONS) if o not in ('No Finding', 'Support Devices')]
  found_any = np.isin(out[pathology], (POSITIVE, UNCERTAIN)).any()
  out[0] = NEGATIVE if found_any else POSITIVE
  return out


def label(text: str) -> np.ndarray:
  """One report's labels (int8 [14])."""
  return combine(mentions(text))


def label_reports(
    study_ids: Sequence[str], texts: Sequence[str | None]
) -> labels_lib.FindingLabels:
  """The labels table of reports; a study without text gets NOT_MENTIONED everywhere."""
  nlp = _pipeline()
  rows = []
  for doc, text in zip(nlp.pipe([t or '' for t in texts]), texts):
    row = combine(_found(doc)) if text else np.full(len(OBSERVATIONS), NOT_MENTIONED, np.int8)
    rows.append(row)
  return labels_lib.from_rows(study_ids, rows)
