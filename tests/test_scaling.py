"""Distributed training that pays: the worker layout, the training step's gradient synchronisation
(accumulation, float16/bfloat16 on the wire, metrics read once per epoch), and the scaling benchmark
on a real multi-node Ray cluster on this machine."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import ROOT, require_shared_cifar

from toolkit.cluster import LayoutError, Node, resolve_layout
from toolkit.config import TrainConfig
from toolkit.train.step import DEFERRED_KEY


def nodes(*spec):
    return [Node(f"n{i}", "127.0.0.1", cpus, gpus) for i, (cpus, gpus) in enumerate(spec)]


# -- layout ---------------------------------------------------------------------------------------


def test_auto_layout_is_one_worker_per_node_with_all_its_cpus():
    layout = resolve_layout(TrainConfig(), nodes((2, 0)))
    assert (layout.num_workers, layout.cpus_per_worker, layout.gpus_per_worker) == (1, 2, 0)
    layout = resolve_layout(TrainConfig(), nodes((16, 0), (16, 0), (8, 0)))
    assert (layout.num_workers, layout.cpus_per_worker) == (3, 8), "the smallest node sets the size, so all fit"


def test_auto_layout_with_gpus_gives_each_worker_its_nodes_gpus():
    layout = resolve_layout(TrainConfig(use_gpu=True), nodes((8, 4), (8, 4), (4, 0)))
    assert (layout.num_workers, layout.gpus_per_worker, layout.cpus_per_worker) == (2, 4, 8)
    layout = resolve_layout(TrainConfig(use_gpu=True, num_workers=8), nodes((8, 4), (8, 4)))
    assert (layout.num_workers, layout.gpus_per_worker, layout.cpus_per_worker) == (8, 1, 2)


def test_explicit_options_override_auto():
    assert resolve_layout(TrainConfig(num_workers=2), nodes((2, 0))).cpus_per_worker == 1
    assert resolve_layout(TrainConfig(num_workers=4), nodes((16, 0))).cpus_per_worker == 4
    layout = resolve_layout(TrainConfig(cpus_per_worker=4), nodes((16, 0), (8, 0)))
    assert (layout.num_workers, layout.cpus_per_worker) == (6, 4)
    layout = resolve_layout(TrainConfig(num_workers=4, cpus_per_worker=5), nodes((2, 0)))
    assert (layout.num_workers, layout.cpus_per_worker, layout.how) == (4, 5, "as given")


def test_a_cluster_without_the_asked_resources_is_one_clear_error():
    with pytest.raises(LayoutError, match="no node with GPUs"):
        resolve_layout(TrainConfig(use_gpu=True), nodes((2, 0)))
    with pytest.raises(LayoutError, match="no node with CPUs"):
        resolve_layout(TrainConfig(), [])


def test_batch_must_split_into_workers_and_micro_batches():
    with pytest.raises(ValueError, match="num_workers x accumulate_steps"):
        TrainConfig(num_workers=3, batch_size=256)
    with pytest.raises(ValueError, match="num_workers x accumulate_steps"):
        TrainConfig(num_workers=2, accumulate_steps=3, batch_size=256)
    TrainConfig(num_workers=2, accumulate_steps=4, batch_size=256)
    with pytest.raises(ValueError, match="grad_dtype"):
        TrainConfig(grad_dtype="int8")


def test_cli_reads_auto_and_numbers():
    from jobs.train import config_from_args, parse_args

    cfg = config_from_args(parse_args([]))
    assert cfg.num_workers is None and cfg.cpus_per_worker is None
    cfg = config_from_args(parse_args(["--num-workers", "4", "--cpus-per-worker", "2", "--accumulate-steps", "2",
                                       "--grad-dtype", "bfloat16"]))
    assert (cfg.num_workers, cfg.cpus_per_worker, cfg.accumulate_steps, cfg.grad_dtype) == (4, 2, 2, "bfloat16")
    proc = subprocess.run([sys.executable, str(ROOT / "jobs" / "train.py"), "--num-workers", "zero"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "expected a positive integer or 'auto'" in proc.stderr


# -- the training step ------------------------------------------------------------------------------

# Run in a child process: two logical CPU devices must be configured before TensorFlow starts, so
# MirroredStrategy has two real replicas whose gradients and metric states go through real collectives.
STEP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import tf_keras as keras
    from toolkit.train.step import install_train_step, metric_results

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 3, 64), 3)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])

    def layers(bn):
        # With batch normalisation, a micro-batch's gradient depends on which images share it: accumulating
        # 4 micro-batches is then a different update from one batch of the same images.
        mid = [keras.layers.BatchNormalization()] if bn else []
        return [keras.layers.Dense(8, input_shape=(6,)), *mid, keras.layers.ReLU(),
                keras.layers.Dense(3, activation="softmax")]

    def run(batch, steps, spe=1, bn=False, **kw):
        keras.utils.set_random_seed(1)
        with strategy.scope():
            model = keras.Sequential(layers(bn))
            model.compile(keras.optimizers.SGD(0.5), "categorical_crossentropy", metrics=["accuracy"],
                          steps_per_execution=spe)
            installed = install_train_step(model, **kw)
        start = [w.numpy().tolist() for w in model.trainable_variables]
        hist = model.fit(x, y, batch_size=batch, epochs=1, steps_per_epoch=steps, shuffle=False, verbose=0)
        logs = metric_results(model) if kw.get("deferred_metrics") else {k: v[-1] for k, v in hist.history.items()}
        return (installed, [w.tolist() for w in model.get_weights()], logs, int(model.optimizer.iterations.numpy()),
                start, [w.numpy().tolist() for w in model.trainable_variables], sorted(hist.history))

    def reference_accumulated(start, replicas=2, micro=4):
        # The update accumulation must make, computed by hand on one device: each replica's half of the batch
        # in micro-batches, each micro-batch's mean loss (batch-norm statistics of its own images), the
        # gradients averaged over all of them, one SGD step.
        model = keras.Sequential(layers(True))
        model.build((None, 6))
        for v, w in zip(model.trainable_variables, start):
            v.assign(np.asarray(w, np.float32))
        size = len(x) // (replicas * micro)
        total = None
        for i in range(0, len(x), size):
            with tf.GradientTape() as tape:
                loss = tf.reduce_mean(keras.losses.categorical_crossentropy(y[i:i + size], model(x[i:i + size],
                                                                                               training=True)))
            g = tape.gradient(loss, model.trainable_variables)
            total = g if total is None else [a + b for a, b in zip(total, g)]
        n = len(x) // size
        return [(v - 0.5 * t / n).numpy().tolist() for v, t in zip(model.trainable_variables, total)]

    out = {
        "keras": run(64, 1, deferred_metrics=False),
        "accumulate4": run(64, 1, accumulate_steps=4, deferred_metrics=False),
        "float16": run(64, 1, grad_dtype="float16", deferred_metrics=False),
        "bfloat16": run(64, 1, grad_dtype="bfloat16", deferred_metrics=False),
        "keras_epoch": run(16, 4, deferred_metrics=False),
        "deferred_epoch": run(16, 4, deferred_metrics=True),
        "deferred_epoch_spe2": run(16, 4, spe=2, deferred_metrics=True),
        "bn_keras": run(64, 1, bn=True, deferred_metrics=False),
        "bn_accumulate4": run(64, 1, bn=True, accumulate_steps=4, deferred_metrics=False),
    }
    out["bn_reference"] = reference_accumulated(out["bn_accumulate4"][4])
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def step_runs():
    proc = subprocess.run([sys.executable, "-c", STEP_SCRIPT], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _weights(run):
    return [np.asarray(w) for w in run[1]]


def test_keras_step_is_kept_when_nothing_is_asked(step_runs):
    assert step_runs["keras"][0] is False
    assert all(step_runs[k][0] is True for k in ("accumulate4", "float16", "bfloat16", "deferred_epoch"))


def test_accumulated_micro_batches_give_the_big_batch_update(step_runs):
    """4 micro-batches per replica, one all-reduce: the same SGD update as Keras's one batch of 64, in one
    optimizer step (one gradient all-reduce), not four."""
    for a, b in zip(_weights(step_runs["keras"]), _weights(step_runs["accumulate4"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert step_runs["keras"][3] == step_runs["accumulate4"][3] == 1, "one optimizer step per global batch"


def test_accumulation_really_splits_the_batch_into_micro_batches(step_runs):
    """Where micro-batching changes the maths (batch normalisation), the update is the hand-computed mean of
    the 8 micro-batch gradients (2 replicas x 4), and not the one-batch update a step ignoring
    accumulate_steps would make."""
    got = step_runs["bn_accumulate4"][5]
    for a, b in zip(got, step_runs["bn_reference"]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
    one_batch = step_runs["bn_keras"][5]
    assert max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(got, one_batch)) > 1e-3
    assert step_runs["bn_accumulate4"][3] == 1


def test_half_precision_gradients_on_the_wire_stay_close(step_runs):
    for name, tol in (("float16", 2e-3), ("bfloat16", 2e-2)):
        for a, b in zip(_weights(step_runs["keras"]), _weights(step_runs[name])):
            np.testing.assert_allclose(a, b, atol=tol)
        # ... and not identical: the gradients really were sent in half precision
        assert any(not np.array_equal(a, b) for a, b in zip(_weights(step_runs["keras"]), _weights(step_runs[name])))


def test_metrics_read_once_per_epoch_equal_kerass_per_step_results(step_runs):
    """Deferred metrics: the epoch's loss and accuracy, aggregated over both replicas, are Keras's."""
    keras_logs = step_runs["keras_epoch"][2]
    for name in ("deferred_epoch", "deferred_epoch_spe2"):  # also with several steps per tf.function call
        deferred_logs = step_runs[name][2]
        assert set(keras_logs) == set(deferred_logs) == {"loss", "accuracy"}
        for k in keras_logs:
            assert deferred_logs[k] == pytest.approx(keras_logs[k], rel=1e-5)
        for a, b in zip(_weights(step_runs["keras_epoch"]), _weights(step_runs[name])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        # ... and no step returned a metric result (each would be a cross-replica read): what Keras saw of
        # every step is the placeholder alone, and the results above were read once, after the epoch.
        assert step_runs[name][6] == [DEFERRED_KEY], step_runs[name][6]
    assert step_runs["keras_epoch"][6] == ["accuracy", "loss"]


# -- the benchmark on a real multi-node cluster -----------------------------------------------------


def test_scaling_benchmark_on_one_and_two_nodes(tmp_path, cache_dir):
    """benchmarks/scaling.py on a tiny size: real Ray clusters of one and two nodes (`ray start` per node, each
    pinned to its own core), strong-scaling rows with a step breakdown, JSON and Markdown written, and the two-node
    row's efficiency computed from the one-node row. (Weak scaling is the same code at another batch: --kinds
    strong keeps this to one run per cluster.)"""
    data = require_shared_cifar()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "scaling.py"), "--data", str(data), "--cache-dir", cache_dir,
         "--limit", "1024", "--epochs", "2", "--profile-steps", "2", "--sections", "nodes", "--nodes", "1,2",
         "--kinds", "strong", "--global-batch", "128", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "scaling.json").read_text())
    rows = result["rows"]
    assert [(r["nodes"], r["kind"]) for r in rows] == [(1, "strong"), (2, "strong")]
    for r in rows:
        assert r["workers"] == r["worker_nodes"] == r["nodes"], "one worker on each Ray node"
        assert r["cpus_per_worker"] == 1 and r["compute_ms"] > 0
        # Every figure follows from the file: the rate from the measured step, the ratio from the plain-Keras
        # baseline recorded with it. (step_ms is the slowest worker's, images/s rank 0's: synchronous steps keep
        # them within a few percent)
        assert r["images_per_s"] == pytest.approx(r["global_batch"] / (r["step_ms"] / 1000), rel=0.1)
        assert r["plain_keras_images_per_s"] > 0
        assert r["vs_plain_keras"] == pytest.approx(r["images_per_s"] / r["plain_keras_images_per_s"])
        assert r["other_ms"] == pytest.approx(r["step_ms"] - r["compute_ms"] - r["all_reduce_ms"])
    one, two = rows
    assert one["global_batch"] == two["global_batch"] == 128
    # efficiency = two nodes' rate / (2 x one node's rate): the rows against each other
    ref = one["images_per_s"]
    assert one["reference_images_per_s"] == two["reference_images_per_s"] == ref
    assert two["efficiency"] == pytest.approx(two["images_per_s"] / (2 * ref)), two
    assert two["all_reduce_ms"] > 0, "two workers synchronise their gradients"
    md = (tmp_path / "scaling.md").read_text()
    assert "| setup |" in md and "1 node(s), strong: 128 per worker" in md and "2 node(s), strong" in md
    assert "2 node(s), strong" in proc.stdout, "the table is printed"


def test_scaling_benchmark_help():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scaling.py"), "--help"],
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "--nodes" in proc.stdout and "--cores-per-node" in proc.stdout


def test_time_to_accuracy_counts_epochs_and_seconds_up_to_the_first_hit():
    from toolkit.train.outputs import time_to_accuracy

    h = {"val_accuracy": [0.5, 0.69, 0.71, 0.68, 0.75], "epoch_time_s": [10, 11, 12, 13, 14],
         "train_time_s": [9, 10, 11, 12, 13]}
    assert time_to_accuracy(h, 0.70) == {"target": 0.70, "epoch": 3, "epoch_time_s": 33.0, "train_time_s": 30.0}
    assert time_to_accuracy(h, 0.80) is None
