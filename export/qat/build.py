"""qat_int8, built and measured in the worker (export.run.worker): quantisation-aware fine-tuning with tfmot's
schemes in turn (export.qat.model on the graph export.qat.graph prepared), or the quantisation-aware model as the
user gave it (toolkit.tfmot); kept only when it is not worse than post-training int8 on the held-out images."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from export.results import Built, Skip
from toolkit.errors import one_line

if TYPE_CHECKING:
    from export.run.context import Context


def build_qat(ctx: Context, attempt: int):
    from export import tflite
    from export.qat import finetune as qat
    from export.qat import model as qat_model
    from export.qat.graph import for_qat

    if ctx.source.given_qat is not None:
        return qat_as_given(ctx)
    cfg = ctx.config
    model, rebuilt = (ctx.source.keras2, {}) if ctx.source.keras2 is not None else tf_keras_twin(ctx)
    failures = list(ctx.attempt_failures.get("qat_int8", []))
    ctx.phase("rewriting the graph for QAT (export.qat.graph)")
    prepared = for_qat(model)  # once: every scheme and retry clones it
    for i in range(attempt, len(qat_model.SCHEMES)):
        scheme = qat_model.SCHEMES[i]
        ctx.emit("attempt", variant="qat_int8", index=i, of=len(qat_model.SCHEMES), what=f"scheme {scheme}")
        # Rebuilding the graph takes seconds; tfmot can also loop forever on some graphs.
        ctx.phase(f"tfmot {scheme} scheme: rebuilding the model for QAT", timeout_s=cfg.qat_build_timeout)
        try:
            wrapped = qat_model.quantize_aware_model(model, scheme, ctx.source.custom_objects, prepared=prepared[0])
        except Exception as e:  # tfmot raises many types for graphs it cannot rebuild
            failures.append(f"{scheme}: {one_line(e)}")
            ctx.log(f"  qat scheme {scheme} cannot rebuild this model ({one_line(e)[:160]})")
            continue
        epochs = qat.qat_epochs_for(len(ctx.x_fit), cfg.qat_epochs)
        more = f", raised from {cfg.qat_epochs} to reach {qat.QAT_MIN_STEPS} steps" if epochs > cfg.qat_epochs else ""
        what = f"quantisation-aware fine-tuning ({epochs} epochs on {len(ctx.x_fit):,} images{more}, scheme {scheme})"
        ctx.phase(what)
        ctx.log(f"  {what}")
        res = qat.train_qat(model, np.asarray(ctx.x_fit), np.asarray(ctx.y_fit), ctx.x_val, ctx.y_val,
                            output_kind=ctx.info.output_kind, num_classes=ctx.num_classes,
                            float_val_accuracy=ctx.float_val_accuracy, epochs=epochs,
                            scheme=scheme, learning_rate=cfg.qat_learning_rate, seed=cfg.seed,
                            qat_model=wrapped, prepared=prepared, custom_objects=ctx.source.custom_objects, log=ctx.log,
                            heartbeat=ctx.beat)
        ctx.phase("converting qat_int8")
        path = ctx.tflite_file("qat_int8", lambda: tflite.convert_int8(res.model, ctx.calibration))
        extra = {"qat": {**res.summary(), "schemes_failed": failures, **rebuilt, **compare_with_int8(ctx, path)}}
        ctx.log(f"  qat_int8: scheme {scheme}, {res.quantized_layers} of {res.weighted_layers} layers with kernels "
                "quantised" + (f"; in float: {', '.join(res.float_layers)}" if res.float_layers else "")
                + (f"; dropped before fine-tuning: {', '.join(res.dropped_layers)}" if res.dropped_layers else ""))
        q = extra["qat"]
        if q["held_out_vs_int8_pp"] < -q["held_out_noise_pp"]:
            path.unlink()
            raise Skip(f"quantisation-aware fine-tuning is worse than post-training int8 on the held-out images "
                       f"({q['held_out_accuracy'] * 100:.2f}% vs {q['int8_held_out_accuracy'] * 100:.2f}%, beyond "
                       f"their paired noise of {q['held_out_noise_pp']:.2f} points): int8.tflite is the model to ship",
                       qat=q)
        return Built(path, ctx.measure(path), extra)
    raise RuntimeError("no QAT scheme could rebuild this model: " + "; ".join(failures))


def qat_as_given(ctx: Context):
    """A quantisation-aware model as the user gave it (toolkit.tfmot): converted to int8 from the ranges it
    learned (its fake-quant), with no second fine-tuning; compared with post-training int8 as a fine-tune is."""
    from export import tflite
    from export.qat.model import count_quantized
    from toolkit.tfmot import has_kernel

    ctx.phase("converting the quantisation-aware model as given")
    path = ctx.tflite_file("qat_int8", lambda: tflite.convert_int8(ctx.source.given_qat, ctx.calibration))
    quantized = count_quantized(ctx.source.given_qat)
    weighted = sum(1 for layer in ctx.source.keras2.layers if has_kernel(layer))
    ctx.log(f"  qat_int8: quantisation-aware model as given ({quantized} of {weighted} layers with kernels "
            "quantised), converted from the ranges it learned")
    return Built(path, ctx.measure(path), {"qat": {"as_given": True, "scheme": "as given",
                                                   "quantized_layers": quantized, "weighted_layers": weighted,
                                                   **compare_with_int8(ctx, path)}})


def tf_keras_twin(ctx: Context):
    """(the tf_keras rebuild of a Keras 3 model, what was checked) for tfmot, which needs Keras 2; Skip
    when a layer has no tf_keras counterpart or the rebuild's outputs differ from the model's."""
    from toolkit.keras3 import NoTfKerasCounterpart, to_tf_keras
    from export.model.rewrite import outputs_close

    from export.model.load import load_keras3_model

    if not ctx.keras3_model:
        raise Skip("tfmot needs a Keras model; this is a SavedModel saved by TensorFlow without Keras")
    ctx.phase("rebuilding the Keras 3 model in tf_keras for tfmot")
    keras3_model = load_keras3_model(ctx.keras3_model, ctx.config.custom_objects)
    try:
        model = to_tf_keras(keras3_model)
    except NoTfKerasCounterpart as e:
        raise Skip(f"tfmot needs Keras 2 (tf_keras), and this Keras 3 model has {e}") from e
    images = np.asarray(ctx.x_val[:256], np.float32)
    close, measured = outputs_close(np.asarray(keras3_model.predict(images, verbose=0)),
                                    np.asarray(model.predict(images, verbose=0)))
    if not close:
        raise Skip(f"the tf_keras rebuild of this Keras 3 model does not compute its outputs ({measured})")
    ctx.log(f"  qat_int8: Keras 3 model rebuilt in tf_keras ({measured})")
    return model, {"rebuilt_from_keras3": measured}


def compare_with_int8(ctx: Context, qat_path: Path) -> dict:
    """QAT's TFLite model against post-training int8 on the held-out training images (never the test
    split), with the noise of that paired comparison: twice the standard error of the difference, from
    the images where the two disagree (measured on the zoo: 300 held-out images put QAT 3 points under
    int8 where the test split put it 3.4 points over). A fine-tune worse than int8 beyond that is not kept."""
    from export.model.predictions import class_predictions
    from export.runtime import open_model

    ctx.phase("comparing qat_int8 with int8 on the held-out images")
    right = {}
    for name, path in (("qat", qat_path), ("int8", ctx.int8_file())):
        pred = class_predictions(open_model(str(path), num_threads=os.cpu_count() or 1).predict(ctx.x_val),
                                 ctx.info.output_kind)
        right[name] = pred == ctx.y_val
    n = len(ctx.y_val)
    only_qat, only_int8 = int(np.sum(right["qat"] & ~right["int8"])), int(np.sum(~right["qat"] & right["int8"]))
    diff = (only_qat - only_int8) / n
    se = float(np.sqrt(max(only_qat + only_int8 - n * diff ** 2, 0.0))) / n
    return {"held_out_accuracy": float(right["qat"].mean()), "int8_held_out_accuracy": float(right["int8"].mean()),
            "held_out_vs_int8_pp": diff * 100, "held_out_noise_pp": 2 * se * 100}
