"""The variants the export builds, in report order: the one list of names, formats and the functions that build
and measure each (export.tflite.build and export.tflite.int8, export.qat.build, export.onnx.build). A builder takes the worker's Context and the attempt to start from (export.run.worker); the build modules import no
framework at import time, so the command line reads this list without loading TensorFlow."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from export.onnx import build as onnx_build
from export.qat import build as qat_build
from export.tflite import build as tflite_build
from export.tflite import int8


@dataclass(frozen=True)
class Variant:
    name: str
    format: str  # "tflite" or "onnx": the file it ships as, and the runtime that measures it
    build: Callable  # (Context, attempt) -> Built: builds and measures it, or raises Skip
    what: str


REGISTRY = (
    Variant("float32", "tflite", tflite_build.build_plain_tflite, "the float model in LiteRT"),
    Variant("dynamic", "tflite", tflite_build.build_plain_tflite,
            "dynamic-range quantisation: int8 weights, float activations"),
    Variant("float16", "tflite", tflite_build.build_plain_tflite, "float16 weights"),
    Variant("int8", "tflite", int8.build_int8, "full-integer quantisation, calibrated, uint8 in and out"),
    Variant("int8_selective", "tflite", int8.build_int8_selective, "int8 with the worst tensors kept in float"),
    Variant("qat_int8", "tflite", qat_build.build_qat, "int8 after quantisation-aware fine-tuning (tfmot)"),
    Variant("onnx_float32", "onnx", onnx_build.build_onnx_float32, "the float model in ONNX Runtime"),
    Variant("onnx_int8", "onnx", onnx_build.build_onnx_int8, "int8 QDQ, the best of its routes"),
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
