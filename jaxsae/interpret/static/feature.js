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
