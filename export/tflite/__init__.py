"""TFLite variants: float32, dynamic-range, float16, full-integer int8, selective int8, and QAT int8.

    python -m export.tflite MODEL.keras --data ...    (see --help)

Each ``convert_*`` takes a tf_keras model or a SourceModel (any saved model) and returns the .tflite flatbuffer bytes.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator, Optional

import numpy as np

from toolkit.tf import import_tf

def representative_dataset(calibration: np.ndarray):
    """The converter's representative dataset: raw 0-255 pixels, one image at a time, exactly
    what the model is fed on a device."""
    def gen() -> Iterator[list]:
        for i in range(len(calibration)):
            yield [calibration[i:i + 1].astype(np.float32)]
    return gen


def _converter(model):
    """A TFLiteConverter for a tf_keras model or an :class:`export.model.load.SourceModel` (any source)."""
    if hasattr(model, "tflite_converter"):
        return model.tflite_converter()
    tf = import_tf()
    return tf.lite.TFLiteConverter.from_keras_model(model)


@contextlib.contextmanager
def quiet_converter():
    """The converter warns that a model scaling its own pixels has no input statistics; expected here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
        yield


def convert_float32(model) -> bytes:
    return _converter(model).convert()


def convert_dynamic(model) -> bytes:
    """Dynamic-range quantisation: int8 weights, float activations; no calibration needed."""
    tf = import_tf()
    c = _converter(model)
    c.optimizations = [tf.lite.Optimize.DEFAULT]
    return c.convert()


def convert_float16(model) -> bytes:
    tf = import_tf()
    c = _converter(model)
    c.optimizations = [tf.lite.Optimize.DEFAULT]
    c.target_spec.supported_types = [tf.float16]
    return c.convert()


def convert_int8(model, calibration: np.ndarray, io_type: str = "uint8") -> bytes:
    """Full-integer quantisation calibrated on ``calibration`` (uint8 images); integer-only ops.

    Input and output are ``io_type`` (uint8 or int8): a device feeds camera bytes as they are,
    since the model scales pixels itself (its input scale comes out as 1.0, zero point 0)."""
    tf = import_tf()
    if io_type not in ("uint8", "int8"):
        raise ValueError(f"io_type: expected 'uint8' or 'int8', got {io_type!r}")
    c = _calibrated_converter(model, calibration, [tf.lite.OpsSet.TFLITE_BUILTINS_INT8])
    c.inference_input_type = getattr(tf, io_type)
    c.inference_output_type = getattr(tf, io_type)
    with quiet_converter():
        return c.convert()


def convert_int16x8(model, calibration: np.ndarray, float_fallback: bool = False) -> bytes:
    """TFLite's 16x8 mode, calibrated on ``calibration``: 16-bit activations, 8-bit weights, integer throughout,
    float input and output. 256 times int8's activation steps, for models whose int8 loss is the activations' 8 bits
    (benchmarks/int8_precision.py); LiteRT runs it on reference kernels (no XNNPACK), TFLite Micro on its int16 ones.
    Raises the converter's error for an op without a 16x8 kernel (HARD_SWISH), unless ``float_fallback``: such ops
    then stay in float between a DEQUANTIZE and a QUANTIZE (TFLite's documented fallback: the 16x8 ops set with
    TFLITE_BUILTINS), and the rest is 16x8."""
    tf = import_tf()
    ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
    c = _calibrated_converter(model, calibration, ops + ([tf.lite.OpsSet.TFLITE_BUILTINS] if float_fallback else []))
    with quiet_converter():
        return c.convert()


def _calibrated_converter(model, calibration: np.ndarray, ops: list):
    """A converter quantising with ``ops`` (OpsSets), calibrated on ``calibration``."""
    tf = import_tf()
    if len(calibration) == 0:
        raise ValueError("calibration: no calibration images")
    c = _converter(model)
    c.optimizations = [tf.lite.Optimize.DEFAULT]
    c.representative_dataset = representative_dataset(calibration)
    c.target_spec.supported_ops = list(ops)
    return c


def convert_variant(variant: str, model, *, calibration: Optional[np.ndarray] = None) -> bytes:
    """Convert ``model`` (tf_keras model or SourceModel) to TFLite ``variant``.

    ``qat_int8`` is ``convert_int8`` of the QAT model (:mod:`export.qat.finetune`); ``int8_selective`` needs
    held-out images and a budget (:func:`export.tflite.selective.search_selective`)."""
    if variant == "float32":
        return convert_float32(model)
    if variant == "dynamic":
        return convert_dynamic(model)
    if variant == "float16":
        return convert_float16(model)
    if variant == "int8":
        return convert_int8(model, calibration)
    raise ValueError(f"variant: {variant!r} is not a plain conversion; choose from float32, dynamic, float16, int8")
