// slope_bench leaderboard page: inlined into leaderboard.html by slope_bench.page.
// Click a header to sort; select boxes filter rows by model, task and method. The URL hash
// (#sort=compress/ratio, #sort=-metric, #model=resnet18&task=digits) does the same on load.
(function () {
  var table = document.getElementById('leaderboard');
  if (!table) { return; }
  var tbody = table.tBodies[0];
  var headers = Array.prototype.slice.call(table.tHead.rows[0].cells);
  function value(row, index) {
    var cell = row.cells[index];
    var raw = cell.getAttribute('data-sort');
    if (raw === null) { raw = cell.textContent.trim(); }
    if (raw === '') { return null; }
    var number = Number(raw);
    return isNaN(number) ? raw : number;
  }
  function sortBy(th) {
    var index = headers.indexOf(th);
    var direction = th.getAttribute('aria-sort') === 'ascending' ? 'descending' : 'ascending';
    headers.forEach(function (h) { h.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', direction);
    var sign = direction === 'ascending' ? 1 : -1;
    var rows = Array.prototype.slice.call(tbody.rows);
    rows.sort(function (a, b) {
      var x = value(a, index), y = value(b, index);
      if (x === null && y === null) { return 0; }
      if (x === null) { return 1; }
      if (y === null) { return -1; }
      if (typeof x === 'number' && typeof y === 'number') { return sign * (x - y); }
      return sign * String(x).localeCompare(String(y), undefined, {numeric: true});
    });
    rows.forEach(function (row) { tbody.appendChild(row); });
  }
  headers.forEach(function (th) {
    if (th.hasAttribute('data-key')) { th.addEventListener('click', function () { sortBy(th); }); }
  });
  var selects = Array.prototype.slice.call(document.querySelectorAll('select[data-filter]'));
  var counter = document.getElementById('shown');
  function filter() {
    var shown = 0;
    Array.prototype.slice.call(tbody.rows).forEach(function (row) {
      var keep = selects.every(function (s) {
        return s.value === '' || row.getAttribute('data-' + s.getAttribute('data-filter')) === s.value;
      });
      row.hidden = !keep;
      if (keep) { shown += 1; }
    });
    if (counter) { counter.textContent = shown + ' of ' + tbody.rows.length + ' settings shown'; }
  }
  selects.forEach(function (s) { s.addEventListener('change', filter); });
  filter();
  var hash = location.hash.replace(/^#/, '');
  var params = {};
  hash.split('&').forEach(function (part) {
    if (!part) { return; }
    var at = part.indexOf('=');
    if (at > 0) { params[decodeURIComponent(part.slice(0, at))] = decodeURIComponent(part.slice(at + 1)); }
  });
  selects.forEach(function (s) {
    var wanted = params[s.getAttribute('data-filter')];
    if (wanted !== undefined) { s.value = wanted; s.dispatchEvent(new Event('change')); }
  });
  if (params.sort) {
    var descending = params.sort.charAt(0) === '-';
    var key = descending ? params.sort.slice(1) : params.sort;
    var th = headers.filter(function (h) { return h.getAttribute('data-key') === key; })[0];
    if (th) { th.click(); if (descending) { th.click(); } }
  }
})();
