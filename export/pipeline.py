"""Export a trained classifier to every edge variant, measure each on the test split, gate on drift.

``run_export(cfg)`` is the whole stage:

1. validate every input before any work: the model (``.keras`` from Keras 2 or 3, ``.h5``, a SavedModel
   folder; one image input, one output; finite weights), the data, and that they fit each other;
   find what the model outputs (probabilities, logits, a sigmoid unit);
2. build and measure the variants in a supervised worker process (:mod:`export.worker`): a variant that
   raises, crashes its process or hangs fails alone, with a one-line reason, and the others go on;
3. write the report (``report.json``, ``report.md``, a plot, one sidecar per model file).

Files are staged in a hidden folder next to the output and moved into place at the end, so an export
that dies half-way (or bad input) leaves no partial output. The drift gate and failed variants do not
stop the report: ``report["passed"]`` says whether every requested variant was built and stayed within
``max_drop_pp``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from export import onnx as onnx_export
from export import tflite as tflite_export
from export.errors import ExportInputError
from export.model_io import class_predictions, inspect_model, load_source_model
from export.report import plot_accuracy_vs_size, render_markdown
from toolkit.config import default_cache_dir
from toolkit.outputs import git_revision, write_json, write_text

ALL_VARIANTS = tflite_export.VARIANTS + onnx_export.VARIANTS
FORMAT_OF = {**{v: "tflite" for v in tflite_export.VARIANTS}, **{v: "onnx" for v in onnx_export.VARIANTS}}
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class ExportConfig:
    model: str  # the float model: .keras (Keras 2 or 3), .h5, or a SavedModel folder
    # Same sources as training; calibration images come from its training split, evaluation
    # uses its full test split. None = the Keras download.
    data: Optional[str] = None
    # Output folder; None = "export/" next to the model.
    out: Optional[str] = None
    # None = every variant that applies (a variant that does not apply, such as QAT of a Keras 3
    # model, is skipped with its reason). Named variants must all be built, or the export fails.
    variants: Optional[tuple[str, ...]] = None
    # Whether ``variants`` was named by the user (None: named when given). ``python -m export.tflite``
    # passes its own format's variants as a default, not as a demand.
    explicit_variants: Optional[bool] = None
    # Largest allowed top-1 accuracy drop of any variant against the float model, in points.
    max_drop: float = 1.0
    # Representative images for int8 calibration: 500 covers CIFAR-10's classes many times over;
    # more adds conversion time, not accuracy (see README).
    calibration_size: int = 500
    # A different source for calibration images (its training split), e.g. device-domain images.
    calibration_data: Optional[str] = None
    # Quantisation-aware fine-tuning epochs over the training split, at a small step: the float
    # weights are already good, QAT only adapts them to 8-bit rounding.
    qat_epochs: int = 2
    qat_learning_rate: float = 1e-4
    # int8_selective: at most this many tensors kept in float before giving up.
    selective_steps: int = 8
    # Held-out images from the training split (never the test split) that QAT's divergence check
    # and int8_selective's search measure on: 2,000 resolve a 1-point drop to +-0.5 points.
    holdout_size: int = 2000
    # Latency: batch-1 runs after warm-up, on one thread, as on a phone's single big core.
    latency_runs: int = 200
    latency_threads: int = 1
    throughput_batch: int = 64
    # A variant whose worker shows no sign of life this long is killed (converters can hang);
    # tfmot's graph rebuild gets its own, shorter limit (it takes seconds, or loops forever).
    stall_timeout: float = 900.0
    qat_build_timeout: float = 120.0
    cache_dir: str = field(default_factory=default_cache_dir)
    # The data as the model was trained on it (jobs/train.py's --image-size, --resize, --channels).
    image_size: Optional[tuple[int, int]] = None
    resize: str = "crop"
    channels: Optional[int] = None
    seed: int = 0
    # Tracebacks of failed variants, and the worker's raw output, on stderr.
    debug: bool = False

    def __post_init__(self) -> None:
        if self.variants is not None:
            self.variants = tuple(self.variants)
            unknown = [v for v in self.variants if v not in ALL_VARIANTS]
            if unknown:
                raise ExportInputError(f"variants: unknown variant(s) {', '.join(unknown)}; "
                                       f"choose from {', '.join(ALL_VARIANTS)}")
            if not self.variants:
                raise ExportInputError("variants: no variants selected")
        if self.max_drop < 0:
            raise ExportInputError(f"max_drop: must be >= 0, got {self.max_drop}")
        for name in ("calibration_size", "latency_runs", "selective_steps", "holdout_size"):
            if getattr(self, name) < 1:
                raise ExportInputError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if "qat_int8" in self.requested and self.qat_epochs < 1:
            raise ExportInputError(f"qat_epochs: must be >= 1, got {self.qat_epochs}")

    @property
    def requested(self) -> tuple[str, ...]:
        """The variants to build, in report order."""
        return tuple(v for v in ALL_VARIANTS if self.variants is None or v in self.variants)

    @property
    def explicit(self) -> tuple[str, ...]:
        """The variants the user named (these must be built)."""
        named = self.variants is not None if self.explicit_variants is None else self.explicit_variants
        return self.requested if named else ()

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path(self.model).resolve().parent / "export"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def run_export(cfg: ExportConfig, log: Callable[[str], None] = print, dataset=None) -> dict:
    """Convert, measure and report; returns the report dict (also written as report.json).

    ``dataset`` (a toolkit.data.Dataset) skips loading ``cfg.data``: the training job passes the
    arrays it trained on."""
    from toolkit.data import load_dataset, split_validation

    t_start = time.perf_counter()
    # --- validate every input before doing any work or writing anything ---------------------
    source = load_source_model(cfg.model)  # ExportInputError names the file
    from toolkit.data import ImageSpec

    spec = ImageSpec(cfg.image_size, cfg.resize, cfg.channels)
    ds = dataset if dataset is not None else load_dataset(cfg.data, cfg.cache_dir, spec)  # DataError names the source
    info = inspect_model(source, ds.x_test[:256], ds.num_classes, f"data {ds.source}")
    # Held-out images for QAT's divergence check and int8_selective's search: the same seeded split as
    # training's validation set (so, after a training run, images it never trained on), at most holdout_size.
    x_fit, y_fit, x_val, y_val = split_validation(
        ds.x_train, ds.y_train, min(0.1, cfg.holdout_size / len(ds.x_train)), cfg.seed)
    if cfg.calibration_data is not None:
        cal_source = load_dataset(cfg.calibration_data, cfg.cache_dir, spec)
        if tuple(cal_source.x_train.shape[1:]) != info.input_shape:
            raise ExportInputError(f"{cfg.model}: model input shape {info.input_shape} does not fit the images "
                                   f"of calibration data {cal_source.source} {tuple(cal_source.x_train.shape[1:])}")
        pool = cal_source.x_train
    else:
        pool = x_fit  # calibration never uses the held-out images
    calibration = pool[np.sort(np.random.default_rng(cfg.seed).permutation(len(pool))[:cfg.calibration_size])]
    out = cfg.out_dir
    if out.exists() and not out.is_dir():
        raise ExportInputError(f"--out {out}: exists and is not a folder")

    log(f"export: {cfg.model} -> {out}  ({len(cfg.requested)} variants, test split {len(ds.x_test):,} images)")
    log(f"  model: {info.format}" + (f" (Keras {info.keras})" if info.keras else "")
        + f", input {'x'.join(map(str, info.input_shape))}, {info.units} output unit(s): {info.output_kind}"
        + (f" (last activation {info.output_activation})" if info.output_activation else ""))
    ref_pred = class_predictions(source.predict(ds.x_test), info.output_kind)
    float_acc = float(np.mean(ref_pred == ds.y_test))
    float_val_acc = float(np.mean(class_predictions(source.predict(x_val), info.output_kind) == y_val))
    log(f"  float model: accuracy {float_acc:.4f} (held-out training images {float_val_acc:.4f})")

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    try:
        work = stage / ".work"
        arrays = work / "arrays"
        arrays.mkdir(parents=True)
        for name, a in (("x_test", ds.x_test), ("y_test", ds.y_test), ("ref_pred", ref_pred),
                        ("x_fit", x_fit), ("y_fit", y_fit), ("x_val", x_val),
                        ("y_val", y_val), ("calibration", calibration)):
            np.save(arrays / f"{name}.npy", np.ascontiguousarray(a))
        write_text(stage / "labels.txt", "".join(f"{c}\n" for c in ds.class_names))
        # The worker loads its own copy; a Keras 3 model from the SavedModel exported here (the worker
        # only converts, it never needs Keras 3 itself).
        job = {"model": source.saved_model_dir if info.keras == 3 else str(Path(cfg.model).resolve()), "stage": str(stage), "arrays": str(arrays),
               "info": info.to_dict(), "config": cfg.to_dict(), "explicit": list(cfg.explicit),
               "num_classes": ds.num_classes, "float_accuracy": float_acc, "float_val_accuracy": float_val_acc,
               "debug": cfg.debug}
        rows = _supervise(job, list(cfg.requested), work, cfg, float_acc, log)
        report = _report(stage, cfg, info, ds, rows, float_acc, float_val_acc)
        report["wall_time_s"] = time.perf_counter() - t_start
        for v in report["variants"]:
            if v.get("path"):
                v["path"] = str(out.resolve() / Path(v["path"]).name)  # where the file is about to land
        write_json(stage / "report.json", report)
        if any(r["status"] == "failed" for r in rows) and (work / "worker.log").exists():
            shutil.copy(work / "worker.log", stage / "export-worker.log")  # the frameworks' own words
        shutil.rmtree(work)
        # Done: move the staged files into place (one rename each).
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(stage.iterdir()):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return report


# --------------------------------------------------------------------------------------------
# Supervising the worker


def _describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"crashed ({signal.Signals(-rc).name})"
        except ValueError:
            return f"crashed (signal {-rc})"
    return f"exited with status {rc}"


def _tail(path: Path, n: int = 1) -> str:
    try:
        lines = [l.strip() for l in path.read_text(errors="replace").splitlines() if l.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])[:300]


def _supervise(job: dict, variants: list[str], work: Path, cfg: ExportConfig, float_acc: float,
               log: Callable[[str], None]) -> list[dict]:
    """Run export.worker until every variant has a row; a crash or a hang fails the variant that was
    running (or moves it to its next attempt, e.g. the next QAT scheme) and a new worker takes the rest."""
    remaining = list(variants)
    rows: dict[str, dict] = {}
    start_attempt: dict[str, int] = {}
    attempt_failures: dict[str, list[str]] = {}
    logf = open(work / "worker.log", "ab")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    runs, proc = 0, None
    try:
        while remaining:
            runs += 1
            events_path = work / f"events-{runs}.jsonl"
            job_path = work / f"job-{runs}.json"
            job.update(variants=remaining, prior_rows=rows, start_attempt=start_attempt,
                       attempt_failures=attempt_failures, events=str(events_path))
            job_path.write_text(json.dumps(job))
            events_path.touch()
            proc = subprocess.Popen([sys.executable, "-m", "export.worker", str(job_path)], cwd=str(ROOT), env=env,
                                    stdout=None if cfg.debug else logf, stderr=None if cfg.debug else logf)
            current, phase, attempt, attempts_of = None, "starting", 0, 1
            timeout, last = cfg.stall_timeout, time.monotonic()
            done, killed, exited, partial = False, None, False, ""
            with open(events_path) as ev:
                while True:
                    line = ev.readline()
                    if line:
                        partial += line
                        if not partial.endswith("\n"):
                            continue  # the rest of the line is still being written
                        e, partial = json.loads(partial), ""
                        last = time.monotonic()
                        kind = e["event"]
                        if kind == "start":
                            current, phase, attempt, attempts_of = e["variant"], "starting", \
                                start_attempt.get(e["variant"], 0), 1
                            timeout = cfg.stall_timeout
                        elif kind == "attempt":
                            attempt, attempts_of = e["index"], e["of"]
                        elif kind == "phase":
                            phase = e["what"]
                            timeout = e.get("timeout_s") or cfg.stall_timeout
                        elif kind == "log":
                            log(e["line"])
                        elif kind == "row":
                            rows[e["variant"]] = e["row"]
                            remaining.remove(e["variant"])
                            _log_row(e["row"], float_acc, cfg, log)
                            current = None
                        elif kind == "done":
                            done = True
                        continue
                    if proc.poll() is not None:
                        if exited:  # and everything it wrote has been read
                            break
                        exited = True
                        continue
                    if time.monotonic() - last > timeout:
                        killed = timeout
                        proc.kill()
                        proc.wait()
                        break
                    time.sleep(0.1)
            if done or not remaining:
                break
            rc = proc.returncode
            what = f"no sign of life for {killed:.0f} s" if killed else f"the worker process {_describe_exit(rc)}"
            if current is None:  # died before starting a variant (e.g. could not load the model)
                detail = _tail(work / "worker.log")
                for v in remaining:
                    rows[v] = {"name": v, "format": FORMAT_OF[v], "status": "failed",
                               "reason": f"{what} before building it" + (f": {detail}" if detail else "")}
                    _log_row(rows[v], float_acc, cfg, log)
                remaining.clear()
                break
            reason = f"{what} while {phase}" + ("; killed" if killed else "")
            if attempt + 1 < attempts_of:
                attempt_failures.setdefault(current, []).append(reason)
                start_attempt[current] = attempt + 1
                log(f"  {current}: {reason}; trying its next way (attempt {attempt + 2} of {attempts_of})")
            else:
                prior = attempt_failures.get(current, [])
                rows[current] = {"name": current, "format": FORMAT_OF[current], "status": "failed",
                                 "reason": "; ".join(prior + [reason])}
                remaining.remove(current)
                _log_row(rows[current], float_acc, cfg, log)
    finally:
        if proc is not None and proc.poll() is None:  # interrupted: take the worker down with us
            proc.kill()
            proc.wait()
        logf.close()
    return [rows[v] for v in variants]


def _log_row(row: dict, float_acc: float, cfg: ExportConfig, log) -> None:
    name = row["name"]
    if row["status"] == "failed":
        log(f"  {name:<14} FAILED: {row['reason']}")
        return
    if row["status"] == "skipped":
        log(f"  {name:<14} skipped: {row['reason']}")
        return
    drop = (float_acc - row["accuracy"]) * 100
    log(f"  {name:<14} acc {row['accuracy']:.4f}  drop {drop:+.2f} pp  agree {row['agreement']:.4f}  "
        f"{row['size_bytes'] / 1024:,.0f} KB  p50 {row['latency_ms_p50']:.3f} ms"
        + (f"  (kept {row['route']})" if row.get("route") else "")
        + ("" if drop <= cfg.max_drop else "  OVER THRESHOLD"))


# --------------------------------------------------------------------------------------------
# The report


def _report(stage: Path, cfg: ExportConfig, info, ds, rows: list[dict], float_acc: float,
            float_val_acc: float) -> dict:
    requested = set(cfg.requested)
    # Intermediate files (int8 built for onnx_int8 or int8_selective, float ONNX for onnx_int8) only
    # ship when they were asked for.
    for f in list(stage.iterdir()):
        if f.is_file() and f.suffix in (".tflite", ".onnx") and (f.stem not in requested or ".part" in f.name):
            f.unlink()
    ok = {r["name"]: r for r in rows if r["status"] == "ok"}
    float32_size = ok["float32"]["size_bytes"] if "float32" in ok else None
    for r in rows:
        if r["status"] == "ok":
            r["drop_pp"] = (float_acc - r["accuracy"]) * 100
            r["passed"] = r["drop_pp"] <= cfg.max_drop
            r["size_ratio_vs_float32_tflite"] = r["size_bytes"] / float32_size if float32_size else None
            # What an app needs to feed and read the model.
            write_json(stage / f"{Path(r['path']).name}.json",
                       {"variant": r["name"], "file": Path(r["path"]).name, "input": r["input"],
                        "output": r["output"], "output_kind": info.output_kind,
                        "apply_softmax": info.output_kind == "logits",
                        "apply_sigmoid": info.output_kind == "sigmoid_logit", "labels": "labels.txt"})
        elif r["status"] == "skipped":
            r["passed"] = r["name"] not in cfg.explicit  # a named variant must be built
        else:
            r["passed"] = False
    failed = [r["name"] for r in rows if not r["passed"]]
    report = {
        "model": str(Path(cfg.model).resolve()),
        "model_info": info.to_dict(),
        "output_kind": info.output_kind,
        "data_source": ds.source,
        "class_names": list(ds.class_names),
        "num_test_images": int(len(ds.x_test)),
        "float_accuracy": float_acc,
        "float_holdout_accuracy": float_val_acc,
        "max_drop_pp": cfg.max_drop,
        "passed": not failed,
        "failed": failed,
        "built": [r["name"] for r in rows if r["status"] == "ok"],
        "skipped": {r["name"]: r["reason"] for r in rows if r["status"] == "skipped"},
        "variants": rows,
        "git_revision": git_revision(),
        "config": cfg.to_dict(),
    }
    write_text(stage / "report.md", render_markdown(report))
    plot_accuracy_vs_size(report, stage / "accuracy_vs_size.png")
    return report
