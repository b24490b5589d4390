"""Run records: the schema and the one record builder, the results store, provenance and
the comparability keys that decide which records may share a table.

May import: linbench.errors, linbench.units. Nothing else of linbench (in particular no
plugin: records describe plugins through the metadata the runner copies into them).
"""
