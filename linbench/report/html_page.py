"""The leaderboard as one self-contained HTML file: inline CSS and JS, plots embedded as
base64 PNGs, so the page works when opened anywhere, with no network.

The script sorts a table when a header is clicked (first click: descending for numbers,
ascending for text). It reports itself in the DOM so a headless browser can check it:
`<html data-js-errors>` lists uncaught errors and console.error calls (also shown in a red
box), `<body data-images="ok/total">` counts decoded images, each table's `data-order` holds
its first column after a sort, and `<body data-ready="1">` is set last. `?sort=t0:3,t1:2`
clicks those headers (table id : column index) after loading.
"""
from __future__ import annotations

import base64
import html
import time

from linbench.report import meta as plugin_meta
from linbench.report import stats
from linbench.report.build import PROVENANCE_COLUMNS, provenance

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1500px;
 padding:0 24px 48px;color:#1d2330;background:#fff}
h1{margin:24px 0 4px}h2{margin-top:36px;border-bottom:2px solid #dde3ec;padding-bottom:4px}
h3{font-size:15px;margin:28px 0 8px}.meta{color:#5b6678}
nav ul{columns:2;padding-left:18px}nav a{color:#2156a5}
#js-errors{background:#fde8e8;border:1px solid #d33;color:#900;padding:8px 8px 8px 28px}
.wrap{overflow-x:auto}
table{border-collapse:collapse;font-variant-numeric:tabular-nums;font-size:13px}
th,td{border:1px solid #dde3ec;padding:4px 8px;text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}
table.sortable th{background:#f2f5f9;cursor:pointer;user-select:none;position:sticky;top:0}
table.sortable th:hover{background:#e3e9f2}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
tr.baseline td{background:#f7f9fc;font-weight:600}
tr.failed td{background:#fdf0ef;color:#8a1f11}
ul.notes{color:#5b6678;font-size:12.5px;margin:6px 0}
details.prov{margin:6px 0 0;font-size:12.5px}details.prov td{text-align:left;white-space:normal}
figure{margin:16px 0;border:1px solid #dde3ec;padding:8px;display:inline-block;max-width:100%}
figure img{max-width:100%;height:auto;display:block}figcaption{color:#5b6678;font-size:12.5px}
p.skipped{color:#8a6d00;background:#fff8e0;padding:6px 10px;border-left:3px solid #e0b000}
td.ns{color:#7a8699}td[title]{cursor:help}
ul.notes li.chance{color:#8a4b00;font-weight:600}
div.legend{border:1px solid #dde3ec;background:#f7f9fc;padding:6px 12px;margin:10px 0;font-size:13px}
div.legend dt{font-weight:600;display:inline}div.legend dd{display:inline;margin:0 0 0 6px}
div.legend div{margin:2px 0}
"""

# Installed first, in <head>: every later error lands in the DOM.
ERROR_JS = """
window.__errors = [];
function __note(msg) {
  window.__errors.push(String(msg));
  document.documentElement.setAttribute('data-js-errors', JSON.stringify(window.__errors));
  var box = document.getElementById('js-errors');
  if (box) { box.hidden = false; var li = document.createElement('li');
             li.textContent = String(msg); box.appendChild(li); }
}
window.addEventListener('error', function (e) {
  __note((e.message || 'error') + ' (line ' + (e.lineno || '?') + ')'); });
window.addEventListener('unhandledrejection', function (e) { __note('rejection: ' + e.reason); });
(function () { var orig = console.error;
  console.error = function () { __note('console.error: ' + Array.prototype.join.call(arguments, ' '));
                                return orig.apply(console, arguments); }; })();
"""

MAIN_JS = """
(function () {
  function key(td) {
    var s = td.getAttribute('data-sort');
    if (s === null) { s = td.textContent.trim(); if (s === '-') s = ''; }
    return s === '' ? null : s;
  }
  function isNum(s) { return s !== null && s.trim() !== '' && !isNaN(Number(s)); }
  function sortBy(th) {
    var table = th.closest('table'), idx = th.cellIndex, body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var numeric = rows.every(function (r) { var k = key(r.cells[idx]); return k === null || isNum(k); });
    var now = th.getAttribute('aria-sort');
    var dir = now ? (now === 'ascending' ? -1 : 1) : (numeric ? -1 : 1);
    rows.sort(function (r1, r2) {
      var a = key(r1.cells[idx]), b = key(r2.cells[idx]);
      if (a === null || b === null) return (a === null) - (b === null);  // blanks last
      return dir * (numeric ? Number(a) - Number(b) : a.localeCompare(b));
    });
    rows.forEach(function (r) { body.appendChild(r); });
    Array.prototype.forEach.call(th.parentNode.cells, function (h) { h.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', dir === 1 ? 'ascending' : 'descending');
    table.setAttribute('data-order', rows.map(function (r) {
      return r.cells[0].textContent.trim(); }).join(','));
  }
  document.querySelectorAll('table.sortable th').forEach(function (th) {
    th.title = 'click to sort';
    th.addEventListener('click', function () { sortBy(th); });
  });
  window.addEventListener('load', function () {
    var ok = 0, imgs = document.images;
    for (var i = 0; i < imgs.length; i++) {
      imgs[i].setAttribute('data-natural-width', imgs[i].naturalWidth);
      if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++;
    }
    document.body.setAttribute('data-images', ok + '/' + imgs.length);
    var want = new URLSearchParams(location.search).get('sort');
    (want ? want.split(',') : []).forEach(function (item) {
      var parts = item.split(':'), table = document.getElementById(parts[0]);
      table.tHead.rows[0].cells[Number(parts[1])].click();
    });
    document.body.setAttribute('data-ready', '1');
  });
})();
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _cell(c) -> str:
    if c.sort is None:
        attr = ' data-sort=""' if c.text == "-" else ""
    else:
        attr = f' data-sort="{_e(c.sort)}"'
    if getattr(c, "title", None):
        attr += f' title="{_e(c.title)}"'
    if getattr(c, "css", None):
        attr += f' class="{_e(c.css)}"'
    return f"<td{attr}>{_e(c.text)}</td>"


LEGEND = [
    (f"{stats.APPROX} 41.2", "not significantly different from the parent row at 95% on the "
     "items both runs share (paired test: exact McNemar for accuracies, bootstrap for "
     "averages and other values, document bootstrap of the ratio for perplexities); the "
     "same mark on its % of parent / x parent"),
    ("41.2", "significant, or not testable (the table's notes count those cells and say "
     "why, e.g. records without per-item outcomes)"),
    ("hover a cell", f"the test: difference, 95% CI, p, number of shared items "
     f"({stats.ACCURACY_CI})"),
    ("parent at chance", "the parent is within 2 stderr of the chance level: that suite "
     "cannot rank methods on this model, so its table has no % of parent and is not ranked"),
]


def legend_html() -> str:
    return ('<div class="legend" id="legend"><b>Marks</b>'
            + "".join(f"<div><dt>{_e(k)}</dt><dd>{_e(v)}</dd></div>" for k, v in LEGEND)
            + "</div>")


def _table(i: int, t, plots) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in t.columns)
    body = []
    for row, rec in zip(t.rows, t.records):
        cls = ("failed" if rec.get("status") != "ok"
               else "baseline" if rec.get("method_role") in plugin_meta.ROLES else "")
        body.append(f'<tr class="{cls}" data-method="{_e(rec.get("method"))}" '
                    f'data-status="{_e(rec.get("status"))}">' + "".join(map(_cell, row)) + "</tr>")
    parts = [f'<section class="tbl" id="sec-t{i}"><h3>{_e(t.title)}</h3>',
             f'<div class="wrap"><table class="sortable" id="t{i}" data-kind="{t.kind}" '
             f'data-suite="{_e(t.suite)}"><thead><tr>{head}</tr></thead>'
             f'<tbody>{"".join(body)}</tbody></table></div>']
    if t.notes:
        parts.append('<ul class="notes">' + "".join(
            f'<li class="chance">{_e(n)}</li>' if n == stats.AT_CHANCE_NOTE else f"<li>{_e(n)}</li>"
            for n in t.notes) + "</ul>")
    mine = [p for p in plots if p.table == i]
    if mine:
        parts.append("<p>Plots: " + ", ".join(f'<a href="#{_e(p.path.stem)}">{_e(p.title)}</a>'
                                              for p in mine) + "</p>")
    prov = provenance(t)
    rows = "".join("<tr>" + "".join(f"<td>{_e(r[c])}</td>" for c in PROVENANCE_COLUMNS) + "</tr>"
                   for r in prov)
    parts.append(f'<details class="prov"><summary>Provenance ({len(prov)})</summary>'
                 f'<div class="wrap"><table><thead><tr>'
                 + "".join(f"<th>{_e(c)}</th>" for c in PROVENANCE_COLUMNS)
                 + f"</tr></thead><tbody>{rows}</tbody></table></div></details></section>")
    return "\n".join(parts)


def _figure(p) -> str:
    data = base64.b64encode(p.path.read_bytes()).decode("ascii")
    return (f'<figure id="{_e(p.path.stem)}"><img alt="{_e(p.title)}" '
            f'src="data:image/png;base64,{data}"><figcaption><b>{_e(p.title)}</b>. '
            f"{_e(p.caption)} <code>{_e(p.path.name)}</code></figcaption></figure>")


def page(tables: list, plots: list, skipped: dict[str, str], n_records: int,
         sections: dict[str, str]) -> str:
    """The page; `sections` maps each plot section to its title (plots.sections)."""
    toc = "".join(f'<li><a href="#sec-t{i}">{_e(t.title)}</a></li>' for i, t in enumerate(tables))
    toc += "".join(f'<li><a href="#plots-{s}">{_e(title)}</a></li>' for s, title in sections.items())
    body = [f"<h1>linbench leaderboard</h1><p class=\"meta\">generated "
            f"{_e(time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime()))} from {n_records} "
            f"records · {len(tables)} tables · {len(plots)} plots · rows share a table only "
            f"under one comparability key; click a column header to sort</p>",
            '<ul id="js-errors" hidden></ul>', f"<nav><ul>{toc}</ul></nav>",
            "<h2>Tables</h2>", legend_html()]
    body += [_table(i, t, plots) for i, t in enumerate(tables)]
    body.append('<h2 id="plots">Plots</h2>')
    for section, title in sections.items():
        body.append(f'<section class="plots" id="plots-{section}"><h3>{_e(title)}</h3>')
        mine = [p for p in plots if p.section == section]
        body += [_figure(p) for p in mine]
        if not mine:
            body.append(f'<p class="skipped">No plot: {_e(skipped.get(section, "no data"))}.</p>')
        body.append("</section>")
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>linbench leaderboard</title><script>{ERROR_JS}</script>"
            f"<style>{CSS}</style></head>\n<body>\n" + "\n".join(body)
            + f"\n<script>{MAIN_JS}</script>\n</body></html>\n")
