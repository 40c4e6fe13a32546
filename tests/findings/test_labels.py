"""CheXpert-format label files (read, write, their errors) and where a run's labels come from."""

import json
import logging

import numpy as np
import pytest

from jaxsae import config as config_lib
from jaxsae.errors import ConfigError
from jaxsae.findings import labels, source
from jaxsae.findings.labels import NEGATIVE, NOT_MENTIONED, OBSERVATIONS, POSITIVE, UNCERTAIN

HEADER = ['study_id', *OBSERVATIONS]


def _table():
  values = np.full((3, len(OBSERVATIONS)), NOT_MENTIONED, np.int8)
  values[0, :4] = (POSITIVE, NEGATIVE, UNCERTAIN, NOT_MENTIONED)
  values[1, 10] = POSITIVE
  values[2, 13] = NEGATIVE
  return labels.FindingLabels(('s1', 's2', 's3'), values)


def _write(path, header, rows):
  path.write_text('\n'.join(','.join(r) for r in [header, *rows]) + '\n')
  return str(path)


def test_write_then_read_gives_the_same_table(tmp_path):
  path = str(tmp_path / 'labels.csv')
  labels.write_chexpert(path, _table())
  back = labels.read_chexpert(path)
  assert back.study_ids == ('s1', 's2', 's3')
  assert back.values.dtype == np.int8
  np.testing.assert_array_equal(back.values, _table().values)
  first = open(path).read().splitlines()[:2]
  assert first[0] == ','.join(HEADER)
  assert first[1].startswith('s1,1.0,0.0,-1.0,,')  # CheXpert's own spelling; blank = not mentioned


def test_reads_mimics_layout_any_column_order_and_a_prefix(tmp_path):
  header = ['subject_id', 'study_id', *reversed(OBSERVATIONS)]
  row = ['10000032', '50414267', *(['1', '0'] + [''] * (len(OBSERVATIONS) - 2))]
  path = _write(tmp_path / 'mimic.csv', header, [row])
  table = labels.read_chexpert(path, id_prefix='s')
  assert table.study_ids == ('s50414267',)
  assert table.values[0, OBSERVATIONS.index('Support Devices')] == POSITIVE
  assert table.values[0, OBSERVATIONS.index('Fracture')] == NEGATIVE
  assert table.get('s50414267') is not None and table.get('50414267') is None
  other = _write(tmp_path / 'ids.csv', ['dicom', *OBSERVATIONS], [['d1', *[''] * 14]])
  assert labels.read_chexpert(other, id_column='dicom').study_ids == ('d1',)


def test_a_missing_column_is_named(tmp_path):
  path = _write(tmp_path / 'l.csv', ['study_id', *OBSERVATIONS[:-1]], [['s1', *[''] * 13]])
  with pytest.raises(ConfigError, match="'Support Devices'"):
    labels.read_chexpert(path)
  with pytest.raises(ConfigError, match="'sid'"):
    labels.read_chexpert(path, id_column='sid')


def test_a_bad_value_names_the_file_row_and_column(tmp_path):
  rows = [['s1', *[''] * 14], ['s2', *[''] * 4, 'yes', *[''] * 9]]
  path = _write(tmp_path / 'bad.csv', HEADER, rows)
  with pytest.raises(ConfigError) as e:
    labels.read_chexpert(path)
  msg = str(e.value)
  assert 'bad.csv row 3' in msg and "'Lung Lesion'" in msg and "'yes'" in msg and '-1' in msg
  path = _write(tmp_path / 'two.csv', HEADER, [['s1', '2', *[''] * 13]])
  with pytest.raises(ConfigError, match="two.csv row 2, column 'No Finding'"):
    labels.read_chexpert(path)


def test_a_study_listed_twice_is_an_error(tmp_path):
  path = _write(tmp_path / 'dup.csv', HEADER, [['s1', *[''] * 14], ['s1', *[''] * 14]])
  with pytest.raises(
      ConfigError, match=r"'s1' is listed twice \(dup.csv row 2 and dup.csv row 3\)"
  ):
    labels.read_chexpert(path)


def test_a_missing_file_is_named(tmp_path):
  with pytest.raises(ConfigError, match='findings.labels_file=.*does not exist'):
    labels.read_chexpert(str(tmp_path / 'none.csv'))


def test_aligned_follows_the_order_asked_and_says_what_is_unlisted():
  values, listed = _table().aligned(['s3', 'x', 's1'])
  assert listed.tolist() == [True, False, True]
  np.testing.assert_array_equal(values[0], _table().values[2])
  assert (values[1] == NOT_MENTIONED).all()
  np.testing.assert_array_equal(values[2], _table().values[0])
  assert _table().aligned([])[0].shape == (0, len(OBSERVATIONS))
  assert _table().index() == {'s1': 0, 's2': 1, 's3': 2}


def test_observation_by_name():
  assert labels.observation('No Finding') == 0
  assert labels.observation('pleural effusion') == OBSERVATIONS.index('Pleural Effusion')
  assert labels.observation('support_devices') == 13
  with pytest.raises(
      ConfigError, match="'effusion' is not a CheXpert observation.*Pleural Effusion"
  ):
    labels.observation('effusion')


def test_from_rows_and_a_wrong_shape():
  t = labels.from_rows([1, 2], [[NOT_MENTIONED] * 14, [POSITIVE] * 14])
  assert t.study_ids == ('1', '2') and t.values.dtype == np.int8
  with pytest.raises(ValueError):
    labels.FindingLabels(('a',), np.zeros((1, 13), np.int8))


def _config(**findings):
  c = config_lib.default_config()
  for k, v in findings.items():
    c.findings[k] = v
  return c


def test_study_labels_from_a_file(tmp_path, caplog):
  path = str(tmp_path / 'labels.csv')
  labels.write_chexpert(path, labels.from_rows(['1', '2'], [[POSITIVE] * 14, [NEGATIVE] * 14]))
  c = _config(labels_file=path, id_prefix='s')
  with caplog.at_level(logging.WARNING):
    got = source.study_labels(c, ['s2', 's9', 's1'])
  assert got.study_ids == ('s2', 's9', 's1')
  assert got.values[:, 0].tolist() == [NEGATIVE, NOT_MENTIONED, POSITIVE]
  assert '1 of 3 studies have no finding labels' in caplog.text


def test_study_labels_from_a_manifests_findings(tmp_path):
  manifest = tmp_path / 'manifest.jsonl'
  rows = [
      {'study_id': 'a', 'findings': 'Large left pleural effusion.'},
      {'study_id': 'b', 'findings': ''},
      {'study_id': 'c', 'findings': 'Possible pneumonia. No pneumothorax.'},
  ]
  manifest.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  c = _config()
  c.export.manifest = str(manifest)
  got = source.study_labels(c, ['c', 'a', 'b', 'z'])
  pe, pn, ptx = (OBSERVATIONS.index(o) for o in ('Pleural Effusion', 'Pneumonia', 'Pneumothorax'))
  assert got.study_ids == ('c', 'a', 'b', 'z')
  assert got.values[0, [pn, ptx, 0]].tolist() == [UNCERTAIN, NEGATIVE, NEGATIVE]
  assert got.values[1, [pe, 0]].tolist() == [POSITIVE, NEGATIVE]
  assert (got.values[2:] == NOT_MENTIONED).all()  # no text, and not in the manifest


def test_study_labels_needs_a_source():
  c = _config()
  c.export.manifest = ''
  with pytest.raises(ConfigError, match='findings.labels_file'):
    source.study_labels(c, ['a'])
