"""Activation ranges for full-integer int8: the converter's (each activation's minimum and maximum on the
calibration images) or narrower ones, clipped to a percentile of each activation's values.

A rare outlier stretches a min/max range until every ordinary value falls within a step or two of int8's 256;
clipping saturates the outlier instead and keeps the steps for the values that carry the decision. Which is better
is measured, not assumed (``export.tflite.int8``' int8 and ``export.tflite.selective``'s step 0 try CLIP_PERCENTILES on
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
# agrees most with the float model on the held-out images (export.tflite.int8.int8_ranges).
RANGE_IMAGES = 64
RANGE_SETS = 4

# A classifier's answer is the largest of the logits its final softmax takes (or puts out), and int8 gives those
# logits one range for every image: set by the rare image with a huge logit, its steps can be wider than the gap
# between an image's first and second class, which then round to the same step, and the tie goes to the lower class
# index. Measured on the zoo's EfficientNetB0 (5,000 CIFAR-10 images, 23.80% float; /tmp scripts, 2026-11-30): its
# logits spanned [-34, 128] on the calibration images while the median gap between an image's first two was 0.24,
# and rounding the float logits alone to int8's step (0.29) cost 0.9 points. The range that agrees most with the
# float logits' top-1 on the calibration images (DECISION_LOW_PERCENTILES x DECISION_HIGH_PERCENTILES, the
# softmax's output rounded to its fixed 1/256 steps as its kernel does) took the head alone from 73.6% to 97.0%;
# over four calibrations and three ranges the int8 files' ties fell from 11.8-61.5% of the test images to
# 2.5-11.7% at 11 of 12, their drop by 0.65 points on average (benchmarks/results/int8_precision_head.md), and
# int8's own choice went from +1.30 to +0.95 points. On eight zoo models without such logits (a logits-out CNN
# among them) it moved accuracy within 0.4 points either way (int8_precision_head_zoo.md). Logits below the range
# saturate: a class that far behind the first keeps a probability near 0 either way.
DECISION_LOW_PERCENTILES = (0, 0.1, 1, 5, 10, 25)  # of every logit: the range's low end
DECISION_HIGH_PERCENTILES = (50, 75, 90, 95, 99, 100)  # of each image's largest logit: its high end
# Not chosen with them: the range of the dense layer's input that computes the logits. On the same model its int8
# steps (0.067 over the pooled features' clipped range) cost the head alone 16% of its agreement on the test images,
# and choosing that range with the logits' (percentiles 0.01-1 x 98-99.99, its int8 weights simulated) took the head
# alone on the calibration images from 98.2% to 98.8%, but the whole file from 72.70% to 72.75% (+0.95 -> +1.00
# points): the error made before the head decides (/tmp scripts and `python -m export ... --variants
# float32,int8`, 2026-11-30).
HEAD = "+head"  # a clip_key's suffix: the decision tensor's range chosen by decision_range as well


def range_sets(calibration: np.ndarray) -> int:
    """How many sets of RANGE_IMAGES images ``calibration`` holds, up to RANGE_SETS (at least one)."""
    return max(1, min(RANGE_SETS, len(calibration) // RANGE_IMAGES))


def range_images(calibration: np.ndarray, k: int = 0) -> np.ndarray:
    """The ``k``-th set of RANGE_IMAGES calibration images the percentiles are read from."""
    return calibration[k * RANGE_IMAGES:(k + 1) * RANGE_IMAGES]


def clip_key(percentile: Optional[float], k: int = 0, head: bool = False) -> str:
    """The report's name of a range: "min/max", "99.9" (the first set of images), "99.9/2" (the third); with
    ``head``, "+head" after it: the decision tensor's range chosen by decision_range."""
    key = "min/max" if percentile is None else f"{percentile:g}" if k == 0 else f"{percentile:g}/{k}"
    return key + (HEAD if head else "")


def describe(key: Optional[str]) -> str:
    """A clip_key in words, for logs and reports."""
    percentile = parse_clip_key(key or "min/max")[0]
    words = ("min/max activation ranges" if percentile is None
             else f"activation ranges clipped at {key.removesuffix(HEAD)}")
    return words + (", the logits' range chosen for the top-1" if (key or "").endswith(HEAD) else "")


def parse_clip_key(key: str) -> tuple[Optional[float], int]:
    """(percentile, set of images) of a ``clip_key``; (None, 0) for "min/max"."""
    key = key.removesuffix(HEAD)
    if key == "min/max":
        return None, 0
    p, _, k = key.partition("/")
    return float(p), int(k or 0)


def clipped_as(calibrated: bytes, calibration: np.ndarray, key: Optional[str],
               output_kind: Optional[str] = None) -> bytes:
    """The calibrated model with the ranges a clip_key names (read from that set of ``calibration`` images, the
    decision range from all of them); unchanged for None or "min/max"."""
    percentile, k = parse_clip_key(key or "min/max")
    out = calibrated
    if percentile is not None:
        out = clip_ranges(calibrated, activation_values(calibrated, range_images(calibration, k)), percentile)
    if (key or "").endswith(HEAD):
        out = with_decision_range(out, decision_range(calibrated, calibration, output_kind))
    return out


def decision_tensor(calibrated: bytes, output_kind: Optional[str] = None) -> Optional[tuple[int, bool]]:
    """The tensor whose largest entry is the model's answer, and whether a softmax follows it: the logits a SOFTMAX
    producing the model's output takes, or, for ``output_kind`` "logits" (export.model.predictions' name for a classifier
    without a final activation), the output itself. None otherwise (a sigmoid, several outputs)."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=calibrated)
    outputs = [d["index"] for d in interp.get_output_details()]
    if len(outputs) != 1:
        return None
    for op in interp._get_ops_details():  # the public API has no op graph; the same call export.ops makes
        if outputs[0] in list(op["outputs"]) and op["op_name"] == "SOFTMAX":
            return int(op["inputs"][0]), True
    return (int(outputs[0]), False) if output_kind == "logits" else None


def tensor_values(calibrated: bytes, tensor: int, images: np.ndarray) -> np.ndarray:
    """One tensor's values on each of ``images`` (raw pixels), from the calibrated model: (images, values)."""
    from ai_edge_litert.interpreter import Interpreter

    with warnings.catch_warnings():  # "intended for debugging purposes only": this is reading one tensor
        warnings.simplefilter("ignore", UserWarning)
        interp = Interpreter(model_content=calibrated, experimental_preserve_all_tensors=True)
    interp.allocate_tensors()
    inp = interp.get_input_details()[0]["index"]
    out = []
    for i in range(len(images)):
        interp.set_tensor(inp, images[i:i + 1].astype(np.float32))
        interp.invoke()
        out.append(interp.get_tensor(tensor).reshape(-1).copy())
    return np.asarray(out)


def rounded(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """``values`` rounded to int8's steps over [low, high], saturating outside (as the converter sets them:
    scale (high - low) / 255, an integer zero point)."""
    scale = (high - low) / 255.0
    zero = np.round(-128.0 - low / scale)
    return (np.clip(np.round(values / scale) + zero, -128, 127) - zero) * scale


def int8_top1(logits: np.ndarray, low: float, high: float, softmax: bool = True) -> np.ndarray:
    """Each row's top-1 when ``logits`` are rounded to int8 over [low, high] and (``softmax``) the softmax's output
    to its fixed 1/256 steps, ties going to the lower index: what the int8 file answers when only its head is
    quantised."""
    q = rounded(logits, low, high)
    if not softmax:
        return q.argmax(-1)
    p = np.exp(q - q.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.minimum(np.round(p * 256.0), 255.0).argmax(-1)


def decision_range(calibrated: bytes, images: np.ndarray, output_kind: Optional[str] = None) -> Optional[dict]:
    """The range of the model's logits (decision_tensor; DECISION_LOW_PERCENTILES x DECISION_HIGH_PERCENTILES, the
    recorded one among them) whose int8 top-1 agrees most with the float logits' on ``images``; of equals, the
    widest first. None without a decision tensor. Returns {"tensor", "low", "high", "agreement",
    "recorded_agreement" (the recorded range's)}."""
    found = decision_tensor(calibrated, output_kind)
    if found is None or len(images) == 0:
        return None
    tensor, softmax = found
    logits = tensor_values(calibrated, tensor, images)
    if logits.shape[1] < 2:
        return None
    top1, top = logits.argmax(-1), logits.max(-1)
    low0, high0 = min(float(logits.min()), 0.0), max(float(logits.max()), 0.0)  # the recorded range, about
    lows = sorted({low0} | {min(float(np.percentile(logits, p)), 0.0) for p in DECISION_LOW_PERCENTILES})
    highs = sorted({high0} | {max(float(np.percentile(top, p)), 0.0) for p in DECISION_HIGH_PERCENTILES}, reverse=True)
    spans = [(lo, hi) for lo in lows for hi in highs if hi > lo]  # widest first
    agree = [float(np.mean(int8_top1(logits, lo, hi, softmax) == top1)) for lo, hi in spans]
    best = int(np.argmax(agree))  # the first of equals: spans are widest first
    return {"tensor": tensor, "low": spans[best][0], "high": spans[best][1], "agreement": agree[best],
            "recorded_agreement": agree[0]}


def with_decision_range(calibrated: bytes, head: Optional[dict]) -> bytes:
    """The calibrated model with decision_range's range recorded (unchanged for None)."""
    return calibrated if head is None else with_range(calibrated, head["tensor"], head["low"], head["high"])


def with_range(calibrated: bytes, tensor: int, low: float, high: float) -> bytes:
    """The calibrated model with ``tensor``'s recorded range set to [low, high]."""
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(calibrated)
    q = model.subgraphs[0].tensors[tensor].quantization
    q.min, q.max = np.array([low], np.float32), np.array([high], np.float32)
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def candidate_ranges(calibrated: bytes, calibration: np.ndarray, head: Optional[dict], sets: int):
    """The calibrated models int8's range search tries, each with its clip_key, one at a time: with ``head``
    (decision_range's answer) min/max ranges and the logits' range first; then each of CLIP_PERCENTILES read from
    each of the first ``sets`` sets of ``calibration`` images, the logits' range too with ``head``."""
    if head is not None:
        yield clip_key(None, 0, True), with_decision_range(calibrated, head)
    for k in range(sets):
        values = activation_values(calibrated, range_images(calibration, k))
        for p in CLIP_PERCENTILES:
            yield clip_key(p, k, head is not None), with_decision_range(clip_ranges(calibrated, values, p), head)


def best_clipped_ranges(calibrated: bytes, calibration: np.ndarray, measure: Callable[[bytes], tuple[float, float]],
                        max_drop_pp: float, log: Callable[[str], None] = lambda line: None,
                        output_kind: Optional[str] = None) -> dict:
    """The full-integer int8 model of each of candidate_ranges (all ``range_sets(calibration)`` sets of images;
    the logits' range for a model that ends in a softmax or puts out logits, ``output_kind``), measured by
    ``measure(blob)`` -> (drop from the float model in points, agreement with it, on held-out images); of those
    within ``max_drop_pp``, the one that agrees most. Returns {"clip": its clip_key or None (none within), "blob":
    its file or None, "held_out_drop_pp": {key: drop}, "held_out_agreement": {key: agreement}, "decision_range":
    decision_range's answer or None}."""
    head = decision_range(calibrated, calibration, output_kind)
    out: dict = {"clip": None, "blob": None, "held_out_drop_pp": {}, "held_out_agreement": {}, "decision_range": head}
    if head is not None:
        log(f"  int8 decision range for the logits: [{head['low']:.3g}, {head['high']:.3g}] (top-1 of the head alone "
            f"in int8 on the calibration images: {head['recorded_agreement']:.1%} with the recorded range, "
            f"{head['agreement']:.1%} with this)")
    best = -1.0
    for key, clipped in candidate_ranges(calibrated, calibration, head, range_sets(calibration)):
        blob = quantize(clipped)
        drop, agree = measure(blob)
        out["held_out_drop_pp"][key], out["held_out_agreement"][key] = drop, agree
        log(f"  int8 ranges {key}: held-out drop {drop:+.2f} pp, agreement with the float model {agree:.1%}")
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
