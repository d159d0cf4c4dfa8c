"""``python -m export MODEL.keras``: TFLite and ONNX variants with one combined report."""

import sys

from export.run.cli import main

if __name__ == "__main__":
    sys.exit(main())
