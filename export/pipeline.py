"""Export a trained Keras model to every edge variant, measure each on the test split, gate on drift.

``run_export(cfg)`` is the whole stage: validate inputs -> convert -> measure -> report. All files
are written into a staging folder and moved into ``cfg.out`` only when every stage succeeded, so a
failure leaves no partial output. The drift gate does not count as a failure here: the report is
written, and ``report["passed"]`` says whether every variant stayed within ``max_drop_pp``.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from export import onnx as onnx_export
from export import tflite as tflite_export
from export.report import plot_accuracy_vs_size, render_markdown
from export.runtime import open_model, time_calls
from toolkit.config import default_cache_dir
from toolkit.outputs import git_revision, write_json, write_text

ALL_VARIANTS = tflite_export.VARIANTS + onnx_export.VARIANTS
FORMAT_OF = {**{v: "tflite" for v in tflite_export.VARIANTS}, **{v: "onnx" for v in onnx_export.VARIANTS}}


class ExportInputError(ValueError):
    """Bad input to the export (model, data, variants): exit status 2, nothing written."""


@dataclass
class ExportConfig:
    model: str  # path to the float .keras model
    # Same sources as training; calibration images come from its training split, evaluation
    # uses its full test split. None = the Keras download.
    data: Optional[str] = None
    # Output folder; None = "export/" next to the model.
    out: Optional[str] = None
    variants: tuple[str, ...] = ALL_VARIANTS
    # Largest allowed top-1 accuracy drop of any variant against the float model, in points.
    max_drop: float = 1.0
    # Representative images for int8 calibration: 500 covers CIFAR-10's classes many times over;
    # more adds conversion time, not accuracy (see README).
    calibration_size: int = 500
    # A different source for calibration images (its training split), e.g. device-domain images.
    calibration_data: Optional[str] = None
    # Quantisation-aware fine-tuning epochs over the training split.
    qat_epochs: int = 2
    # Latency: batch-1 runs after warm-up, on one thread, as on a phone's single big core.
    latency_runs: int = 200
    latency_threads: int = 1
    throughput_batch: int = 64
    cache_dir: str = field(default_factory=default_cache_dir)
    seed: int = 0

    def __post_init__(self) -> None:
        self.variants = tuple(self.variants)
        unknown = [v for v in self.variants if v not in ALL_VARIANTS]
        if unknown:
            raise ExportInputError(f"variants: unknown variant(s) {', '.join(unknown)}; "
                                   f"choose from {', '.join(ALL_VARIANTS)}")
        if not self.variants:
            raise ExportInputError("variants: no variants selected")
        if self.max_drop < 0:
            raise ExportInputError(f"max_drop: must be >= 0, got {self.max_drop}")
        if self.calibration_size < 1:
            raise ExportInputError(f"calibration_size: must be >= 1, got {self.calibration_size}")
        if self.latency_runs < 1:
            raise ExportInputError(f"latency_runs: must be >= 1, got {self.latency_runs}")
        if "qat_int8" in self.variants and self.qat_epochs < 1:
            raise ExportInputError(f"qat_epochs: must be >= 1, got {self.qat_epochs}")

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path(self.model).resolve().parent / "export"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_keras_model(path: str):
    """Load a Keras 2 model, or raise ExportInputError with one line naming the file."""
    from toolkit.tf import import_keras

    p = Path(path)
    if not p.exists():
        raise ExportInputError(f"{path}: model file does not exist")
    if p.is_dir():
        raise ExportInputError(f"{path}: is a folder, expected a .keras model file")
    keras = import_keras()
    try:
        return keras.models.load_model(str(p), compile=False)
    except Exception as e:  # Keras raises many types for a bad file; all mean "not a loadable model"
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise ExportInputError(f"{path}: not a loadable Keras model ({type(e).__name__}: {detail})") from e


def _check_fits(model, x: np.ndarray, num_classes: int, model_path: str, data_desc: str) -> None:
    want = tuple(model.input_shape[1:])
    got = tuple(x.shape[1:])
    if len(want) != len(got) or any(w is not None and w != g for w, g in zip(want, got)):
        raise ExportInputError(f"{model_path}: model input shape {want} does not fit the images of "
                               f"{data_desc} {got}")
    if model.output_shape[-1] != num_classes:
        raise ExportInputError(f"{model_path}: model has {model.output_shape[-1]} outputs but "
                               f"{data_desc} has {num_classes} classes")


def _select_calibration(x: np.ndarray, n: int, seed: int) -> np.ndarray:
    idx = np.random.default_rng(seed).permutation(len(x))[:n]
    return x[np.sort(idx)]


def _measure(path: Path, x_test, y_test, ref_pred, cfg: ExportConfig, **open_kw) -> dict:
    """Accuracy and agreement on the full test split, latency at batch 1, throughput at a batch."""
    m = open_model(str(path), num_threads=os.cpu_count() or 1, **open_kw)
    probs = m.predict(x_test)
    pred = probs.argmax(1)
    timed = open_model(str(path), num_threads=cfg.latency_threads, **open_kw)
    one = timed.prepare(x_test[:1])
    lat = time_calls(lambda: timed.run(one), runs=cfg.latency_runs, warmup=20)
    batch = timed.prepare(x_test[: cfg.throughput_batch])
    t = time_calls(lambda: timed.run(batch), runs=10, warmup=2)
    return {
        "accuracy": float(np.mean(pred == y_test)),
        "agreement": float(np.mean(pred == ref_pred)),
        "latency_ms_p50": float(np.percentile(lat, 50)),
        "latency_ms_p90": float(np.percentile(lat, 90)),
        "throughput_images_per_s": float(len(batch) / (np.median(t) / 1e3)),
        "throughput_batch": int(len(batch)),
        "input": m.input.to_dict(),
        "output": m.output.to_dict(),
    }


def run_export(cfg: ExportConfig, log: Callable[[str], None] = print, dataset=None) -> dict:
    """Convert, measure and report; returns the report dict (also written as report.json).

    ``dataset`` (a toolkit.data.Dataset) skips loading ``cfg.data``: the training job passes the
    arrays it trained on."""
    from toolkit.data import load_dataset

    t_start = time.perf_counter()
    # --- validate every input before doing any work or writing anything ---------------------
    model = load_keras_model(cfg.model)
    ds = dataset if dataset is not None else load_dataset(cfg.data, cfg.cache_dir)  # DataError names the source
    _check_fits(model, ds.x_test, ds.num_classes, cfg.model, f"data {ds.source}")
    cal_source = ds
    if cfg.calibration_data is not None:
        cal_source = load_dataset(cfg.calibration_data, cfg.cache_dir)
        _check_fits(model, cal_source.x_train, ds.num_classes, cfg.model, f"calibration data {cal_source.source}")
    calibration = _select_calibration(cal_source.x_train, cfg.calibration_size, cfg.seed)
    out = cfg.out_dir
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".export-", dir=out.parent))
    try:
        report = _export_into(stage, cfg, model, ds, calibration, log)
        report["wall_time_s"] = time.perf_counter() - t_start
        for v in report["variants"]:
            v["path"] = str(out.resolve() / Path(v["path"]).name)  # where the file is about to land
        write_json(stage / "report.json", report)
        # Everything succeeded: move the staged files into place (one rename each).
        out.mkdir(parents=True, exist_ok=True)
        for f in sorted(stage.iterdir()):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return report


def _export_into(stage: Path, cfg: ExportConfig, model, ds, calibration: np.ndarray, log) -> dict:
    x_test, y_test = ds.x_test, ds.y_test
    log(f"export: {cfg.model} -> {cfg.out_dir}  ({len(cfg.variants)} variants, test split {len(x_test):,} images)")
    ref_probs = np.asarray(model.predict(x_test, batch_size=500, verbose=0))
    ref_pred = ref_probs.argmax(1)
    float_acc = float(np.mean(ref_pred == y_test))
    log(f"  float model (Keras): accuracy {float_acc:.4f}")
    write_text(stage / "labels.txt", "".join(f"{c}\n" for c in ds.class_names))

    rows: list[dict] = []
    files: dict[str, Path] = {}

    def tflite_file(variant: str, qat_model=None) -> Path:
        if variant not in files:
            t0 = time.perf_counter()
            blob = tflite_export.convert_variant(variant, model, calibration=calibration, qat_model=qat_model)
            files[variant] = stage / f"{variant}.tflite"
            files[variant].write_bytes(blob)
            log(f"  converted {variant}: {len(blob) / 1024:,.0f} KB ({time.perf_counter() - t0:.1f}s)")
        return files[variant]

    def add_row(name: str, path: Path) -> None:
        rows.append(_row(name, path, _measure(path, x_test, y_test, ref_pred, cfg), float_acc, cfg, log))

    for variant in tflite_export.VARIANTS:
        if variant not in cfg.variants:
            continue
        qat_model = None
        if variant == "qat_int8":
            log(f"  quantisation-aware fine-tuning ({cfg.qat_epochs} epochs on {len(ds.x_train):,} images)")
            qat_model = tflite_export.train_qat(model, ds.x_train, ds.y_train, epochs=cfg.qat_epochs,
                                                seed=cfg.seed, log=log)
        add_row(variant, tflite_file(variant, qat_model))

    if "onnx_float32" in cfg.variants or "onnx_int8" in cfg.variants:
        float_onnx = stage / "onnx_float32.onnx"
        onnx_export.convert_float32(model, str(float_onnx))
        if "onnx_float32" in cfg.variants:
            add_row("onnx_float32", float_onnx)
    if "onnx_int8" in cfg.variants:
        rows.append(_onnx_int8(stage, cfg, x_test, y_test, ref_pred, float_acc, calibration, float_onnx,
                               tflite_file, log))
        if "onnx_float32" not in cfg.variants:
            float_onnx.unlink()
    # Only requested variants' files ship (int8.tflite may have been built for onnx_int8).
    for variant, path in files.items():
        if variant not in cfg.variants and path.exists():
            path.unlink()

    float32_size = next((r["size_bytes"] for r in rows if r["name"] == "float32"), None)
    for r in rows:
        r["size_ratio_vs_float32_tflite"] = r["size_bytes"] / float32_size if float32_size else None
        if r["name"] not in ("float32", "onnx_float32"):
            # What an app needs to feed and read the quantised model.
            write_json(stage / f"{Path(r['path']).name}.json",
                       {"variant": r["name"], "file": Path(r["path"]).name, "input": r["input"],
                        "output": r["output"], "labels": "labels.txt"})
    failed = [r["name"] for r in rows if not r["passed"]]
    report = {
        "model": str(Path(cfg.model).resolve()),
        "data_source": ds.source,
        "num_test_images": int(len(x_test)),
        "float_accuracy": float_acc,
        "max_drop_pp": cfg.max_drop,
        "passed": not failed,
        "failed": failed,
        "variants": rows,
        "git_revision": git_revision(),
        "config": cfg.to_dict(),
    }
    write_text(stage / "report.md", render_markdown(report))
    plot_accuracy_vs_size(report, stage / "accuracy_vs_size.png")
    return report


def _row(name: str, path: Path, measured: dict, float_acc: float, cfg: ExportConfig, log, **extra) -> dict:
    """One report row: the measurement plus drop against the float model and the gate verdict."""
    drop = (float_acc - measured["accuracy"]) * 100
    row = {"name": name, "format": FORMAT_OF[name], "path": str(path), "size_bytes": path.stat().st_size,
           **measured, "drop_pp": drop, "passed": drop <= cfg.max_drop, **extra}
    log(f"  {name:<13} acc {row['accuracy']:.4f}  drop {drop:+.2f} pp  agree {row['agreement']:.4f}  "
        f"{row['size_bytes'] / 1024:,.0f} KB  p50 {row['latency_ms_p50']:.3f} ms"
        + (f"  (kept {extra['route']})" if "route" in extra else "")
        + ("" if row["passed"] else "  OVER THRESHOLD"))
    return row


def _onnx_int8(stage, cfg, x_test, y_test, ref_pred, float_acc, calibration, float_onnx, tflite_file, log) -> dict:
    """Build both int8 ONNX candidates, measure both, keep the more accurate (then the faster)."""
    candidates = {}
    ort_path = stage / "onnx_int8.ort_static.onnx"
    onnx_export.quantize_static(str(float_onnx), calibration, str(ort_path))
    candidates["ort_static"] = (ort_path, {})
    int8_tflite = tflite_file("int8")
    tfl_path = stage / "onnx_int8.from_tflite.onnx"
    onnx_export.convert_from_tflite(str(int8_tflite), str(tfl_path))
    out_q = open_model(str(int8_tflite)).output
    candidates["from_tflite"] = (tfl_path, {"output_quantization": (out_q.scale, out_q.zero_point)})
    measured = {}
    for route, (path, kw) in candidates.items():
        measured[route] = _measure(path, x_test, y_test, ref_pred, cfg, **kw)
        measured[route]["size_bytes"] = path.stat().st_size
        log(f"  onnx_int8 candidate {route}: acc {measured[route]['accuracy']:.4f}  "
            f"p50 {measured[route]['latency_ms_p50']:.3f} ms")
    # The more accurate; within 0.1 point (10 of 10,000 images: noise) the faster at batch 1.
    top = max(v["accuracy"] for v in measured.values())
    best = min((r for r in measured if measured[r]["accuracy"] >= top - 0.001),
               key=lambda r: measured[r]["latency_ms_p50"])
    final = stage / "onnx_int8.onnx"
    os.replace(candidates[best][0], final)
    for route, (path, _) in candidates.items():
        if route != best and path.exists():
            path.unlink()
    candidates_summary = {r: {k: v[k] for k in ("accuracy", "latency_ms_p50", "size_bytes")}
                          for r, v in measured.items()}
    return _row("onnx_int8", final, measured[best], float_acc, cfg, log, route=best,
                candidates=candidates_summary)
