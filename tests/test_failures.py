"""Runs that cannot be scheduled or cannot write their outputs stop early with one line and exit 2
(real jobs/train.py processes, real local Ray)."""

from __future__ import annotations

import subprocess
import sys
import time

from conftest import ROOT

TRAIN = str(ROOT / "jobs" / "train.py")


def run(args, timeout=300):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - t0


def error_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_gpus_that_do_not_exist_fail_fast(tmp_path, tiny_tree_tgz, cache_dir):
    proc, seconds = run(["--data", str(tiny_tree_tgz), "--cache-dir", cache_dir, "--use-gpu", "--resource-timeout", "5",
                         "--output", str(tmp_path / "out"), "--storage-path", str(tmp_path / "ray"), "--no-export"])
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    (line,) = error_lines(proc)
    assert "cannot schedule GPU workers" in line and "0 GPU in all" in line and "waited 5s" in line
    assert "Traceback" not in proc.stderr
    assert "waiting for resources" in proc.stdout, "it says what it waits for"
    assert seconds < 120 and not (tmp_path / "out").exists()


def test_more_workers_than_the_cluster_holds_fail_fast(tmp_path, tiny_tree_tgz, cache_dir):
    import os

    cpus = os.cpu_count() or 1
    proc, _ = run(["--data", str(tiny_tree_tgz), "--cache-dir", cache_dir, "--num-workers", str(2 * cpus),
                   "--cpus-per-worker", "1", "--batch-size", str(4 * cpus), "--resource-timeout", "3",
                   "--output", str(tmp_path / "out"), "--storage-path", str(tmp_path / "ray"), "--no-export"])
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    (line,) = error_lines(proc)
    assert f"cannot schedule {2 * cpus} worker(s) x 1 CPU" in line and f"room for {cpus}" in line
    assert "Traceback" not in proc.stderr


def test_an_output_that_is_a_file_is_refused_before_training(tmp_path, tiny_tree_tgz, cache_dir):
    target = tmp_path / "taken"
    target.write_text("not a folder")
    proc, seconds = run(["--data", str(tiny_tree_tgz), "--cache-dir", cache_dir, "--output", str(target),
                         "--no-export"])
    assert proc.returncode == 2
    assert error_lines(proc) == [f"error: --output {target}: exists and is not a folder"]
    assert "layout:" not in proc.stdout, "refused before Ray or any training started"
    assert target.read_text() == "not a folder"
