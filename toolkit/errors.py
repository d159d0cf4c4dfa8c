"""One way to turn an exception into one line, for every message this toolkit prints."""

from __future__ import annotations

import re


def one_line(e: BaseException, typed: bool = True, limit: int = 300) -> str:
    """The gist of ``e`` on one line, prefixed with its type unless ``typed`` is False.

    - pyarrow's AWS errors carry request ids and curl codes: keep the message and the AWS error code
      (``The specified bucket does not exist (NO_SUCH_BUCKET)``, ``cannot connect to the endpoint (HOST)``);
    - the TFLite converter's messages are MLIR diagnostics with source locations and notes: keep the first
      ``error:`` sentence;
    - lines repeated (the converter says "not yet supported for op" once per op): each once;
    - anything else: its text with whitespace collapsed, cut at ``limit`` characters."""
    raw = "\n".join(dict.fromkeys(line for line in str(e).strip().splitlines()))
    first = raw.splitlines()[0] if raw else ""
    aws = re.search(r"AWS Error (\w+) during \w+ operation: (.*?)(?: \(Request ID:.*)?$", first)
    if aws:
        code, message = aws.groups()
        if code == "NETWORK_CONNECTION":
            m = re.search(r"Failed to connect to (\S+)", message)
            return "cannot connect to the endpoint" + (f" ({m.group(1)})" if m else "")
        return f"{message.rstrip('.')} ({code})"
    text = " ".join(raw.split())
    if "error: " in text:
        text = text.split("error: ", 1)[1].split(" note: ")[0]
        text = text.split(" ^ ")[0].split(" <unknown>:")[0]
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    if not typed:
        return text or type(e).__name__
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
