"""Assets a run needs: the data lock of the embedded PyPI-shipped model and data, model
resolution and loading, and the one list of supported architectures.

May import: linbench.errors. Nothing else of linbench.
"""
