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
`static/nav.js` rather than baked into the pages. The first three static files are this
package's own `static/` files (package data), copied byte for byte.

Heatmap images are referenced, not copied: `image_file` is relative to `out_dir` (as in
records.Heatmap; the pipeline names them by jaxsae.formats.names.encode(study id), URL-quoted
here). A name outside `out_dir` or a missing file is dropped at write time (the grid is drawn
alone) so pages never produce "failed to load resource" errors. The patch grid is stretched over
the whole image, so the image should be the one the model saw (after its resize / crop).
"""

from __future__ import annotations

import html
from importlib import resources
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
# Copied verbatim from this package's static/ (package data) into the site's static/.
STATIC_FILES = ('style.css', 'index.js', 'feature.js')
MAX_PREVIEW_TOKENS = 8
HIST_WIDTH, HIST_HEIGHT, HIST_AXIS = 600, 160, 18
HEATMAP_WIDTH = 320  # CSS px; the height follows the image (or the grid's aspect ratio)
_PAGE_RE = re.compile(r'^\d+\.html$')


def write_site(
    out_dir: str,
    records: Iterable[FeatureRecord],
    explanations: dict[int, Explanation],
    *,
    title: str,
    meta: dict,
    page_size: int = 200,
) -> str:
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
  assets = resources.files('jaxsae.interpret').joinpath(STATIC_DIR)
  for name in STATIC_FILES:
    with open(os.path.join(static_dir, name), 'wb') as f:
      f.write(assets.joinpath(name).read_bytes())

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
      _write(
          os.path.join(features_dir, f'{f}.html'),
          _feature_page(record, explanation, title, out_dir),
      )

  live.sort()
  live_names = {f'{f}.html' for f in live}
  for name in os.listdir(features_dir):  # pages of features no longer live, from an earlier run
    if _PAGE_RE.match(name) and name not in live_names:
      os.remove(os.path.join(features_dir, name))
  _write(
      os.path.join(static_dir, 'nav.js'),
      'window.LIVE_FEATURES = ' + json.dumps(live, separators=(',', ':')) + ';\n',
  )
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
  counts = [
      ('features', f'{n:,}'),
      ('fired in the store', f'{n - dead:,}'),
      ('never fired in the store', f'{dead:,}'),
      ('explained', f'{explained:,}'),
  ]
  if scores:
    counts.append(('mean detection score', f'{sum(scores) / len(scores):.3f}'))
  data = {'fields': ROW_FIELDS, 'pageSize': page_size, 'rows': rows}
  meta_html = ''.join(f'<dt>{_esc(k)}</dt><dd>{_esc(_fmt_meta(v))}</dd>' for k, v in meta.items())
  counts_html = ''.join(f'<span class="count"><b>{_esc(v)}</b> {_esc(k)}</span>' for k, v in counts)
  headers = ''.join(
      f'<th data-key="{key}" class="{"sortable" if sortable else ""} {key}">{_esc(label)}</th>'
      for key, label, sortable in (
          ('id', 'id', True),
          ('density', 'density', True),
          ('mean', 'mean act', True),
          ('max', 'max act', True),
          ('explanation', 'explanation', True),
          ('score', 'score', True),
          ('tokens', 'top tokens', False),
          ('kind', 'kind', False),
      )
  )
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
<label><input type="checkbox" id="show-dead"> include features that never fired</label>
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


def _feature_page(
    record: FeatureRecord, explanation: Explanation | None, title: str, out_dir: str
) -> str:
  """The pre-rendered page of one live feature."""
  f = int(record['feature'])
  scale = record['max'] if record['max'] > 0 else 1.0
  sections = [
      _explanation_html(explanation),
      _stats_html(record),
      _section('histogram', 'Activation histogram', _histogram_svg(record.get('histogram'))),
  ]
  if record.get('heatmaps'):
    sections.append(
        _section(
            'heatmaps',
            'Image heatmaps',
            '<div class="heatmap-row">'
            + ''.join(_heatmap_html(h, out_dir) for h in record['heatmaps'])
            + '</div>',
        )
    )
  sections.append(_section('top', 'Top activations', _examples_html(record.get('top'), scale)))
  quantiles = record.get('quantiles') or []
  if any(quantiles):
    parts = []
    for i in reversed(range(len(quantiles))):  # highest bin first, like the top examples
      if not quantiles[i]:
        continue
      acts = [e['activation'] for e in quantiles[i]]
      parts.append(
          f'<h3>Bin {i + 1} of {len(quantiles)} '
          f'<span class="range">({_fmt(min(acts))} – {_fmt(max(acts))})</span></h3>'
          + _examples_html(quantiles[i], scale)
      )
    sections.append(_section('quantiles', 'Samples by activation quantile', ''.join(parts)))
  if record.get('negatives'):
    sections.append(
        f'<details id="negatives"><summary>Non-activating samples '
        f'({len(record["negatives"])})</summary>{_examples_html(record["negatives"], scale)}'
        '</details>'
    )
  if record.get('promoted_tokens'):
    items = ''.join(
        f'<li><span class="ptok">{_esc(_display_token(t))}</span> '
        f'<span class="num">{_fmt(v)}</span></li>'
        for t, v in record['promoted_tokens']
    )
    sections.append(
        _section(
            'promoted',
            'Top promoted tokens (W_dec · unembedding)',
            f'<ol class="promoted">{items}</ol>',
        )
    )
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
    s = (
        f'<p class="score">Detection balanced accuracy <b id="score-value">'
        f'{score["balanced_accuracy"]:.3f}</b> <span class="confusion">(tp {score["tp"]}, '
        f'fp {score["fp"]}, tn {score["tn"]}, fn {score["fn"]}, unparsed '
        f'{score["unparsed"]})</span></p>'
    )
  else:
    s = '<p class="score none">Not scored (too few examples).</p>'
  by = ' · '.join(
      f'{k}: {_esc(explanation.get(k) or "")}'
      for k in ('explainer', 'scorer')
      if explanation.get(k)
  )
  return (
      f'<section id="explanation"><p class="explanation">'
      f'{_esc(explanation["explanation"])}</p>{s}'
      + (f'<p class="by">{by}</p>' if by else '')
      + '</section>'
  )


def _stats_html(record: FeatureRecord) -> str:
  rows = [
      ('density', _fmt(record['density'])),
      ('count', f'{record["count"]:,}'),
      ('mean activation', _fmt(record['mean'])),
      ('max activation', _fmt(record['max'])),
  ]
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
    bars.append(
        f'<rect class="bar" x="{i * bw:.2f}" y="{h - axis - bh:.2f}" '
        f'width="{max(bw - 1, 0.5):.2f}" height="{bh:.2f}"><title>'
        f'{_fmt(edges[i])} – {_fmt(edges[i + 1])}: {c:,}</title></rect>'
    )
  labels = (
      f'<text x="0" y="{h - 4}">{_fmt(edges[0])}</text>'
      f'<text x="{w}" y="{h - 4}" text-anchor="end">{_fmt(edges[-1])}</text>'
      f'<text x="{w}" y="12" text-anchor="end">max bin {top:,}</text>'
  )
  return (
      f'<svg class="hist" width="{w}" height="{h}" viewBox="0 0 {w} {h}" '
      f'role="img" aria-label="activation histogram">{"".join(bars)}'
      f'<line x1="0" y1="{h - axis}" x2="{w}" y2="{h - axis}" class="axis"/>{labels}</svg>'
  )


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
        cells.append(
            f'<rect x="{x}" y="{y}" width="1" height="1" '
            f'fill-opacity="{0.15 + 0.6 * min(v / peak, 1.0):.2f}">'
            f'<title>{_fmt(v)}</title></rect>'
        )
  svg = (
      f'<svg class="hm-grid" viewBox="0 0 {n_cols} {n_rows}" preserveAspectRatio="none" '
      f'shape-rendering="crispEdges">{"".join(cells)}</svg>'
  )
  src = _image_src(hm.get('image_file') or '', out_dir)
  caption = (
      f'study {_esc(hm.get("study_id", ""))} · image {hm.get("image", 0)} · ' f'max {_fmt(peak)}'
  )
  if src:
    inner = f'<img src="{_esc(src)}" alt="{caption}">{svg}'
    style = ''
  else:
    inner, style = svg, f' style="aspect-ratio: {n_cols} / {n_rows}"'
  return (
      f'<figure class="heatmap" data-rows="{n_rows}" data-cols="{n_cols}" '
      f'data-cells="{len(cells)}"><div class="hm-wrap{"" if src else " no-image"}"{style}>'
      f'{inner}</div><figcaption>{caption}</figcaption></figure>'
  )


def _image_src(image_file: str, out_dir: str) -> str:
  """The image's URL from a feature page, or '' when there is no such file. A relative name is
  URL-quoted whole (the pipeline's names hold `%XX` escapes: `%` -> `%25`), and one that would
  leave `out_dir` (`../x`) is dropped."""
  if not image_file:
    return ''
  if os.path.isabs(image_file):
    return pathlib.Path(image_file).as_uri() if os.path.isfile(image_file) else ''
  rel = os.path.normpath(image_file)
  if rel == os.curdir or rel.split(os.sep)[0] == os.pardir:
    return ''
  if not os.path.isfile(os.path.join(out_dir, rel)):
    return ''
  return '../' + urllib.parse.quote(pathlib.PurePath(rel).as_posix())


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
      toks.append(
          f'<span class="{cls}"{style} title="{_esc(f"{_fmt(a)} · {tok!r}")}">'
          f'{_esc(_display_token(tok))}</span>'
      )
    info = (
        f'<b>{_fmt(ex["activation"])}</b> · {_esc(ex.get("kind", ""))} · study '
        f'{_esc(ex.get("study_id", ""))} · pos {ex.get("position", "")}'
    )
    out.append(
        f'<div class="example" data-activation="{_fmt(ex["activation"])}">'
        f'<div class="ex-meta">{info}</div><div class="ctx">{"".join(toks)}</div></div>'
    )
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
  return (
      text.replace('<', '\\u003c')
      .replace('>', '\\u003e')
      .replace('&', '\\u0026')
      .replace('\u2028', '\\u2028')
      .replace('\u2029', '\\u2029')
  )


def _write(path: str, text: str) -> None:
  with open(path, 'w', encoding='utf-8') as f:
    f.write(text)
