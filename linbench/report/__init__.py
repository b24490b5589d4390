"""The report: result tables, the markdown and HTML leaderboard, and the plots.

Reads records only. It knows no method or suite by name: metric order, direction, chance
level, derived metrics and a method's role arrive inside the records.
May import: linbench.records, linbench.errors, linbench.units.
"""
