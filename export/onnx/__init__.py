"""ONNX variants: float32 through tf2onnx, and int8 (QDQ) by two to four routes, measured, the best kept.

    python -m export.onnx MODEL.keras --data ...    (see --help)

``onnx_int8`` candidates:
  ``ort_static``   ONNX Runtime static quantisation of the float ONNX model (QDQ, per-channel
                   int8 weights, uint8 activations), calibrated on the same images as TFLite int8;
  ``from_tflite``  tf2onnx conversion of the int8 TFLite model (its quantisation carried over);
  ``ort_static_clipped``  when int8 clipped its activation ranges (export.tflite.ranges): ``ort_static`` with
                   ONNX Runtime's percentile calibration at the same percentile;
  ``ort_static_selective``  when int8_selective had to clip ranges or keep layers in float: ``ort_static``
                   with the same percentile ranges and the same layers' nodes left in float.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from typing import Optional

import numpy as np

from toolkit.tf import import_tf

# Opset 17: supported by every ONNX Runtime of the last years, mobile included.
OPSET = 17


def convert_float32(model, path: str) -> None:
    """tf2onnx with an explicit input signature (batch dimension dynamic, raw 0-255 float pixels),
    checked with ``onnx.checker``. ``model``: a tf_keras model, or a SourceModel (any saved model,
    converted through its concrete function)."""
    tf = import_tf()
    import onnx
    import tf2onnx

    keras2 = model.onnx_keras() if hasattr(model, "info") else model
    if keras2 is not None:
        spec = [tf.TensorSpec((None, *keras2.input_shape[1:]), tf.float32, name="image")]
        proto, _ = tf2onnx.convert.from_keras(keras2, input_signature=spec, opset=OPSET)
    else:
        from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

        spec = [tf.TensorSpec((None, *model.info.input_shape), tf.float32, name="image")]
        fn = model.concrete_function()
        # Frozen first: a loaded SavedModel's function captures constant tensors (a Keras 3 Normalization's mean
        # and variance) that tf2onnx would otherwise leave as graph inputs ("Required inputs ... are missing
        # from input feed": the zoo's Keras 3 EfficientNetB0).
        frozen = convert_variables_to_constants_v2(tf.function(lambda image: fn(image)).get_concrete_function(*spec))
        proto, _ = tf2onnx.convert.from_function(tf.function(lambda image: frozen(image)), input_signature=spec,
                                                 opset=OPSET)
    proto = erfc_as_erf(proto)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, path)


def erfc_as_erf(proto):
    """Every ``Erfc(x)`` node as ``1 - Erf(x)``. TensorFlow computes exact GELU with erfc; tf2onnx writes it
    as an ``Erfc`` node, an op ONNX does not have (``No Op registered for Erfc with domain_version of 17``);
    ``Erf`` exists since opset 9 and ONNX Runtime runs it."""
    import onnx
    from onnx import helper, numpy_helper

    graph = proto.graph
    if not any(n.op_type == "Erfc" for n in graph.node):
        return proto
    one = "erfc_as_erf_one"
    graph.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), one))
    nodes = []
    for n in graph.node:
        if n.op_type != "Erfc":
            nodes.append(n)
            continue
        erf = f"{n.name}_erf"
        nodes.append(helper.make_node("Erf", [n.input[0]], [erf], name=erf))
        nodes.append(helper.make_node("Sub", [one, erf], list(n.output), name=f"{n.name}_one_minus"))
    del graph.node[:]
    graph.node.extend(nodes)
    return onnx.shape_inference.infer_shapes(proto)


def convert_from_tflite(tflite_path: str, path: str) -> None:
    """tf2onnx from an int8 TFLite model: quantised tensors become QuantizeLinear/DequantizeLinear."""
    import onnx
    import tf2onnx

    with warnings.catch_warnings():
        # tf2onnx reads the flatbuffer with tf.lite.Interpreter, which warns it is deprecated;
        # our measurements run in LiteRT.
        warnings.simplefilter("ignore", UserWarning)
        proto, _ = tf2onnx.convert.from_tflite(str(tflite_path), opset=OPSET)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, path)


def nodes_of_layers(float_path: str, layers: list[str]) -> list[str]:
    """The ONNX nodes tf2onnx made from the named Keras layers (their names keep ``.../layer/...``)."""
    import onnx

    keys = [f"/{layer}/" for layer in layers]
    return [n.name for n in onnx.load(float_path).graph.node if any(k in f"/{n.name}" for k in keys)]


def quantize_static(float_path: str, calibration: np.ndarray, path: str,
                    float_layers: Optional[list[str]] = None, percentile: Optional[float] = None) -> None:
    """ONNX Runtime static QDQ quantisation calibrated on ``calibration`` (uint8 images); the nodes
    made from the Keras layers ``float_layers`` stay in float. ``percentile``: each activation's range is that
    percentile of its values (ONNX Runtime's Percentile calibration, as int8_selective's clipped ranges) instead
    of its minimum and maximum."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    input_name = onnx.load(float_path).graph.input[0].name

    # Batches of one size: ONNX Runtime's percentile calibrater stacks every batch's outputs and refuses a shorter
    # last one ("inhomogeneous shape"); the largest size up to 32 that divides the images.
    batch = max(b for b in range(1, 33) if len(calibration) % b == 0)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(range(0, len(calibration), batch))

        def get_next(self):
            i = next(self._it, None)
            return None if i is None else {input_name: calibration[i:i + batch].astype(np.float32)}

    with tempfile.TemporaryDirectory() as tmp:
        pre = os.path.join(tmp, "pre.onnx")
        quant_pre_process(float_path, pre, skip_symbolic_shape=True)
        # Pre-processing fuses nodes (MatMul + Add -> Gemm) and renames them: look the layers up after it.
        exclude = nodes_of_layers(pre, float_layers) if float_layers else []
        if float_layers and not exclude:
            raise ValueError(f"float_layers: no ONNX nodes found for layers {', '.join(float_layers)}")
        with contextlib.redirect_stdout(io.StringIO()):  # its percentile calibrater prints its histograms' sizes
            ort_quantize_static(
                pre, path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                nodes_to_exclude=exclude,
                # ONNX Runtime's percentile cuts (100 - p) / 2 off each side; clip_ranges cuts (100 - p) off each
                **({"calibrate_method": CalibrationMethod.Percentile,
                    "extra_options": {"CalibPercentile": 100 - 2 * (100 - percentile)}} if percentile else {}),
            )
    onnx.checker.check_model(onnx.load(path), full_check=True)
