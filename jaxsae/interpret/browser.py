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
  findings/index.html   (with `alignment`) every clinical finding: counts, coverage, best feature
  findings/<slug>.html  (with `alignment`) one finding: its features by AUROC, its sparse probes

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

With `alignment` (the interpretation's alignment.json, jaxsae/interpret/alignment.py) feature
pages list their best-aligned findings, the findings pages above are written, and the index
gains a "best finding" column and a finding filter (features aligned with the chosen finding,
by its AUROC). Without it the site has no trace of findings.
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
FINDINGS_DIR = 'findings'
_FINDING_PAGE_RE = re.compile(r'^[a-z0-9-]+\.html$')  # slugs (and index.html): ours to replace
# The index's finding filter keeps a feature when its AUROC for the finding reaches this, or when
# it is among the finding's top features (by_finding[...]['features']).
ALIGNED_AUROC = 0.75
PROBE_WIDTH, PROBE_HEIGHT = 600, 220
PROBE_LEFT, PROBE_RIGHT, PROBE_TOP, PROBE_BOTTOM = 44, 16, 30, 26  # plot margins in the SVG


def write_site(
    out_dir: str,
    records: Iterable[FeatureRecord],
    explanations: dict[int, Explanation],
    *,
    title: str,
    meta: dict,
    page_size: int = 200,
    alignment: dict | None = None,
) -> str:
  """Write the browser under `out_dir` and return the path of its `index.html`.

  Args:
    out_dir: the interpretation's out dir (heatmap `image_file`s are relative to it).
    records: feature records in any order; consumed once, one at a time.
    explanations: explanation per feature id (features without one show none).
    title: the site's title.
    meta: run facts shown in the index's header (SAE name, tokens processed, ...), key: value.
    page_size: table rows per page in the index.
    alignment: the alignment.json dict (features vs clinical findings), or None for no findings.
  """
  if page_size < 1:
    raise ValueError(f'page_size must be >= 1; got {page_size}')
  findings = _Findings(alignment) if alignment is not None else None
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
    row = _index_row(record, explanation)
    if findings is not None:
      row += findings.row_fields(f)
    rows.append(row)
    if record['count'] > 0:
      live.append(f)
      _write(
          os.path.join(features_dir, f'{f}.html'),
          _feature_page(record, explanation, title, out_dir, findings),
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
  _write_findings(os.path.join(out_dir, FINDINGS_DIR), findings, set(live), title)
  rows.sort(key=lambda r: r[0])
  path = os.path.join(out_dir, INDEX)
  _write(path, _index_html(rows, title, meta, page_size, findings))
  return path


# --------------------------------------------------------------------------------------------------
# Index
# --------------------------------------------------------------------------------------------------

# Columns of an index row, in order (static/index.js reads them by position to keep the JSON small).
ROW_FIELDS = ('id', 'density', 'count', 'mean', 'max', 'explanation', 'score', 'tokens', 'kind')
# Appended to every row when the site has findings: the feature's best finding and its AUROC.
FINDING_FIELDS = ('finding', 'auroc')


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


def _index_html(
    rows: list[list], title: str, meta: dict, page_size: int, findings: _Findings | None
) -> str:
  """The index page; `rows` are ROW_FIELDS (+ FINDING_FIELDS) lists, sorted by id."""
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
  columns = [
      ('id', 'id', True),
      ('density', 'density', True),
      ('mean', 'mean act', True),
      ('max', 'max act', True),
      ('explanation', 'explanation', True),
      ('score', 'score', True),
      ('tokens', 'top tokens', False),
      ('kind', 'kind', False),
  ]
  findings_html = filter_html = ''
  if findings is not None:
    data['fields'] = ROW_FIELDS + FINDING_FIELDS
    data['findings'] = findings.index_data()
    columns.append(('auroc', 'best finding', True))
    findings_html = (
        f'<p class="findings-line" id="coverage">{findings.coverage_html(f"{FINDINGS_DIR}/")} · '
        f'<a href="{FINDINGS_DIR}/index.html" id="to-findings">all findings</a></p>'
    )
    options = ''.join(
        f'<option value="{_esc(name)}">{_esc(name)} ({n})</option>'
        for name, n in findings.filter_options()
    )
    filter_html = (
        f'<label title="features with AUROC &ge; {ALIGNED_AUROC} for the finding, or among its '
        f'top features; sorted by that AUROC">finding <select id="finding">'
        f'<option value="">all features</option>{options}</select></label>\n'
    )
  meta_html = ''.join(f'<dt>{_esc(k)}</dt><dd>{_esc(_fmt_meta(v))}</dd>' for k, v in meta.items())
  counts_html = ''.join(f'<span class="count"><b>{_esc(v)}</b> {_esc(k)}</span>' for k, v in counts)
  headers = ''.join(
      f'<th data-key="{key}" class="{"sortable" if sortable else ""} {key}">{_esc(label)}</th>'
      for key, label, sortable in columns
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
<p class="counts" id="counts">{counts_html}</p>{findings_html}</header>
<div class="controls">
<input type="search" id="search" placeholder="search explanation, top tokens, or #id" autofocus>
{filter_html}<label><input type="checkbox" id="show-dead"> include features that never fired</label>
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
    record: FeatureRecord,
    explanation: Explanation | None,
    title: str,
    out_dir: str,
    findings: _Findings | None = None,
) -> str:
  """The pre-rendered page of one live feature."""
  f = int(record['feature'])
  scale = record['max'] if record['max'] > 0 else 1.0
  sections = [_explanation_html(explanation), _stats_html(record)]
  if findings is not None:
    sections.append(
        _section('findings', 'Clinical findings (best-aligned)', findings.feature_table(f))
    )
  sections.append(
      _section('histogram', 'Activation histogram', _histogram_svg(record.get('histogram')))
  )
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
  to_findings = ''
  if findings is not None:
    to_findings = f' <a href="../{FINDINGS_DIR}/index.html" id="to-findings">findings</a>'
  return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Feature {f} · {_esc(title)}</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="../{STATIC_DIR}/style.css">
</head><body class="feature" data-feature="{f}">
<nav class="top"><a href="../{INDEX}" id="to-index">&uarr; all features</a>
<a id="prev" hidden>&larr; prev</a> <a id="next" hidden>next &rarr;</a>{to_findings}</nav>
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
# Clinical findings (alignment.json)
# --------------------------------------------------------------------------------------------------


class _Findings:
  """The alignment.json dict, checked and indexed for the pages: findings in their order with a
  file name each, every feature's listed findings, every finding's figures."""

  def __init__(self, alignment: dict):
    if not isinstance(alignment, dict):
      raise ValueError(
          f'alignment must be the alignment.json object; got {type(alignment).__name__}'
      )
    features = _field(alignment, 'features', dict)
    by_finding = _field(alignment, 'by_finding', dict)
    names = list(_field(alignment, 'findings', list, []))
    self.by_feature: dict[int, list[dict]] = {}
    for key, entries in features.items():
      try:
        f = int(key)
      except (TypeError, ValueError):
        raise ValueError(f'alignment: "features" keys must be feature ids; got {key!r}') from None
      if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ValueError(
            f'alignment: "features"["{key}"] must be a list of objects; got '
            f'{type(entries).__name__}'
        )
      self.by_feature[f] = sorted(entries, key=lambda e: -_auroc_key(e.get('auroc')))
    self.by_finding: dict[str, dict] = {}
    for name, info in by_finding.items():
      if not isinstance(info, dict):
        raise ValueError(
            f'alignment: "by_finding"["{name}"] must be an object; got {type(info).__name__}'
        )
      self.by_finding[str(name)] = info
    names += list(self.by_finding)
    names += [str(e.get('finding')) for es in self.by_feature.values() for e in es]
    self.names = list(dict.fromkeys(str(n) for n in names))
    self.slugs = _slugs(self.names)
    self.coverage = alignment.get('coverage') or {}
    self.studies = alignment.get('studies') or {}
    self.uncertain = alignment.get('uncertain')
    self.kinds = alignment.get('kinds') or []
    self._aligned: dict[str, dict[int, tuple[float, str]]] | None = None

  def info(self, name: str) -> dict:
    return self.by_finding.get(name) or {}

  def top(self, name: str) -> list[dict]:
    """The finding's listed features, best AUROC first."""
    top = [e for e in self.info(name).get('features') or [] if isinstance(e, dict)]
    return sorted(top, key=lambda e: -_auroc_key(e.get('auroc')))

  def link(self, name: str, prefix: str) -> str:
    return f'<a href="{prefix}{self.slugs[name]}.html" class="finding">{_esc(name)}</a>'

  # ---- index ------------------------------------------------------------------------------------

  def row_fields(self, f: int) -> list:
    """FINDING_FIELDS of feature f: its best finding and that AUROC (None, None without one)."""
    best = next((e for e in self.by_feature.get(f, []) if _finite(e.get('auroc'))), None)
    return [str(best['finding']), _num(best['auroc'])] if best else [None, None]

  def aligned(self, name: str) -> dict[int, tuple[float, str]]:
    """The features the index's filter keeps for a finding: {feature: (AUROC, kind)}, from its
    top list and from every feature's list at AUROC >= ALIGNED_AUROC (the best pair wins)."""
    if self._aligned is None:  # all findings in one pass over the features
      self._aligned = {n: {} for n in self.names}

      def add(n: str, f: Any, auroc: Any, kind: Any) -> None:
        try:
          f = int(f)
        except (TypeError, ValueError):
          return
        out = self._aligned[n]
        if _finite(auroc) and (f not in out or auroc > out[f][0]):
          out[f] = (float(auroc), str(kind or ''))

      for n in self.names:
        for e in self.top(n):
          add(n, e.get('feature'), e.get('auroc'), e.get('kind'))
      for f, entries in self.by_feature.items():
        for e in entries:
          auroc = e.get('auroc')
          if _finite(auroc) and auroc >= ALIGNED_AUROC:
            add(str(e.get('finding')), f, auroc, e.get('kind'))
    return self._aligned.get(name, {})

  def index_data(self) -> dict:
    """What static/index.js needs for the finding column and filter."""
    aligned = {}
    for name in self.names:
      items = sorted(self.aligned(name).items(), key=lambda it: (-it[1][0], it[0]))
      aligned[name] = [[f, _num(a), k] for f, (a, k) in items]
    return {
        'names': self.names,
        'slugs': [self.slugs[n] for n in self.names],
        'threshold': ALIGNED_AUROC,
        'aligned': aligned,
    }

  def filter_options(self) -> list[tuple[str, int]]:
    return [(name, len(self.aligned(name))) for name in self.names]

  def coverage_html(self, prefix: str) -> str:
    """The coverage line; finding links are relative to `prefix` (the findings folder)."""
    cov = self.coverage
    covered = [str(n) for n in cov.get('covered') or []]
    threshold = cov.get('threshold')
    text = (
        f'Clinical findings: <b>{_esc(cov.get("count", len(covered)))}</b> of '
        f'{_esc(cov.get("of", "?"))} covered'
    )
    if _finite(threshold):
      text += f' (a feature reaches AUROC &ge; {_esc(_fmt(threshold))})'
    if covered:
      text += ': ' + ', '.join(
          self.link(n, prefix) if n in self.slugs else _esc(n) for n in covered
      )
    return text

  # ---- feature pages ----------------------------------------------------------------------------

  def feature_table(self, f: int) -> str:
    entries = self.by_feature.get(f) or []
    if not entries:
      return '<p class="none">No finding aligned with this feature.</p>'
    rows = ''.join(
        f'<tr data-finding="{_esc(e.get("finding"))}">'
        f'<td>{self.link(str(e.get("finding")), f"../{FINDINGS_DIR}/")}</td>'
        f'<td class="kind">{_esc(e.get("kind") or "")}</td>'
        f'<td class="num auroc">{_f3(e.get("auroc"))}</td>'
        f'<td class="num precision">{_f3(e.get("precision"))}</td>'
        f'<td class="num recall">{_f3(e.get("recall"))}</td>'
        f'<td class="num fired">{_count(e.get("fired"))}</td></tr>'
        for e in entries
    )
    return (
        '<table class="findings"><thead><tr><th>finding</th><th>kind</th><th>AUROC</th>'
        '<th>precision</th><th>recall</th><th>studies fired</th></tr></thead>'
        f'<tbody>{rows}</tbody></table>'
        '<p class="note">Per study: the feature\'s maximum activation over its tokens of the kind; '
        'precision and recall predict the finding wherever the feature fires.</p>'
    )


def _field(alignment: dict, key: str, kind: type, default: Any = None) -> Any:
  value = alignment.get(key, default)
  if not isinstance(value, kind):
    expected = {dict: 'an object', list: 'a list'}[kind]
    raise ValueError(
        f'alignment: field "{key}" must be {expected}; got '
        f'{"nothing" if value is None else type(value).__name__} (pass the alignment.json '
        'that jaxsae/interpret/alignment.py writes, or alignment=None)'
    )
  return value


def _slugs(names: Sequence[str]) -> dict[str, str]:
  """A distinct file name stem per finding: lowercase letters, digits and '-'."""
  out, used = {}, {'index'}
  for name in names:
    base = re.sub(r'[^a-z0-9]+', '-', name.lower()).strip('-') or 'finding'
    slug, i = base, 2
    while slug in used:
      slug, i = f'{base}-{i}', i + 1
    used.add(slug)
    out[name] = slug
  return out


def _write_findings(
    findings_dir: str, findings: _Findings | None, live: set[int], title: str
) -> None:
  """The findings pages; without findings, an earlier run's pages go (the folder too if empty)."""
  written = set()
  if findings is not None:
    os.makedirs(findings_dir, exist_ok=True)
    _write(os.path.join(findings_dir, INDEX), _findings_index(findings, live, title))
    written.add(INDEX)
    for name in findings.names:
      page = f'{findings.slugs[name]}.html'
      _write(os.path.join(findings_dir, page), _finding_page(findings, name, live, title))
      written.add(page)
  if not os.path.isdir(findings_dir):
    return
  for page in os.listdir(findings_dir):
    if _FINDING_PAGE_RE.match(page) and page not in written:
      os.remove(os.path.join(findings_dir, page))
  if findings is None and not os.listdir(findings_dir):
    os.rmdir(findings_dir)


def _feature_link(f: Any, live: set[int], prefix: str = f'../{FEATURES_DIR}/') -> str:
  """Feature f's id, linked to its page when it has one (live features only)."""
  try:
    f = int(f)
  except (TypeError, ValueError):
    return _esc(f)
  if f in live:
    return f'<a href="{prefix}{f}.html" class="feature">#{f}</a>'
  return f'<span class="feature">#{f}</span>'


def _page(title: str, body_class: str, nav: str, body: str) -> str:
  return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_esc(title)}</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="../{STATIC_DIR}/style.css">
</head><body class="{body_class}">
<nav class="top">{nav}</nav>
{body}
</body></html>
"""


def _studies_html(findings: _Findings) -> str:
  st = findings.studies
  parts = []
  if 'total' in st:
    parts.append(f'<b>{_count(st["total"])}</b> studies')
  if 'labelled' in st:
    parts.append(f'{_count(st["labelled"])} labelled')
  if findings.uncertain:
    parts.append(f'uncertain labels: {_esc(findings.uncertain)}')
  if findings.kinds:
    parts.append('token kinds: ' + ', '.join(_esc(k) for k in findings.kinds))
  return f'<p class="counts" id="studies">{" · ".join(parts)}</p>' if parts else ''


def _findings_index(findings: _Findings, live: set[int], title: str) -> str:
  covered = {str(n) for n in findings.coverage.get('covered') or []}
  rows = []
  for name in findings.names:
    info = findings.info(name)
    top = findings.top(name)
    best = next((e for e in top if _finite(e.get('auroc'))), None)
    if info.get('reason'):
      what = f'<td colspan="3" class="reason">{_esc(info["reason"])}</td>'
    elif best:
      what = (
          f'<td class="best">{_feature_link(best.get("feature"), live)}</td>'
          f'<td class="num auroc">{_f3(best.get("auroc"))}</td>'
          f'<td class="kind">{_esc(best.get("kind") or "")}</td>'
      )
    else:
      what = '<td colspan="3" class="reason">no figures</td>'
    probe = info.get('probe') if isinstance(info.get('probe'), dict) else None
    bacc = [b for b in (probe or {}).get('balanced_accuracy') or [] if _finite(b)]
    rows.append(
        f'<tr data-finding="{_esc(name)}"><td>{findings.link(name, "")}</td>'
        f'<td class="num positives">{_count(info.get("positives"))}</td>'
        f'<td class="num negatives">{_count(info.get("negatives"))}</td>'
        f'<td class="covered">{"&#10003;" if name in covered else ""}</td>{what}'
        f'<td class="num probe">{_f3(max(bacc)) if bacc else "&mdash;"}</td></tr>'
    )
  body = (
      f'<h1>Clinical findings</h1>{_studies_html(findings)}'
      f'<p class="findings-line" id="coverage">{findings.coverage_html("")}</p>'
      '<table class="findings" id="findings-table"><thead><tr><th>finding</th><th>positives</th>'
      '<th>negatives</th><th>covered</th><th>best feature</th><th>AUROC</th><th>kind</th>'
      '<th>best probe bal. acc.</th></tr></thead>'
      f'<tbody>{"".join(rows)}</tbody></table>'
  )
  nav = f'<a href="../{INDEX}" id="to-index">&uarr; all features</a>'
  return _page(f'Clinical findings · {title}', 'findings-index', nav, body)


def _finding_page(findings: _Findings, name: str, live: set[int], title: str) -> str:
  info = findings.info(name)
  counts = [f'<b>{_count(info.get(k))}</b> {k}' for k in ('positives', 'negatives') if k in info]
  uncertain = (findings.studies.get('uncertain') or {}).get(name)
  if uncertain is not None:
    counts.append(f'{_count(uncertain)} uncertain ({_esc(findings.uncertain or "")})')
  covered = name in {str(n) for n in findings.coverage.get('covered') or []}
  parts = [f'<h1>{_esc(name)}</h1>', f'<p class="counts" id="counts">{" · ".join(counts)}</p>']
  if covered:
    parts.append('<p class="covered">&#10003; covered</p>')
  if info.get('reason'):
    parts.append(f'<p class="reason" id="reason">{_esc(info["reason"])}</p>')
  top = findings.top(name)
  if top:
    filt = urllib.parse.urlencode({'finding': name, 'sort': 'auroc', 'dir': '-1'})
    rows = ''.join(
        f'<tr data-feature="{_esc(e.get("feature"))}"><td>{_feature_link(e.get("feature"), live)}'
        f'</td><td class="kind">{_esc(e.get("kind") or "")}</td>'
        f'<td class="num auroc">{_f3(e.get("auroc"))}</td>'
        f'<td class="num precision">{_f3(e.get("precision"))}</td>'
        f'<td class="num recall">{_f3(e.get("recall"))}</td></tr>'
        for e in top
    )
    parts.append(
        _section(
            'aligned',
            'Features by AUROC',
            '<table class="findings"><thead><tr><th>feature</th><th>kind</th><th>AUROC</th>'
            f'<th>precision</th><th>recall</th></tr></thead><tbody>{rows}</tbody></table>'
            f'<p><a href="../{INDEX}#{_esc(filt)}" id="in-index">these features in the index'
            '</a></p>',
        )
    )
  elif not info.get('reason'):
    parts.append('<p class="none">No features listed.</p>')
  probe = info.get('probe')
  if isinstance(probe, dict):
    parts.append(_section('probe', 'Sparse probes', _probe_html(probe, live)))
  nav = (
      f'<a href="index.html" id="to-findings">&uarr; all findings</a>'
      f'<a href="../{INDEX}" id="to-index">all features</a>'
  )
  return _page(f'{name} · {title}', 'finding', nav, ''.join(parts))


def _probe_html(probe: dict, live: set[int]) -> str:
  """The probe curve (accuracy, balanced accuracy vs k, the majority class as a reference) and
  its table, with each k's features."""
  ks = list(probe.get('k') or [])
  n = len(ks)

  def series(key: str) -> list:
    values = list(probe.get(key) or [])
    return (values + [None] * n)[:n]

  acc, bacc, auroc, feats = (
      series('accuracy'),
      series('balanced_accuracy'),
      series('auroc'),
      series('features'),
  )
  majority = probe.get('majority_accuracy')
  facts = [
      f'{_count(probe.get(k))} {k.split("_")[0].replace("test", "held-out test")} studies'
      for k in ('train_studies', 'test_studies')
      if k in probe
  ]
  if _finite(majority):
    facts.append(f'majority class accuracy {_f3(majority)}')
  rows = ''.join(
      f'<tr data-k="{_esc(k)}"><td class="num">{_esc(k)}</td>'
      f'<td class="num accuracy">{_f3(acc[i])}</td>'
      f'<td class="num balanced">{_f3(bacc[i])}</td><td class="num auroc">{_f3(auroc[i])}</td>'
      f'<td class="features">{" ".join(_feature_link(f, live) for f in (feats[i] or []))}</td></tr>'
      for i, k in enumerate(ks)
  )
  return (
      (f'<p class="counts">{" · ".join(facts)}</p>' if facts else '')
      + _probe_svg(ks, acc, bacc, majority)
      + '<table class="findings probe"><thead><tr><th>k</th><th>accuracy</th>'
      '<th>balanced accuracy</th><th>AUROC</th><th>features</th></tr></thead>'
      f'<tbody>{rows}</tbody></table>'
  )


def _probe_svg(ks: list, acc: list, bacc: list, majority: Any) -> str:
  """Accuracy and balanced accuracy (held-out studies) against k, k evenly spaced."""
  values = [v for v in acc + bacc + [majority] if _finite(v)]
  if not ks or not values:
    return '<p class="none">No probe figures.</p>'
  w, h = PROBE_WIDTH, PROBE_HEIGHT
  x0, x1, y0, y1 = PROBE_LEFT, w - PROBE_RIGHT, PROBE_TOP, h - PROBE_BOTTOM
  lo = min(0.5, math.floor(min(values) * 10) / 10)

  def x(i: int) -> float:  # the points keep clear of the axis labels and the right edge
    inner0, inner1 = x0 + 20, x1 - 20
    return (inner0 + inner1) / 2 if len(ks) == 1 else inner0 + (inner1 - inner0) * i / (len(ks) - 1)

  def y(v: float) -> float:
    return y1 - (y1 - y0) * (min(max(v, lo), 1.0) - lo) / (1.0 - lo)

  out = []
  tick = lo
  while tick <= 1.0 + 1e-9:
    out.append(
        f'<line class="grid" x1="{x0}" x2="{x1}" y1="{y(tick):.2f}" y2="{y(tick):.2f}"/>'
        f'<text x="{x0 - 4}" y="{y(tick) + 4:.2f}" text-anchor="end">{tick:.1f}</text>'
    )
    tick = round(tick + 0.1, 10)
  out += [
      f'<text x="{x(i):.2f}" y="{h - 8}" text-anchor="middle">k={_esc(k)}</text>'
      for i, k in enumerate(ks)
  ]
  if _finite(majority):
    out.append(
        f'<line class="majority" x1="{x0}" x2="{x1}" y1="{y(majority):.2f}" '
        f'y2="{y(majority):.2f}"><title>majority class {_f3(majority)}</title></line>'
    )
  for cls, label, vals in (('acc', 'accuracy', acc), ('bacc', 'balanced accuracy', bacc)):
    pts = [(x(i), y(v), k, v) for i, (k, v) in enumerate(zip(ks, vals)) if _finite(v)]
    if len(pts) > 1:
      line = ' '.join(f'{px:.2f},{py:.2f}' for px, py, _, _ in pts)
      out.append(f'<polyline class="{cls}" points="{line}"/>')
    out += [
        f'<circle class="{cls}" cx="{px:.2f}" cy="{py:.2f}" r="4" data-k="{_esc(k)}" '
        f'data-value="{v}"><title>k={_esc(k)}: {label} {_f3(v)}</title></circle>'
        for px, py, k, v in pts
    ]
  legend = (  # above the plot
      f'<g class="legend"><circle class="acc" cx="{x0 + 4}" cy="10" r="4"/>'
      f'<text x="{x0 + 12}" y="14">accuracy</text>'
      f'<circle class="bacc" cx="{x0 + 92}" cy="10" r="4"/>'
      f'<text x="{x0 + 100}" y="14">balanced accuracy</text>'
      f'<line class="majority" x1="{x0 + 320}" x2="{x0 + 344}" y1="10" y2="10"/>'
      f'<text x="{x0 + 350}" y="14">majority class</text></g>'
  )
  return (
      f'<svg class="probe" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" '
      f'aria-label="probe accuracy against k">{"".join(out)}{legend}</svg>'
  )


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


def _finite(x: Any) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _auroc_key(x: Any) -> float:
  """Sort key: AUROCs high first, missing ones last."""
  return float(x) if _finite(x) else -math.inf


def _f3(x: Any) -> str:
  """A fraction to 3 decimals; missing (null) as a dash."""
  return f'{float(x):.3f}' if _finite(x) else '\u2014'


def _count(x: Any) -> str:
  return f'{x:,}' if isinstance(x, int) and not isinstance(x, bool) else '\u2014'


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
