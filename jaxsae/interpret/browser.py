"""A static HTML feature browser: one index of all features and one page per live feature.

The site is opened straight from disk (file://), so nothing is fetched at run time: the index
embeds its rows as one compact JSON array in an inline `<script type="application/json">` and
builds only the visible page of rows from it (searching and sorting 32k rows in plain JS takes
milliseconds; building 32k DOM rows would not). Feature pages are pre-rendered HTML, written one
at a time while the records stream in, so a `features.jsonl` of gigabytes never sits in memory.

Layout under `out_dir`:

  index.html            summary (`meta`), search box, sortable paged table of all features
  features/<id>.html    one page per feature that fired (count > 0)
  static/style.css      shared styles
  static/index.js       the index's search / sort / paging
  static/feature.js     prev / next links and arrow-key navigation on feature pages
  static/nav.js         the sorted ids of live features (written last, for prev / next)

Dead features (count 0) get no page: the index lists them (behind "include dead features"),
marked dead and without a link, and prev / next on feature pages skip them. Because records may
arrive in any order and are never held together, prev / next are resolved in the browser from
`static/nav.js` rather than baked into the pages.

Heatmap images are referenced, not copied: `image_file` is relative to `out_dir` (as in
records.Heatmap); a missing file is dropped at write time (the grid is drawn alone) so pages never
produce "failed to load resource" errors. The patch grid is stretched over the whole image, so the
image should be the one the model saw (after its resize / crop).
"""

from __future__ import annotations

import html
import json
import math
import os
import pathlib
import re
import urllib.parse
from typing import Any, Iterable, Sequence

from jaxsae.interpret.records import Example, Explanation, FeatureRecord, Heatmap, Histogram

INDEX = 'index.html'
FEATURES_DIR = 'features'
STATIC_DIR = 'static'
MAX_PREVIEW_TOKENS = 8
HIST_WIDTH, HIST_HEIGHT, HIST_AXIS = 600, 160, 18
HEATMAP_WIDTH = 320  # CSS px; the height follows the image (or the grid's aspect ratio)
_PAGE_RE = re.compile(r'^\d+\.html$')


def write_site(out_dir: str, records: Iterable[FeatureRecord],
               explanations: dict[int, Explanation], *, title: str, meta: dict,
               page_size: int = 200) -> str:
  """Write the browser under `out_dir` and return the path of its `index.html`.

  Args:
    out_dir: the interpretation's out dir (heatmap `image_file`s are relative to it).
    records: feature records in any order; consumed once, one at a time.
    explanations: explanation per feature id (features without one show none).
    title: the site's title.
    meta: run facts shown in the index's header (SAE name, tokens processed, ...), key: value.
    page_size: table rows per page in the index.
  """
  if page_size < 1:
    raise ValueError(f'page_size must be >= 1; got {page_size}')
  features_dir = os.path.join(out_dir, FEATURES_DIR)
  static_dir = os.path.join(out_dir, STATIC_DIR)
  os.makedirs(features_dir, exist_ok=True)
  os.makedirs(static_dir, exist_ok=True)
  _write(os.path.join(static_dir, 'style.css'), _CSS)
  _write(os.path.join(static_dir, 'index.js'), _INDEX_JS)
  _write(os.path.join(static_dir, 'feature.js'), _FEATURE_JS)

  rows, live, seen = [], [], set()
  for record in records:
    f = int(record['feature'])
    if f in seen:
      raise ValueError(f'feature {f} appears twice in the records')
    seen.add(f)
    explanation = explanations.get(f)
    rows.append(_index_row(record, explanation))
    if record['count'] > 0:
      live.append(f)
      _write(os.path.join(features_dir, f'{f}.html'),
             _feature_page(record, explanation, title, out_dir))

  live.sort()
  live_names = {f'{f}.html' for f in live}
  for name in os.listdir(features_dir):  # pages of features no longer live, from an earlier run
    if _PAGE_RE.match(name) and name not in live_names:
      os.remove(os.path.join(features_dir, name))
  _write(os.path.join(static_dir, 'nav.js'),
         'window.LIVE_FEATURES = ' + json.dumps(live, separators=(',', ':')) + ';\n')
  rows.sort(key=lambda r: r[0])
  path = os.path.join(out_dir, INDEX)
  _write(path, _index_html(rows, title, meta, page_size))
  return path


# --------------------------------------------------------------------------------------------------
# Index
# --------------------------------------------------------------------------------------------------

# Columns of an index row, in order (static/index.js reads them by position to keep the JSON small).
ROW_FIELDS = ('id', 'density', 'count', 'mean', 'max', 'explanation', 'score', 'tokens', 'kind')


def _index_row(record: FeatureRecord, explanation: Explanation | None) -> list:
  """The compact index row of one feature (see ROW_FIELDS)."""
  score = explanation.get('score') if explanation else None
  kinds = {k: v for k, v in (record.get('kind_counts') or {}).items() if v > 0}
  return [
      int(record['feature']),
      _num(record['density']),
      int(record['count']),
      _num(record['mean']),
      _num(record['max']),
      explanation['explanation'] if explanation else None,
      _num(score['balanced_accuracy']) if score else None,
      ' · '.join(_preview_tokens(record.get('top') or [])),
      max(kinds, key=lambda k: (kinds[k], k)) if kinds else '',
  ]


def _preview_tokens(top: Sequence[Example]) -> list[str]:
  """The distinct target tokens of the top examples, best first: what the feature fires on."""
  out = []
  for ex in top:
    tokens = ex.get('tokens') or []
    if not 0 <= ex.get('target', -1) < len(tokens):
      continue
    tok = _display_token(tokens[ex['target']]).strip()
    if tok and tok not in out:
      out.append(tok)
      if len(out) == MAX_PREVIEW_TOKENS:
        break
  return out


def _index_html(rows: list[list], title: str, meta: dict, page_size: int) -> str:
  """The index page; `rows` are ROW_FIELDS lists, sorted by id."""
  n = len(rows)
  dead = sum(1 for r in rows if r[2] == 0)
  explained = sum(1 for r in rows if r[5] is not None)
  scores = [r[6] for r in rows if r[6] is not None]
  counts = [('features', f'{n:,}'), ('live', f'{n - dead:,}'), ('dead', f'{dead:,}'),
            ('explained', f'{explained:,}')]
  if scores:
    counts.append(('mean detection score', f'{sum(scores) / len(scores):.3f}'))
  data = {'fields': ROW_FIELDS, 'pageSize': page_size, 'rows': rows}
  meta_html = ''.join(f'<dt>{_esc(k)}</dt><dd>{_esc(_fmt_meta(v))}</dd>' for k, v in meta.items())
  counts_html = ''.join(f'<span class="count"><b>{_esc(v)}</b> {_esc(k)}</span>'
                        for k, v in counts)
  headers = ''.join(
      f'<th data-key="{key}" class="{"sortable" if sortable else ""} {key}">{_esc(label)}</th>'
      for key, label, sortable in (
          ('id', 'id', True), ('density', 'density', True), ('mean', 'mean act', True),
          ('max', 'max act', True), ('explanation', 'explanation', True),
          ('score', 'score', True), ('tokens', 'top tokens', False), ('kind', 'kind', False)))
  return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(title)}</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{STATIC_DIR}/style.css">
</head><body class="index">
<header><h1>{_esc(title)}</h1>
<dl class="meta" id="meta">{meta_html}</dl>
<p class="counts" id="counts">{counts_html}</p></header>
<div class="controls">
<input type="search" id="search" placeholder="search explanation, top tokens, or #id" autofocus>
<label><input type="checkbox" id="show-dead"> include dead features</label>
<span id="status"></span>
<button type="button" id="prev-page">&larr; prev</button>
<button type="button" id="next-page">next &rarr;</button>
</div>
<table id="features"><thead><tr>{headers}</tr></thead><tbody></tbody></table>
<noscript><p>The feature table needs JavaScript.</p></noscript>
<script type="application/json" id="feature-data">{_script_json(data)}</script>
<script src="{STATIC_DIR}/index.js"></script>
</body></html>
"""


# --------------------------------------------------------------------------------------------------
# Feature pages
# --------------------------------------------------------------------------------------------------


def _feature_page(record: FeatureRecord, explanation: Explanation | None, title: str,
                  out_dir: str) -> str:
  """The pre-rendered page of one live feature."""
  f = int(record['feature'])
  scale = record['max'] if record['max'] > 0 else 1.0
  sections = [
      _explanation_html(explanation),
      _stats_html(record),
      _section('histogram', 'Activation histogram', _histogram_svg(record.get('histogram'))),
  ]
  if record.get('heatmaps'):
    sections.append(_section('heatmaps', 'Image heatmaps', '<div class="heatmap-row">' + ''.join(
        _heatmap_html(h, out_dir) for h in record['heatmaps']) + '</div>'))
  sections.append(_section('top', 'Top activations', _examples_html(record.get('top'), scale)))
  quantiles = record.get('quantiles') or []
  if any(quantiles):
    parts = []
    for i in reversed(range(len(quantiles))):  # highest bin first, like the top examples
      if not quantiles[i]:
        continue
      acts = [e['activation'] for e in quantiles[i]]
      parts.append(f'<h3>Bin {i + 1} of {len(quantiles)} '
                   f'<span class="range">({_fmt(min(acts))} – {_fmt(max(acts))})</span></h3>'
                   + _examples_html(quantiles[i], scale))
    sections.append(_section('quantiles', 'Samples by activation quantile', ''.join(parts)))
  if record.get('negatives'):
    sections.append(
        f'<details id="negatives"><summary>Non-activating samples '
        f'({len(record["negatives"])})</summary>{_examples_html(record["negatives"], scale)}'
        '</details>')
  if record.get('promoted_tokens'):
    items = ''.join(f'<li><span class="ptok">{_esc(_display_token(t))}</span> '
                    f'<span class="num">{_fmt(v)}</span></li>'
                    for t, v in record['promoted_tokens'])
    sections.append(_section('promoted', 'Top promoted tokens (W_dec · unembedding)',
                             f'<ol class="promoted">{items}</ol>'))
  return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Feature {f} · {_esc(title)}</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="../{STATIC_DIR}/style.css">
</head><body class="feature" data-feature="{f}">
<nav class="top"><a href="../{INDEX}" id="to-index">&uarr; all features</a>
<a id="prev" hidden>&larr; prev</a> <a id="next" hidden>next &rarr;</a></nav>
<h1>Feature {f}</h1>
{''.join(sections)}
<script src="../{STATIC_DIR}/nav.js"></script>
<script src="../{STATIC_DIR}/feature.js"></script>
</body></html>
"""


def _section(id_: str, heading: str, body: str) -> str:
  return f'<section id="{id_}"><h2>{_esc(heading)}</h2>{body}</section>'


def _explanation_html(explanation: Explanation | None) -> str:
  if not explanation:
    return '<section id="explanation"><p class="explanation none">No explanation yet.</p></section>'
  score = explanation.get('score')
  if score:
    s = (f'<p class="score">Detection balanced accuracy <b id="score-value">'
         f'{score["balanced_accuracy"]:.3f}</b> <span class="confusion">(tp {score["tp"]}, '
         f'fp {score["fp"]}, tn {score["tn"]}, fn {score["fn"]}, unparsed '
         f'{score["unparsed"]})</span></p>')
  else:
    s = '<p class="score none">Not scored (too few examples).</p>'
  by = ' · '.join(f'{k}: {_esc(explanation.get(k) or "")}' for k in ('explainer', 'scorer')
                  if explanation.get(k))
  return (f'<section id="explanation"><p class="explanation">'
          f'{_esc(explanation["explanation"])}</p>{s}'
          + (f'<p class="by">{by}</p>' if by else '') + '</section>')


def _stats_html(record: FeatureRecord) -> str:
  rows = [('density', _fmt(record['density'])), ('count', f'{record["count"]:,}'),
          ('mean activation', _fmt(record['mean'])), ('max activation', _fmt(record['max']))]
  rows += [(f'{k} tokens', f'{v:,}') for k, v in (record.get('kind_counts') or {}).items()]
  body = ''.join(f'<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>' for k, v in rows)
  return f'<section id="stats"><table class="stats">{body}</table></section>'


def _histogram_svg(hist: Histogram | None) -> str:
  """Bars over the non-zero activations, one `rect.bar` per bin (title: range and count)."""
  counts = list((hist or {}).get('counts') or [])
  edges = list((hist or {}).get('edges') or [])
  if not counts or len(edges) != len(counts) + 1 or max(counts) <= 0:
    return '<p class="none">No activations.</p>'
  w, h, axis = HIST_WIDTH, HIST_HEIGHT, HIST_AXIS
  top = max(counts)
  bw = w / len(counts)
  bars = []
  for i, c in enumerate(counts):
    bh = (h - axis - 4) * c / top
    bars.append(f'<rect class="bar" x="{i * bw:.2f}" y="{h - axis - bh:.2f}" '
                f'width="{max(bw - 1, 0.5):.2f}" height="{bh:.2f}"><title>'
                f'{_fmt(edges[i])} – {_fmt(edges[i + 1])}: {c:,}</title></rect>')
  labels = (f'<text x="0" y="{h - 4}">{_fmt(edges[0])}</text>'
            f'<text x="{w}" y="{h - 4}" text-anchor="end">{_fmt(edges[-1])}</text>'
            f'<text x="{w}" y="12" text-anchor="end">max bin {top:,}</text>')
  return (f'<svg class="hist" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
          f'role="img" aria-label="activation histogram">{"".join(bars)}'
          f'<line x1="0" y1="{h - axis}" x2="{w}" y2="{h - axis}" class="axis"/>{labels}</svg>')


def _heatmap_html(hm: Heatmap, out_dir: str) -> str:
  """The image with an SVG grid stretched over it: one rect per patch where the feature fires."""
  grid = hm.get('grid') or []
  n_rows, n_cols = len(grid), max((len(r) for r in grid), default=0)
  if not n_rows or not n_cols:
    return ''
  peak = hm.get('max') or max((v for r in grid for v in r), default=0.0)
  cells = []
  for y, row in enumerate(grid):
    for x, v in enumerate(row):
      if v > 0 and peak > 0:
        cells.append(f'<rect x="{x}" y="{y}" width="1" height="1" '
                     f'fill-opacity="{0.15 + 0.6 * min(v / peak, 1.0):.2f}">'
                     f'<title>{_fmt(v)}</title></rect>')
  svg = (f'<svg class="hm-grid" viewBox="0 0 {n_cols} {n_rows}" preserveAspectRatio="none" '
         f'shape-rendering="crispEdges">{"".join(cells)}</svg>')
  src = _image_src(hm.get('image_file') or '', out_dir)
  caption = (f'study {_esc(hm.get("study_id", ""))} · image {hm.get("image", 0)} · '
             f'max {_fmt(peak)}')
  if src:
    inner = f'<img src="{_esc(src)}" alt="{caption}">{svg}'
    style = ''
  else:
    inner, style = svg, f' style="aspect-ratio: {n_cols} / {n_rows}"'
  return (f'<figure class="heatmap" data-rows="{n_rows}" data-cols="{n_cols}" '
          f'data-cells="{len(cells)}"><div class="hm-wrap{"" if src else " no-image"}"{style}>'
          f'{inner}</div><figcaption>{caption}</figcaption></figure>')


def _image_src(image_file: str, out_dir: str) -> str:
  """The image's URL from a feature page, or '' when there is no such file."""
  if not image_file:
    return ''
  path = image_file if os.path.isabs(image_file) else os.path.join(out_dir, image_file)
  if not os.path.isfile(path):
    return ''
  if os.path.isabs(image_file):
    return pathlib.Path(image_file).as_uri()
  return '../' + urllib.parse.quote(pathlib.PurePath(image_file).as_posix())


def _examples_html(examples: Sequence[Example] | None, scale: float) -> str:
  """Token contexts, each token shaded by its activation relative to the feature's max."""
  if not examples:
    return '<p class="none">None.</p>'
  out = []
  for ex in examples:
    toks = []
    for i, (tok, a) in enumerate(zip(ex['tokens'], ex['acts'])):
      alpha = min(max(a, 0.0) / scale, 1.0)
      style = f' style="--a:{alpha:.2f}"' if alpha >= 0.005 else ''
      cls = 'tok target' if i == ex['target'] else 'tok'
      toks.append(f'<span class="{cls}"{style} title="{_esc(f"{_fmt(a)} · {tok!r}")}">'
                  f'{_esc(_display_token(tok))}</span>')
    info = (f'<b>{_fmt(ex["activation"])}</b> · {_esc(ex.get("kind", ""))} · study '
            f'{_esc(ex.get("study_id", ""))} · pos {ex.get("position", "")}')
    out.append(f'<div class="example" data-activation="{_fmt(ex["activation"])}">'
               f'<div class="ex-meta">{info}</div><div class="ctx">{"".join(toks)}</div></div>')
  return ''.join(out)


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _esc(text: Any) -> str:
  return html.escape(str(text), quote=True)


def _display_token(tok: str) -> str:
  """SentencePiece's word-start marker as a space and newlines as a visible mark."""
  return tok.replace('\u2581', ' ').replace('\n', '\u23ce')


def _num(x: float) -> float | None:
  """4 significant digits (the index JSON stays small); NaN / inf become null (valid JSON)."""
  x = float(x)
  return float(f'{x:.4g}') if math.isfinite(x) else None


def _fmt(x: float) -> str:
  x = float(x)
  if not math.isfinite(x):
    return str(x)
  if x == 0:
    return '0'
  return f'{x:.3g}' if 1e-3 <= abs(x) < 1e5 else f'{x:.2e}'


def _fmt_meta(v: Any) -> str:
  if isinstance(v, bool) or v is None:
    return str(v)
  if isinstance(v, int):
    return f'{v:,}'
  if isinstance(v, float):
    return _fmt(v)
  if isinstance(v, (dict, list, tuple)):
    return json.dumps(v)
  return str(v)


def _script_json(obj: Any) -> str:
  """JSON safe inside a <script> element: no '<', '>' or '&' can end it or open a comment."""
  text = json.dumps(obj, separators=(',', ':'), ensure_ascii=False, allow_nan=False)
  return (text.replace('<', '\\u003c').replace('>', '\\u003e').replace('&', '\\u0026')
          .replace('\u2028', '\\u2028').replace('\u2029', '\\u2029'))


def _write(path: str, text: str) -> None:
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text)


# --------------------------------------------------------------------------------------------------
# Static assets
# --------------------------------------------------------------------------------------------------

_CSS = """\
:root { --accent: 255 110 0; --ink: #1d2330; --muted: #6b7280; --line: #e3e6ea; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink);
       margin: 0 auto; padding: 16px 24px 48px; max-width: 1200px; background: #fff; }
h1 { font-size: 22px; margin: 4px 0 8px; }
h2 { font-size: 16px; margin: 24px 0 8px; border-bottom: 1px solid var(--line); }
h3 { font-size: 14px; margin: 12px 0 4px; }
a { color: #1f5fbf; }
.none { color: var(--muted); font-style: italic; }
dl.meta { display: grid; grid-template-columns: max-content auto; gap: 2px 12px; margin: 8px 0; }
dl.meta dt { color: var(--muted); }
dl.meta dd { margin: 0; font-family: ui-monospace, monospace; }
.counts .count { margin-right: 16px; }
.controls { display: flex; gap: 12px; align-items: center; margin: 12px 0; flex-wrap: wrap; }
#search { width: 360px; padding: 6px 8px; font-size: 14px; }
#status { color: var(--muted); }
table#features { border-collapse: collapse; width: 100%; }
#features th, #features td { border-bottom: 1px solid var(--line); padding: 4px 8px;
                             text-align: left; vertical-align: top; }
#features th { position: sticky; top: 0; background: #f6f7f9; white-space: nowrap; }
#features th.sortable { cursor: pointer; user-select: none; }
#features th.sortable:hover { background: #eceef2; }
#features th[aria-sort="ascending"]::after { content: " \\25B2"; }
#features th[aria-sort="descending"]::after { content: " \\25BC"; }
#features td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
#features td.tokens { font-family: ui-monospace, monospace; font-size: 12px; color: #374151; }
#features tr.dead { color: var(--muted); }
.badge { font-size: 11px; background: #eee; border-radius: 3px; padding: 0 4px; margin-left: 4px; }
nav.top a { margin-right: 16px; }
table.stats th { text-align: left; font-weight: normal; color: var(--muted); padding-right: 16px; }
p.explanation { font-size: 16px; margin: 8px 0 4px; }
p.by, .confusion, .range { color: var(--muted); font-size: 12px; }
svg.hist rect.bar { fill: rgb(var(--accent)); }
svg.hist rect.bar:hover { fill: #b34700; }
svg.hist .axis { stroke: #999; }
svg.hist text { font-size: 11px; fill: var(--muted); }
.heatmap-row { display: flex; flex-wrap: wrap; gap: 16px; }
figure.heatmap { margin: 0; }
.hm-wrap { position: relative; width: 320px; background: #111; }
.hm-wrap img { display: block; width: 100%; height: auto; }
.hm-grid { position: absolute; left: 0; top: 0; width: 100%; height: 100%; }
.hm-grid rect { fill: rgb(255 60 0); }
figcaption { color: var(--muted); font-size: 12px; margin-top: 4px; }
.example { border-left: 3px solid var(--line); padding: 2px 8px; margin: 6px 0; }
.ex-meta { color: var(--muted); font-size: 12px; }
.ctx { font-family: ui-monospace, monospace; font-size: 13px; line-height: 1.9; }
.tok { white-space: pre; background: rgb(var(--accent) / var(--a, 0)); border-radius: 2px; }
.tok.target { font-weight: bold; outline: 1.5px solid #222; }
ol.promoted { columns: 3; font-family: ui-monospace, monospace; }
ol.promoted .ptok { white-space: pre; background: #f1f3f5; }
ol.promoted .num { color: var(--muted); font-size: 12px; }
"""

_INDEX_JS = """\
// The index table: rows come from the inline JSON (#feature-data); only one page is in the DOM.
// State (query, sort, dead toggle, page) lives in the URL fragment so "back" restores the view.
(function () {
  'use strict';
  var data = JSON.parse(document.getElementById('feature-data').textContent);
  var F = {};
  data.fields.forEach(function (name, i) { F[name] = i; });
  var rows = data.rows;
  var pageSize = data.pageSize;
  var text = rows.map(function (r) {
    return ((r[F.explanation] || '') + ' \\n ' + r[F.tokens]).toLowerCase();
  });
  var DEFAULT_DIR = {id: 1, explanation: 1, density: -1, mean: -1, max: -1, score: -1};
  var state = {q: '', sort: 'id', dir: 1, dead: false, page: 0};
  var view = [];
  var written = null;  // the fragment this script last wrote (its own hashchange is ignored)

  var search = document.getElementById('search');
  var showDead = document.getElementById('show-dead');
  var status = document.getElementById('status');
  var prev = document.getElementById('prev-page');
  var next = document.getElementById('next-page');
  var tbody = document.querySelector('#features tbody');
  var headers = document.querySelectorAll('#features th.sortable');

  function readHash() {
    var p = new URLSearchParams(location.hash.slice(1));
    var sort = p.get('sort');
    state.q = p.get('q') || '';
    state.sort = DEFAULT_DIR.hasOwnProperty(sort) ? sort : 'id';
    state.dir = p.get('dir') === '-1' ? -1 : 1;
    state.dead = p.get('dead') === '1';
    state.page = Math.max(0, parseInt(p.get('page') || '0', 10) || 0);
    search.value = state.q;
    showDead.checked = state.dead;
  }

  function writeHash() {
    var p = new URLSearchParams();
    if (state.q) p.set('q', state.q);
    if (state.sort !== 'id' || state.dir !== 1) {
      p.set('sort', state.sort);
      p.set('dir', state.dir);
    }
    if (state.dead) p.set('dead', '1');
    if (state.page) p.set('page', state.page);
    var h = p.toString();
    if (h !== location.hash.slice(1)) location.replace('#' + h);
    written = location.hash.slice(1);
  }

  // A term matches text containing it; a number also matches that feature id, '#12' only the id.
  function matcher(q) {
    var terms = q.toLowerCase().split(/\\s+/).filter(Boolean);
    return function (i) {
      var r = rows[i];
      return terms.every(function (t) {
        var m = /^#?(\\d+)$/.exec(t);
        if (m && r[F.id] === parseInt(m[1], 10)) return true;
        return t.charAt(0) !== '#' && text[i].indexOf(t) !== -1;
      });
    };
  }

  function compare(key, dir) {
    var c = F[key];
    var textual = key === 'explanation';
    return function (a, b) {
      var x = rows[a][c], y = rows[b][c];
      if (x === null || y === null) {  // missing values last, whatever the direction
        if (x !== y) return x === null ? 1 : -1;
        return rows[a][F.id] - rows[b][F.id];
      }
      if (textual) { x = x.toLowerCase(); y = y.toLowerCase(); }
      if (x < y) return -dir;
      if (x > y) return dir;
      return rows[a][F.id] - rows[b][F.id];
    };
  }

  function refilter() {
    var match = matcher(state.q);
    view = [];
    for (var i = 0; i < rows.length; i++) {
      if ((state.dead || rows[i][F.count] > 0) && match(i)) view.push(i);
    }
    view.sort(compare(state.sort, state.dir));
  }

  function fmt(x) {
    if (x === null) return '\\u2014';
    if (x === 0) return '0';
    var a = Math.abs(x);
    return (a >= 1e-3 && a < 1e5) ? String(Number(x.toPrecision(3))) : x.toExponential(2);
  }

  function cell(tr, text, cls) {
    var td = document.createElement('td');
    if (cls) td.className = cls;
    td.textContent = text;
    tr.appendChild(td);
    return td;
  }

  function render() {
    var pages = Math.max(1, Math.ceil(view.length / pageSize));
    state.page = Math.min(state.page, pages - 1);
    var start = state.page * pageSize;
    var end = Math.min(view.length, start + pageSize);
    var frag = document.createDocumentFragment();
    for (var k = start; k < end; k++) {
      var r = rows[view[k]];
      var tr = document.createElement('tr');
      tr.dataset.id = r[F.id];
      var dead = r[F.count] === 0;
      if (dead) tr.className = 'dead';
      var td = document.createElement('td');
      td.className = 'num id';
      if (dead) {
        td.textContent = r[F.id];
        var badge = document.createElement('span');
        badge.className = 'badge';
        badge.textContent = 'dead';
        td.appendChild(badge);
      } else {
        var a = document.createElement('a');
        a.href = 'features/' + r[F.id] + '.html';
        a.textContent = r[F.id];
        td.appendChild(a);
      }
      tr.appendChild(td);
      cell(tr, fmt(r[F.density]), 'num density');
      cell(tr, fmt(r[F.mean]), 'num mean');
      cell(tr, fmt(r[F.max]), 'num max');
      cell(tr, r[F.explanation] === null ? '' : r[F.explanation], 'explanation');
      cell(tr, r[F.score] === null ? '\\u2014' : r[F.score].toFixed(3), 'num score');
      cell(tr, r[F.tokens], 'tokens');
      cell(tr, r[F.kind], 'kind');
      frag.appendChild(tr);
    }
    tbody.replaceChildren(frag);
    status.textContent = view.length
        ? 'showing ' + (start + 1) + '\\u2013' + end + ' of ' + view.length + ' matching (' +
          rows.length + ' features)'
        : 'no matching features (' + rows.length + ' features)';
    prev.disabled = state.page === 0;
    next.disabled = state.page >= pages - 1;
    headers.forEach(function (th) {
      if (th.dataset.key === state.sort) {
        th.setAttribute('aria-sort', state.dir === 1 ? 'ascending' : 'descending');
      } else {
        th.removeAttribute('aria-sort');
      }
    });
    writeHash();
  }

  function update() { refilter(); render(); }

  search.addEventListener('input', function () {
    state.q = search.value; state.page = 0; update();
  });
  showDead.addEventListener('change', function () {
    state.dead = showDead.checked; state.page = 0; update();
  });
  headers.forEach(function (th) {
    th.addEventListener('click', function () {
      var key = th.dataset.key;
      state.dir = key === state.sort ? -state.dir : DEFAULT_DIR[key];
      state.sort = key; state.page = 0; update();
    });
  });
  prev.addEventListener('click', function () { state.page--; render(); });
  next.addEventListener('click', function () { state.page++; render(); });

  // A fragment typed or linked while the page is open (no reload happens) applies too.
  window.addEventListener('hashchange', function () {
    if (location.hash.slice(1) !== written) { readHash(); update(); }
  });

  readHash();
  update();
})();
"""

_FEATURE_JS = """\
// Prev / next among live features (static/nav.js holds their sorted ids); arrow keys follow them.
(function () {
  'use strict';
  var ids = window.LIVE_FEATURES || [];
  var f = parseInt(document.body.dataset.feature, 10);
  var lo = 0, hi = ids.length;
  while (lo < hi) { var mid = (lo + hi) >> 1; if (ids[mid] < f) lo = mid + 1; else hi = mid; }
  var before = lo > 0 ? ids[lo - 1] : null;
  var after = ids[lo] === f ? (lo + 1 < ids.length ? ids[lo + 1] : null)
                            : (lo < ids.length ? ids[lo] : null);
  function link(id, target) {
    var a = document.getElementById(id);
    if (target === null) return null;
    a.href = target + '.html';
    a.hidden = false;
    return a;
  }
  var prev = link('prev', before), next = link('next', after);
  document.addEventListener('keydown', function (e) {
    if (e.target.tagName === 'INPUT' || e.altKey || e.ctrlKey || e.metaKey) return;
    if (e.key === 'ArrowLeft' && prev) location.href = prev.href;
    if (e.key === 'ArrowRight' && next) location.href = next.href;
  });
})();
"""
