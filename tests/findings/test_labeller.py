"""The rule labeller (spaCy + negspacy) on real radiology wording: synonyms, negation and its scope,
hedges, CheXpert's way of combining a report's sentences and deriving No Finding."""

import numpy as np
import pytest

from jaxsae.findings import labeller
from jaxsae.findings.labels import NEGATIVE, NOT_MENTIONED, OBSERVATIONS, POSITIVE, UNCERTAIN

P, N, U = POSITIVE, NEGATIVE, UNCERTAIN
EC, CM, OP, LL = 'Enlarged Cardiomediastinum', 'Cardiomegaly', 'Lung Opacity', 'Lung Lesion'
ED, CO, PN, AT = 'Edema', 'Consolidation', 'Pneumonia', 'Atelectasis'
PTX, PE, PO, FX, SD = (
    'Pneumothorax',
    'Pleural Effusion',
    'Pleural Other',
    'Fracture',
    'Support Devices',
)

# One sentence or report -> the label of every observation it mentions (the rest: not mentioned).
SENTENCES = [
    # plain positives and synonyms
    ('Large left pleural effusion.', {PE: P}),
    ('Small bilateral effusions.', {PE: P}),
    ('Moderate cardiomegaly.', {CM: P}),
    ('The heart is mildly enlarged.', {CM: P}),
    ('The heart is markedly enlarged.', {CM: P}),
    ('Enlarged heart.', {CM: P}),
    ('Cardiac silhouette is enlarged.', {CM: P}),
    ('The mediastinum is widened.', {EC: P}),
    ('Bibasilar infiltrates.', {OP: P}),
    ('Patchy airspace disease in the right lower lobe.', {OP: P}),
    ('Small right upper lobe nodule.', {LL: P}),
    ('Left hilar mass.', {LL: P}),
    ('Mild interstitial edema.', {ED: P}),
    ('Pulmonary vascular congestion.', {ED: P}),
    ('Kerley B lines are present.', {ED: P}),
    ('Right lower lobe pneumonia.', {PN: P}),
    ('Low lung volumes with bibasilar atelectasis.', {AT: P}),
    ('There is a small left apical pneumothorax.', {PTX: P}),
    ('Healed right rib fractures.', {FX: P}),
    ('Left apical pleural thickening.', {PO: P}),
    ('Small left pleural effusion with adjacent atelectasis.', {PE: P, AT: P}),
    ('The ETT is in good position.', {SD: P}),
    ('Endotracheal tube tip terminates 4 cm above the carina.', {SD: P}),
    ('Enteric tube courses below the diaphragm with the tip in the stomach.', {SD: P}),
    ('Right-sided PICC line terminates in the SVC.', {SD: P}),
    ('Right internal jugular central venous catheter tip in the mid SVC.', {SD: P}),
    ('Left chest wall pacemaker with leads in the right atrium and ventricle.', {SD: P}),
    ('Right chest tube in place.', {SD: P}),
    ('Sternotomy wires are intact.', {SD: P}),
    # a change is still a finding
    ('The left pleural effusion has decreased.', {PE: P}),
    ('Stable cardiomegaly.', {CM: P}),
    ('Left pleural effusion without change.', {PE: P}),
    ('No change in the right pleural effusion.', {PE: P}),
    # negation
    ('No pleural effusion or pneumothorax.', {PE: N, PTX: N}),
    ('There is no focal consolidation, pleural effusion or pneumothorax.', {CO: N, PE: N, PTX: N}),
    (
        'The lungs are clear without consolidation, effusion, or pneumothorax.',
        {CO: N, PE: N, PTX: N},
    ),
    ('Negative for pneumothorax.', {PTX: N}),
    ('Lungs are free of focal consolidation.', {CO: N}),
    ('No evidence of pneumonia.', {PN: N}),
    ('Without evidence of pulmonary edema.', {ED: N}),
    ('No acute fracture.', {FX: N}),
    ('No nodule.', {LL: N}),
    ('Interval resolution of the left pleural effusion.', {PE: N}),
    ('Pleural effusions have resolved.', {PE: N}),
    ('Interval removal of the endotracheal tube.', {SD: N}),
    ('The right PICC line has been removed.', {SD: N}),
    ('The cardiomediastinal silhouette is within normal limits.', {EC: N}),
    ('Normal cardiomediastinal contours.', {EC: N}),
    ('Unremarkable cardiomediastinal silhouette.', {EC: N}),
    ('Heart size is normal.', {CM: N}),
    ('The heart is normal in size.', {CM: N}),
    ('Top-normal heart size.', {CM: N}),
    ('Consolidation is not seen.', {CO: N}),
    ('Pneumothorax is not identified.', {PTX: N}),
    ('Pneumothorax is no longer seen.', {PTX: N}),
    ('The pleural effusion is no longer visible.', {PE: N}),
    ('Pleural effusion absent.', {PE: N}),
    ('No pneumothorax, there is a small pleural effusion.', {PTX: N, PE: P}),
    ('No significant increase in the pleural effusion.', {PE: P}),
    ('Partially resolved pleural effusion.', {PE: P}),
    ('Pleural effusion is absent.', {PE: N}),
    ('Pneumonia is unlikely.', {PN: N}),
    # uncertainty
    ('Possible small left pleural effusion.', {PE: U}),
    ('A small left pleural effusion cannot be excluded.', {PE: U}),
    ('Pneumothorax cannot be entirely excluded.', {PTX: U}),
    ('Pleural effusion is not excluded.', {PE: U}),
    ('A left pleural effusion is suspected.', {PE: U}),
    ('Findings suspicious for pneumonia.', {PN: U}),
    ('Heart size is borderline.', {CM: U}),
    (
        'Opacity at the right base may represent atelectasis or early pneumonia.',
        {OP: P, AT: U, PN: U},
    ),
    ('Left lower lobe opacity, concerning for pneumonia.', {OP: P, PN: U}),
    ('Left basilar opacity likely reflects atelectasis.', {OP: P, AT: U}),
    ('Atelectasis versus consolidation in the left lower lobe.', {AT: U, CO: U}),
    ('Left effusion versus pleural thickening.', {PE: U, PO: U}),
    (
        'Nodular opacity in the right upper lobe is suspicious for malignancy.',
        {OP: P, LL: U},
    ),
    # a negation's scope ends at a termination word, a semicolon or the sentence
    ('No pneumothorax, but a small left effusion.', {PTX: N, PE: P}),
    ('There is no pleural effusion; the heart is enlarged.', {PE: N, CM: P}),
    ('Normal heart size and small left pleural effusion.', {CM: N, PE: P}),
    ('Cardiomegaly with normal pulmonary vasculature.', {CM: P}),
    (
        'Interval removal of the endotracheal tube and placement of a right PICC line.',
        {SD: P},  # the line is there: CheXpert's rule, positive beats negative
    ),
    (
        'The effusion has resolved, and there is new right lower lobe consolidation.',
        {PE: N, CO: P},
    ),
    ('Mild pulmonary vascular congestion without frank edema.', {ED: P}),
]


def _expected(said: dict) -> np.ndarray:
  want = np.full(len(OBSERVATIONS), NOT_MENTIONED, np.int8)
  for name, value in said.items():
    want[OBSERVATIONS.index(name)] = value
  return want


@pytest.mark.parametrize('text, said', SENTENCES, ids=[t for t, _ in SENTENCES])
def test_each_sentence_gets_the_labels_a_radiologist_reads(text, said):
  got = labeller.label(text)
  assert dict(zip(OBSERVATIONS[1:], got[1:].tolist())) == dict(
      zip(OBSERVATIONS[1:], _expected(said)[1:].tolist())
  ), [(m.observation, text[m.start : m.end], m.status) for m in labeller.mentions(text)]


def test_the_table_is_large_and_covers_every_status():
  assert len(SENTENCES) >= 40
  values = {v for _, said in SENTENCES for v in said.values()}
  assert values == {P, N, U}
  assert {name for _, said in SENTENCES for name in said} == set(OBSERVATIONS[1:])


def test_mentions_give_where_and_how():
  text = 'No pneumothorax. Possible small left pleural effusion.'
  found = labeller.mentions(text)
  assert [(m.observation, text[m.start : m.end], m.status) for m in found] == [
      (PTX, 'pneumothorax', N),
      (PE, 'pleural effusion', U),
  ]


@pytest.mark.parametrize(
    'report, said',
    [
        # positive beats uncertain beats negative, across sentences
        ('No pleural effusion. Small left effusion cannot be excluded.', {PE: U}),
        ('Possible small right effusion. Moderate left pleural effusion.', {PE: P}),
        ('Small bilateral effusions. No effusion on the right.', {PE: P}),
        (
            'The endotracheal tube has been removed. A nasogastric tube remains in place.',
            {SD: P},
        ),
        (
            'Compared to the prior study: Interval removal of the enteric tube. '
            'The heart is moderately enlarged. Possible small left pleural effusion. '
            'No pneumothorax.',
            {SD: N, CM: P, PE: U, PTX: N},
        ),
    ],
)
def test_a_reports_sentences_combine_by_chexperts_rule(report, said):
  got = labeller.label(report)
  assert got[1:].tolist() == _expected(said)[1:].tolist()


@pytest.mark.parametrize(
    'report, no_finding',
    [
        ('The lungs are clear. No pleural effusion or pneumothorax.', P),
        ('Heart size is normal. The lungs are clear.', P),
        # support devices do not count ...
        ('Endotracheal tube tip 4 cm above the carina. No pneumothorax.', P),
        ('Left chest wall pacemaker. The lungs are clear.', P),
        # ... a positive or an uncertain pathology does
        ('Small left pleural effusion.', N),
        ('Pneumonia cannot be excluded.', N),
        ('Pacemaker in place. Mild cardiomegaly.', N),
    ],
)
def test_no_finding_is_derived_from_the_other_observations(report, no_finding):
  assert labeller.label(report)[0] == no_finding


def test_combine_on_no_mentions_and_label_reports():
  assert labeller.combine([]).tolist() == [P] + [NOT_MENTIONED] * (len(OBSERVATIONS) - 1)
  table = labeller.label_reports(
      ['a', 'b', 'c'], ['Large left pleural effusion.', None, 'No pneumothorax.']
  )
  assert table.study_ids == ('a', 'b', 'c')
  assert table.values.dtype == np.int8
  assert table.values[0].tolist() == labeller.label('Large left pleural effusion.').tolist()
  assert (table.values[1] == NOT_MENTIONED).all()  # no text: nothing known, not even No Finding
  assert table.values[2, OBSERVATIONS.index(PTX)] == N and table.values[2, 0] == P
