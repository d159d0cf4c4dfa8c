"""What a variant builder works with, in the export's worker process (:mod:`export.run.worker`): the
loaded model, the arrays and the ExportConfig (:class:`Context`), the progress events the supervisor follows
(:class:`Events`). What a builder returns, or raises, is in export.results."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from export.results import Measurement, VariantResult


class Events:
    def __init__(self, path: str):
        self._f = open(path, "a", buffering=1)

    def __call__(self, event: str, **fields: Any) -> None:
        self._f.write(json.dumps({"event": event, "t": time.time(), **fields}) + "\n")
        self._f.flush()


class Context:
    """Everything a variant builder needs, loaded once per worker process."""

    def __init__(self, job: dict, config, emit: Events):
        from export.model.load import ModelInfo, load_source_model

        self.config = config  # the ExportConfig (export.config), rebuilt from the job by the worker
        self.emit = emit
        self.stage = Path(job["stage"])
        self.info = ModelInfo(**{**job["info"], "input_shape": tuple(job["info"]["input_shape"])})
        self.source = load_source_model(job["model"], self.config.custom_objects)
        self.num_classes: int = job["num_classes"]
        self.float_accuracy: float = job["float_accuracy"]  # of the float model, on the test split
        self.float_val_accuracy: float = job["float_val_accuracy"]  # and on the held-out training images
        self.keras3_model: Optional[str] = job.get("keras3_model")  # a Keras 3 model's own file (QAT rebuilds it)
        self.predictions_dir = Path(job["arrays"]).parent / "predictions"
        # What earlier worker processes found: each variant's result, and the ways of building one that failed.
        self.attempt_failures: dict[str, list[str]] = job.get("attempt_failures", {})
        a = Path(job["arrays"])
        load = lambda n: np.load(a / f"{n}.npy", mmap_mode="r")  # noqa: E731
        self.x_test, self.y_test, self.ref_pred = load("x_test"), load("y_test"), load("ref_pred")
        self.x_fit, self.y_fit = load("x_fit"), load("y_fit")
        self.x_val, self.y_val = np.asarray(load("x_val")), np.asarray(load("y_val"))
        self.val_pred = np.asarray(load("val_pred"))  # the float model's classes on the held-out images
        self.calibration = np.asarray(load("calibration"))
        self.rows: dict[str, VariantResult] = {k: VariantResult.from_dict(v) for k, v in job.get("prior_rows", {}).items()}
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

    def measure(self, path: Path, **open_kw) -> Measurement:
        """Accuracy and agreement on the full test split, latency at batch 1, throughput at a batch."""
        from export.model.predictions import class_predictions
        from export.runtime import open_model
        from toolkit.timing import time_calls

        cfg = self.config
        kind = self.info.output_kind
        m = open_model(str(path), num_threads=os.cpu_count() or 1, **open_kw)
        scores = m.predict(np.asarray(self.x_test))
        pred = class_predictions(scores, kind)
        # Per-image predictions, so that this export can be the next one's --baseline (export.gate.checks).
        saved = self.predictions_dir / f"{path.name}.npz"
        saved.parent.mkdir(exist_ok=True)
        np.savez_compressed(saved, top1=pred.astype(np.int16), scores=scores.astype(np.float16))
        self.beat()
        timed = open_model(str(path), num_threads=cfg.latency_threads, **open_kw)
        one = timed.prepare(np.asarray(self.x_test[:1]))
        lat = time_calls(lambda: timed.run(one), runs=cfg.latency_runs, warmup=20)
        batch = timed.prepare(np.asarray(self.x_test[: cfg.throughput_batch]))
        t = time_calls(lambda: timed.run(batch), runs=10, warmup=2)
        return Measurement(
            accuracy=float(np.mean(pred == self.y_test)),
            agreement=float(np.mean(pred == self.ref_pred)),
            latency_ms_p50=float(np.percentile(lat, 50)),
            latency_ms_p90=float(np.percentile(lat, 90)),
            throughput_images_per_s=float(len(batch) / (np.median(t) / 1e3)),
            throughput_batch=int(len(batch)),
            predictions_file=str(saved),
            input=m.input.to_dict(),
            output=m.output.to_dict(),
        )
