"""index.html in a real browser: headless Chromium loads the page, runs its script, and we
read back the DOM it dumps (the page writes its JS errors, decoded images and sort
results into the DOM, see linbench/report_html.py). Skipped only without a Chromium,
and never when LINBENCH_REQUIRE_CHROMIUM=1 (set by .ci/run, which installs it)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from matplotlib.image import imread

from linbench.report import leaderboard
from tests.report.records import record, synthetic_records

BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome",
                                          "google-chrome-stable") if shutil.which(b)), None)
if BROWSER is None and os.environ.get("LINBENCH_REQUIRE_CHROMIUM") == "1":
    raise RuntimeError("LINBENCH_REQUIRE_CHROMIUM=1 but no chromium on PATH")
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no chromium installed "
                                "(apt-get install chromium; CI installs it)")


class Dom(HTMLParser):
    """Attributes of <html>, <body>, every element with an id, the <img>s, and for each
    sortable table its rows as (tr attributes, first cell text)."""

    def __init__(self, text: str):
        super().__init__()
        self.attrs, self.imgs, self.rows = {}, [], {}
        self._table, self._row, self._cell, self._depth, self._body = None, None, None, 0, False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag in ("html", "body"):
            self.attrs[tag] = a
        if "id" in a:
            self.attrs[a["id"]] = a
        if tag == "img":
            self.imgs.append(a)
        if tag == "table":
            self._depth += 1
            if "sortable" in (a.get("class") or ""):
                self._table = a["id"]
                self.rows[self._table] = []
        elif tag == "tbody":
            self._body = True
        elif tag == "tr" and self._table and self._depth == 1 and self._body:
            self._row = [a, None]
        elif tag == "td" and self._row is not None and self._row[1] is None:
            self._cell = ""

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self._row[1], self._cell = self._cell.strip(), None
        elif tag == "tr" and self._row is not None:
            self.rows[self._table].append(tuple(self._row))
            self._row = None
        elif tag == "tbody":
            self._body = False
        elif tag == "table":
            self._depth -= 1
            self._table = None if self._depth == 0 else self._table


def chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([BROWSER, "--headless=new", "--no-sandbox", "--disable-gpu",
                           "--disable-dev-shm-usage", "--hide-scrollbars", *args],
                          capture_output=True, text=True, timeout=120)


def load(page, query: str = "", profile=None) -> Dom:
    out = chromium(f"--user-data-dir={profile}", "--dump-dom", page.as_uri() + query)
    assert "<body" in out.stdout, out.stderr[-2000:]
    return Dom(out.stdout)


@pytest.fixture(scope="module")
def board(tmp_path_factory):
    return leaderboard.write(synthetic_records(), tmp_path_factory.mktemp("leaderboard"))


@pytest.fixture
def profile(tmp_path):
    return tmp_path / "chromium-profile"


def methods(dom: Dom, table: str) -> list[str]:
    return [text for _, text in dom.rows[table]]


def test_page_loads_without_errors_with_tables_images_and_provenance(board, profile):
    dom = load(board.html, profile=profile)
    assert dom.attrs["body"].get("data-ready") == "1"
    assert "data-js-errors" not in dom.attrs["html"], dom.attrs["html"]["data-js-errors"]
    assert dom.attrs["js-errors"].get("hidden") is not None  # the red box stays hidden
    assert dom.attrs["body"]["data-images"] == "9/9"
    assert len(dom.imgs) == 9 and all(int(i["data-natural-width"]) > 0 for i in dom.imgs)
    assert all(i["src"].startswith("data:image/png;base64,") for i in dom.imgs)  # one file
    assert len(dom.rows) == len(board.tables) == 6
    kinds = {t: dom.attrs[t]["data-suite"] for t in dom.rows}
    assert kinds == {"t0": "mmlu5", "t1": "mmlu5", "t2": "commonsense", "t3": "ppl",
                     "t4": "recall", "t5": "speed"}
    assert methods(dom, "t0") == ["softmax", "lolcats", "swa", "liger"]  # parent, then by acc
    assert [r.get("data-status") for r, _ in dom.rows["t0"]] == ["ok", "ok", "ok", "error"]
    assert methods(dom, "t4") == ["softmax", "swa", "hedgehog", "lolcats"]
    speed = dom.rows["t5"]
    assert len(speed) == 30 and methods(dom, "t5")[:10] == ["softmax"] * 10
    assert sorted(r["data-status"] for r, _ in speed if r["data-status"] != "ok") == \
        ["oom", "oom", "timeout"]
    for i in range(6):
        assert f"sec-t{i}" in dom.attrs
    text = board.html.read_text()
    assert text.count('<details class="prov">') == 6 and "0123456789ab" in text
    assert "http://" not in text and "https://" not in text  # nothing fetched from a network


@pytest.mark.parametrize("query, table, order", [
    ("?sort=t0:3", "t0", ["softmax", "lolcats", "swa", "liger"]),        # acc: descending, blanks last
    ("?sort=t0:3,t0:3", "t0", ["swa", "lolcats", "softmax", "liger"]),   # second click: ascending
    ("?sort=t0:3,t0:0", "t0", ["softmax", "swa", "liger", "lolcats"]),   # method: canonical order
    ("?sort=t3:4", "t3", ["swa", "lolcats", "softmax"]),                 # ppl ratio, descending
], ids=["desc", "asc", "method", "ppl"])
def test_clicking_a_header_sorts_the_table(board, profile, query, table, order):
    dom = load(board.html, query, profile)
    assert dom.attrs["body"].get("data-ready") == "1" and "data-js-errors" not in dom.attrs["html"]
    assert methods(dom, table) == order
    assert dom.attrs[table]["data-order"] == ",".join(order)


def test_a_script_error_is_visible_in_the_dom(board, tmp_path, profile):
    """The error capture itself can fail the page: an injected error must show up."""
    broken = tmp_path / "broken.html"
    broken.write_text(board.html.read_text().replace(
        "<ul id=\"js-errors\" hidden></ul>",
        "<ul id=\"js-errors\" hidden></ul><script>undefinedFunction42();</script>"))
    dom = load(broken, profile=profile)
    errors = json.loads(dom.attrs["html"]["data-js-errors"])
    assert len(errors) == 1 and "undefinedFunction42" in errors[0]
    assert dom.attrs["js-errors"].get("hidden") is None
    assert dom.attrs["body"].get("data-ready") == "1"  # the page still works


def test_page_without_plot_data_says_so_and_loads(tmp_path, profile):
    recs = [record("softmax", "mmlu5", {"acc": {"value": 0.3, "stderr": 0.01, "n": 10}})]
    recs[0]["state_bytes"] = None
    board = leaderboard.write(recs, tmp_path / "lb")
    dom = load(board.html, profile=profile)
    assert dom.attrs["body"].get("data-ready") == "1" and "data-js-errors" not in dom.attrs["html"]
    assert dom.attrs["body"]["data-images"] == "0/0" and methods(dom, "t0") == ["softmax"]
    assert board.html.read_text().count('class="skipped">No plot:') == 4


def test_screenshot_is_a_rendered_page(board, tmp_path, profile):
    shot = tmp_path / "page.png"
    out = chromium(f"--user-data-dir={profile}", "--window-size=1400,2000",
                   f"--screenshot={shot}", board.html.as_uri())
    assert shot.exists(), out.stderr[-2000:]
    pixels = imread(shot)
    assert pixels.shape[:2] == (2000, 1400)
    assert pixels[..., :3].std() > 0.05  # not a blank page
