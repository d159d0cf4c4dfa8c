"""Where int8 is built. ``int8``: the converter's full-integer file (export.tflite.convert_int8), its activation
ranges checked on the held-out images and clipped when over budget (export.tflite.ranges). ``int8_selective``: int8
within budget with the fewest tensors in float (export.tflite.selective), or 16-bit activations when no int8 file is,
made fast where XNNPACK does not run some ops in int8 (export.tflite.fast_int8). qat_int8 converts through
export.tflite.convert_int8 too (export.qat.build)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from export.results import Built, Skip
from export.model.predictions import drop_and_agreement
from export.gate.stats import points
from toolkit.errors import one_line

if TYPE_CHECKING:
    from export.results import VariantResult
    from export.run.context import Context


def held_out_drop(ctx: Context, blob: bytes) -> float:
    """A TFLite file's accuracy drop from the float model on the held-out training images, in points."""
    return points(ctx.float_val_accuracy - float(np.mean(held_out_predictions(ctx, blob) == ctx.y_val)))


def held_out_predictions(ctx: Context, blob: bytes) -> np.ndarray:
    """A TFLite file's top-1 classes on the held-out training images."""
    from export.model.predictions import class_predictions
    from export.runtime import TFLiteModel

    return class_predictions(TFLiteModel(content=blob).predict(ctx.x_val), ctx.info.output_kind)


def build_int8(ctx: Context, attempt: int) -> Built:
    """int8: full-integer quantisation by the converter (export.tflite.convert_int8, calibrated on the calibration
    images), its activation ranges then checked on the held-out images (int8_ranges)."""
    ctx.phase("converting int8")
    path = ctx.int8_file()
    return Built(path, ctx.measure(path), {"ranges": int8_ranges(ctx, path)})


def int8_ranges(ctx: Context, path: Path) -> dict:
    """int8 with the converter's min/max activation ranges, measured on the held-out images; over --max-drop there,
    export.tflite.ranges.best_clipped_ranges (each of CLIP_PERCENTILES read from each of its sets of calibration images;
    of those within budget, the one that agrees most with the float model on the held-out images) replaces ``path``
    (none within: the converter's file stays, and int8_selective's search starts from the most accurate). Returns
    the report's ``ranges``: which the file has (``clip``, a clip_key), and each one's held-out drop and agreement."""
    from export.tflite import ranges

    budget = ctx.config.max_drop
    first = held_out_drop(ctx, path.read_bytes())
    out = {"clip": None, "clip_percentile": None, "held_out_drop_pp": {"min/max": first}, "held_out_agreement": {}}
    if first <= budget:
        return out
    ctx.phase("int8: over budget on the held-out images; clipping activation ranges")
    calibrated = ranges.calibrate(ctx.source.tflite_converter(), ctx.calibration)

    def measure(blob: bytes) -> tuple[float, float]:
        ctx.beat()
        _, drop, agree = drop_and_agreement(held_out_predictions(ctx, blob), ctx.y_val, ctx.val_pred,
                                            ctx.float_val_accuracy)
        return drop, agree

    chosen = ranges.best_clipped_ranges(calibrated, ctx.calibration, measure, budget, log=ctx.log,
                                       output_kind=ctx.info.output_kind)
    out["held_out_drop_pp"].update(chosen["held_out_drop_pp"])
    out["held_out_agreement"] = chosen["held_out_agreement"]
    out["decision_range"] = chosen["decision_range"]
    if chosen["clip"] is not None:
        tmp = path.with_suffix(".part")
        tmp.write_bytes(chosen["blob"])
        os.replace(tmp, path)
        out["clip"], out["clip_percentile"] = chosen["clip"], ranges.parse_clip_key(chosen["clip"])[0]
        ctx.log(f"  int8: {ranges.describe(chosen['clip'])} (min/max: held-out drop {first:+.2f} pp)")
    return out


def int8_calibration(ctx: Context, clip: Optional[str]) -> bytes:
    """The calibrated float model int8 was quantised from: the converter's ranges, clipped as int8's were (``clip``,
    export.tflite.ranges.clip_key; None: min/max)."""
    from export.tflite import ranges

    return ranges.clipped_as(ranges.calibrate(ctx.source.tflite_converter(), ctx.calibration), ctx.calibration, clip,
                             ctx.info.output_kind)


def build_int8_selective(ctx: Context, attempt: int):
    """int8 within --max-drop on the held-out images with the fewest ops in float (export.tflite.selective), then, when
    that file is slower than float32 at batch 1, the op types XNNPACK does not run in int8 kept in float as well
    (export.tflite.fast_int8). With int8 within --max-drop already (and int8_selective not named), only the second: the
    variant is built when it makes int8 faster, and skipped, saying so, otherwise."""
    from export.tflite import fast_int8
    from export.tflite import ranges
    from export.tflite.selective import SelectiveResult

    cfg = ctx.config
    int8_row = ctx.rows.get("int8")
    for_speed = int8_row is not None and int8_row.ok and int8_row.drop_pp <= cfg.max_drop \
        and "int8_selective" not in cfg.explicit
    if for_speed:
        measured = int8_row.details.get("ranges") or {}
        clip = measured.get("clip")
        drop = (measured.get("held_out_drop_pp") or {}).get(clip or "min/max", 0.0)
        start = SelectiveResult(ctx.int8_file().read_bytes(), [], ctx.float_val_accuracy - drop / 100, drop,
                                0, clip=clip)
    else:
        start = selective_for_accuracy(ctx, int8_row)
    try:
        # 16x8 runs on reference kernels: slower than float32, and no int8 re-quantisation is the same file
        speed = fast_int8.SpeedUp(start.blob, start.float_ops, {}, error="not run: 16-bit activations") \
            if start.activations == "int16" else speed_step(ctx, start)
    except Exception as e:  # the speed step never loses the file the accuracy search found
        if for_speed:
            raise Skip(f"int8 is within --max-drop ({int8_row.drop_pp:+.2f} pp), and timing it against float32 "
                       f"failed ({one_line(e)}): int8.tflite is the model to ship") from e
        ctx.log(f"  int8_selective: the speed step failed ({one_line(e)}); the file within budget is kept as it is")
        speed = fast_int8.SpeedUp(start.blob, [], {}, error=one_line(e))
    if for_speed and speed.kept is None:
        raise Skip(f"int8 is within --max-drop ({int8_row.drop_pp:+.2f} pp) and " + not_faster(speed)
                   + ": int8.tflite is the model to ship")
    path = ctx.stage / "int8_selective.tflite"
    path.write_bytes(speed.blob)
    from export.tflite.selective import layer_of

    extra = {"float_tensors": start.float_tensors, "float_layers": [layer_of(t) for t in start.float_tensors],
             "float_op_types": speed.float_ops, "clip_percentile": start.clip_percentile, "clip": start.clip,
             "selective_steps": start.steps, "selective_val_drop_pp": start.val_drop_pp,
             "selective_ranking": start.ranking, "speed": speed.summary(), "activations": start.activations,
             "selective_val_agreement": start.val_agreement}
    ranges_used = ranges.describe(start.clip)
    ranges_used = "16-bit activations (16x8" + (f"; {', '.join(start.float_ops)} in float" if start.float_ops
                                                else "") + ")" if start.activations == "int16" else ranges_used
    ctx.log(f"  int8_selective: {ranges_used}, {len(start.float_tensors)} tensor(s) kept in float"
            + (f", from layers {', '.join(extra['float_layers'])}" if start.float_tensors else "")
            + (f"; op types in float for speed: {', '.join(speed.float_ops)} ({speed.ratio():.2f}x float32 at "
               f"batch 1, was {speed.ratio('before'):.2f}x)" if speed.kept else ""))
    return Built(path, ctx.measure(path), extra)


def speed_step(ctx: Context, start):
    """export.tflite.fast_int8.speed_up on ``start`` (a SelectiveResult within budget): the same calibration re-quantised
    with op types in float, against float32.tflite (converted here when float32 was not asked for)."""
    from export import tflite
    from export.tflite import fast_int8
    from export.tflite import ranges

    cfg = ctx.config
    float32 = ctx.tflite_file("float32", lambda: tflite.convert_variant("float32", ctx.source)).read_bytes()

    def requantize(op_types) -> bytes:
        if start.calibrated is None:  # int8's own: calibrated only when int8 is slower
            start.calibrated = int8_calibration(ctx, start.clip)
        return ranges.quantize(start.calibrated, "float32", op_types, start.float_tensors)

    ctx.phase("int8_selective: timing int8 against float32 at batch 1")
    return fast_int8.speed_up(start.blob, float32, requantize, lambda b: held_out_drop(ctx, b), cfg.max_drop,
                              np.asarray(ctx.x_test[:1]), cfg.latency_threads, log=ctx.log)


def not_faster(speed) -> str:
    """Why the speed step kept nothing, in words: int8 was not slower, or no candidate was faster within budget."""
    if not speed.held_out_drop_pp:
        return f"not slower than float32 at batch 1 ({speed.ratio('before'):.2f}x, side by side)"
    tried = "; ".join(f"{what} in float {speed.ratio(what):.2f}x" if what in speed.latency_ms
                      else f"{what} in float {drop:+.2f} pp on the held-out images, over budget"
                      for what, drop in speed.held_out_drop_pp.items())
    return (f"{speed.ratio('before'):.2f}x float32 at batch 1, and keeping ops in float makes it no faster "
            f"within budget ({tried})")


def selective_for_accuracy(ctx: Context, int8_row: Optional["VariantResult"]):
    """export.tflite.selective's search: int8 within --max-drop on the held-out images with the fewest tensors in float;
    when no int8 file is, 16-bit activations (int16_activations)."""
    from export.tflite.selective import search_selective

    cfg = ctx.config
    min_agreement = agreement_to_beat(ctx, int8_row)
    ctx.phase("ranking quantised tensors and keeping the worst in float")
    res = search_selective(ctx.source.tflite_converter(), ctx.calibration, ctx.x_val, ctx.y_val,
                 output_kind=ctx.info.output_kind, float_val_accuracy=ctx.float_val_accuracy,
                 max_drop_pp=cfg.max_drop, max_steps=cfg.selective_steps, log=ctx.log, heartbeat=ctx.beat,
                 ranges_measured=int8_row.details.get("ranges") if int8_row else None, val_pred=ctx.val_pred, min_agreement=min_agreement)
    if res.within_budget:
        return res
    if res.val_drop_pp > cfg.max_drop:
        why = (f"still {res.val_drop_pp:.2f} pp below float on held-out images with {len(res.float_tensors)} "
               f"tensors in float (--selective-steps {cfg.selective_steps})")
    else:  # within on accuracy, not closer to the float model than int8 (agreement_to_beat)
        why = (f"no int8 file agrees with the float model on more than {res.val_agreement:.1%} of the held-out "
               f"images; {min_agreement:.1%} is needed to be measurably closer than int8, which failed the gate")
    return int16_activations(ctx, min_agreement, why)


def agreement_to_beat(ctx: Context, int8_row: Optional["VariantResult"]) -> float:
    """When int8 was built and failed --max-drop on the test split, int8_selective's file must agree with the float
    model on the held-out images by more than int8's file does, by two standard errors of that agreement: the
    held-out images may have said int8 was within (measured: EfficientNetB0, +0.40 pp held-out and +1.30 pp on the
    test split at 72-76% agreement), and a file no closer to the float model than int8 would fail as int8 did.
    0 otherwise."""
    if int8_row is None or not int8_row.ok or int8_row.drop_pp <= ctx.config.max_drop:
        return 0.0
    a = float(np.mean(held_out_predictions(ctx, ctx.int8_file().read_bytes()) == ctx.val_pred))
    return min(1.0, a + 2 * float(np.sqrt(a * (1 - a) / len(ctx.val_pred))))


def int16_activations(ctx: Context, min_agreement: float, why: str):
    """The last resort when no int8 file is within budget: TFLite's 16x8 mode (16-bit activations, int8 weights,
    integer throughout; export.tflite.convert_int16x8), measured on the held-out images like every candidate.
    Measured on the zoo's EfficientNetB0, whose int8 agreed with float32 on 15-79% of the test images over four
    calibrations: 97.1% (benchmarks/results/int8_precision.md). Raises RuntimeError with ``why`` and its own reason
    when it is not within budget either, or does not convert."""
    from export.tflite.selective import SelectiveResult
    from export.tflite import convert_int16x8

    ctx.phase("int8_selective: no int8 file within budget; 16-bit activations")
    ctx.log(f"  int8_selective: {why}; trying 16-bit activations (16x8)")
    float_ops: list[str] = []
    try:
        blob = convert_int16x8(ctx.source, ctx.calibration)
    except Exception as e:
        # An op without a 16x8 kernel (HARD_SWISH): that op type in float, the rest 16x8, rather than no file
        ctx.log(f"  int8_selective: 16-bit activations do not convert ({one_line(e)}); the ops without a 16x8 "
                "kernel kept in float")
        try:
            blob = convert_int16x8(ctx.source, ctx.calibration, float_fallback=True)
        except Exception as again:
            raise RuntimeError(f"{why}; 16-bit activations do not convert ({one_line(e)}), nor with those ops in "
                               f"float ({one_line(again)})") from again
        from export.ops import tflite_ops

        float_ops = sorted(tflite_ops(content=blob)["float_ops"])
    in_float = f" ({', '.join(float_ops)} in float)" if float_ops else ""
    try:
        pred = held_out_predictions(ctx, blob)
    except RuntimeError as e:  # the converter quantised an op LiteRT has no 16-bit kernel for (SQUARED_DIFFERENCE)
        raise RuntimeError(f"{why}; 16-bit activations{in_float} convert but do not run in LiteRT "
                           f"({one_line(e)})") from e
    acc, drop, agree = drop_and_agreement(pred, ctx.y_val, ctx.val_pred, ctx.float_val_accuracy)
    ctx.log(f"  int8_selective 16x8{in_float}: held-out accuracy {acc:.4f} (drop {drop:+.2f} pp), agreement with the "
            f"float model {agree:.1%}")
    if drop > ctx.config.max_drop or agree < min_agreement:
        raise RuntimeError(f"{why}; with 16-bit activations{in_float} {drop:+.2f} pp on them, agreement {agree:.1%}")
    return SelectiveResult(blob, [], acc, drop, 0, val_agreement=agree, activations="int16", float_ops=float_ops)
