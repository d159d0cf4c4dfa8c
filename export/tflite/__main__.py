"""``python -m export.tflite MODEL.keras``: the TFLite variants only (see --help)."""

import sys

from export.run.cli import main

if __name__ == "__main__":
    sys.exit(main(formats=("tflite",), prog="python -m export.tflite"))
