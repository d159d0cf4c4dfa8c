"""The process that builds and measures the variants, one after another, for :mod:`export.pipeline`.

    python -m export.worker JOB.json

It is a separate process so that nothing a converter or tfmot does can take the export down: an
exception fails that variant only (a row with ``status: failed`` and a one-line reason); a crash or a
hang kills this process, and the supervisor starts a new one for the variants that are left.

Progress goes to an events file, one JSON object per line, which the supervisor follows:
``start`` (a variant begins), ``attempt`` (a numbered way of building it begins, e.g. a QAT scheme),
``phase`` (what it is doing, with the seconds it may take without a sign of life), ``beat`` (alive),
``log`` (a line for the user) and ``row`` (the variant's result).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from toolkit.errors import one_line


class Skip(Exception):
    """The variant does not apply to this model; the message says why."""


class Events:
    def __init__(self, path: str):
        self._f = open(path, "a", buffering=1)

    def __call__(self, event: str, **fields: Any) -> None:
        self._f.write(json.dumps({"event": event, "t": time.time(), **fields}) + "\n")
        self._f.flush()


class Context:
    """Everything a variant builder needs, loaded once per worker process."""

    def __init__(self, job: dict, emit: Events):
        from export.model_io import ModelInfo, load_source_model

        self.job = job
        self.emit = emit
        self.stage = Path(job["stage"])
        self.info = ModelInfo(**{**job["info"], "input_shape": tuple(job["info"]["input_shape"])})
        self.source = load_source_model(job["model"], job["config"]["custom_objects"])
        a = Path(job["arrays"])
        load = lambda n: np.load(a / f"{n}.npy", mmap_mode="r")  # noqa: E731
        self.x_test, self.y_test, self.ref_pred = load("x_test"), load("y_test"), load("ref_pred")
        self.x_fit, self.y_fit = load("x_fit"), load("y_fit")
        self.x_val, self.y_val = np.asarray(load("x_val")), np.asarray(load("y_val"))
        self.calibration = np.asarray(load("calibration"))
        self.rows: dict[str, dict] = dict(job.get("prior_rows", {}))
        self.variant = ""

    # -- progress --------------------------------------------------------------------------
    def log(self, line: str) -> None:
        self.emit("log", variant=self.variant, line=line)

    def phase(self, what: str, timeout_s: Optional[float] = None) -> None:
        self.emit("phase", variant=self.variant, what=what, timeout_s=timeout_s)

    def beat(self) -> None:
        self.emit("beat", variant=self.variant)

    # -- shared pieces ---------------------------------------------------------------------
    def tflite_file(self, variant: str, build: Callable[[], bytes]) -> Path:
        """The staged .tflite for ``variant``, built once (a later variant may reuse it)."""
        path = self.stage / f"{variant}.tflite"
        if not path.exists():
            t0 = time.perf_counter()
            blob = build()
            tmp = path.with_suffix(".part")
            tmp.write_bytes(blob)
            os.replace(tmp, path)
            self.log(f"  converted {variant}: {len(blob) / 1024:,.0f} KB ({time.perf_counter() - t0:.1f}s)")
        return path

    def int8_file(self) -> Path:
        from export import tflite

        return self.tflite_file("int8", lambda: tflite.convert_variant("int8", self.source,
                                                                        calibration=self.calibration))

    def measure(self, path: Path, **open_kw) -> dict:
        """Accuracy and agreement on the full test split, latency at batch 1, throughput at a batch."""
        from export.model_io import class_predictions
        from export.runtime import open_model
        from toolkit.timing import time_calls

        cfg = self.job["config"]
        kind = self.info.output_kind
        m = open_model(str(path), num_threads=os.cpu_count() or 1, **open_kw)
        pred = class_predictions(m.predict(np.asarray(self.x_test)), kind)
        self.beat()
        timed = open_model(str(path), num_threads=cfg["latency_threads"], **open_kw)
        one = timed.prepare(np.asarray(self.x_test[:1]))
        lat = time_calls(lambda: timed.run(one), runs=cfg["latency_runs"], warmup=20)
        batch = timed.prepare(np.asarray(self.x_test[: cfg["throughput_batch"]]))
        t = time_calls(lambda: timed.run(batch), runs=10, warmup=2)
        return {
            "accuracy": float(np.mean(pred == self.y_test)),
            "agreement": float(np.mean(pred == self.ref_pred)),
            "latency_ms_p50": float(np.percentile(lat, 50)),
            "latency_ms_p90": float(np.percentile(lat, 90)),
            "throughput_images_per_s": float(len(batch) / (np.median(t) / 1e3)),
            "throughput_batch": int(len(batch)),
            "input": m.input.to_dict(),
            "output": m.output.to_dict(),
        }


# --------------------------------------------------------------------------------------------
# Builders: each returns (path of the built file, measurement, extra report fields)


def build_plain_tflite(ctx: Context, attempt: int):
    """float32, dynamic, float16 and int8: one converter call each."""
    from export import tflite

    variant = ctx.variant
    ctx.phase(f"converting {variant}")
    path = ctx.tflite_file(variant, lambda: tflite.convert_variant(variant, ctx.source, calibration=ctx.calibration))
    return path, ctx.measure(path), {}


def build_int8_selective(ctx: Context, attempt: int):
    from export.selective import build_int8_selective as search

    cfg = ctx.job["config"]
    int8_row = ctx.rows.get("int8")
    explicit = "int8_selective" in ctx.job["explicit"]
    if int8_row is not None and int8_row.get("status") == "ok" and int8_row["drop_pp"] <= cfg["max_drop"] \
            and not explicit:
        raise Skip(f"int8 is within --max-drop ({int8_row['drop_pp']:+.2f} pp): int8.tflite is the model to ship")
    ctx.phase("ranking quantised tensors and keeping the worst in float")
    res = search(ctx.source.tflite_converter(), ctx.calibration, ctx.x_val, ctx.y_val,
                               output_kind=ctx.info.output_kind,
                               float_val_accuracy=ctx.job["float_val_accuracy"],
                               max_drop_pp=cfg["max_drop"], max_steps=cfg["selective_steps"],
                               log=ctx.log, heartbeat=ctx.beat)
    path = ctx.stage / "int8_selective.tflite"
    path.write_bytes(res.blob)
    from export.selective import layer_of

    extra = {"float_tensors": res.float_tensors, "float_layers": [layer_of(t) for t in res.float_tensors],
             "selective_steps": res.steps,
             "selective_val_drop_pp": res.val_drop_pp, "selective_ranking": res.ranking}
    if not res.within_budget:
        path.unlink()
        raise RuntimeError(f"still {res.val_drop_pp:.2f} pp below float on held-out images with "
                           f"{len(res.float_tensors)} tensors in float (--selective-steps {cfg['selective_steps']})")
    ctx.log(f"  int8_selective: {len(res.float_tensors)} tensor(s) kept in float"
            + (f", from layers {', '.join(extra['float_layers'])}" if res.float_tensors else ""))
    return path, ctx.measure(path), extra


def build_qat(ctx: Context, attempt: int):
    from export import qat, tflite

    cfg = ctx.job["config"]
    if ctx.source.keras2 is None:
        raise Skip("tfmot needs Keras 2 (tf_keras); this model was saved by "
                   + ("Keras 3" if ctx.info.keras == 3 else "TensorFlow without Keras"))
    failures = list(ctx.job.get("attempt_failures", {}).get("qat_int8", []))
    for i in range(attempt, len(qat.SCHEMES)):
        scheme = qat.SCHEMES[i]
        ctx.emit("attempt", variant="qat_int8", index=i, of=len(qat.SCHEMES), what=f"scheme {scheme}")
        # Rebuilding the graph takes seconds; tfmot can also loop forever on some graphs.
        ctx.phase(f"tfmot {scheme} scheme: rebuilding the model for QAT", timeout_s=cfg["qat_build_timeout"])
        try:
            qat_model = qat.quantize_aware_model(ctx.source.keras2, scheme, ctx.source.custom_objects)
        except Exception as e:  # tfmot raises many types for graphs it cannot rebuild
            failures.append(f"{scheme}: {one_line(e)}")
            ctx.log(f"  qat scheme {scheme} cannot rebuild this model ({one_line(e)[:160]})")
            continue
        epochs = qat.qat_epochs_for(len(ctx.x_fit), cfg["qat_epochs"])
        more = f", raised from {cfg['qat_epochs']} to reach {qat.QAT_MIN_STEPS} steps" if epochs > cfg["qat_epochs"] else ""
        what = f"quantisation-aware fine-tuning ({epochs} epochs on {len(ctx.x_fit):,} images{more}, scheme {scheme})"
        ctx.phase(what)
        ctx.log(f"  {what}")
        res = qat.train_qat(ctx.source.keras2, np.asarray(ctx.x_fit), np.asarray(ctx.y_fit), ctx.x_val, ctx.y_val,
                            output_kind=ctx.info.output_kind, num_classes=ctx.job["num_classes"],
                            float_val_accuracy=ctx.job["float_val_accuracy"], epochs=epochs,
                            scheme=scheme, learning_rate=cfg["qat_learning_rate"], seed=cfg["seed"],
                            qat_model=qat_model, custom_objects=ctx.source.custom_objects, log=ctx.log,
                            heartbeat=ctx.beat)
        ctx.phase("converting qat_int8")
        path = ctx.tflite_file("qat_int8", lambda: tflite.convert_int8(res.model, ctx.calibration))
        extra = {"qat": {**res.summary(), "schemes_failed": failures, **compare_with_int8(ctx, path)}}
        ctx.log(f"  qat_int8: scheme {scheme}, {res.quantized_layers} of {res.weighted_layers} convolution/dense "
                "layers quantised" + (f"; in float: {', '.join(res.float_layers)}" if res.float_layers else "")
                + (f"; dropped before fine-tuning: {', '.join(res.dropped_layers)}" if res.dropped_layers else ""))
        if extra["qat"]["held_out_vs_int8_pp"] < 0:
            path.unlink()
            q = extra["qat"]
            raise Skip(f"quantisation-aware fine-tuning is worse than post-training int8 on the held-out images "
                       f"({q['held_out_accuracy'] * 100:.2f}% vs {q['int8_held_out_accuracy'] * 100:.2f}%): "
                       "int8.tflite is the model to ship")
        return path, ctx.measure(path), extra
    raise RuntimeError("no QAT scheme could rebuild this model: " + "; ".join(failures))


def compare_with_int8(ctx: Context, qat_path: Path) -> dict:
    """QAT's TFLite model against post-training int8 on the held-out training images (never the test
    split): a fine-tune that ends below post-training quantisation is not kept."""
    from export.model_io import class_predictions
    from export.runtime import open_model

    ctx.phase("comparing qat_int8 with int8 on the held-out images")
    acc = {}
    for name, path in (("qat", qat_path), ("int8", ctx.int8_file())):
        pred = class_predictions(open_model(str(path), num_threads=os.cpu_count() or 1).predict(ctx.x_val),
                                 ctx.info.output_kind)
        acc[name] = float(np.mean(pred == ctx.y_val))
    return {"held_out_accuracy": acc["qat"], "int8_held_out_accuracy": acc["int8"],
            "held_out_vs_int8_pp": (acc["qat"] - acc["int8"]) * 100}


def build_onnx_float32(ctx: Context, attempt: int):
    path = _onnx_float(ctx)
    return path, ctx.measure(path), {}


def _onnx_float(ctx: Context) -> Path:
    from export import onnx as onnx_export

    path = ctx.stage / "onnx_float32.onnx"
    if not path.exists():
        ctx.phase("converting onnx_float32")
        tmp = ctx.stage / "onnx_float32.part.onnx"
        onnx_export.convert_float32(ctx.source, str(tmp))
        os.replace(tmp, path)
    return path


def build_onnx_int8(ctx: Context, attempt: int):
    """Both int8 ONNX candidates, measured; the more accurate (then the faster) kept. One route
    failing leaves the other."""
    from export import onnx as onnx_export
    from export.runtime import open_model

    candidates, errors = {}, {}
    try:
        float_onnx = _onnx_float(ctx)
        ctx.phase("onnx_int8: ONNX Runtime static quantisation")
        p = ctx.stage / "onnx_int8.ort_static.onnx"
        onnx_export.quantize_static(str(float_onnx), ctx.calibration, str(p))
        candidates["ort_static"] = (p, {})
    except Exception as e:  # any converter error fails this route only
        errors["ort_static"] = one_line(e)
    selective = ctx.rows.get("int8_selective", {})
    if selective.get("status") == "ok" and selective.get("float_layers"):
        try:
            ctx.phase("onnx_int8: static quantisation with int8_selective's float layers left in float")
            float_onnx = _onnx_float(ctx)
            p = ctx.stage / "onnx_int8.ort_static_selective.onnx"
            onnx_export.quantize_static(str(float_onnx), ctx.calibration, str(p),
                                        float_layers=selective["float_layers"])
            candidates["ort_static_selective"] = (p, {})
        except Exception as e:  # any converter error fails this route only
            errors["ort_static_selective"] = one_line(e)
    try:
        ctx.phase("onnx_int8: converting the int8 TFLite model")
        int8 = ctx.int8_file()
        p = ctx.stage / "onnx_int8.from_tflite.onnx"
        onnx_export.convert_from_tflite(str(int8), str(p))
        out_q = open_model(str(int8)).output
        candidates["from_tflite"] = (p, {"output_quantization": (out_q.scale, out_q.zero_point)})
    except Exception as e:  # any converter error fails this route only
        errors["from_tflite"] = one_line(e)
    if not candidates:
        raise RuntimeError("; ".join(f"{k}: {v}" for k, v in errors.items()))
    measured = {}
    for route, (path, kw) in candidates.items():
        ctx.phase(f"measuring onnx_int8 candidate {route}")
        measured[route] = ctx.measure(path, **kw)
        measured[route]["size_bytes"] = path.stat().st_size
        ctx.log(f"  onnx_int8 candidate {route}: acc {measured[route]['accuracy']:.4f}  "
                f"p50 {measured[route]['latency_ms_p50']:.3f} ms")
    # The more accurate; within 0.1 point (10 of 10,000 images: noise) the faster at batch 1.
    top = max(v["accuracy"] for v in measured.values())
    best = min((r for r in measured if measured[r]["accuracy"] >= top - 0.001),
               key=lambda r: measured[r]["latency_ms_p50"])
    final = ctx.stage / "onnx_int8.onnx"
    os.replace(candidates[best][0], final)
    for route, (path, _) in candidates.items():
        if route != best and path.exists():
            path.unlink()
    summary = {r: {k: v[k] for k in ("accuracy", "latency_ms_p50", "size_bytes")} for r, v in measured.items()}
    summary.update({r: {"error": e} for r, e in errors.items()})
    return final, measured[best], {"route": best, "candidates": summary}


def build_row(ctx: Context, variant: str, attempt: int) -> dict:
    """The report row for ``variant``: built and measured, skipped, or failed with a reason."""
    from export.variants import BY_NAME

    spec = BY_NAME[variant]
    base = {"name": variant, "format": spec.format}
    t0 = time.perf_counter()
    try:
        path, measured, extra = globals()[spec.builder](ctx, attempt)
    except Skip as e:
        return {**base, "status": "skipped", "reason": str(e)}
    except Exception as e:  # the point of this process: any error fails this variant only
        if ctx.job.get("debug"):
            traceback.print_exc()
        return {**base, "status": "failed", "reason": one_line(e)}
    drop = (ctx.job["float_accuracy"] - measured["accuracy"]) * 100
    return {**base, "status": "ok", "path": str(path), "size_bytes": path.stat().st_size, **measured,
            "drop_pp": drop, "build_s": time.perf_counter() - t0, **extra}


def main(argv: Optional[list[str]] = None) -> int:
    from toolkit.tf import quiet_tf_logs, set_tf_env

    set_tf_env()
    argv = sys.argv[1:] if argv is None else argv
    job = json.loads(Path(argv[0]).read_text())
    emit = Events(job["events"])
    quiet_tf_logs()
    ctx = Context(job, emit)
    starts = job.get("start_attempt", {})
    for variant in job["variants"]:
        ctx.variant = variant
        emit("start", variant=variant)
        row = build_row(ctx, variant, int(starts.get(variant, 0)))
        ctx.rows[variant] = row
        emit("row", variant=variant, row=row)
    emit("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
