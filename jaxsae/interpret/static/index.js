// The index table: rows come from the inline JSON (#feature-data); only one page is in the DOM.
// State (query, sort, dead toggle, page, finding) lives in the URL fragment so "back" restores
// the view. With clinical findings (data.findings) a column shows each feature's best finding and
// a select box keeps the features aligned with one finding, its AUROC then shown and sortable.
(function () {
  'use strict';
  var data = JSON.parse(document.getElementById('feature-data').textContent);
  var F = {};
  data.fields.forEach(function (name, i) { F[name] = i; });
  var rows = data.rows;
  var pageSize = data.pageSize;
  var text = rows.map(function (r) {
    return ((r[F.explanation] || '') + ' \n ' + r[F.tokens]).toLowerCase();
  });
  var DEFAULT_DIR = {id: 1, explanation: 1, density: -1, mean: -1, max: -1, score: -1};
  var FD = data.findings || null;
  var aligned = new Map();  // finding -> Map(feature id -> [AUROC, kind])
  var slugs = new Map();  // finding -> its page's name stem
  if (FD) {
    DEFAULT_DIR.auroc = -1;
    FD.names.forEach(function (name, i) {
      slugs.set(name, FD.slugs[i]);
      aligned.set(name, new Map(FD.aligned[name].map(function (e) {
        return [e[0], [e[1], e[2]]];
      })));
    });
  }
  var state = {q: '', sort: 'id', dir: 1, dead: false, page: 0, finding: ''};
  var view = [];
  var written = null;  // the fragment this script last wrote (its own hashchange is ignored)

  var search = document.getElementById('search');
  var showDead = document.getElementById('show-dead');
  var status = document.getElementById('status');
  var prev = document.getElementById('prev-page');
  var next = document.getElementById('next-page');
  var tbody = document.querySelector('#features tbody');
  var headers = document.querySelectorAll('#features th.sortable');
  var findingBox = document.getElementById('finding');
  var findingHeader = document.querySelector('#features th[data-key="auroc"]');

  function readHash() {
    var p = new URLSearchParams(location.hash.slice(1));
    var sort = p.get('sort');
    state.q = p.get('q') || '';
    state.sort = DEFAULT_DIR.hasOwnProperty(sort) ? sort : 'id';
    state.dir = p.get('dir') === '-1' ? -1 : 1;
    state.dead = p.get('dead') === '1';
    state.page = Math.max(0, parseInt(p.get('page') || '0', 10) || 0);
    var finding = p.get('finding') || '';
    state.finding = aligned.has(finding) ? finding : '';
    search.value = state.q;
    showDead.checked = state.dead;
    if (findingBox) findingBox.value = state.finding;
  }

  function writeHash() {
    var p = new URLSearchParams();
    if (state.q) p.set('q', state.q);
    if (state.sort !== 'id' || state.dir !== 1) {
      p.set('sort', state.sort);
      p.set('dir', state.dir);
    }
    if (state.dead) p.set('dead', '1');
    if (state.finding) p.set('finding', state.finding);
    if (state.page) p.set('page', state.page);
    var h = p.toString();
    if (h !== location.hash.slice(1)) location.replace('#' + h);
    written = location.hash.slice(1);
  }

  // A term matches text containing it; a number also matches that feature id, '#12' only the id.
  function matcher(q) {
    var terms = q.toLowerCase().split(/\s+/).filter(Boolean);
    return function (i) {
      var r = rows[i];
      return terms.every(function (t) {
        var m = /^#?(\d+)$/.exec(t);
        if (m && r[F.id] === parseInt(m[1], 10)) return true;
        return t.charAt(0) !== '#' && text[i].indexOf(t) !== -1;
      });
    };
  }

  // The AUROC column: the chosen finding's AUROC, or (none chosen) the best finding's.
  function chosen(i) {
    return state.finding ? aligned.get(state.finding).get(rows[i][F.id]) || null : null;
  }

  function value(i, key) {
    if (key === 'auroc' && state.finding) {
      var e = chosen(i);
      return e ? e[0] : null;
    }
    return rows[i][F[key]];
  }

  function compare(key, dir) {
    var textual = key === 'explanation';
    return function (a, b) {
      var x = value(a, key), y = value(b, key);
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
    var only = state.finding ? aligned.get(state.finding) : null;
    view = [];
    for (var i = 0; i < rows.length; i++) {
      if (only && !only.has(rows[i][F.id])) continue;
      if ((state.dead || rows[i][F.count] > 0) && match(i)) view.push(i);
    }
    view.sort(compare(state.sort, state.dir));
  }

  function fmt(x) {
    if (x === null) return '\u2014';
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

  function findingCell(tr, i) {
    var td = cell(tr, '', 'finding');
    var name = state.finding || rows[i][F.finding];
    var e = state.finding ? chosen(i) : [rows[i][F.auroc], ''];
    if (name === null || !e || e[0] === null) { td.textContent = '\u2014'; return; }
    if (!state.finding) {
      var a = document.createElement('a');
      a.href = 'findings/' + slugs.get(name) + '.html';
      a.textContent = name;
      td.appendChild(a);
      td.appendChild(document.createTextNode(' '));
    }
    var num = document.createElement('span');
    num.className = 'num auroc';
    num.textContent = e[0].toFixed(3);
    td.appendChild(num);
    if (e[1]) td.appendChild(document.createTextNode(' \u00b7 ' + e[1]));
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
        badge.textContent = 'never fired';
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
      cell(tr, r[F.score] === null ? '\u2014' : r[F.score].toFixed(3), 'num score');
      cell(tr, r[F.tokens], 'tokens');
      cell(tr, r[F.kind], 'kind');
      if (FD) findingCell(tr, view[k]);
      frag.appendChild(tr);
    }
    tbody.replaceChildren(frag);
    status.textContent = (view.length
        ? 'showing ' + (start + 1) + '\u2013' + end + ' of ' + view.length + ' matching (' +
          rows.length + ' features)'
        : 'no matching features (' + rows.length + ' features)') +
        (state.finding ? ' aligned with ' + state.finding : '');
    if (findingHeader) {
      findingHeader.textContent = state.finding ? state.finding + ' AUROC' : 'best finding';
    }
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
  if (findingBox) {
    findingBox.addEventListener('change', function () {
      state.finding = findingBox.value;
      if (state.finding) { state.sort = 'auroc'; state.dir = -1; }
      state.page = 0; update();
    });
  }
  prev.addEventListener('click', function () { state.page--; render(); });
  next.addEventListener('click', function () { state.page++; render(); });

  // A fragment typed or linked while the page is open (no reload happens) applies too.
  window.addEventListener('hashchange', function () {
    if (location.hash.slice(1) !== written) { readHash(); update(); }
  });

  readHash();
  update();
})();
