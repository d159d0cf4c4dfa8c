"""The export's two kinds of trouble: bad input (exit 2, nothing written) and one-line error gists."""

from __future__ import annotations


class ExportInputError(ValueError):
    """Bad input to the export (model, data, variants): exit status 2, nothing written."""


def one_line(e: BaseException) -> str:
    """The gist of an error on one line. The TFLite converter's messages are MLIR diagnostics with
    source locations and notes: keep the first ``error:`` sentence."""
    text = " ".join(str(e).split())
    if "error: " in text:
        text = text.split("error: ", 1)[1].split(" note: ")[0]
        text = text.split(" ^ ")[0].split(" <unknown>:")[0]
    if len(text) > 300:
        text = text[:297] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
