"""``int8_selective``: full-integer int8 with the fewest layers kept in float that brings the accuracy
back within the budget.

1. Calibrate once and let TFLite's QuantizationDebugger compare every quantised tensor with its float
   value on calibration images. Each tensor is ranked by its normalised error, the mean squared
   quantisation error over the mean squared float value: scale-free, so a tensor whose range is blown
   up by a few outliers (every ordinary value rounding to zero) ranks first even though its absolute
   error looks small. The error is taken per channel and averaged, so one huge channel cannot hide
   the others it crushes.
2. Keep the worst tensor's op in float, re-quantise (no new calibration), measure accuracy on held-out
   images from the training split, and repeat with the next worst until the drop is within budget or
   the step limit is reached (NNCF's accuracy-control loop, for TFLite).
3. Still over: whole op types, worst first by their tensors' mean error (every LOGISTIC and MUL of
   EfficientNet's sixteen squeeze-and-excitation gates, say), one more type per step, up to
   ``max_op_types``. A deep net loses its points a little in each of many blocks, where one tensor a
   step stops at the step limit long before the error is gone.

The model keeps float32 input and output (raw 0-255 pixels in, the model's own output out): with float
ops inside, the converter's integer-only I/O does not apply.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from export.outputs import class_predictions


@dataclass
class SelectiveResult:
    blob: bytes
    float_tensors: list[str]  # tensors (ops' outputs) kept in float, worst first
    val_accuracy: float
    val_drop_pp: float
    steps: int
    ranking: list[dict] = field(default_factory=list)  # the worst tensors with their normalised error
    within_budget: bool = True


def layer_of(tensor_name: str) -> str:
    """The Keras layer a TFLite tensor came from: 'model/dense_1/MatMul;model/dense_1/Relu' -> 'dense_1';
    inside a nested model, the innermost layer ('model/regnetx002/stem_conv/Conv2D' -> 'stem_conv'), the
    scopes TensorFlow's ops open (CamelCase: 'Tensordot') skipped."""
    first = tensor_name.split(";")[0]
    parts = [p for p in first.split("/") if p]
    if len(parts) <= 2:
        return parts[-2] if len(parts) > 1 else first
    scopes = [p for p in parts[1:-1] if not p[:1].isupper()]
    return scopes[-1] if scopes else parts[1]


def _nmse(float_values, quant_values, scale, zero_point) -> float:
    """Mean over channels of each channel's squared quantisation error relative to its mean square:
    1.0 for a channel rounded away entirely, ~1e-4 for a well-quantised one, whatever the scale."""
    f = np.asarray(float_values, np.float32)
    deq = (np.asarray(quant_values, np.float32) - zero_point) * scale
    channels = f.shape[-1] if f.ndim else 1
    f, err = f.reshape(-1, channels), (deq - f.reshape(deq.shape)).reshape(-1, channels)
    power = np.mean(f ** 2, axis=0)
    # Channels that are (almost) always zero carry no signal to lose: dead ReLUs, and channels under a millionth of
    # the tensor's median channel or of 1e-20, whose ratio otherwise ranks them first (EfficientNetB0: errors of
    # 1e44-1e46 led its search, benchmarks/results/export_zoo_effnet.md). The median, not the maximum: one huge
    # outlier channel must not make the ordinary ones it crushes look dead.
    live = (power > 1e-20) & (power > 1e-6 * float(np.median(power)))
    return float(np.mean(np.mean(err ** 2, axis=0)[live] / power[live])) if live.any() else 0.0


def denylists(ranked: list[dict], names: list[str], max_steps: int, max_op_types: int):
    """The tensors to keep in float at each step: none; the worst one, two, ... ``max_steps``; then those plus
    every tensor of the worst op type, of the two worst, ... ``max_op_types`` (types ranked by their tensors'
    mean error)."""
    for step in range(0, min(max_steps, len(names)) + 1):
        yield names[:step]
    errors: dict[str, list[float]] = {}
    for r in ranked:
        if r["nmse"] not in ("", "nan"):
            errors.setdefault(r["op_name"], []).append(float(r["nmse"]))
    types = sorted(errors, key=lambda op: -float(np.mean(errors[op])))
    keep = list(names[:max_steps])
    for op in types[:max_op_types]:
        more = [r["tensor_name"] for r in ranked if r["op_name"] == op and r["tensor_name"] not in keep]
        if more:
            keep = keep + list(dict.fromkeys(more))
            yield keep


def _accuracy(blob: bytes, x, y, output_kind: str) -> float:
    from export.runtime import TFLiteModel

    return float(np.mean(class_predictions(TFLiteModel(content=blob).predict(x), output_kind) == y))


def build_int8_selective(converter, calibration: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, *,
                         output_kind: str, float_val_accuracy: float, max_drop_pp: float, max_steps: int = 8,
                         max_op_types: int = 3, debug_images: int = 64, log: Callable[[str], None] = print,
                         heartbeat: Callable[[], None] = lambda: None) -> SelectiveResult:
    """``converter``: a fresh TFLiteConverter for the float model. Returns the best model found;
    ``within_budget`` says whether it met ``max_drop_pp`` on the held-out images."""
    from export.tflite import quiet_converter, representative_dataset
    from toolkit.tf import import_tf

    tf = import_tf()
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative_dataset(calibration)
    debug_set = representative_dataset(calibration[:debug_images])
    with quiet_converter():
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter, debug_dataset=debug_set,
            debug_options=tf.lite.experimental.QuantizationDebugOptions(
                layer_direct_compare_metrics={"nmse": _nmse}))
        debugger.run()
    dump = io.StringIO()
    debugger.layer_statistics_dump(dump)
    dump.seek(0)
    stats = [r for r in csv.DictReader(dump) if r.get("tensor_name")]
    ranked = sorted(stats, key=lambda r: -float(r["nmse"]) if r["nmse"] not in ("", "nan") else 0.0)
    names: list[str] = []
    for r in ranked:  # one entry per tensor, worst first
        if r["tensor_name"] not in names:
            names.append(r["tensor_name"])
    ranking = [{"tensor": r["tensor_name"], "layer": layer_of(r["tensor_name"]), "op": r["op_name"],
                "nmse": float(r["nmse"])} for r in ranked[:10]]
    log("  int8_selective: worst quantised tensors: "
        + ", ".join(f"{r['layer']} {r['op']} (error {r['nmse']:.3g})" for r in ranking[:3]))
    best = None
    for step, keep in enumerate(denylists(ranked, names, max_steps, max_op_types)):
        heartbeat()
        with quiet_converter():
            try:
                debugger.options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=keep)
            except ValueError:
                # The setter stores the options, then rebuilds its instrumented debug model and refuses one with
                # nothing left to verify ("Please check if the quantized model is in debug mode") once every
                # quantised op is denylisted: the model to ship needs no instrumentation (measured: a 3-epoch
                # seed_cnn under --max-drop 0 failed its int8_selective here).
                pass
            blob = debugger.get_nondebug_quantized_model()
        acc = _accuracy(blob, x_val, y_val, output_kind)
        drop = (float_val_accuracy - acc) * 100
        log(f"  int8_selective step {step}: {len(keep)} tensor(s) in float"
            + (f" (+{layer_of(keep[-1])})" if keep else "") + f", held-out accuracy {acc:.4f} (drop {drop:+.2f} pp)")
        if best is None or acc > best.val_accuracy:
            best = SelectiveResult(blob, list(keep), acc, drop, step, ranking, drop <= max_drop_pp)
        if drop <= max_drop_pp:
            break
    if best is None:
        raise RuntimeError("the quantisation debugger found no quantised tensors to keep in float")
    return best
