"""Real Ray Train runs: two workers on a small real subset, the output folder, resuming a run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, require_shared_cifar

TRAIN = str(ROOT / "jobs" / "train.py")


def run_train(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"train.py failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, cache_dir):
    """One --smoke-test run with 2 workers on a real CIFAR-10 subset, shared by the tests below."""
    data = require_shared_cifar()
    tmp = tmp_path_factory.mktemp("smoke")
    out = tmp / "out"
    proc = run_train(["--smoke-test", "--data", str(data), "--num-workers", "2", "--output", str(out),
                      "--storage-path", str(tmp / "ray"), "--name", "smoke", "--cache-dir", cache_dir, "--no-export"])
    return out, proc


def test_two_workers_both_take_part(smoke_run):
    out, proc = smoke_run
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_workers"] == 2
    workers = m["workers"]
    assert sorted(w["rank"] for w in workers) == [0, 1]
    assert len({w["pid"] for w in workers}) == 2, "two separate processes"
    # Each worker ran every step of every epoch on its own shard of the global batch.
    assert workers[0]["batches"] == workers[1]["batches"] > 0
    assert workers[0]["batch_size"] * 2 == m["config"]["batch_size"]


def test_outputs_are_complete_and_loadable(smoke_run):
    out, proc = smoke_run
    m = json.loads((out / "metrics.json").read_text())
    for key in ("test_accuracy", "test_precision", "test_recall", "per_class_accuracy", "confusion_matrix",
                "class_names", "epochs", "wall_time_s", "train_images_per_s", "num_workers", "config"):
        assert key in m, key
    for key in ("test_accuracy", "test_precision", "test_recall"):
        assert 0.0 <= m[key] <= 1.0
    cm = np.asarray(m["confusion_matrix"])
    assert cm.shape == (10, 10) and cm.sum() == m["num_test_images"] == 2048
    assert m["test_accuracy"] == pytest.approx(np.trace(cm) / cm.sum())
    assert m["test_accuracy"] > 0.15, "learned something in two smoke epochs (chance is 0.10)"
    assert m["epochs"] == 2 and m["config"]["epochs"] == 2
    history = json.loads((out / "history.json").read_text())
    assert len(history["val_accuracy"]) == 2 and len(history["loss"]) == 2
    for png in ("curves.png", "confusion_matrix.png", "samples.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "labels.txt").read_text().split() == m["class_names"]
    # The model loads with Keras 2 and reproduces the reported accuracy on raw pixels.
    from toolkit.data import load_dataset
    from toolkit.tf import import_keras

    model = import_keras().models.load_model(out / "model.keras")
    ds = load_dataset(m["config"]["data"], m["config"]["cache_dir"]).limited(2048, m["config"]["seed"])
    acc = float(np.mean(model.predict(ds.x_test, verbose=0).argmax(1) == ds.y_test))
    assert acc == pytest.approx(m["test_accuracy"], abs=1e-6)
    # One progress line per epoch.
    epoch_lines = [l for l in proc.stdout.splitlines() if "epoch " in l and "img/s" in l]
    assert len(epoch_lines) == 2, proc.stdout[-2000:]


def test_same_name_resumes_from_the_latest_checkpoint(tmp_path, tiny_tree_tgz, cache_dir):
    common = ["--data", str(tiny_tree_tgz), "--num-workers", "2", "--batch-size", "32", "--cache-dir", cache_dir,
              "--storage-path", str(tmp_path / "ray"), "--name", "resume-me", "--no-export"]
    run_train([*common, "--epochs", "2", "--output", str(tmp_path / "a")])
    second = run_train([*common, "--epochs", "4", "--output", str(tmp_path / "b")])
    assert "resuming from checkpoint after epoch 2" in second.stdout
    history = json.loads((tmp_path / "b" / "history.json").read_text())
    assert len(history["loss"]) == 4  # 2 restored + 2 new
    m = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert m["epochs"] == 4
    assert m["test_accuracy"] > 0.5, "colour classes are easy after 4 epochs"


def test_survives_a_killed_worker(tmp_path, tiny_tree_tgz, cache_dir):
    """SIGKILL a training worker mid-run: Ray Train restarts the group from the latest checkpoint
    and the run still completes every epoch."""
    import os
    import re
    import signal

    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, TRAIN, "--data", str(tiny_tree_tgz), "--num-workers", "2", "--batch-size", "32",
         "--epochs", "8", "--cache-dir", cache_dir, "--storage-path", str(tmp_path / "ray"), "--name", "chaos",
         "--max-failures", "2", "--output", str(out), "--no-export"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines, killed = [], None
    for line in proc.stdout:
        lines.append(line)
        m = re.search(r"RayTrainWorker pid=(\d+)\).*epoch +2/8", line)
        if m and killed is None:
            killed = int(m.group(1))
            os.kill(killed, signal.SIGKILL)
    proc.wait(timeout=600)
    text = "".join(lines)
    assert killed is not None, text[-3000:]
    assert proc.returncode == 0, text[-3000:]
    assert "resuming from checkpoint after epoch" in text
    m = json.loads((out / "metrics.json").read_text())
    assert m["epochs"] == 8
    assert killed not in {w["pid"] for w in m["workers"]}, "the finished run ran on replacement workers"
