"""Runs that cannot be scheduled or cannot write their outputs stop early with one line and exit 2; runs
interrupted or losing a worker resume and lose nothing (real jobs/train.py processes on a real Ray node)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from conftest import ROOT, local_snapshot, train_in_process, wait_for_registered_epoch

TRAIN = str(ROOT / "jobs" / "train.py")
pytestmark = pytest.mark.usefixtures("joined_ray_node")  # one Ray for the module's runs


def run(args, timeout=300):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, timeout=timeout)
    return proc, time.monotonic() - t0


def error_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_the_runs_here_join_the_session_ray_node_only_through_its_address(ray_node):
    """This module's runs join conftest.ray_node through RAY_ADDRESS; a plain ray.init() elsewhere on the machine
    does not find it (`ray start` records a cluster in Ray's address file; LocalCluster(advertise=False) keeps its
    own temp folder, and records it there), so test_train_ray's runs still start a Ray of their own, as on a laptop."""
    import os

    from benchmarks.localcluster import recorded_address

    assert os.environ["RAY_ADDRESS"] == ray_node["RAY_ADDRESS"]
    port = ray_node["RAY_ADDRESS"].rsplit(":", 1)[-1]
    recorded = recorded_address() or ""
    assert not recorded.endswith(f":{port}"), recorded


def test_gpus_that_do_not_exist_fail_fast(tmp_path, tiny_tree_tgz, cache_dir):
    proc, seconds = run(["--data", str(tiny_tree_tgz), "--cache-dir", cache_dir, "--use-gpu", "--resource-timeout", "2",
                         "--output", str(tmp_path / "out"), "--storage-path", str(tmp_path / "ray"), "--no-export"])
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    (line,) = error_lines(proc)
    assert "cannot schedule GPU workers" in line and "0 GPU in all" in line and "waited 2s" in line
    assert "Traceback" not in proc.stderr
    assert "waiting for resources" in proc.stdout, "it says what it waits for"
    assert seconds < 120 and not (tmp_path / "out").exists()


def test_more_workers_than_the_cluster_holds_fail_fast(tmp_path, tiny_tree_tgz, cache_dir):
    import os

    cpus = os.cpu_count() or 1
    proc, _ = run(["--data", str(tiny_tree_tgz), "--cache-dir", cache_dir, "--num-workers", str(2 * cpus),
                   "--cpus-per-worker", "1", "--batch-size", str(4 * cpus), "--resource-timeout", "2",
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


def test_a_layer_module_that_cannot_be_imported_is_refused_before_training(tmp_path, tiny_tree_tgz, cache_dir):
    """--custom-objects is imported before any data is read or worker started (it used to be imported only to write
    the outputs: the run trained its epochs, then ended in a traceback, issue 36)."""
    out = tmp_path / "out"
    proc = train_in_process(["--data", str(tiny_tree_tgz), "--cache-dir", cache_dir, "--output", str(out),
                             "--custom-objects", "no_such_pkg.layers", "--epochs", "1"])
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert error_lines(proc) == ["error: --custom-objects no_such_pkg.layers: cannot import no_such_pkg.layers "
                                 "(ModuleNotFoundError: No module named 'no_such_pkg'); it must be installed, on "
                                 "PYTHONPATH, or in the current folder"], proc.stderr
    assert "Traceback" not in proc.stderr and "data:" not in proc.stdout and not out.exists()


def test_a_diverging_run_stops_with_one_line_and_writes_no_model(tmp_path, tiny_tree_tgz, cache_dir):
    """A learning rate of 1e37 sends the weights (and the loss) to infinity in the first epoch: the run
    stops there instead of training on NaN, says so in one line (epoch, steps), exits 1, and writes no
    model.keras."""
    proc, _ = run(["--data", str(tiny_tree_tgz), "--cache-dir", cache_dir, "--epochs", "5", "--batch-size", "32",
                   "--learning-rate", "1e37", "--output", str(tmp_path / "out"), "--storage-path",
                   str(tmp_path / "ray"), "--name", "diverge", "--no-export"], timeout=600)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    (line,) = error_lines(proc)
    assert line.startswith("error: training diverged: loss ") and "in epoch 1 (steps 1-" in line, line
    assert "no model.keras written" in line and "--learning-rate" in line
    assert "Traceback" not in proc.stderr
    assert "epoch   2/5" not in proc.stdout, "it stopped at the diverged epoch"
    assert not (tmp_path / "out").exists()


def test_ctrl_c_then_a_killed_worker_lose_nothing(tmp_path, tiny_tree_tgz, cache_dir):
    """Two failures a long run meets on a laptop. SIGINT mid-run (what Ctrl-C sends): Ray Train aborts the
    workers, the driver exits 130 with one line saying where the checkpoints are and how to resume, writes no
    outputs. The same command resumes; a training worker SIGKILLed in that run is replaced, the group restarts
    from the latest checkpoint, and every epoch is in the history once."""
    import os
    import re
    import signal

    args = [sys.executable, TRAIN, "--data", str(tiny_tree_tgz), "--cache-dir", cache_dir, "--epochs", "40",
            "--batch-size", "32", "--output", str(tmp_path / "out"), "--storage-path", str(tmp_path / "ray"),
            "--name", "ctrlc", "--no-export", "--num-workers", "2", "--recipe", "adam"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    deadline = time.monotonic() + 300
    for line in proc.stdout:  # wait until two epochs are done
        seen.append(line)
        if "epoch   2/40" in line or time.monotonic() > deadline:
            break
    assert any("epoch   2/40" in l for l in seen), "".join(seen)[-2000:]
    # Ray Train's controller registers a reported checkpoint when it next polls the workers: wait for that
    wait_for_registered_epoch(local_snapshot(tmp_path / "ray", "ctrlc"), 2, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:] + err[-2000:]
    (line,) = [l for l in err.splitlines() if l.startswith("stopped:")]
    assert "interrupted; the checkpoints of run ctrlc are kept" in line and "--name ctrlc" in line, line
    assert not (tmp_path / "out").exists()

    # The same command resumes from the last checkpoint (two epochs or more in); its first trained epoch, a
    # worker is killed. Ray Train V2 registers a reported checkpoint when its controller polls the workers (every
    # 2 s by default); these epochs take about a second, so poll faster or the kill can beat the poll.
    again = subprocess.Popen(args[:6] + ["--epochs", "12", "--max-failures", "2"] + args[8:], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"})
    lines, killed = [], None
    for line in again.stdout:
        lines.append(line)
        m = re.search(r"RayTrainWorker pid=(\d+)\).*epoch +(\d+)/12", line)
        if m and killed is None and int(m.group(2)) < 11:
            killed = int(m.group(1))
            os.kill(killed, signal.SIGKILL)
    again.wait(timeout=600)
    text = "".join(lines)
    assert again.returncode == 0 and killed is not None, text[-3000:]
    resumes = [int(e) for e in re.findall(r"resuming from checkpoint after epoch (\d+)", text)]
    assert len(resumes) == 2 and resumes[0] >= 2 and resumes[1] >= resumes[0], text[-3000:]  # Ctrl-C's, the kill's
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert len(history["loss"]) == 12 and m["epochs"] == 12 and m["test_accuracy"] > 0.5
    assert killed not in {w["pid"] for w in m["workers"]}, "the finished run ran on replacement workers"
    # Two workers, each running every step of the last start on its own half of the batch, on the one node.
    workers = m["workers"]
    assert m["num_workers"] == 2 and sorted(w["rank"] for w in workers) == [0, 1]
    assert len({w["pid"] for w in workers}) == 2, "two separate processes"
    assert workers[0]["batches"] == workers[1]["batches"] > 0 and workers[0]["batch_size"] == workers[1]["batch_size"] == 16
    assert workers[0]["node_id"] and workers[0]["node_id"] == workers[1]["node_id"], "both on the local Ray node"


BAD_DATA = ("missing split", "empty class folder", "undecodable image", "label out of range", "mixed sizes",
            "truncated archive")


def _bad_data(tmp_path, case):
    """One bad source as a user would hand it over, and the words its one line must hold."""
    import shutil

    from conftest import make_arrays, write_image_tree, write_python_batches

    arrays = make_arrays(n_train=40, n_test=20)
    if case == "label out of range":
        x_train, y_train, x_test, y_test = arrays
        y_train = y_train.copy()
        y_train[7] = 10  # ten class names, labels 0..9
        return write_python_batches(tmp_path / "batches", (x_train, y_train, x_test, y_test)), \
            "train label 10 at index 7 is out of range 0..9"
    tree = write_image_tree(tmp_path / "tree", arrays)
    if case == "missing split":
        shutil.rmtree(tree / "test")
        return tree, "missing split 'test/'"
    if case == "empty class folder":
        for f in (tree / "train" / "dog").iterdir():
            f.unlink()
        return tree, "class folder train/dog/ has no images"
    if case == "mixed sizes":
        from PIL import Image

        Image.new("RGB", (40, 28)).save(tree / "train" / "cat" / "9999.png")
        return tree, "train/cat/9999.png: image is 40x28 RGB but"
    if case == "truncated archive":
        from conftest import tar_folder

        archive = tar_folder(tree, tmp_path / "tree.tar.gz")
        archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
        return archive, "truncated or corrupt archive"
    (tree / "train" / "cat" / "9999.png").write_bytes(b"not a png")
    return tree, "train/cat/9999.png: cannot decode image"


def test_bad_data_is_one_line_and_exit_2(tmp_path, cache_dir):
    """Each bad source through the command a user runs: exit 2, one line naming the problem, nothing started
    or written. (The same sources are checked at library level in test_data.py.)"""

    for case in BAD_DATA:
        path, expected = _bad_data(tmp_path / case.replace(" ", "_"), case)
        out = tmp_path / f"out-{case.replace(' ', '_')}"
        proc, _ = run(["--data", str(path), "--cache-dir", str(tmp_path / "cache"), "--output", str(out),
                       "--no-export"])
        assert proc.returncode == 2, (case, proc.stdout[-2000:], proc.stderr[-2000:])
        (line,) = error_lines(proc)
        assert expected in line, (case, line)
        assert "Traceback" not in proc.stderr and "layout:" not in proc.stdout, case
        assert not out.exists(), f"{case}: nothing written"
