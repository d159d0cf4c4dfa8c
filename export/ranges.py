"""Activation ranges for full-integer int8: the converter's (each activation's minimum and maximum on the
calibration images) or narrower ones, clipped to a percentile of each activation's values.

A rare outlier stretches a min/max range until every ordinary value falls within a step or two of int8's 256;
clipping saturates the outlier instead and keeps the steps for the values that carry the decision. Which is better
is measured, not assumed (``export.int8_variants``' int8 and ``export.selective``'s step 0 try CLIP_PERCENTILES on
held-out images). The pieces: ``calibrate`` (the converter's calibrated float model, ranges recorded),
``activation_values`` (what each activation holds on some images), ``clip_ranges`` (the recorded ranges narrowed)
and ``quantize`` (the int8 model, as the converter would finish it).
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence

import numpy as np

# The percentiles tried as each activation's range when the min/max ranges miss the budget, widest first. Measured
# on the zoo's EfficientNetB0 (20,000 CIFAR-10 images, 4 epochs, 26.70% float; /tmp script over clip_ranges,
# 2026-11-29): int8 with min/max ranges agreed with float32 on 58.8% of 2,000 test images; clipped at the 99.99th
# percentile 68.1%, 99.9th 76.0%, 99th 71.4% (ranges kept: median 38% and 17% of min/max); the ranges minimising
# each tensor's squared error kept 85% and agreed on 62.3%: the tails they keep are what int8 cannot afford.
CLIP_PERCENTILES = (99.99, 99.9, 99.0)

# The percentiles are read from RANGE_IMAGES calibration images, and which ones decides as much as the percentile.
# Measured on the zoo's EfficientNetB0 (5,000 CIFAR-10 images, 23.80% float; /tmp script over these functions,
# 2026-11-29): clipped at the 99.99th percentile, five sets of 64 of the same 500 calibration images gave int8s that
# agreed with float32 on 64.9-80.9% of 2,000 test images (test accuracy 21.50-23.40%), and 500 held-out training
# images ranked them alike (agreement 64.2-81.0%) where their accuracy did not; reading the percentiles from 256
# images at once agreed less (47-61% over three calibrations). So int8 tries RANGE_SETS sets and keeps the one that
# agrees most with the float model on the held-out images (export.int8_variants.int8_ranges).
RANGE_IMAGES = 64
RANGE_SETS = 4


def range_sets(calibration: np.ndarray) -> int:
    """How many sets of RANGE_IMAGES images ``calibration`` holds, up to RANGE_SETS (at least one)."""
    return max(1, min(RANGE_SETS, len(calibration) // RANGE_IMAGES))


def range_images(calibration: np.ndarray, k: int = 0) -> np.ndarray:
    """The ``k``-th set of RANGE_IMAGES calibration images the percentiles are read from."""
    return calibration[k * RANGE_IMAGES:(k + 1) * RANGE_IMAGES]


def clip_key(percentile: Optional[float], k: int = 0) -> str:
    """The report's name of a range: "min/max", "99.9" (the first set of images), "99.9/2" (the third)."""
    if percentile is None:
        return "min/max"
    return f"{percentile:g}" if k == 0 else f"{percentile:g}/{k}"


def parse_clip_key(key: str) -> tuple[Optional[float], int]:
    """(percentile, set of images) of a ``clip_key``; (None, 0) for "min/max"."""
    if key == "min/max":
        return None, 0
    p, _, k = key.partition("/")
    return float(p), int(k or 0)


def clipped_as(calibrated: bytes, calibration: np.ndarray, key: Optional[str]) -> bytes:
    """The calibrated model with the ranges a clip_key names (read from that set of ``calibration`` images);
    unchanged for None or "min/max"."""
    percentile, k = parse_clip_key(key or "min/max")
    if percentile is None:
        return calibrated
    return clip_ranges(calibrated, activation_values(calibrated, range_images(calibration, k)), percentile)


def best_clipped_ranges(calibrated: bytes, calibration: np.ndarray, measure: Callable[[bytes], tuple[float, float]],
                        max_drop_pp: float, log: Callable[[str], None] = lambda line: None) -> dict:
    """The full-integer int8 model of ``calibrated`` with each of CLIP_PERCENTILES read from each of
    ``range_sets(calibration)`` sets of images, measured by ``measure(blob)`` -> (drop from the float model in
    points, agreement with it, on held-out images); of those within ``max_drop_pp``, the one that agrees most.
    Returns {"clip": its clip_key or None (none within), "blob": its file or None, "held_out_drop_pp": {key: drop},
    "held_out_agreement": {key: agreement}}."""
    out: dict = {"clip": None, "blob": None, "held_out_drop_pp": {}, "held_out_agreement": {}}
    best = -1.0
    for k in range(range_sets(calibration)):
        values = activation_values(calibrated, range_images(calibration, k))
        for p in CLIP_PERCENTILES:
            key, blob = clip_key(p, k), quantize(clip_ranges(calibrated, values, p))
            drop, agree = measure(blob)
            out["held_out_drop_pp"][key], out["held_out_agreement"][key] = drop, agree
            log(f"  int8 ranges clipped at {key}: held-out drop {drop:+.2f} pp, agreement with the float model "
                f"{agree:.1%}")
            if drop <= max_drop_pp and agree > best:
                best, out["clip"], out["blob"] = agree, key, blob
    return out


def activation_values(calibrated: bytes, images: np.ndarray, per_image: int = 2048,
                      seed: int = 0) -> dict[int, np.ndarray]:
    """Each float tensor's values on ``images`` (raw pixels, one at a time), from the calibrated model (a float
    model with its recorded ranges): at most ``per_image`` of them per image, drawn at random, so a large model's
    activations stay within memory. Keyed by tensor index."""
    from ai_edge_litert.interpreter import Interpreter

    with warnings.catch_warnings():  # "intended for debugging purposes only": this is reading them, once
        warnings.simplefilter("ignore", UserWarning)
        interp = Interpreter(model_content=calibrated, experimental_preserve_all_tensors=True)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]["index"]
    rng = np.random.default_rng(seed)
    values: dict[int, list] = {}
    for i in range(len(images)):
        interp.set_tensor(inp, images[i:i + 1].astype(np.float32))
        interp.invoke()
        for t in interp.get_tensor_details():
            if t["dtype"] != np.float32 or t["index"] == inp:
                continue
            try:
                v = interp.get_tensor(t["index"]).ravel()
            except ValueError:  # a tensor the runtime does not keep (weights folded away)
                continue
            values.setdefault(t["index"], []).append(v if v.size <= per_image else rng.choice(v, per_image))
    return {k: np.concatenate(v) for k, v in values.items()}


def clip_ranges(calibrated: bytes, values: dict[int, np.ndarray], percentile: float) -> bytes:
    """The calibrated model with each activation's recorded range narrowed to the ``percentile``-th and the
    (100 - ``percentile``)-th percentile of its ``values`` (never widened, zero kept inside, as int8 needs). The
    model's inputs (raw pixels: their range is exact) and outputs keep theirs."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(calibrated)
    for graph in model.subgraphs:
        keep = set(np.asarray(graph.inputs).tolist()) | set(np.asarray(graph.outputs).tolist())
        for i, t in enumerate(graph.tensors):
            q = t.quantization
            if i in keep or i not in values or q is None or q.min is None or len(q.min) != 1:
                continue
            lo, hi = np.percentile(values[i], (100 - percentile, percentile))
            q.min = np.array([max(float(q.min[0]), min(float(lo), 0.0))], np.float32)
            q.max = np.array([min(float(q.max[0]), max(float(hi), 0.0))], np.float32)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def calibrate(converter, calibration: np.ndarray) -> bytes:
    """The converter's calibrated model for full-integer int8 (a float model with every activation's recorded
    range): what ``export.tflite.convert_int8`` quantises, stopped before quantising."""
    from export.tflite import quiet_converter, representative_dataset
    from toolkit.tf import import_tf

    tf = import_tf()
    if len(calibration) == 0:
        raise ValueError("calibration: no calibration images")
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative_dataset(calibration)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter._experimental_calibrate_only = True  # the converter's own switch (TFLiteConverterBase._quantize)
    with quiet_converter():
        return converter.convert()


def quantize(calibrated: bytes, io_type: str = "uint8", float_ops: Sequence[str] = (),
             float_tensors: Sequence[str] = ()) -> bytes:
    """The int8 model of a calibrated one, finished as the converter finishes ``convert_int8``'s (``io_type``
    input and output, per-channel weights): the same file for the same ranges. ``float_ops`` (op types, as LiteRT
    names them: "HARD_SWISH") and ``float_tensors`` (ops' output tensors) stay in float; ``io_type`` "float32"
    keeps float input and output (with float ops inside, the integer ones do not apply)."""
    from tensorflow.lite.python import convert

    from toolkit.tf import import_tf

    tf = import_tf()
    if io_type not in ("uint8", "int8", "float32"):
        raise ValueError(f"io_type: expected 'uint8', 'int8' or 'float32', got {io_type!r}")
    return convert.mlir_quantize(calibrated, input_data_type=getattr(tf, io_type),
                                 output_data_type=getattr(tf, io_type), denylisted_ops=list(float_ops) or None,
                                 denylisted_nodes=list(float_tensors) or None)
