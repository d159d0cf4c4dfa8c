"""The export's bad input: exit 2, nothing written (one-line gists of other errors: toolkit.errors.one_line)."""

from __future__ import annotations


class ExportInputError(ValueError):
    """Bad input to the export (model, data, variants): exit status 2, nothing written."""
