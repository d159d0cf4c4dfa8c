"""int8 that is not slower than float32 at batch 1: int8_selective's last step.

LiteRT's default CPU delegate, XNNPACK, runs int8 convolution and dense kernels, but not every op in int8; the rest
(HARD_SWISH, GELU, attention's SOFTMAX and BATCH_MATMUL, layer norm's pieces) fall back to LiteRT's built-in int8
kernels, some of them reference ones, and a full-integer file can be several times slower than float32. Kept in
float, those ops run in the delegate between a DEQUANTIZE and a QUANTIZE. Measured
(benchmarks/op_types_in_float.py, benchmarks/results/int8_speed_*.md, 2026-11-29, one thread): the zoo's
squeeze-and-excitation net 5.62x float32 in full int8, 0.93x with its HARD_SWISH in float; the ViT 3.15x, 1.81x with
GELU, SOFTMAX and BATCH_MATMUL in float, 0.72x with every op but the kernels in float, accuracy unchanged.

So when the int8 file is slower than float32 by more than ``export.ops.SLOWER``, two candidates are re-quantised
from the same calibration (no new one, the same ranges): the op types the int8 file leaves outside the delegate
(beyond what float32 leaves), and every op type but the kernels. Each is measured on the held-out images (it must
stay within the budget) and timed side by side with float32 and the file it would replace; the fastest within
budget is kept when it is faster than that file by ``SLOWER`` too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from export.ops import SLOWER, tflite_ops

# The ops that do a quantised model's arithmetic, and what int8 is for: XNNPACK runs them in int8.
KERNELS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def op_types_outside_delegate(ops: dict, float32_ops: dict) -> list[str]:
    """The quantised op types an int8 file leaves to LiteRT's built-in kernels beyond those the float32 file leaves
    (shape arithmetic is outside in both). ``ops``, ``float32_ops``: export.ops.tflite_ops of each."""
    base = float32_ops["not_delegated"]
    return sorted(op for op, n in ops["not_delegated"].items() if op in ops["int8_ops"] and n > base.get(op, 0))


def candidate_float_ops(blob: bytes, float32: bytes) -> dict[str, list[str]]:
    """{what: op types kept in float}: the quantised ones outside the delegate, and every quantised one but the
    kernels (one entry when the two are the same; none when there is nothing to keep in float)."""
    ops = tflite_ops(content=blob)
    outside = op_types_outside_delegate(ops, tflite_ops(content=float32))
    all_but = sorted(op for op in ops["int8_ops"] if op not in KERNELS)
    out = {}
    if outside:
        out["ops outside XNNPACK"] = outside
    if all_but and set(all_but) != set(outside):
        out["all but the kernels"] = all_but
    return out


def time_side_by_side(blobs: dict[str, bytes], image: np.ndarray, threads: int = 1, rounds: int = 5,
                      runs: int = 40) -> dict[str, float]:
    """Each model's median batch-1 latency in ms on ``image`` (raw pixels, one), timed in ``rounds`` interleaved
    rounds of ``runs`` calls, so that a busy moment of the machine falls on every model alike."""
    from export.runtime import TFLiteModel
    from toolkit.timing import time_calls

    models = {k: TFLiteModel(content=b, num_threads=threads) for k, b in blobs.items()}
    inputs = {k: m.prepare(image[:1]) for k, m in models.items()}
    times: dict[str, list] = {k: [] for k in models}
    for r in range(rounds):
        for k, m in models.items():
            times[k].extend(time_calls(lambda: m.run(inputs[k]), runs=runs, warmup=20 if r == 0 else 3))
    return {k: float(np.median(v)) for k, v in times.items()}


@dataclass
class SpeedUp:
    """What the speed step measured: ``blob`` is the file to ship (the one it started from when nothing was
    faster), ``float_ops`` the op types it keeps in float."""

    blob: bytes
    float_ops: list[str]
    latency_ms: dict[str, float]  # float32, the file it started from ("before"), and each candidate
    held_out_drop_pp: dict[str, float] = field(default_factory=dict)  # each candidate's
    kept: Optional[str] = None  # the candidate kept, None: none was faster within budget
    error: Optional[str] = None  # why the step did not run (the file it started from is kept)

    def ratio(self, name: Optional[str] = None) -> float:
        """A file's latency over float32's: the kept one's (or the starting one's) by default."""
        return self.latency_ms[name or self.kept or "before"] / self.latency_ms["float32"]

    def summary(self) -> dict:
        if self.error:
            return {"kept": None, "float_op_types": [], "error": self.error}
        return {"kept": self.kept, "float_op_types": self.float_ops, "latency_ms": self.latency_ms,
                "held_out_drop_pp": self.held_out_drop_pp, "ratio_vs_float32": self.ratio(),
                "before_ratio_vs_float32": self.ratio("before")}


def speed_up(before: bytes, float32: bytes, requantize: Callable[[Sequence[str]], bytes],
             held_out_drop: Callable[[bytes], float], max_drop_pp: float, image: np.ndarray, threads: int = 1,
             log: Callable[[str], None] = print) -> SpeedUp:
    """``before`` (an int8 file within budget) or a faster one: ``requantize(op_types)`` re-quantises the same
    calibration with those op types in float; ``held_out_drop(blob)`` is a file's drop in points on the held-out
    images. Candidates are tried only when ``before`` is slower than ``float32`` by more than SLOWER."""
    latency = time_side_by_side({"float32": float32, "before": before}, image, threads)
    result = SpeedUp(before, [], latency)
    if latency["before"] <= SLOWER * latency["float32"]:
        return result
    blobs, ops = {}, candidate_float_ops(before, float32)
    for what, types in ops.items():
        blob = requantize(types)
        result.held_out_drop_pp[what] = drop = held_out_drop(blob)
        log(f"  int8_selective speed: {', '.join(types)} in float: held-out drop {drop:+.2f} pp"
            + ("" if drop <= max_drop_pp else f", over --max-drop {max_drop_pp:g}"))
        if drop <= max_drop_pp:
            blobs[what] = blob
    if not blobs:
        return result
    result.latency_ms = time_side_by_side({"float32": float32, "before": before, **blobs}, image, threads)
    fastest = min(blobs, key=result.latency_ms.get)
    log("  int8_selective speed at batch 1, against float32: "
        + ", ".join(f"{k} {result.ratio(k):.2f}x" for k in ("before", *blobs)))
    if result.latency_ms[fastest] * SLOWER < result.latency_ms["before"]:
        result.blob, result.float_ops, result.kept = blobs[fastest], ops[fastest], fastest
    return result
