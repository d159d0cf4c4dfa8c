"""Export a trained classifier to every edge variant, measure each on the test split, gate on drift.

``run_export(cfg)`` is the whole stage:

1. validate every input before any work: the model (``.keras`` from Keras 2 or 3, ``.h5``, a SavedModel
   folder; one image input, one output; finite weights), the data, and that they fit each other;
   find what the model outputs (probabilities, logits, a sigmoid unit);
2. build and measure the variants in a supervised worker process (:mod:`export.run.worker`): a variant that
   raises, crashes its process or hangs fails alone, with a one-line reason, and the others go on;
3. write the report (``report.json``, ``report.md``, a plot, one sidecar per model file).

Files are staged in a hidden folder next to the output and moved into place at the end, so an export
that dies half-way (or bad input) leaves no partial output. The drift gate and failed variants do not
stop the report: ``report["passed"]`` says whether every requested variant was built and stayed within
``max_drop_pp``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from export.gate.baseline import PREDICTIONS, load_baseline
from export.gate.card import write_model_card
from export.config import ExportConfig
from export.errors import ExportInputError
from export.gate.checks import baseline_checks, drift_checks, floor_checks, images_digest
from export.gate.verdict import decide, verdict_lines
from export.tflite.micro import measure_variants
from export.model.load import load_source_model
from export.model.predictions import class_predictions, inspect_model
from export.report import build_report
from export.results import VariantResult
from export.run.supervisor import supervise
from export.gate.targets import target_checks
from toolkit.data import load_dataset, seeded_subset, split_validation
from toolkit.files import file_path_problem, write_json, write_text


def prepare_inputs(cfg: ExportConfig, source, ds) -> dict:
    """The arrays the worker measures and calibrates on: the test split, the float model's predictions,
    held-out training images, calibration images; with the model's description."""
    info = inspect_model(source, ds.x_test[:256], ds.num_classes, f"data {ds.source}")
    # Held-out images for QAT's divergence check and int8_selective's search: the same seeded split as
    # training's validation set (so, after a training run, images it never trained on), at most holdout_size.
    x_fit, y_fit, x_val, y_val = split_validation(
        ds.x_train, ds.y_train, min(0.1, cfg.holdout_size / len(ds.x_train)), cfg.seed)
    if cfg.calibration_data is not None:
        cal_source = load_dataset(cfg.calibration_data, cfg.cache_dir, cfg.image_spec)
        if tuple(cal_source.x_train.shape[1:]) != info.input_shape:
            raise ExportInputError(f"{cfg.model}: model input shape {info.input_shape} does not fit the images "
                                   f"of calibration data {cal_source.source} {tuple(cal_source.x_train.shape[1:])}")
        pool = cal_source.x_train
    else:
        pool = x_fit  # calibration never uses the held-out images
    calibration = pool[seeded_subset(len(pool), cfg.calibration_size, np.random.default_rng(cfg.seed))]
    if cfg.qat_images is not None and cfg.qat_images < len(x_fit):  # what QAT fine-tunes on
        keep = np.sort(seeded_subset(len(x_fit), cfg.qat_images, np.random.default_rng(cfg.seed + 1)))
        x_fit, y_fit = x_fit[keep], y_fit[keep]
    ref_pred = class_predictions(source.predict(ds.x_test), info.output_kind)
    val_pred = class_predictions(source.predict(x_val), info.output_kind)  # what int8's ranges must agree with
    return {"info": info, "arrays": {"x_test": ds.x_test, "y_test": ds.y_test, "ref_pred": ref_pred,
                                     "x_fit": x_fit, "y_fit": y_fit, "x_val": x_val, "y_val": y_val,
                                     "val_pred": val_pred, "calibration": calibration}}


def run_export(cfg: ExportConfig, log: Callable[[str], None] = print, dataset=None) -> dict:
    """Convert, measure and report; returns the report dict (also written as report.json).

    ``dataset`` (a toolkit.data.Dataset) skips loading ``cfg.data``: the training job passes the
    arrays it trained on."""
    clock = StageClock()
    # --- validate every input before doing any work or writing anything ---------------------
    if cfg.junit and file_path_problem(cfg.junit):  # where the verdict goes, before anything is built
        raise ExportInputError(f"--junit {file_path_problem(cfg.junit)}")
    source = load_source_model(cfg.model, cfg.custom_objects)  # ExportInputError names the file
    clock.mark("model")
    ds = dataset if dataset is not None else load_dataset(cfg.data, cfg.cache_dir, cfg.image_spec)  # DataError names the source
    clock.mark("data")
    inputs = prepare_inputs(cfg, source, ds)
    clock.mark("float predictions")
    info, arrays = inputs["info"], inputs["arrays"]
    unknown = sorted(set(cfg.gate.class_floors) - set(ds.class_names))
    if unknown:
        raise ExportInputError(f"--class-floor: unknown class(es) {', '.join(unknown)}; the data's classes are "
                               f"{', '.join(ds.class_names)}")
    digest = images_digest(ds.x_test, ds.y_test)
    baseline = load_baseline(cfg.baseline, digest, ds.x_test, ds.num_classes, cfg.custom_objects) if cfg.baseline else None
    clock.mark("baseline" if cfg.baseline else "test images")
    out = cfg.out_dir
    if out.exists() and not out.is_dir():
        raise ExportInputError(f"--out {out}: exists and is not a folder")

    log(f"export: {cfg.model} -> {out}  ({len(cfg.requested)} variants, test split {len(ds.x_test):,} images)")
    log(f"  model: {info.format}" + (f" (Keras {info.keras})" if info.keras else "")
        + f", input {'x'.join(map(str, info.input_shape))}, {info.units} output unit(s): {info.output_kind}"
        + (f" (last activation {info.output_activation})" if info.output_activation else ""))
    for rewrite in info.rewrites:  # what the converters get instead of the saved model, each checked
        log(f"  rewritten: {rewrite}")
    float_acc = float(np.mean(arrays["ref_pred"] == ds.y_test))
    float_val_acc = float(np.mean(arrays["val_pred"] == arrays["y_val"]))
    log(f"  float model: accuracy {float_acc:.4f} (held-out training images {float_val_acc:.4f})")
    # The worker loads its own copy; a Keras 3 model from the SavedModel exported here (what it converts),
    # and from its file only to rebuild it in tf_keras for QAT.
    job = {"model": source.saved_model_dir if info.keras == 3 else str(Path(cfg.model).resolve()),
           "info": info.to_dict(), "config": cfg.to_dict(),  # the worker rebuilds the ExportConfig from it
           "num_classes": ds.num_classes, "float_accuracy": float_acc, "float_val_accuracy": float_val_acc,
           "keras3_model": str(Path(cfg.model).resolve()) if info.keras == 3 else None}
    return stage_and_build(cfg, job, arrays, ds, info, (float_acc, float_val_acc), log, clock,
                           {"digest": digest, "baseline": baseline, "targets": cfg.device_targets()})


def stage_and_build(cfg: ExportConfig, job: dict, arrays: dict, ds, info, accuracies, log, clock: "StageClock",
                    compared: dict) -> dict:
    """Build every variant into a hidden staging folder next to the output, write the report there, then
    move the files into place (one rename each): an export that dies half-way leaves no partial output."""
    out = cfg.out_dir
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    try:
        work = stage / ".work"
        (work / "arrays").mkdir(parents=True)
        for name, a in arrays.items():
            np.save(work / "arrays" / f"{name}.npy", np.ascontiguousarray(a))
        write_text(stage / "labels.txt", "".join(f"{c}\n" for c in ds.class_names))
        job.update(stage=str(stage), arrays=str(work / "arrays"))
        results = supervise(job, list(cfg.requested), work, stall_timeout=cfg.stall_timeout, debug=cfg.debug,
                            on_row=lambda r: log_result(r, log), log=log)
        clock.mark("variants")
        preds = stored_predictions(stage, results, arrays)
        micro = measure_variants(results, arrays["x_test"], arrays["y_test"], preds, cfg.micro_samples,
                                 cfg.stall_timeout, info.output_kind, log)
        clock.mark("TFLite Micro")
        checks = (gate_checks(cfg, ds, arrays["ref_pred"], preds, compared["baseline"])
                  + target_checks(results, micro, compared["targets"]))
        verdict = decide(results, checks, cfg)
        for line in verdict_lines(verdict):
            log(line)
        clock.mark("checks")
        report = build_report(stage, cfg, info, ds, results, *accuracies, micro=micro, checks=checks,
                              verdict=verdict, targets=compared["targets"])
        report["predictions"] = {"file": PREDICTIONS, "test_images_sha256": compared["digest"]}
        if compared["baseline"] is not None:
            report["baseline"] = compared["baseline"]["source"]
        try:  # a card that cannot be drawn never loses the export
            write_model_card(stage, report, ds.x_test, ds.y_test.astype(np.int64),
                             {"float": arrays["ref_pred"].astype(np.int64), **preds}, compared["baseline"])
        except Exception as e:
            report["model_card_error"] = f"{type(e).__name__}: {e}"
        clock.mark("report")
        report["wall_time_s"] = clock.total()
        report["stage_seconds"] = clock.seconds
        log("  time: " + clock.line(results))
        for v in report["variants"]:
            if v.get("speed_note"):
                log("  note: " + v["speed_note"]["text"].replace("`", ""))
        write_json(stage / "report.json", report)
        if any(r.status == "failed" for r in results) and (work / "worker.log").exists():
            shutil.copy(work / "worker.log", stage / "export-worker.log")  # the frameworks' own words
        shutil.rmtree(work)
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(stage.iterdir()):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return report


class StageClock:
    """The export's seconds per stage, in order (report.json's ``stage_seconds``; each variant's own are its
    ``build_s``): what a slow export spends its time on."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def mark(self, stage: str) -> None:
        now = time.perf_counter()
        self.seconds[stage] = now - self.last
        self.last = now

    def total(self) -> float:
        return time.perf_counter() - self.start

    def line(self, results: list[VariantResult]) -> str:
        """The log's line: each stage, the variants' own seconds inside theirs, and the total."""
        built = ", ".join(f"{r.name} {r.build_s:.1f}" for r in results if r.ok)
        return ", ".join(f"{stage} {s:.1f} s" + (f" ({built})" if stage == "variants" and built else "")
                         for stage, s in self.seconds.items()) + f"; {self.total():.1f} s in all"


def stored_predictions(stage: Path, results: list[VariantResult], arrays: dict) -> dict:
    """Every built variant's per-image top-1 (and scores) in one ``predictions.npz`` in ``stage``, with the float
    model's and the labels: what a later export's --baseline reads. Returns {variant: top-1}."""
    store = {"labels": arrays["y_test"].astype(np.int16), "float": arrays["ref_pred"].astype(np.int16)}
    preds = {}
    for r in results:
        f = r.measured.predictions_file if r.ok else None
        if f and Path(f).exists():
            with np.load(f) as z:
                store[r.name], store[f"{r.name}_scores"] = z["top1"], z["scores"]
            preds[r.name] = store[r.name].astype(np.int64)
    np.savez_compressed(stage / PREDICTIONS, **store)
    return preds


def gate_checks(cfg: ExportConfig, ds, float_pred, preds: dict, baseline) -> list[dict]:
    """export.gate.checks' checks: drift against the float model, and against the baseline and per class when asked."""
    y, names, float_pred = ds.y_test.astype(np.int64), list(ds.class_names), float_pred.astype(np.int64)
    checks = drift_checks(y, float_pred, preds, cfg.max_drop, cfg.gate)
    if baseline is not None:
        checks += baseline_checks(y, {"float": float_pred, **preds}, baseline["predictions"], cfg.gate, names)
    return checks + floor_checks(y, preds, cfg.gate, names)


def log_result(r: VariantResult, log) -> None:
    """A variant's line as it is built: its numbers, or why it was not built (the verdict comes after every check:
    export.gate.verdict.verdict_lines)."""
    if not r.ok:
        log(f"  {r.name:<14} {'FAILED' if r.status == 'failed' else 'skipped'}: {r.reason}")
        return
    m = r.measured
    log(f"  {r.name:<14} acc {m.accuracy:.4f}  drop {r.drop_pp:+.2f} pp  agree {m.agreement:.4f}  "
        f"{r.size_bytes / 1024:,.0f} KB  p50 {m.latency_ms_p50:.3f} ms"
        + (f"  (kept {r.details['route']})" if r.details.get("route") else ""))
