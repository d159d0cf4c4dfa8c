"""The variants the export builds, in report order: the one list of names, formats and builders (the
functions of :mod:`export.builders` that build and measure each). Imports nothing of ours."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Variant:
    name: str
    format: str  # "tflite" or "onnx": the file it ships as, and the runtime that measures it
    builder: str  # the function in export.builders that builds and measures it
    what: str


REGISTRY = (
    Variant("float32", "tflite", "build_plain_tflite", "the float model in LiteRT"),
    Variant("dynamic", "tflite", "build_plain_tflite", "dynamic-range quantisation: int8 weights, float activations"),
    Variant("float16", "tflite", "build_plain_tflite", "float16 weights"),
    Variant("int8", "tflite", "build_plain_tflite", "full-integer quantisation, calibrated, uint8 in and out"),
    Variant("int8_selective", "tflite", "build_int8_selective", "int8 with the worst tensors kept in float"),
    Variant("qat_int8", "tflite", "build_qat", "int8 after quantisation-aware fine-tuning (tfmot)"),
    Variant("onnx_float32", "onnx", "build_onnx_float32", "the float model in ONNX Runtime"),
    Variant("onnx_int8", "onnx", "build_onnx_int8", "int8 QDQ, the best of its routes"),
)
BY_NAME = {v.name: v for v in REGISTRY}
ALL_VARIANTS = tuple(v.name for v in REGISTRY)
FORMAT_OF = {v.name: v.format for v in REGISTRY}


def variants_problem(names: Sequence[str]) -> str:
    """What is wrong with a selection of variant names ("" when nothing): the one check of ``--variants``
    (ExportConfig) and of jobs/train.py's ``--export-variants`` (before any training)."""
    unknown = [v for v in names if v not in ALL_VARIANTS]
    if unknown:
        return f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(ALL_VARIANTS)}"
    return "" if names else "no variants selected"


def variants_of(formats: Sequence[str]) -> tuple[str, ...]:
    """The variant names of ``formats``, in report order."""
    return tuple(v.name for v in REGISTRY if v.format in formats)
