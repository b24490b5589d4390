"""`linbench report`: render every record into leaderboard.md, index.html and PNG plots.

The markdown file links the PNGs next to it; index.html embeds them (base64), so it is one
self-contained file.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from linbench.report import ablations
from linbench.report import plots as plots_mod
from linbench.report import build as report
from linbench.report import html_page as report_html


@dataclass
class Leaderboard:
    markdown: Path
    html: Path
    plots: list            # plots_mod.Plot
    skipped: dict          # plot section -> why it has no plot
    tables: list           # report.Table


def _md_escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown_page(tables: list, plots: list, skipped: dict, n_records: int,
                  sections: dict[str, str]) -> str:
    lines = ["# linbench leaderboard", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} from "
             f"{n_records} records. Rows share a table only under one comparability key.", "",
             "## Tables", "", "Marks:", ""]
    lines += [f"- `{k}`: {v}" for k, v in report_html.LEGEND] + [""]
    for i, t in enumerate(tables):
        lines += [report.to_markdown(t), ""]
        mine = [p for p in plots if p.table == i]
        if mine:
            lines += ["Plots: " + ", ".join(f"[{p.title}]({p.path.name})" for p in mine), ""]
        lines += ["<details><summary>Provenance</summary>", "",
                  "| " + " | ".join(report.PROVENANCE_COLUMNS) + " |",
                  "|" + "---|" * len(report.PROVENANCE_COLUMNS)]
        lines += ["| " + " | ".join(_md_escape(r[c]) for c in report.PROVENANCE_COLUMNS) + " |"
                  for r in report.provenance(t)]
        lines += ["", "</details>", ""]
    lines += ["## Plots", ""]
    for section, title in sections.items():
        lines += [f"### {title}", ""]
        mine = [p for p in plots if p.section == section]
        for p in mine:
            lines += [f"![{p.title}]({p.path.name})", "", f"*{p.caption}*", ""]
        if not mine:
            lines += [f"_No plot: {skipped.get(section, 'no data')}._", ""]
    return "\n".join(lines)


def write(records: list[dict], out_dir) -> Leaderboard:
    """Write leaderboard.md, index.html and the plots into out_dir (created if needed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = report.build_tables(records)
    plots, skipped = plots_mod.make_plots(tables, records, out)
    tables += ablations.ablation_tables(tables)  # after the plots: they index the tables
    sections = plots_mod.sections(records)
    md = out / "leaderboard.md"
    md.write_text(markdown_page(tables, plots, skipped, len(records), sections))
    page = out / "index.html"
    page.write_text(report_html.page(tables, plots, skipped, len(records), sections))
    return Leaderboard(md, page, plots, skipped, tables)
