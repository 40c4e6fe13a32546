"""The static feature browser: files and escaping, then the real thing in headless Chromium.

The browser tests need Debian's chromium + chromium-driver (tools/install_browser.sh, run by
tools/test.sh) and selenium (the `test` extra). Missing ones FAIL the tests, so a broken browser
setup is never mistaken for a pass; JAXSAE_SKIP_BROWSER=1 skips them on purpose. Set
JAXSAE_BROWSER_SCREENSHOTS=DIR to keep the index and feature page screenshots.
"""

import html.parser
import io
import json
import os
import re
import shutil
import time

import numpy as np
import pytest
from PIL import Image

from jaxsae.interpret import browser

pytestmark = pytest.mark.browser

N = 30
DEAD = 7
IMAGE_FEATURE = 3  # heatmap over a real PNG, plus one whose image file is missing
GRID_ONLY_FEATURE = 5  # heatmap with image_file ''
EVIL_FEATURE = 11  # tokens that would inject elements if not escaped
ODD_EXPLANATION = 13  # explanation with markup, '&' and quotes
UNSCORED = 14  # explanation without a score
LONG_HIST = 4  # 25 histogram bins instead of 10
PAGE_SIZE = 12
WORDS = [
    'effusion',
    'cardiomegaly',
    'pneumothorax',
    'atelectasis',
    'edema',
    'consolidation',
    'nodule',
    'fracture',
]
EVIL = '<script>window.__pwned=1</script>'
EVIL_IMG = '"><img src=x onerror="window.__pwned=2">'
ODD_TEXT = 'Marks <b>bold</b> & "quoted" \'text\' about devices'
META = {
    'sae': 'maira2_l15_ef4 <test>',
    'features': N,
    'dead': 1,
    'tokens processed': 1234567,
    'threshold': 0.25,
}
HEAT_ROWS, HEAT_COLS, CELL = 6, 8, 20  # the PNG is HEAT_COLS*CELL x HEAT_ROWS*CELL
HOT_CELLS = {(1, 2): 4.0, (4, 6): 2.0, (0, 0): 1.0, (5, 7): 0.5}


# --------------------------------------------------------------------------------------------------
# A small synthetic site
# --------------------------------------------------------------------------------------------------


def _word(f):
  return WORDS[f % len(WORDS)]


def _example(f, act, target_token, seed):
  rng = np.random.default_rng(seed)
  tokens = ['\u2581The', '\u2581small', f'\u2581{target_token}', '\u2581is', '\u2581seen', '.']
  if f == EVIL_FEATURE:
    tokens = ['\u2581a', EVIL, EVIL_IMG, '\u2581&amp;', '\u2581"q"', '\n']
  target = 1 if f == EVIL_FEATURE else 2
  acts = [round(float(a), 3) for a in rng.uniform(0, act / 2, len(tokens))]
  acts[0] = 0.0
  acts[target] = act
  return {
      'study_id': f's{seed % 5}',
      'row': seed,
      'position': 10 + seed % 7,
      'kind': 'report',
      'activation': act,
      'tokens': tokens,
      'acts': acts,
      'target': target,
  }


def make_record(f):
  if f == DEAD:
    return {
        'feature': f,
        'density': 0.0,
        'count': 0,
        'mean': 0.0,
        'max': 0.0,
        'kind_counts': {},
        'histogram': {'edges': [], 'counts': []},
        'top': [],
        'quantiles': [],
        'negatives': [],
        'heatmaps': [],
        'promoted_tokens': [],
    }
  mx = ((f * 11) % N + 1) * 0.5
  bins = 25 if f == LONG_HIST else 10
  counts = [(f + 3 * i) % 9 + 1 for i in range(bins)]
  top = [
      _example(f, mx * s, t, 100 * f + i)
      for i, (s, t) in enumerate([(1.0, _word(f)), (0.9, _word(f)), (0.8, 'the')])
  ]
  quantiles = [[_example(f, mx * q, _word(f), 1000 * f + k)] for k, q in enumerate((0.1, 0.4, 0.7))]
  negatives = [dict(_example(f, 0.0, 'lung', 5000 + f), acts=[0.0] * 6, activation=0.0)]
  record = {
      'feature': f,
      'density': ((f * 7) % N + 1) / 1000,
      'count': 10 * (f + 1),
      'mean': mx / 3,
      'max': mx,
      'kind_counts': {'report': 8 * (f + 1), 'prompt': 2 * (f + 1)},
      'histogram': {'edges': list(np.linspace(0, mx, bins + 1)), 'counts': counts},
      'top': top,
      'quantiles': quantiles,
      'negatives': negatives,
      'heatmaps': [],
      'promoted_tokens': [['\u2581' + _word(f), 2.5], ['<eos>', 1.25]] if f % 2 else [],
  }
  if f in (IMAGE_FEATURE, GRID_ONLY_FEATURE):
    record['kind_counts'] = {'image': 10 * (f + 1)}
  if f == IMAGE_FEATURE:
    grid = [[0.0] * HEAT_COLS for _ in range(HEAT_ROWS)]
    for (r, c), v in HOT_CELLS.items():
      grid[r][c] = v
    record['heatmaps'] = [
        {
            'study_id': 's3',
            'image': 0,
            'image_file': 'images/s3 frontal.png',
            'grid': grid,
            'max': 4.0,
        },
        {
            'study_id': 's4',
            'image': 1,
            'image_file': 'images/missing.png',
            'grid': grid,
            'max': 4.0,
        },
    ]
  if f == GRID_ONLY_FEATURE:
    record['heatmaps'] = [
        {
            'study_id': 's5',
            'image': 0,
            'image_file': '',
            'grid': [[0.0, 1.0, 0.0, 2.0]] * 4,
            'max': 2.0,
        }
    ]
  return record


def make_explanations():
  out = {}
  for f in range(N):
    if (f % 3 == 0 and f != IMAGE_FEATURE) or f == DEAD:
      continue
    score = {
        'balanced_accuracy': round(0.5 + ((f * 13) % 50) / 100, 3),
        'tp': 8,
        'fp': 2,
        'tn': 9,
        'fn': 1,
        'unparsed': 0,
    }
    out[f] = {
        'feature': f,
        'explanation': f'mentions of {_word(f)}',
        'score': None if f == UNSCORED else score,
        'explainer': 'test:echo',
        'scorer': 'test:echo',
    }
  out[ODD_EXPLANATION]['explanation'] = ODD_TEXT
  return out


# A small alignment.json (jaxsae/interpret/alignment.py's contract): three findings, one with a
# probe curve, one whose name needs escaping, one without figures.
CARDIO, ODD_FINDING, PNEUMO = 'Cardiomegaly', 'Lung <i>Opacity</i> & "x"', 'Pneumothorax'
TOO_FEW = 'too few positives (2 positive studies, 5 needed)'


def _entry(finding, kind, auroc, precision, recall, fired=30):
  return {
      'finding': finding,
      'kind': kind,
      'auroc': auroc,
      'precision': precision,
      'recall': recall,
      'fired': fired,
  }


def _top(feature, kind, auroc, precision, recall):
  return {
      'feature': feature,
      'kind': kind,
      'auroc': auroc,
      'precision': precision,
      'recall': recall,
  }


def make_alignment():
  return {
      'findings': [CARDIO, ODD_FINDING, PNEUMO],
      'kinds': ['report', 'image', 'any'],
      'uncertain': 'exclude',
      'coverage_auroc': 0.9,
      'studies': {
          'total': 200,
          'labelled': 190,
          'positives': {CARDIO: 40, ODD_FINDING: 12, PNEUMO: 2},
          'negatives': {CARDIO: 150, ODD_FINDING: 178, PNEUMO: 188},
          'uncertain': {CARDIO: 3, ODD_FINDING: 0, PNEUMO: 0},
      },
      'features': {
          '2': [
              _entry(CARDIO, 'report', 0.95, 0.8, 0.9, 45),
              _entry(ODD_FINDING, 'any', 0.62, None, 0.5),  # below the filter's AUROC
          ],
          '5': [_entry(CARDIO, 'image', 0.91, 0.7, 0.85)],
          '9': [
              _entry(ODD_FINDING, 'report', 0.88, 0.6, 0.75),
              _entry(CARDIO, 'report', 0.81, 0.5, 0.4),
          ],
          '12': [_entry(ODD_FINDING, 'report', 0.76, 0.3, 0.2)],
          '15': [_entry(CARDIO, 'report', 0.78, 0.45, 0.3)],  # aligned by AUROC alone
          '16': [_entry(CARDIO, 'report', 0.6, 0.2, 0.1)],  # not aligned
          '20': [_entry(CARDIO, 'any', 0.7, 0.25, 0.2)],  # aligned as one of the top features
      },
      'by_finding': {
          CARDIO: {
              'positives': 40,
              'negatives': 150,
              'reason': None,
              'features': [
                  _top(2, 'report', 0.95, 0.8, 0.9),
                  _top(5, 'image', 0.91, 0.7, 0.85),
                  _top(9, 'report', 0.81, 0.5, 0.4),
                  _top(20, 'any', 0.7, 0.25, 0.2),
                  _top(DEAD, 'any', 0.6, None, None),
              ],
              'probe': {
                  'k': [1, 2, 5],
                  'accuracy': [0.85, 0.9, 0.92],
                  'balanced_accuracy': [0.7, 0.8, None],
                  'auroc': [0.9, 0.94, 0.97],
                  'features': [[2], [2, 5], [2, 5, 9, 20, DEAD]],
                  'train_studies': 150,
                  'test_studies': 40,
                  'majority_accuracy': 0.85,
              },
          },
          ODD_FINDING: {
              'positives': 12,
              'negatives': 178,
              'reason': None,
              'features': [_top(9, 'report', 0.88, 0.6, 0.75), _top(12, 'report', 0.76, 0.3, 0.2)],
              'probe': None,
          },
          PNEUMO: {
              'positives': 2,
              'negatives': 188,
              'reason': TOO_FEW,
              'features': [],
              'probe': None,
          },
      },
      'coverage': {'covered': [CARDIO], 'count': 1, 'of': 2, 'threshold': 0.9},
  }


# The index's finding filter: live features aligned with each finding, by AUROC.
ALIGNED = {CARDIO: [2, 5, 9, 15, 20], ODD_FINDING: [9, 12], PNEUMO: []}
SLUGS = {CARDIO: 'cardiomegaly', ODD_FINDING: 'lung-i-opacity-i-x', PNEUMO: 'pneumothorax'}


def write_png(path):
  """A grey vertical gradient (no red in it), so the overlay's red cells are detectable."""
  y = np.linspace(40, 200, HEAT_ROWS * CELL).astype(np.uint8)
  img = np.repeat(np.repeat(y[:, None], HEAT_COLS * CELL, axis=1)[:, :, None], 3, axis=2)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(img).save(path)


def build_site(out_dir, records=None, explanations=None, page_size=PAGE_SIZE, alignment=None):
  write_png(os.path.join(out_dir, 'images', 's3 frontal.png'))
  records = [make_record(f) for f in range(N)] if records is None else records
  explanations = make_explanations() if explanations is None else explanations
  # Records in a shuffled order: the site must not rely on them arriving sorted.
  order = np.random.default_rng(0).permutation(len(records))
  return browser.write_site(
      str(out_dir),
      (records[i] for i in order),
      explanations,
      title='Test <SAE> browser',
      meta=META,
      page_size=page_size,
      alignment=alignment,
  )


@pytest.fixture(scope='module')
def site(tmp_path_factory):
  out = tmp_path_factory.mktemp('site')
  index = build_site(out)
  return {
      'dir': str(out),
      'index': index,
      'records': {f: make_record(f) for f in range(N)},
      'explanations': make_explanations(),
  }


@pytest.fixture(scope='module')
def aligned_site(tmp_path_factory):
  out = tmp_path_factory.mktemp('aligned')
  return {'dir': str(out), 'index': build_site(out, alignment=make_alignment())}


def index_rows(index_path):
  text = open(index_path, encoding='utf-8').read()
  m = re.search(r'<script type="application/json" id="feature-data">(.*?)</script>', text, re.S)
  return json.loads(m.group(1))


class _Tags(html.parser.HTMLParser):
  """Start tags (with attributes) of a document, as the HTML parser sees them."""

  def __init__(self, text):
    super().__init__()
    self.tags = []
    self.feed(text)

  def handle_starttag(self, tag, attrs):
    self.tags.append((tag, dict(attrs)))


def tags(path, name):
  return [a for t, a in _Tags(open(path, encoding='utf-8').read()).tags if t == name]


# --------------------------------------------------------------------------------------------------
# Without a browser
# --------------------------------------------------------------------------------------------------


def test_site_layout_pages_for_live_features_only(site):
  d = site['dir']
  assert site['index'] == os.path.join(d, 'index.html') and os.path.isfile(site['index'])
  pages = sorted(os.listdir(os.path.join(d, 'features')))
  assert pages == sorted(f'{f}.html' for f in range(N) if f != DEAD)
  for name in ('style.css', 'index.js', 'feature.js', 'nav.js'):
    assert os.path.getsize(os.path.join(d, 'static', name)) > 0
  nav = open(os.path.join(d, 'static', 'nav.js')).read()
  assert json.loads(nav[nav.index('[') : nav.rindex(']') + 1]) == [f for f in range(N) if f != DEAD]
  # Nothing on any page points outside the site (no CDN, no network).
  for name in pages + ['../index.html']:
    text = open(os.path.join(d, 'features', name), encoding='utf-8').read()
    assert not re.search(r'(src|href)="(https?:)?//', text), name


def test_index_embeds_compact_rows(site):
  data = index_rows(site['index'])
  assert data['pageSize'] == PAGE_SIZE and list(data['fields']) == list(browser.ROW_FIELDS)
  rows = {r[0]: dict(zip(data['fields'], r)) for r in data['rows']}
  assert [r[0] for r in data['rows']] == list(range(N))
  assert rows[DEAD]['count'] == 0 and rows[DEAD]['explanation'] is None
  assert rows[ODD_EXPLANATION]['explanation'] == ODD_TEXT
  assert rows[UNSCORED]['score'] is None and rows[UNSCORED]['explanation'] is not None
  assert rows[2]['score'] == site['explanations'][2]['score']['balanced_accuracy']
  assert rows[0]['explanation'] is None
  assert rows[2]['tokens'].split(' · ') == ['pneumothorax', 'the']
  assert rows[IMAGE_FEATURE]['kind'] == 'image' and rows[2]['kind'] == 'report'
  assert rows[2]['density'] == pytest.approx(site['records'][2]['density'], rel=1e-3)
  text = open(site['index'], encoding='utf-8').read()
  for key, value in [('sae', 'maira2_l15_ef4 &lt;test&gt;'), ('tokens processed', '1,234,567')]:
    assert f'<dt>{key}</dt><dd>{value}</dd>' in text


def test_text_is_escaped_everywhere(site):
  d = site['dir']
  index_text = open(site['index'], encoding='utf-8').read()
  # The embedded JSON cannot close its <script>: exactly the two real closing tags remain.
  assert index_text.lower().count('</script') == 2
  assert '<b>bold' not in index_text and EVIL not in index_text
  assert [a.get('id') for a in tags(site['index'], 'script')] == ['feature-data', None]
  page = os.path.join(d, 'features', f'{EVIL_FEATURE}.html')
  text = open(page, encoding='utf-8').read()
  assert EVIL not in text and '<img src=x' not in text
  assert '&lt;script&gt;window.__pwned=1&lt;/script&gt;' in text
  assert [a['src'] for a in tags(page, 'script')] == ['../static/nav.js', '../static/feature.js']
  assert tags(page, 'img') == []
  odd = open(os.path.join(d, 'features', f'{ODD_EXPLANATION}.html'), encoding='utf-8').read()
  assert 'Marks &lt;b&gt;bold&lt;/b&gt; &amp; &quot;quoted&quot; &#x27;text&#x27;' in odd
  assert (
      '<title>Feature 3 · Test &lt;SAE&gt; browser</title>'
      in open(os.path.join(d, 'features', '3.html'), encoding='utf-8').read()
  )


def test_histogram_and_heatmap_markup(site):
  d = site['dir']
  for f in (2, LONG_HIST):
    page = os.path.join(d, 'features', f'{f}.html')
    bars = [a for a in tags(page, 'rect') if a.get('class') == 'bar']
    assert len(bars) == len(site['records'][f]['histogram']['counts'])
  page = os.path.join(d, 'features', f'{IMAGE_FEATURE}.html')
  figures = [a for a in tags(page, 'figure') if a.get('class') == 'heatmap']
  assert [(a['data-rows'], a['data-cols'], a['data-cells']) for a in figures] == [
      (str(HEAT_ROWS), str(HEAT_COLS), str(len(HOT_CELLS)))
  ] * 2
  # The missing image is dropped (its grid is still drawn); the present one is URL-quoted.
  assert [a['src'] for a in tags(page, 'img')] == ['../images/s3%20frontal.png']
  assert tags(os.path.join(d, 'features', f'{GRID_ONLY_FEATURE}.html'), 'img') == []
  assert 'No activations.' not in open(page, encoding='utf-8').read()


def test_rerun_removes_pages_of_features_that_died(tmp_path):
  records = [make_record(f) for f in range(4)]
  build_site(tmp_path, records, {})
  (tmp_path / 'features' / 'notes.txt').write_text('not ours')
  records[2] = {**make_record(DEAD), 'feature': 2}
  build_site(tmp_path, records, {})
  assert sorted(os.listdir(tmp_path / 'features')) == ['0.html', '1.html', '3.html', 'notes.txt']
  assert 'window.LIVE_FEATURES = [0,1,3];' in (tmp_path / 'static' / 'nav.js').read_text()


def test_bad_input_is_refused_and_empty_input_works(tmp_path):
  with pytest.raises(ValueError, match='feature 1 appears twice'):
    browser.write_site(str(tmp_path), [make_record(1), make_record(1)], {}, title='t', meta={})
  with pytest.raises(ValueError, match='page_size'):
    browser.write_site(str(tmp_path), [], {}, title='t', meta={}, page_size=0)
  index = browser.write_site(str(tmp_path / 'empty'), [], {}, title='t', meta={})
  assert index_rows(index)['rows'] == []
  # Non-finite numbers would make the embedded JSON unparsable; they become null.
  rec = {**make_record(1), 'mean': float('nan')}
  index = browser.write_site(str(tmp_path / 'nan'), [rec], {}, title='t', meta={})
  assert index_rows(index)['rows'][0][3] is None


# --------------------------------------------------------------------------------------------------
# In headless Chromium
# --------------------------------------------------------------------------------------------------

CHROMIUM = os.environ.get('JAXSAE_CHROMIUM', '/usr/bin/chromium')
CHROMEDRIVER = os.environ.get('JAXSAE_CHROMEDRIVER', '/usr/bin/chromedriver')
WINDOW = (1280, 1400)


@pytest.fixture(scope='module')
def driver():
  if os.environ.get('JAXSAE_SKIP_BROWSER') == '1':
    pytest.skip('JAXSAE_SKIP_BROWSER=1: headless Chromium tests skipped on purpose')
  missing = [
      p for p in (CHROMIUM, CHROMEDRIVER) if not (os.path.isfile(p) and os.access(p, os.X_OK))
  ]
  try:
    from selenium import webdriver  # pylint: disable=import-outside-toplevel
    from selenium.webdriver.chrome.service import Service  # pylint: disable=import-outside-toplevel
  except ImportError:
    missing.append('the selenium Python package')
  if missing:
    pytest.fail(
        f'the browser tests need {", ".join(missing)}: run `bash tools/test.sh` (it '
        'installs them; tools/install_browser.sh installs chromium and chromium-driver '
        'alone), or set JAXSAE_SKIP_BROWSER=1 to skip these tests on purpose.',
        pytrace=False,
    )
  opts = webdriver.ChromeOptions()
  opts.binary_location = CHROMIUM
  for arg in (
      '--headless=new',
      '--no-sandbox',
      '--disable-dev-shm-usage',
      '--disable-gpu',
      f'--window-size={WINDOW[0]},{WINDOW[1]}',
      '--force-device-scale-factor=1',
      '--hide-scrollbars',
      '--disable-extensions',
      '--no-first-run',
  ):
    opts.add_argument(arg)
  opts.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
  d = webdriver.Chrome(options=opts, service=Service(executable_path=CHROMEDRIVER))
  d.set_page_load_timeout(60)
  yield d
  d.quit()


def url(path, fragment=''):
  return 'file://' + os.path.abspath(path) + (f'#{fragment}' if fragment else '')


def severe(driver):
  """SEVERE entries of the browser log since the last call (uncaught errors, failed loads)."""
  return [e['message'] for e in driver.get_log('browser') if e['level'] == 'SEVERE']


def load(driver, path, fragment=''):
  """Open a page from disk and insist it logged no errors."""
  severe(driver)  # drain whatever an earlier page left
  driver.get(url(path, fragment))
  errors = severe(driver)
  assert not errors, f'{path}: browser errors {errors}'


def shown_ids(driver):
  return driver.execute_script(
      "return Array.from(document.querySelectorAll('#features tbody tr'), tr => +tr.dataset.id);"
  )


def status(driver):
  return driver.find_element('id', 'status').text


def live(site):
  return [f for f in range(N) if site['records'][f]['count'] > 0]


def expected_search(site, query):
  """What the search box must show: every term in explanation or top tokens, or equal to the id."""
  rows = {r[0]: r for r in index_rows(site['index'])['rows']}
  out = []
  for f in live(site):
    text = ((rows[f][5] or '') + ' \n ' + rows[f][7]).lower()

    def ok(t, f=f, text=text):
      m = re.fullmatch(r'#?(\d+)', t)
      return bool(m and int(m.group(1)) == f) or (not t.startswith('#') and t in text)

    if all(ok(t) for t in query.lower().split()):
      out.append(f)
  return out


def test_console_error_check_catches_broken_pages(driver, tmp_path):
  """The no-errors check of every other browser test is only worth something if it can fail."""
  bad = tmp_path / 'bad.html'
  bad.write_text(
      '<!DOCTYPE html><title>bad</title><link rel="icon" href="data:,">'
      '<script>definitelyNotDefined();</script>'
  )
  with pytest.raises(AssertionError, match='definitelyNotDefined'):
    load(driver, bad)
  missing = tmp_path / 'missing.html'
  missing.write_text(
      '<!DOCTYPE html><title>m</title><link rel="icon" href="data:,">' '<img src="nope.png">'
  )
  with pytest.raises(AssertionError, match='ERR_FILE_NOT_FOUND'):
    load(driver, missing)
  good = tmp_path / 'good.html'
  good.write_text('<!DOCTYPE html><title>g</title><link rel="icon" href="data:,"><p>fine')
  load(driver, good)


def test_index_loads_with_summary_and_first_page(driver, site):
  load(driver, site['index'])
  assert driver.title == 'Test <SAE> browser'
  meta = driver.find_element('id', 'meta').text
  assert 'maira2_l15_ef4 <test>' in meta and '1,234,567' in meta
  assert '1 never fired in the store' in driver.find_element('id', 'counts').text
  assert shown_ids(driver) == live(site)[:PAGE_SIZE]
  assert status(driver) == f'showing 1–{PAGE_SIZE} of {N - 1} matching ({N} features)'
  assert driver.find_element('id', 'prev-page').get_property('disabled')
  driver.find_element('id', 'next-page').click()
  assert shown_ids(driver) == live(site)[PAGE_SIZE : 2 * PAGE_SIZE]
  first = driver.find_element('css selector', '#features tbody tr td.id a')
  assert first.get_attribute('href').endswith(f'/features/{live(site)[PAGE_SIZE]}.html')


@pytest.mark.parametrize(
    'query',
    [
        'effusion',
        'PNEUMOTHORAX',
        '#12',
        '12',
        'mentions the',
        '<script>',
        'bold devices',
        'nothing-matches-this',
    ],
)
def test_search_filters_rows(driver, site, query):
  load(driver, site['index'])
  box = driver.find_element('id', 'search')
  box.send_keys(query)
  expected = expected_search(site, query)
  assert shown_ids(driver) == expected[:PAGE_SIZE]
  if expected:
    assert f'of {len(expected)} matching' in status(driver)
  else:
    assert status(driver).startswith('no matching features')
  assert (
      driver.execute_script("return new URLSearchParams(location.hash.slice(1)).get('q')") == query
  )
  # Spot checks that the rule itself is the intended one.
  if query == '#12':
    assert expected == [12]
  if query == 'effusion':
    assert expected == [f for f in live(site) if _word(f) == 'effusion']
  if query == '<script>':
    assert expected == [EVIL_FEATURE]


def test_dead_features_listed_without_page(driver, site):
  load(driver, site['index'])
  driver.find_element('id', 'search').send_keys(f'#{DEAD}')
  assert shown_ids(driver) == []
  driver.find_element('id', 'show-dead').click()
  assert shown_ids(driver) == [DEAD]
  row = driver.find_element('css selector', '#features tbody tr')
  assert 'dead' in row.get_attribute('class')
  assert row.find_elements('tag name', 'a') == []


def sort_expected(site, key, direction):
  rows = [r for r in index_rows(site['index'])['rows'] if r[2] > 0]
  col = browser.ROW_FIELDS.index(key)
  have = [r for r in rows if r[col] is not None]
  none = [r[0] for r in rows if r[col] is None]
  norm = (lambda v: v.lower()) if key == 'explanation' else (lambda v: v)
  have.sort(key=lambda r: r[0])
  have.sort(key=lambda r: norm(r[col]), reverse=direction < 0)  # stable: ties stay by id
  return [r[0] for r in have] + none


def test_sort_headers(driver, site):
  load(driver, site['index'])

  def click(key):
    driver.find_element('css selector', f'#features th[data-key="{key}"]').click()

  click('density')  # numbers: largest first on the first click
  expected = sort_expected(site, 'density', -1)
  assert shown_ids(driver) == expected[:PAGE_SIZE]
  densities = [float(e.text) for e in driver.find_elements('css selector', 'td.density')]
  assert densities == sorted(densities, reverse=True)
  driver.find_element('id', 'next-page').click()
  assert shown_ids(driver) == expected[PAGE_SIZE : 2 * PAGE_SIZE]
  assert 'sort=density' in driver.current_url
  click('density')  # again: ascending, back on page 1
  assert shown_ids(driver) == sort_expected(site, 'density', 1)[:PAGE_SIZE]
  assert (
      driver.find_element('css selector', 'th[data-key="density"]').get_attribute('aria-sort')
      == 'ascending'
  )
  click('score')  # unscored and unexplained features last
  expected = sort_expected(site, 'score', -1)
  assert shown_ids(driver) == expected[:PAGE_SIZE]
  assert expected[0] == max(
      site['explanations'],
      key=lambda f: (site['explanations'][f]['score'] or {}).get('balanced_accuracy', -1),
  )
  click('explanation')
  assert shown_ids(driver) == sort_expected(site, 'explanation', 1)[:PAGE_SIZE]
  click('max')
  assert shown_ids(driver) == sort_expected(site, 'max', -1)[:PAGE_SIZE]
  click('id')
  assert shown_ids(driver) == live(site)[:PAGE_SIZE]
  click('id')
  assert shown_ids(driver) == live(site)[::-1][:PAGE_SIZE]


def test_view_state_restored_from_url(driver, site):
  """Coming back from a feature page shows the same search and order."""
  load(driver, site['index'], 'q=mentions&sort=score&dir=-1')
  assert driver.find_element('id', 'search').get_property('value') == 'mentions'
  expected = [f for f in sort_expected(site, 'score', -1) if f in expected_search(site, 'mentions')]
  assert shown_ids(driver) == expected[:PAGE_SIZE]


def test_index_escapes_text(driver, site):
  load(driver, site['index'])
  driver.find_element('id', 'search').send_keys('devices')
  assert shown_ids(driver) == [ODD_EXPLANATION]
  cell = driver.find_element('css selector', '#features tbody td.explanation')
  assert cell.text == ODD_TEXT
  assert driver.find_elements('css selector', '#features b') == []
  load(driver, site['index'])
  driver.find_element('id', 'search').send_keys(f'#{EVIL_FEATURE}')
  assert EVIL in driver.find_element('css selector', '#features tbody td.tokens').text
  assert driver.execute_script('return window.__pwned === undefined')
  assert len(driver.find_elements('tag name', 'script')) == 2


def test_feature_page_tokens_stats_histogram(driver, site):
  f = LONG_HIST
  rec = site['records'][f]
  load(driver, os.path.join(site['dir'], 'features', f'{f}.html'))
  assert driver.find_element('tag name', 'h1').text == f'Feature {f}'
  assert 'mentions of edema' in driver.find_element('id', 'explanation').text
  stats = driver.find_element('id', 'stats').text
  assert f'count {rec["count"]}' in stats and 'report tokens' in stats
  # Histogram: one bar per bin inside a 600x160 SVG, the tallest bar on the largest count.
  svg = driver.find_element('css selector', 'svg.hist')
  assert (svg.rect['width'], svg.rect['height']) == (browser.HIST_WIDTH, browser.HIST_HEIGHT)
  heights = driver.execute_script(
      "return Array.from(document.querySelectorAll('svg.hist rect.bar'), "
      'r => r.getBoundingClientRect().height);'
  )
  counts = rec['histogram']['counts']
  assert len(heights) == len(counts) == 25
  np.testing.assert_allclose(
      np.array(heights) / max(heights), np.array(counts) / max(counts), atol=0.02
  )
  # Top examples: highest first, a span per token, the target emphasised, shading by activation.
  examples = driver.find_elements('css selector', '#top .example')
  assert len(examples) == len(rec['top'])
  ex = rec['top'][0]
  spans = examples[0].find_elements('css selector', '.tok')
  assert len(spans) == len(ex['tokens'])
  target = examples[0].find_element('css selector', '.tok.target')
  assert driver.execute_script('return arguments[0].textContent', target) == ' edema'  # '\u2581'
  assert driver.execute_script('return getComputedStyle(arguments[0]).fontWeight', target) == '700'
  alphas = driver.execute_script(
      "return Array.from(arguments[0].querySelectorAll('.tok'), s => {"
      '  const m = getComputedStyle(s).backgroundColor.match(/[\\d.]+/g).map(Number);'
      '  return m.length === 4 ? m[3] : (m.length === 3 ? 1 : 0); });',
      examples[0],
  )
  expected = [min(a / rec['max'], 1.0) for a in ex['acts']]
  np.testing.assert_allclose(
      alphas, [round(a, 2) if a >= 0.005 else 0 for a in expected], atol=0.01
  )
  assert alphas[ex['target']] == max(alphas) and alphas[0] == 0
  shown = browser._fmt(ex['acts'][ex['target']])  # pylint: disable=protected-access
  assert target.get_attribute('title').startswith(shown)
  sections = driver.find_elements('css selector', '#quantiles h3')
  assert [s.text.split(' (')[0] for s in sections] == ['Bin 3 of 3', 'Bin 2 of 3', 'Bin 1 of 3']


def test_heatmap_overlay_covers_the_image(driver, site):
  load(driver, os.path.join(site['dir'], 'features', f'{IMAGE_FEATURE}.html'))
  figures = driver.find_elements('css selector', 'figure.heatmap')
  assert len(figures) == 2
  img = figures[0].find_element('tag name', 'img')
  assert (
      driver.execute_script('return arguments[0].complete && arguments[0].naturalWidth', img)
      == HEAT_COLS * CELL
  )
  svg = figures[0].find_element('css selector', 'svg.hm-grid')
  for k in ('x', 'y', 'width', 'height'):
    assert svg.rect[k] == pytest.approx(img.rect[k], abs=0.5), k
  assert img.rect['width'] == browser.HEATMAP_WIDTH
  assert img.rect['height'] == pytest.approx(browser.HEATMAP_WIDTH * HEAT_ROWS / HEAT_COLS, abs=1)
  cells = figures[0].find_elements('css selector', 'svg.hm-grid rect')
  assert len(cells) == len(HOT_CELLS)
  cw, ch = img.rect['width'] / HEAT_COLS, img.rect['height'] / HEAT_ROWS
  for cell_el, ((r, c), _) in zip(cells, sorted(HOT_CELLS.items())):
    box = cell_el.rect
    assert (box['x'] - img.rect['x'], box['y'] - img.rect['y']) == pytest.approx(
        (c * cw, r * ch), abs=1
    )
    assert (box['width'], box['height']) == pytest.approx((cw, ch), abs=1)
  # In the pixels: hot cells are tinted red over the (grey) X-ray, cold cells show it unchanged.
  shot = np.asarray(
      Image.open(
          io.BytesIO(figures[0].find_element('css selector', '.hm-wrap').screenshot_as_png)
      ).convert('RGB'),
      dtype=int,
  )
  sy, sx = shot.shape[0] / HEAT_ROWS, shot.shape[1] / HEAT_COLS

  def pixel(r, c):
    return shot[int((r + 0.5) * sy), int((c + 0.5) * sx)]

  hot, cold = pixel(1, 2), pixel(2, 2)
  assert hot[0] - hot[2] > 100, hot  # strongly red
  assert abs(cold[0] - cold[2]) < 8 and cold[0] > 40, cold  # grey image visible through
  assert pixel(5, 7)[0] - pixel(5, 7)[2] < hot[0] - hot[2]  # weaker activation, lighter tint
  # The heatmap whose image file is missing: the grid alone, with the grid's aspect ratio.
  assert figures[1].find_elements('tag name', 'img') == []
  wrap = figures[1].find_element('css selector', '.hm-wrap').rect
  assert wrap['height'] == pytest.approx(wrap['width'] * HEAT_ROWS / HEAT_COLS, abs=1)
  assert len(figures[1].find_elements('css selector', 'svg.hm-grid rect')) == len(HOT_CELLS)
  promoted = driver.find_elements('css selector', '#promoted li')
  assert [p.text.split()[0] for p in promoted] == [_word(IMAGE_FEATURE), '<eos>']


def test_grid_only_heatmap(driver, site):
  load(driver, os.path.join(site['dir'], 'features', f'{GRID_ONLY_FEATURE}.html'))
  wrap = driver.find_element('css selector', '.hm-wrap')
  assert wrap.rect['width'] == browser.HEATMAP_WIDTH
  assert wrap.rect['height'] == pytest.approx(browser.HEATMAP_WIDTH, abs=1)  # 4 x 4 grid
  assert len(wrap.find_elements('css selector', 'rect')) == 8
  assert driver.find_elements('id', 'promoted') != []


def test_feature_page_escapes_tokens(driver, site):
  load(driver, os.path.join(site['dir'], 'features', f'{EVIL_FEATURE}.html'))
  assert driver.execute_script('return window.__pwned === undefined')
  assert driver.find_elements('css selector', 'img') == []
  assert len(driver.find_elements('tag name', 'script')) == 2
  target = driver.find_element('css selector', '#top .example .tok.target')
  assert driver.execute_script('return arguments[0].textContent', target) == EVIL
  spans = driver.find_element('css selector', '#top .example').find_elements('css selector', '.tok')
  assert driver.execute_script('return arguments[0].textContent', spans[2]) == EVIL_IMG
  assert EVIL in target.get_attribute('title')


def test_prev_next_skip_dead_features(driver, site):
  # pylint: disable=import-outside-toplevel
  from selenium.webdriver.common.action_chains import ActionChains
  from selenium.webdriver.common.keys import Keys

  def feature(f):
    return os.path.join(site['dir'], 'features', f'{f}.html')

  load(driver, feature(DEAD - 1))
  driver.find_element('id', 'next').click()
  wait_for_heading(driver, f'Feature {DEAD + 1}')
  assert not severe(driver)
  driver.find_element('id', 'prev').click()
  wait_for_heading(driver, f'Feature {DEAD - 1}')
  ActionChains(driver).send_keys(Keys.ARROW_RIGHT).perform()
  wait_for_heading(driver, f'Feature {DEAD + 1}')
  load(driver, feature(0))
  assert not driver.find_element('id', 'prev').is_displayed()
  assert driver.find_element('id', 'next').get_attribute('href').endswith('/features/1.html')
  load(driver, feature(N - 1))
  assert not driver.find_element('id', 'next').is_displayed()
  driver.find_element('id', 'to-index').click()
  wait_for_heading(driver, 'Test <SAE> browser')
  assert len(shown_ids(driver)) == PAGE_SIZE and not severe(driver)


def wait_for_heading(driver, text, timeout=10):
  """Wait for a navigation started by a click or key to land on the page headed `text`."""
  deadline = time.time() + timeout
  while True:
    try:
      if driver.find_element('tag name', 'h1').text == text:
        return
    except Exception:  # pylint: disable=broad-except  # the old page went away mid-lookup
      pass
    assert time.time() < deadline, f'no page headed {text!r}; at {driver.current_url}'
    time.sleep(0.05)


def check_screenshot(png, name):
  assert len(png) > 20_000, len(png)
  img = Image.open(io.BytesIO(png))
  assert img.format == 'PNG' and img.size[0] == WINDOW[0] and img.size[1] > 800, img.size
  colors = img.convert('RGB').getcolors(maxcolors=1 << 20)
  assert colors is None or len(colors) > 50  # text, bars, tokens: far from one colour
  keep = os.environ.get('JAXSAE_BROWSER_SCREENSHOTS')
  if keep:
    os.makedirs(keep, exist_ok=True)
    with open(os.path.join(keep, name), 'wb') as f:
      f.write(png)


def test_screenshots(driver, site):
  load(driver, os.path.join(site['dir'], 'features', f'{IMAGE_FEATURE}.html'))
  check_screenshot(driver.get_screenshot_as_png(), 'browser_feature.png')
  load(driver, site['index'])
  check_screenshot(driver.get_screenshot_as_png(), 'browser_index.png')


def test_index_stays_fast_with_32k_features(driver, tmp_path):
  """32768 features (2048 live, all explained): one page of rows in the DOM, quick search/sort."""
  n, n_live = 32768, 2048
  rng = np.random.default_rng(1)
  live_ids = set(rng.choice(n, n_live, replace=False).tolist())

  def records():
    for f in range(n):
      if f in live_ids:
        yield {
            **make_record(0),
            'feature': f,
            'density': float(rng.uniform(1e-5, 1e-2)),
            'quantiles': [],
            'negatives': [],
            'top': make_record(0)['top'][:1],
        }
      else:
        yield {**make_record(DEAD), 'feature': f}

  explanations = {
      f: {
          'feature': f,
          'explanation': f'feature {f} fires on words like '
          f'{WORDS[f % 8]} in the findings section',
          'explainer': 'x',
          'scorer': 'x',
          'score': {
              'balanced_accuracy': float(rng.uniform(0.5, 1)),
              'tp': 1,
              'fp': 1,
              'tn': 1,
              'fn': 1,
              'unparsed': 0,
          },
      }
      for f in range(n)
  }
  start = time.perf_counter()
  index = browser.write_site(str(tmp_path), records(), explanations, title='big', meta={})
  written = time.perf_counter() - start
  assert os.path.getsize(index) < 6e6
  start = time.perf_counter()
  load(driver, index, 'dead=1')
  loaded = time.perf_counter() - start
  assert len(shown_ids(driver)) == 200 and f'of {n} matching' in status(driver)
  start = time.perf_counter()
  driver.find_element('css selector', 'th[data-key="density"]').click()
  ids = shown_ids(driver)
  sorted_in = time.perf_counter() - start
  assert set(ids) <= live_ids  # dead ones (density 0) sort last
  start = time.perf_counter()
  driver.find_element('id', 'search').send_keys('#12345')
  assert shown_ids(driver) == [12345]
  searched = time.perf_counter() - start
  print(
      f'32k index: write {written:.1f}s, load {loaded:.2f}s, sort {sorted_in:.2f}s, '
      f'search {searched:.2f}s, {os.path.getsize(index) / 1e6:.1f} MB'
  )
  assert loaded < 10 and sorted_in < 3 and searched < 5


ODD_IDS = ('p10/p10000/s50410', '../../x', '/abs/x', 'é 中 #?&', '%41', '.')


def test_heatmap_images_named_from_odd_study_ids_load(driver, tmp_path):
  """The pipeline's file names for ids with '/', '..', '%' or unicode stay inside the site and
  its links (URL-quoted) load them; an image_file outside the out dir is dropped."""
  from jaxsae.interpret.pipeline import image_name  # pylint: disable=import-outside-toplevel

  record = make_record(IMAGE_FEATURE)
  grid = record['heatmaps'][0]['grid']
  record['heatmaps'] = [
      {'study_id': s, 'image': 0, 'image_file': image_name(s, 0), 'grid': grid, 'max': 4.0}
      for s in ODD_IDS
  ]
  for m in record['heatmaps']:
    write_png(os.path.join(tmp_path, m['image_file']))
  write_png(str(tmp_path / 'outside.png'))
  site_dir = tmp_path / 'site'
  record['heatmaps'].append(dict(record['heatmaps'][0], image_file='../outside.png'))
  for m in record['heatmaps'][:-1]:  # the site is a folder below the images: move them in
    os.renames(os.path.join(tmp_path, m['image_file']), os.path.join(site_dir, m['image_file']))
  assert sorted(os.listdir(site_dir / 'images')) == sorted(
      os.path.basename(image_name(s, 0)) for s in ODD_IDS
  )
  browser.write_site(str(site_dir), [record], {}, title='odd ids', meta={})
  load(driver, site_dir / 'features' / f'{IMAGE_FEATURE}.html')
  figures = driver.find_elements('css selector', 'figure.heatmap')
  assert len(figures) == len(ODD_IDS) + 1
  widths = [
      driver.execute_script(
          'const i = arguments[0].querySelector("img"); return i ? i.naturalWidth : null', f
      )
      for f in figures
  ]
  assert widths == [HEAT_COLS * CELL] * len(ODD_IDS) + [None]


# --------------------------------------------------------------------------------------------------
# Clinical findings (alignment.json)
# --------------------------------------------------------------------------------------------------


def test_without_alignment_nothing_about_findings(site):
  d = site['dir']
  assert not os.path.exists(os.path.join(d, browser.FINDINGS_DIR))
  data = index_rows(site['index'])
  assert list(data['fields']) == list(browser.ROW_FIELDS) and 'findings' not in data
  for path in (site['index'], os.path.join(d, 'features', '2.html')):
    assert 'finding' not in open(path, encoding='utf-8').read().lower(), path


def test_alignment_pages_rows_and_escaping(aligned_site):
  d = aligned_site['dir']
  assert sorted(os.listdir(os.path.join(d, 'findings'))) == sorted(
      ['index.html'] + [f'{s}.html' for s in SLUGS.values()]
  )
  data = index_rows(aligned_site['index'])
  assert list(data['fields']) == list(browser.ROW_FIELDS + browser.FINDING_FIELDS)
  rows = {r[0]: dict(zip(data['fields'], r)) for r in data['rows']}
  assert (rows[2]['finding'], rows[2]['auroc']) == (CARDIO, 0.95)
  assert (rows[9]['finding'], rows[9]['auroc']) == (ODD_FINDING, 0.88)
  assert (rows[0]['finding'], rows[0]['auroc']) == (None, None)
  fd = data['findings']
  assert fd['names'] == [CARDIO, ODD_FINDING, PNEUMO]
  assert fd['slugs'] == [SLUGS[n] for n in fd['names']]
  assert {n: [e[0] for e in a] for n, a in fd['aligned'].items()} == {
      CARDIO: [2, 5, 9, 15, 20, DEAD],
      ODD_FINDING: [9, 12],
      PNEUMO: [],
  }
  pages = [aligned_site['index']] + [
      os.path.join(d, sub, name)
      for sub in ('features', 'findings')
      for name in os.listdir(os.path.join(d, sub))
  ]
  escaped = 'Lung &lt;i&gt;Opacity&lt;/i&gt; &amp; &quot;x&quot;'
  for path in pages:
    text = open(path, encoding='utf-8').read()
    assert '<i>' not in text and ODD_FINDING not in text, path
    assert not re.search(r'(src|href)="(https?:)?//', text), path
  for name in ('index.html', f'{SLUGS[ODD_FINDING]}.html'):
    assert escaped in open(os.path.join(d, 'findings', name), encoding='utf-8').read()
  assert escaped in open(os.path.join(d, 'features', '9.html'), encoding='utf-8').read()
  assert [a.get('id') for a in tags(aligned_site['index'], 'script')] == ['feature-data', None]
  for name in os.listdir(os.path.join(d, 'findings')):
    assert tags(os.path.join(d, 'findings', name), 'script') == []


def test_rerun_without_alignment_removes_findings_pages(tmp_path):
  records = [make_record(f) for f in range(4)]
  build_site(tmp_path, records, {}, alignment=make_alignment())
  assert os.path.isfile(tmp_path / 'findings' / 'cardiomegaly.html')
  build_site(tmp_path, records, {})
  assert not os.path.exists(tmp_path / 'findings')
  assert 'best finding' not in (tmp_path / 'index.html').read_text()


def test_bad_alignment_is_refused(tmp_path):
  for bad, match in [
      ({'by_finding': {}}, 'field "features" must be an object; got nothing'),
      ({'features': [], 'by_finding': {}}, 'field "features" must be an object; got list'),
      ({'features': {'x': []}, 'by_finding': {}}, '"features" keys must be feature ids'),
      ({'features': {'1': {}}, 'by_finding': {}}, r'"features"\["1"\] must be a list'),
      ({'features': {}, 'by_finding': {'A': 3}}, r'"by_finding"\["A"\] must be an object'),
  ]:
    with pytest.raises(ValueError, match=match):
      browser.write_site(str(tmp_path), [], {}, title='t', meta={}, alignment=bad)
  # The smallest valid dict: no findings, still a findings index.
  browser.write_site(
      str(tmp_path), [], {}, title='t', meta={}, alignment={'features': {}, 'by_finding': {}}
  )
  assert os.listdir(tmp_path / 'findings') == ['index.html']


def table_rows(driver, css):
  return driver.execute_script(
      'return Array.from(document.querySelectorAll(arguments[0]), tr => '
      'Array.from(tr.cells, td => td.textContent.trim()));',
      css,
  )


def test_feature_page_lists_its_findings(driver, aligned_site):
  d = aligned_site['dir']
  load(driver, os.path.join(d, 'features', '9.html'))
  assert table_rows(driver, '#findings table.findings tbody tr') == [
      [ODD_FINDING, 'report', '0.880', '0.600', '0.750', '30'],
      [CARDIO, 'report', '0.810', '0.500', '0.400', '30'],
  ]
  assert driver.find_elements('css selector', '#findings i') == []
  load(driver, os.path.join(d, 'features', '2.html'))
  assert table_rows(driver, '#findings tbody tr')[1] == [
      ODD_FINDING,
      'any',
      '0.620',
      '—',
      '0.500',
      '30',
  ]
  link = driver.find_element('css selector', '#findings tbody tr a.finding')
  assert link.get_attribute('href').endswith(f'/findings/{SLUGS[CARDIO]}.html')
  link.click()
  wait_for_heading(driver, CARDIO)
  assert not severe(driver)
  load(driver, os.path.join(d, 'features', '0.html'))
  assert 'No finding aligned' in driver.find_element('id', 'findings').text
  driver.find_element('id', 'to-findings').click()
  wait_for_heading(driver, 'Clinical findings')
  assert not severe(driver)


def test_findings_index_and_finding_pages(driver, aligned_site):
  d = aligned_site['dir']
  load(driver, os.path.join(d, 'findings', 'index.html'))
  rows = table_rows(driver, '#findings-table tbody tr')
  assert rows == [
      [CARDIO, '40', '150', '✓', '#2', '0.950', 'report', '0.800'],
      [ODD_FINDING, '12', '178', '', '#9', '0.880', 'report', '—'],
      [PNEUMO, '2', '188', '', TOO_FEW, '—'],
  ]
  assert '1 of 2 covered' in driver.find_element('id', 'coverage').text
  assert '200 studies · 190 labelled' in driver.find_element('id', 'studies').text
  assert driver.find_elements('css selector', 'i') == []
  # The probe curve: a point per k (a null is left out), the majority class as a reference line.
  load(driver, os.path.join(d, 'findings', f'{SLUGS[CARDIO]}.html'))
  assert driver.find_element('tag name', 'h1').text == CARDIO
  assert table_rows(driver, '#aligned tbody tr') == [
      ['#2', 'report', '0.950', '0.800', '0.900'],
      ['#5', 'image', '0.910', '0.700', '0.850'],
      ['#9', 'report', '0.810', '0.500', '0.400'],
      ['#20', 'any', '0.700', '0.250', '0.200'],
      [f'#{DEAD}', 'any', '0.600', '—', '—'],
  ]
  assert driver.find_elements('css selector', f'#aligned a[href$="/{DEAD}.html"]') == []
  centers = driver.execute_script(
      'const c = e => { const r = e.getBoundingClientRect(); return r.top + r.height / 2; };'
      'return ["acc", "bacc"].map(k => Array.from('
      "  document.querySelectorAll('svg.probe > circle.' + k), c)).concat("
      "  [[c(document.querySelector('svg.probe > line.majority'))]]);"
  )
  acc, bacc, (majority,) = centers
  assert len(acc) == 3 and len(bacc) == 2
  assert acc[0] == pytest.approx(majority, abs=0.5)  # accuracy at k=1 equals the majority's
  assert acc[0] > acc[1] > acc[2] and bacc[0] > bacc[1] > acc[0]  # higher is better, drawn higher
  # A value's height is linear in it: 0.9 - 0.85 = (0.8 - 0.7) / 2.
  assert acc[0] - acc[1] == pytest.approx((bacc[0] - bacc[1]) / 2, abs=0.5)
  assert table_rows(driver, '#probe tbody tr')[2] == [
      '5',
      '0.920',
      '—',
      '0.970',
      f'#2 #5 #9 #20 #{DEAD}',
  ]
  check_screenshot(driver.get_screenshot_as_png(), 'browser_finding.png')
  load(driver, os.path.join(d, 'findings', f'{SLUGS[ODD_FINDING]}.html'))
  assert driver.find_element('tag name', 'h1').text == ODD_FINDING
  assert driver.find_elements('css selector', 'svg.probe, #probe, i') == []
  load(driver, os.path.join(d, 'findings', f'{SLUGS[PNEUMO]}.html'))
  assert driver.find_element('id', 'reason').text == TOO_FEW
  assert driver.find_elements('css selector', 'svg.probe, #aligned') == []


def test_index_filters_and_sorts_by_finding(driver, aligned_site):
  from selenium.webdriver.support.select import Select  # pylint: disable=import-outside-toplevel

  load(driver, aligned_site['index'])
  assert 'Clinical findings: 1 of 2 covered' in driver.find_element('id', 'coverage').text
  header = driver.find_element('css selector', '#features th[data-key="auroc"]')
  assert header.text == 'best finding'
  assert shown_ids(driver) == live({'records': {f: make_record(f) for f in range(N)}})[:PAGE_SIZE]
  cells = {
      int(tr.get_attribute('data-id')): tr.find_element('css selector', 'td.finding').text
      for tr in driver.find_elements('css selector', '#features tbody tr')
  }
  assert cells[2] == f'{CARDIO} 0.950' and cells[9] == f'{ODD_FINDING} 0.880' and cells[0] == '—'
  box = Select(driver.find_element('id', 'finding'))
  assert [o.text for o in box.options] == [
      'all features',
      f'{CARDIO} (6)',
      f'{ODD_FINDING} (2)',
      f'{PNEUMO} (0)',
  ]
  box.select_by_value(CARDIO)
  assert shown_ids(driver) == ALIGNED[CARDIO]
  assert [e.text for e in driver.find_elements('css selector', 'td.finding')] == [
      '0.950 · report',
      '0.910 · image',
      '0.810 · report',
      '0.780 · report',
      '0.700 · any',
  ]
  assert header.text == f'{CARDIO} AUROC' and header.get_attribute('aria-sort') == 'descending'
  assert status(driver).endswith(f'aligned with {CARDIO}')
  driver.find_element('id', 'show-dead').click()
  assert shown_ids(driver) == ALIGNED[CARDIO] + [DEAD]
  header.click()  # ascending
  assert shown_ids(driver) == [DEAD] + ALIGNED[CARDIO][::-1]
  driver.find_element('id', 'show-dead').click()
  box.select_by_value(ODD_FINDING)
  assert shown_ids(driver) == ALIGNED[ODD_FINDING]
  assert driver.find_elements('css selector', '#features i') == []
  box.select_by_value(PNEUMO)
  assert shown_ids(driver) == [] and status(driver).startswith('no matching features')
  box.select_by_value('')
  assert len(shown_ids(driver)) == PAGE_SIZE and header.text == 'best finding'
  # A finding page's link opens the index filtered to it, sorted by its AUROC.
  load(driver, os.path.join(aligned_site['dir'], 'findings', f'{SLUGS[CARDIO]}.html'))
  driver.find_element('id', 'in-index').click()
  wait_for_heading(driver, 'Test <SAE> browser')
  assert shown_ids(driver) == ALIGNED[CARDIO] and not severe(driver)
  assert (
      Select(driver.find_element('id', 'finding')).first_selected_option.get_attribute('value')
      == CARDIO
  )
