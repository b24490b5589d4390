"""The report: result tables, the markdown and HTML leaderboard, the plots, and `frame`,
every record's metrics as a pandas DataFrame.

Reads records only. It knows no method or suite by name: metric order, direction, chance
level, derived metrics and a method's role arrive inside the records (suite_meta,
method_role).
May import: linbench.records, linbench.errors, linbench.units.
"""
from linbench.report.frame import frame

__all__ = ["frame"]
