"""Record text reaches the markdown and HTML reports escaped: a method label, an error
message or a command line with markup or table syntax cannot break a table or inject HTML."""
from __future__ import annotations

import re

from tests.report.records import metric, record

EVIL_METHOD = "lolcats[note=a|b<script>alert(1)</script>]"
EVIL_ERROR = "ValueError: bad | cell <img src=x onerror=alert(2)>\nsecond line"


def evil_records() -> list[dict]:
    ok = record("softmax", "ppl", {"ppl_wiki": metric(20.0, None, 1000)},
                command=["linbench", "run", "--set", "x=<b>|</b>"])
    bad = record(EVIL_METHOD, "ppl", {}, status="error", error=EVIL_ERROR)
    return [ok, bad]


def _pipes(line: str) -> int:
    """Table cell separators: pipes not escaped with a backslash."""
    return len(re.findall(r"(?<!\\)\|", line))


def test_markdown_tables_keep_their_shape(tmp_path):
    from linbench.report import leaderboard
    board = leaderboard.write(evil_records(), tmp_path)
    text = board.markdown.read_text()
    table_lines = [line for line in text.splitlines() if line.startswith("|")]
    assert any("lolcats[note=a\\|b" in line for line in table_lines)
    blocks, current = [], []
    for line in text.splitlines():  # consecutive table lines form one table
        if line.startswith("|"):
            current.append(line)
        elif current:
            blocks.append(current)
            current = []
    assert blocks
    for block in blocks:
        assert len({_pipes(line) for line in block}) == 1, block
    (note,) = [line for line in text.splitlines() if "ValueError" in line]
    assert note.startswith("- lolcats[note=a\\|b") and "bad \\| cell" in note
    assert note.endswith("second line")  # the error's newline did not end the list item
    assert "linbench run --set x=<b>\\|</b>" in text  # provenance table cell


def test_html_escapes_every_record_string(tmp_path):
    from linbench.report import leaderboard
    board = leaderboard.write(evil_records(), tmp_path)
    page = board.html.read_text()
    assert "<script>alert(1)</script>" not in page
    assert "<img src=x" not in page and "<b>|</b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "bad | cell &lt;img src=x onerror=alert(2)&gt;" in page
    assert "linbench run --set x=&lt;b&gt;|&lt;/b&gt;" in page
