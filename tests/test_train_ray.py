"""Real Ray Train runs: two workers on real data, the output folder, --smoke-test through the export,
resuming a run by name (a killed worker: tests/test_failures.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, require_shared_cifar
from toolkit.tf import resolve_compute_dtype

TRAIN = str(ROOT / "jobs" / "train.py")


def run_train(args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_metrics_are_aggregated_once_per_epoch(regression_run):
    """The regression run (conftest): the epoch's metrics are real fractions, aggregated once per epoch
    (toolkit.train.step). Two workers each running every step on their own half of the batch: test_failures.py."""
    history = json.loads((regression_run / "history.json").read_text())
    for key in ("accuracy", "precision", "recall", "val_accuracy", "val_precision", "val_recall"):
        # Fractions, not sums over steps; precision and recall are 0 in an epoch whose model gives no class a
        # probability over 0.5 (measured once: val_precision 0.0 after the first epoch, 0.80-0.82 after), so only
        # the last epoch must be above 0.
        assert len(history[key]) == 4 and all(0.0 <= v <= 1.0 for v in history[key]) and history[key][-1] > 0, key
    assert history["accuracy"][-1] > history["accuracy"][0] and all(v > 0 for v in history["loss"])
    m = json.loads((regression_run / "metrics.json").read_text())
    steps = 45_000 // 256  # training split minus the 10% validation, at global batch 256
    assert m["workers"][0]["batches"] == 4 * steps and m["workers"][0]["batch_size"] == 256


def test_outputs_are_complete_and_loadable(regression_run):
    out = regression_run
    m = json.loads((out / "metrics.json").read_text())
    for key in ("test_accuracy", "test_precision", "test_recall", "per_class_accuracy", "confusion_matrix",
                "class_names", "epochs", "wall_time_s", "train_images_per_s", "num_workers", "config",
                "git_revision"):
        assert key in m, key
    for key in ("test_accuracy", "test_precision", "test_recall"):
        assert 0.0 <= m[key] <= 1.0
    cm = np.asarray(m["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == m["num_test_images"] == 10_000
    assert m["test_accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    assert m["per_class_accuracy"]["cat"] == pytest.approx(cm[3, 3] / cm[3].sum())
    assert m["train_images_per_s"] > 0 and m["wall_time_s"] > 0
    history = json.loads((out / "history.json").read_text())
    assert len(history["val_accuracy"]) == 4 and len(history["loss"]) == 4
    for png in ("curves.png", "confusion_matrix.png", "samples.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "labels.txt").read_text().split() == m["class_names"]
    # The model loads with Keras 2 and reproduces the reported accuracy on raw pixels.
    from toolkit.data import load_dataset
    from toolkit.tf import import_keras

    model = import_keras().models.load_model(out / "model.keras")
    ds = load_dataset(m["config"]["data"], m["config"]["cache_dir"])
    acc = float(np.mean(model.predict(ds.x_test, batch_size=1000, verbose=0).argmax(1) == ds.y_test))
    assert acc == pytest.approx(m["test_accuracy"], abs=1e-6)
    # One progress line per epoch, printed once.
    log = (out.parent / "stdout.txt").read_text()
    epoch_lines = [l for l in log.splitlines() if "epoch " in l and "img/s" in l]
    assert len(epoch_lines) == 4, log[-2000:]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, cache_dir):
    """`--smoke-test` on a real CIFAR-10 subset, export included (the job's default)."""
    data = require_shared_cifar()
    tmp = tmp_path_factory.mktemp("smoke")
    proc = run_train(["--smoke-test", "--data", str(data), "--output", str(tmp / "out"),
                      "--storage-path", str(tmp / "ray"), "--name", "smoke", "--cache-dir", cache_dir])
    return tmp, proc


def test_smoke_test_runs_every_stage_through_the_export(smoke_run):
    tmp, proc = smoke_run
    m = json.loads((tmp / "out" / "metrics.json").read_text())
    assert m["epochs"] == 2 and m["num_test_images"] == 2048
    # The default layout on one machine: one worker owning every CPU of the local Ray node.
    assert m["num_workers"] == len(m["workers"]) == 1 and m["config"]["num_workers"] == 1
    assert m["cpus_per_worker"] == m["workers"][0]["cpus"] >= min(2, os.cpu_count() or 1), "all the node's CPUs"
    assert "layout: 1 worker(s) x" in proc.stdout and "auto: one per node" in proc.stdout
    assert m["test_accuracy"] > 0.15, "learned something in two smoke epochs (chance is 0.10)"
    assert "batch_norm_recalibrated" not in m  # seed_cnn has no batch norm to recompute (tests/test_keras3.py's has)
    # --compute-dtype auto: bfloat16 where this CPU computes it natively (CI's does), float32 elsewhere.
    policy, why = resolve_compute_dtype("auto", use_gpu=False)
    dtype = "bfloat16" if policy == "mixed_bfloat16" else "float32"
    assert m["workers"][0]["compute_dtype"] == dtype and f"compute dtype: {dtype} ({why})" in proc.stdout
    report = json.loads((tmp / "out" / "export" / "report.json").read_text())
    assert len(report["variants"]) == 8 and report["num_test_images"] == 2048
    assert len(report["built"]) == 7 and list(report["skipped"]) == ["int8_selective"]  # int8 within budget
    assert (tmp / "out" / "export" / "int8.tflite").exists()
    assert "export: 7 variants within 1.0 pp" in proc.stdout and report["max_drop_pp"] == 1.0, "the real gate"
    assert report["passed"] and all(v["drop_pp"] <= 1.0 for v in report["variants"] if v["status"] == "ok")
    # What a user sees: the toolkit's lines, not the frameworks' noise that reads like failures.
    for noise in ("failed call to cuInit", "grpc_server_lib.cc", "PreemptionWatcher",
                  "All log messages before absl::InitializeLog()"):
        assert noise not in proc.stdout + proc.stderr, noise
