"""Study ids as file names: reversible, one path component, never outside the output folder."""

import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from jaxsae.formats import names

IDS = [
    '..',
    '.',
    '...',
    '../../x',
    '/abs/x',
    'p10/p10000/s50410',
    'C:\\Windows\\x',
    'é 中 🙂',
    '\ud800',  # a lone surrogate, as a JSON manifest can hold
    ' ',
    '\t\n',
    '',
    '%',
    '%2E',
    '~',
    'a~b',
    'name.png',
    '.hidden',
    'A_b-c.9',
    'x' * 180,
]


@pytest.mark.parametrize('study_id', IDS)
def test_round_trip_and_one_safe_component(study_id):
  name = names.encode(study_id)
  assert names.decode(name) == study_id
  assert name and name not in ('.', '..') and not name.startswith('.')
  assert '/' not in name and '\\' not in name and '\0' not in name
  assert name.isascii() and len(name) <= names.MAX_NAME
  assert os.path.basename(name) == name == os.path.normpath(name)


def test_plain_ids_keep_their_name_and_distinct_ids_get_distinct_names():
  assert names.encode('s50410') == 's50410' and names.encode('A_b-c.9') == 'A_b-c.9'
  assert names.encode('p10/p10000/s50410') == 'p10%2Fp10000%2Fs50410'
  assert names.encode('..') == '%2E.' and names.encode('') == '%'
  encoded = [names.encode(s) for s in IDS]
  assert len(set(encoded)) == len(IDS)


def test_long_ids_are_cut_with_a_hash():
  long_a, long_b = 'é' * 300, 'é' * 299 + 'e'
  a, b = names.encode(long_a), names.encode(long_b)
  assert a != b and len(a) <= names.MAX_NAME and len(b) <= names.MAX_NAME
  assert a.count('~') == 1 and a.split('~')[0].endswith('%A9')  # never cut inside a '%XX'
  assert names.encode(long_a) == a  # deterministic
  with pytest.raises(ValueError, match='hashed name'):
    names.decode(a)


@pytest.mark.parametrize('name', ['..', '.x', 'a/b', '%4', '%zz', '%41', 'a b', '%FF', 'é'])
def test_foreign_names_are_refused(name):
  with pytest.raises(ValueError, match='not a name'):
    names.decode(name)


def test_heatmap_images_land_inside_out(tmp_path):
  """interpret's X-ray copies: ids with '..', '/', an absolute path or unicode (which crashed it or
  wrote outside --out) give files inside out/images whose names decode to the id."""
  from jaxsae.interpret import pipeline  # pylint: disable=import-outside-toplevel

  ids = ['../../x', '/abs/x', 'p10/p10000/s50410', 'é 中', '..', '.', '%']
  rows = []
  for i, sid in enumerate(ids):
    path = tmp_path / 'xray' / f'{i}.png'
    path.parent.mkdir(exist_ok=True)
    Image.fromarray(np.full((40, 60), 30 * i, np.uint8)).save(path)
    rows.append({'study_id': sid, 'frontal': str(path)})
  manifest = tmp_path / 'manifest.jsonl'
  manifest.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  c = ml_collections.ConfigDict({'export': {'manifest': str(manifest)}})
  out = tmp_path / 'deep' / 'out'
  images = pipeline._Images(c, str(out), size=16)  # pylint: disable=protected-access
  for i, sid in enumerate(ids):
    rel = images({'study_id': sid}, 0)
    assert rel == pipeline.image_name(sid, 0) and rel.startswith('images' + os.sep)
    target = os.path.realpath(out / rel)
    assert os.path.dirname(target) == os.path.realpath(out / 'images')
    stem, image = os.path.basename(rel)[: -len('.png')].rsplit('_', 1)
    assert (names.decode(stem), image) == (sid, '0')
    with Image.open(target) as im:
      assert im.size == (16, 16) and im.getpixel((8, 8)) == 30 * i
  assert sorted(p.name for p in tmp_path.rglob('*.png') if 'xray' not in p.parts) == sorted(
      os.path.basename(pipeline.image_name(s, 0)) for s in ids
  )  # nothing written anywhere else, no temporary file left
