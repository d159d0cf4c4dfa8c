"""``int8_selective``: full-integer int8 with the fewest layers kept in float that brings the accuracy
back within the budget.

0. Narrow the activation ranges. The converter takes each activation's range from its minimum and maximum on the
   calibration images, and one rare outlier then leaves a few of the 256 steps for every ordinary value. Each
   tensor's range is clipped to a percentile of its values (CLIP_PERCENTILES, widest first) and the model
   re-quantised and measured on held-out images; within budget, the file is integer throughout (no op in float,
   as a microcontroller or an int8-only accelerator needs). Otherwise the most accurate ranges carry on. In an
   export the int8 variant has measured these already, on several sets of calibration images
   (export.tflite.int8.int8_ranges), and they are not measured twice: step 0 takes the ranges int8 kept, or the most
   accurate of those it tried.
1. Calibrate once and let TFLite's QuantizationDebugger compare every quantised tensor with its float
   value on calibration images. Each tensor is ranked by its normalised error, the mean squared
   quantisation error over the mean squared float value: scale-free, so a tensor whose range is blown
   up by a few outliers (every ordinary value rounding to zero) ranks first even though its absolute
   error looks small. The error is taken per channel and averaged, so one huge channel cannot hide
   the others it crushes.
2. Keep the worst tensor's op in float, re-quantise (no new calibration), measure accuracy on held-out
   images from the training split, and repeat with the next worst until the drop is within budget or
   the step limit is reached (NNCF's accuracy-control loop, for TFLite).
3. Still over: whole op types (every LOGISTIC and MUL of EfficientNet's sixteen squeeze-and-excitation gates,
   say), ranked by what each does to the held-out accuracy when it alone is kept in float on top of step 2's
   tensors, then the best types together, up to ``max_op_types``. A deep net loses its points a little in each of
   many blocks, where one tensor a step stops at the step limit long before the error is gone; and the debugger's
   error is a poor guide there (1e19 on some EfficientNetB0 tensors), so the types are ranked by measurement.

The model keeps float32 input and output (raw 0-255 pixels in, the model's own output out): with float
ops inside, the converter's integer-only I/O does not apply.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from export.model.predictions import class_predictions, drop_and_agreement
from export.runtime import TFLiteModel
from export.tflite.ranges import candidate_ranges, clipped_as, decision_range, describe, parse_clip_key
from export.gate.stats import points


@dataclass
class SelectiveResult:
    blob: bytes
    float_tensors: list[str]  # tensors (ops' outputs) kept in float, worst first
    val_accuracy: float
    val_drop_pp: float
    steps: int
    ranking: list[dict] = field(default_factory=list)  # the worst tensors with their normalised error
    within_budget: bool = True
    calibrated: Optional[bytes] = None  # the calibrated float model it was quantised from (its ranges)
    clip: Optional[str] = None  # those ranges' export.tflite.ranges.clip_key ("99.9/2"); None: min/max
    val_agreement: Optional[float] = None  # top-1 agreement with the float model on the held-out images
    activations: str = "int8"  # "int16": TFLite's 16x8 mode (export.tflite.int8.int16_activations)
    float_ops: list[str] = field(default_factory=list)  # op types in float there (no 16x8 kernel: HARD_SWISH)

    @property
    def clip_percentile(self) -> Optional[float]:
        """The percentile the activations' ranges are clipped at; None: min/max."""
        return parse_clip_key(self.clip or "min/max")[0]


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


def tensors_by_op_type(ranked: list[dict], exclude: list[str]) -> dict[str, list[str]]:
    """Each op type's quantised tensors (the debugger's rows, worst first), those in ``exclude`` left out; types
    with none left are dropped, and the rest come fewest tensors first."""
    by_type: dict[str, list[str]] = {}
    for r in ranked:
        if r["tensor_name"] not in exclude and r["tensor_name"] not in by_type.get(r["op_name"], []):
            by_type.setdefault(r["op_name"], []).append(r["tensor_name"])
    return dict(sorted(by_type.items(), key=lambda kv: len(kv[1])))


def search_denylist(measure: Callable[[list[str], str], tuple[float, bool]], names: list[str],
                    by_type: dict[str, list[str]], max_steps: int, max_op_types: int,
                    first: int = 0) -> list[tuple[list[str], float]]:
    """The denylists tried, each with its held-out accuracy, in order; the search stops at the first that
    ``measure(denylist, what_changed)`` says is within budget (it is then the last one).

    None (unless ``first`` > 0: full int8 was measured already); the worst one, two, ... ``max_steps`` tensors;
    then, on top of those, each op type alone (fewest tensors first, so the first type within budget is the
    smallest file); then types together in the order of
    their measured accuracy, up to ``max_op_types``. The types are ranked by what keeping them in float does to
    the held-out accuracy, not by the debugger's error, which says little on some graphs (EfficientNetB0: 1e19
    on tensors whose op keeps nothing of its float value, benchmarks/results/export_zoo_effnet.md)."""
    tried: list[tuple[list[str], float]] = []

    def attempt(keep: list[str], what: str) -> bool:
        acc, ok = measure(keep, what)
        tried.append((keep, acc))
        return ok

    for n in range(first, min(max_steps, len(names)) + 1):
        if attempt(names[:n], f"+{layer_of(names[n - 1])}" if n else "full int8"):
            return tried
    base = names[:max_steps]
    alone: dict[str, float] = {}
    for op, tensors in (by_type if max_op_types > 0 else {}).items():
        if attempt(base + tensors, f"+every {op} ({len(tensors)})"):
            return tried
        alone[op] = tried[-1][1]
    keep, types = list(base), []
    for op in sorted(alone, key=lambda o: -alone[o])[:max_op_types]:
        keep, types = keep + by_type[op], types + [op]
        if len(types) > 1 and attempt(keep, "+every " + " and ".join(types)):  # one type alone was measured above
            return tried
    return tried


def debugger_rows(debugger) -> list[dict]:
    """The QuantizationDebugger's per-tensor statistics, one dict per quantised tensor (tensor_name, op_name, ...)."""
    dump = io.StringIO()
    debugger.layer_statistics_dump(dump)
    dump.seek(0)
    return [r for r in csv.DictReader(dump) if r.get("tensor_name")]


def requantize(debugger, keep: list[str]) -> bytes:
    """The debugger's model re-quantised (its calibration, not a new one) with the ops of ``keep`` in float."""
    from export.tflite import quiet_converter
    from toolkit.tf import import_tf

    with quiet_converter():
        try:
            debugger.options = import_tf().lite.experimental.QuantizationDebugOptions(denylisted_nodes=keep)
        except ValueError:
            # The setter stores the options, then rebuilds its instrumented debug model and refuses one with
            # nothing left to verify ("Please check if the quantized model is in debug mode") once every
            # quantised op is denylisted: the model to ship needs no instrumentation (measured: a 3-epoch
            # seed_cnn under --max-drop 0 failed its int8_selective here).
            pass
        return debugger.get_nondebug_quantized_model()


def search_selective(converter, calibration: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, *,
                         output_kind: str, float_val_accuracy: float, max_drop_pp: float, max_steps: int = 8,
                         max_op_types: int = 3, debug_images: int = 64, log: Callable[[str], None] = print,
                         heartbeat: Callable[[], None] = lambda: None,
                         ranges_measured: Optional[dict] = None, val_pred: Optional[np.ndarray] = None,
                         min_agreement: float = 0.0) -> SelectiveResult:
    """``converter``: a fresh TFLiteConverter for the float model. Returns the best model found;
    ``within_budget`` says whether it met ``max_drop_pp`` on the held-out images. ``ranges_measured``: the int8
    variant's report row ``ranges`` for these calibration and held-out images (export.tflite.int8.int8_ranges); step 0
    then takes int8's ranges (the clipped ones it kept, or, none within budget, the most accurate) instead of
    measuring them again. ``val_pred``: the float model's classes on the held-out images; a file is within budget only
    when it also agrees with them on at least ``min_agreement`` of the images (int8 failed the gate on the test split
    while the held-out images said it was within: a file no closer to the float model than int8 is not the answer)."""
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
    ranked = sorted(debugger_rows(debugger), key=lambda r: -float(r["nmse"]) if r["nmse"] not in ("", "nan") else 0.0)
    names: list[str] = []
    for r in ranked:  # one entry per tensor, worst first
        if r["tensor_name"] not in names:
            names.append(r["tensor_name"])
    ranking = [{"tensor": r["tensor_name"], "layer": layer_of(r["tensor_name"]), "op": r["op_name"],
                "nmse": float(r["nmse"])} for r in ranked[:10]]
    log("  int8_selective: worst quantised tensors: "
        + ", ".join(f"{r['layer']} {r['op']} (error {r['nmse']:.3g})" for r in ranking[:3]))
    probe = _Probe(debugger, x_val, y_val, output_kind, float_val_accuracy, max_drop_pp, log, heartbeat,
                   val_pred, min_agreement)
    tried_by_int8 = bool((ranges_measured or {}).get("held_out_drop_pp"))
    if tried_by_int8:
        take_measured_ranges(probe, calibration, ranges_measured)
    elif choose_ranges(probe, calibration):
        return probe.result(ranking)
    search_denylist(probe.measure, names, tensors_by_op_type(ranked, names[:max_steps]), max_steps, max_op_types,
                    first=0 if tried_by_int8 else 1)
    return probe.result(ranking)


def take_measured_ranges(probe: "_Probe", calibration: np.ndarray, measured: dict) -> None:
    """Step 0 from the int8 variant's ranges: the ones it kept (``clip``), or, none within budget, the ones with the
    smallest held-out drop."""
    drops = measured["held_out_drop_pp"]
    best = measured.get("clip") or min(drops, key=drops.get)
    if best != "min/max":
        probe.clip = best
        probe.debugger.calibrated_model = clipped_as(probe.debugger.calibrated_model, calibration, best,
                                                     probe.output_kind)
    shown = ", ".join(f"{k} {v:+.2f} pp" for k, v in list(drops.items())[:7]) + (", ..." if len(drops) > 7 else "")
    probe.log(f"  int8_selective: from {best} ranges (int8's held-out drops: {shown})")


def choose_ranges(probe: "_Probe", calibration: np.ndarray) -> bool:
    """Step 0 when int8 has not measured them: full int8 with the converter's min/max ranges, then int8's own
    candidates (export.tflite.ranges.candidate_ranges: the logits' range, and the percentiles read from the first set of
    calibration images) until one is within budget; the debugger is left with the most accurate ranges. True when
    one is within budget (the search ends there)."""
    debugger = probe.debugger
    minmax = debugger.calibrated_model
    if probe.measure([], "full int8, min/max ranges")[1]:
        return True
    best = (probe.best[1], None, minmax)
    head = decision_range(minmax, calibration, probe.output_kind)
    for key, clipped in candidate_ranges(minmax, calibration, head, 1):
        debugger.calibrated_model, probe.clip = clipped, key
        acc, ok = probe.measure([], f"full int8, {describe(key)}")
        if ok:
            return True
        if acc > best[0]:
            best = (acc, probe.clip, debugger.calibrated_model)
    _, probe.clip, debugger.calibrated_model = best
    return False


class _Probe:
    """Re-quantises with a denylist (the debugger's calibration, not a new one) and measures held-out accuracy,
    keeping the most accurate model seen."""

    def __init__(self, debugger, x_val, y_val, output_kind, float_val_accuracy, max_drop_pp, log, heartbeat,
                 val_pred=None, min_agreement=0.0):
        self.debugger, self.x_val, self.y_val, self.output_kind = debugger, x_val, y_val, output_kind
        self.float_val_accuracy, self.max_drop_pp = float_val_accuracy, max_drop_pp
        # the float model's held-out classes (None: agreement not asked) and the agreement a file must reach
        self.val_pred, self.min_agreement = val_pred, min_agreement
        self.log, self.heartbeat = log, heartbeat
        self.step, self.best = 0, None
        self.clip: Optional[str] = None  # the debugger's ranges now: an export.tflite.ranges.clip_key, None for min/max

    def measure(self, keep: list[str], what: str) -> tuple[float, bool]:
        self.heartbeat()
        blob = requantize(self.debugger, keep)
        pred = class_predictions(TFLiteModel(content=blob).predict(self.x_val), self.output_kind)
        acc, drop, agree = drop_and_agreement(pred, self.y_val, self.val_pred, self.float_val_accuracy)
        ok = drop <= self.max_drop_pp and (agree is None or agree >= self.min_agreement)
        self.log(f"  int8_selective step {self.step}: {len(keep)} tensor(s) in float ({what}), "
                 f"held-out accuracy {acc:.4f} (drop {drop:+.2f} pp)"
                 + ("" if agree is None else f", agreement with the float model {agree:.1%}"
                    + ("" if agree >= self.min_agreement else f" (under {self.min_agreement:.1%})")))
        self.step += 1
        if self.best is None or (ok, acc) > (self.best[-1], self.best[1]) or \
                (ok == self.best[-1] and acc == self.best[1] and len(keep) < len(self.best[0])):
            self.best = (list(keep), acc, blob, self.clip, self.debugger.calibrated_model, agree, ok)
        return acc, ok

    def result(self, ranking: list[dict]) -> SelectiveResult:
        keep, acc, blob, clip, calibrated, agree, ok = self.best
        drop = points(self.float_val_accuracy - acc)
        return SelectiveResult(blob, list(keep), acc, drop, self.step - 1, ranking, ok, calibrated, clip, agree)
