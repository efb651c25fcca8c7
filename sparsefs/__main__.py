"""``python -m sparsefs``: the same as the ``sparsefs`` command."""

from sparsefs.cli import entry_point

entry_point()
