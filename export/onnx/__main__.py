"""``python -m export.onnx MODEL.keras``: the ONNX variants only (see --help)."""

import sys

from export.run.cli import main

if __name__ == "__main__":
    sys.exit(main(formats=("onnx",), prog="python -m export.onnx"))
