"""Keras 3 models as keras.io writes them (``import keras``), through training and the export: a factory with the
team's own Keras 3 layer (registered with keras.saving.register_keras_serializable, its module named by
--custom-objects) trained on two workers and exported with every variant within the gate; its model.keras back in
Keras 3 with the trained weights, and fine-tuned again as a saved Keras 3 file; every worker starting from the same
weights; an operation with no tf_keras counterpart refused in one line before any worker starts."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, require_shared_cifar, train_in_process

TRAIN = str(ROOT / "jobs" / "train.py")
pytestmark = pytest.mark.usefixtures("joined_ray_node")  # one Ray for the module's runs

K3CUSTOM = '''
"""A keras.io-style CNN with the team's own Keras 3 layer."""
import keras


@keras.saving.register_keras_serializable(package="k3custom")
class ScaledSwish(keras.layers.Layer):
    """x * sigmoid(a x), a learned per channel (keras.ops inside)."""

    def build(self, input_shape):
        self.a = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="a")

    def call(self, x):
        return x * keras.ops.sigmoid(self.a * x)


def build(input_shape, num_classes):
    inputs = keras.Input(input_shape)
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(32, 3)(x)
    x = ScaledSwish(name="swish1")(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(keras.layers.Conv2D(64, 3)(x)))
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(64, activation="relu")(x)
    return keras.Model(inputs, keras.layers.Dense(num_classes, activation="softmax")(x))
'''

K3BAD = '''
import keras


def build(input_shape, num_classes):
    inputs = keras.Input(input_shape)
    x = keras.layers.Flatten()(keras.layers.Rescaling(1 / 255)(inputs))
    x = keras.ops.sin(keras.layers.Dense(16)(x))
    return keras.Model(inputs, keras.layers.Dense(num_classes, activation="softmax")(x))
'''


def run_args(pkg: Path) -> list[str]:
    """The run's data and where its checkpoints go (a rerun with the same --name resumes from them)."""
    return ["--limit", "3000", "--name", "k3run", "--storage-path", str(pkg / "ray_results")]


def train(args, cwd, timeout=900):
    return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


@pytest.fixture(scope="module")
def keras3_pkg(tmp_path_factory) -> Path:
    """A folder with the factories, as a user's project holds them."""
    folder = tmp_path_factory.mktemp("keras3_project")
    (folder / "k3custom.py").write_text(textwrap.dedent(K3CUSTOM))
    (folder / "k3bad.py").write_text(textwrap.dedent(K3BAD))
    return folder


@pytest.fixture(scope="module")
def keras3_run(keras3_pkg):
    """jobs/train.py on the factory with its own layer, two workers, 2 epochs of 3,000 CIFAR-10 images, then the
    export with every default variant (QAT fine-tuning on at least its 100 steps)."""
    out = keras3_pkg / "out"
    proc = train(["--data", str(require_shared_cifar()), "--model", "k3custom:build", "--custom-objects", "k3custom",
                  *run_args(keras3_pkg), "--epochs", "2", "--num-workers", "2", "--qat-epochs", "1",
                  "--output", str(out)],
                 cwd=keras3_pkg)
    return out, proc


def test_a_keras3_factory_with_its_own_layer_trains_on_two_workers_and_exports_every_variant(keras3_run, keras3_pkg):
    from export.variants import ALL_VARIANTS
    from toolkit.tf import resolve_compute_dtype

    out, proc = keras3_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "global batch 256 = 2 worker(s) x 128" in proc.stdout
    # The rebuild computes under the run's policy, as a tf_keras model does on this CPU (bfloat16 where chosen).
    policy = resolve_compute_dtype("auto", False)[0]
    assert f"compute dtype: {'bfloat16' if 'bfloat16' in policy else 'float32'} (" in proc.stdout + proc.stderr
    report = json.loads((out / "export" / "report.json").read_text())
    assert report["passed"] and report["model_info"]["keras"] == 3, report["failed"]
    rows = {r["name"]: r for r in report["variants"]}
    assert set(rows) == set(ALL_VARIANTS)
    for name, r in rows.items():  # every variant built, or skipped with its reason
        assert r["status"] == "ok" or (r["status"] == "skipped" and r["reason"]), (name, r)
    qat = rows["qat_int8"]["qat"]  # the team's layer fine-tuned in float inside, every layer with a kernel int8
    assert qat["quantized_layers"] == qat["weighted_layers"] == 4, qat
    assert qat["float_layers"]["swish1"].startswith("custom layer ScaledSwish (Keras 3) (module k3custom)"), qat
    # model.keras is a Keras 3 model again, with the trained weights: the team's layer's own parameter moved
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["keras3"]["saved_by"] == "keras 3" and metrics["keras3"]["layers_copied"] == 6, metrics["keras3"]
    # 22 steps leave most of batch norm's initial statistics: recomputed before the weights go back to Keras 3
    assert metrics["batch_norm_recalibrated"]["layers"] == 1, metrics.get("batch_norm_recalibrated")
    # (not the two files' top-1 agreement: the rebuild computes in bfloat16 on CPUs that have it, and a briefly
    # trained model's near ties flip; the weights themselves must be the same, exactly)
    check = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import numpy as np, keras, k3custom
        from toolkit.custom import custom_scope
        from toolkit.tf import import_keras
        m = keras.saving.load_model({str(out / 'model.keras')!r})
        tfk = import_keras()
        with custom_scope("k3custom", tfk):
            trained = tfk.models.load_model({str(out / 'model_tf_keras.keras')!r})
        a = m.get_layer("swish1").a.numpy()
        same = np.array_equal(a, trained.get_layer("swish1").get_weights()[0]) and all(
            np.array_equal(x, y) for x, y in zip(m.layers[-1].get_weights(), trained.layers[-1].get_weights()))
        print(type(m).__module__.split(".")[0], float(np.abs(a - 1).max()), same)
        """)], capture_output=True, text=True, cwd=keras3_pkg, timeout=300)
    assert check.returncode == 0, check.stderr[-3000:]
    module, moved, same = check.stdout.split()[-3:]
    assert module == "keras" and float(moved) > 1e-4 and same == "True", check.stdout


def test_a_saved_keras3_model_fine_tunes_and_comes_back_in_keras3(keras3_run, keras3_pkg):
    """The run's Keras 3 model.keras as --model: loaded by Keras 3 on the worker and trained from its weights (one
    epoch of the tutorial's Adam at a step of 1e-9, so the test accuracy stays the trained model's, far from a fresh
    model's chance), written back in Keras 3."""
    out, _ = keras3_run
    again = keras3_pkg / "again"
    proc = train(["--data", str(require_shared_cifar()), "--model", str(out / "model.keras"), "--custom-objects",
                  "k3custom", "--recipe", "tutorial", "--learning-rate", "1e-9", "--epochs", "1", "--limit", "3000",
                  "--num-workers", "1", "--no-export", "--output", str(again)], cwd=keras3_pkg)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    before = json.loads((out / "metrics.json").read_text())
    after = json.loads((again / "metrics.json").read_text())
    assert before["test_accuracy"] > 0.15 and abs(after["test_accuracy"] - before["test_accuracy"]) < 0.01, \
        (before["test_accuracy"], after["test_accuracy"])
    assert after["keras3"]["saved_by"] == "keras 3"


def test_a_keras3_run_resumes_from_its_checkpoint(keras3_run, keras3_pkg):
    """The same --name again with one more epoch (as after a killed driver): fresh worker processes restore the
    tf_keras rebuild, with the team's layer inside, from the run's last checkpoint and train on; model.keras comes
    back in Keras 3."""
    out, _ = keras3_run
    proc = train(["--data", str(require_shared_cifar()), "--model", "k3custom:build", "--custom-objects", "k3custom",
                  *run_args(keras3_pkg), "--epochs", "3", "--num-workers", "2", "--no-export",
                  "--output", str(keras3_pkg / "resumed")],
                 cwd=keras3_pkg)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming from checkpoint after epoch 2" in proc.stdout + proc.stderr
    metrics = json.loads((keras3_pkg / "resumed" / "metrics.json").read_text())
    assert metrics["resumed_from_epoch"] == 2 and metrics["epochs"] == 3 and metrics["keras3"]["layers_copied"] == 6


def test_every_worker_builds_the_same_keras3_weights(keras3_pkg, monkeypatch):
    """A Keras 3 factory is called again after seeding Keras 3 (each worker builds its own model, and a
    MultiWorkerMirroredStrategy does not sync weights copied into its variables): the same seed, the same weights;
    another seed, others. The rebuild's layers: the team's layer inside Keras3Layer, the rest tf_keras twins."""
    from toolkit.models import build_model

    monkeypatch.chdir(keras3_pkg)
    a, b, c = (build_model("k3custom:build", (32, 32, 3), 10, custom_objects="k3custom", seed=s) for s in (0, 0, 1))
    assert [type(layer).__name__ for layer in a.layers][2:4] == ["Conv2D", "Keras3Layer"]
    assert type(a).__module__.startswith("tf_keras")
    assert all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights()))
    assert not all(np.array_equal(x, y) for x, y in zip(a.get_weights(), c.get_weights()))


def test_a_keras3_operation_without_a_tf_keras_counterpart_is_named_before_training(keras3_pkg):
    proc = train_in_process(["--data", str(require_shared_cifar()), "--model", "k3bad:build", "--epochs", "1"],
                            cwd=keras3_pkg)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert re.fullmatch(r"error: --model k3bad:build: a Keras 3 model, trained here as its tf_keras rebuild: no "
                        r"tf_keras counterpart for \S+ \(operation Sin\)", lines[0]), lines[0]
    assert "layout:" not in proc.stdout


def test_a_keras3_file_whose_layer_nothing_imports_is_one_line(keras3_pkg, tmp_path):
    """A Keras 3 model saved with the team's layer, trained from a folder where its module is not importable and
    without --custom-objects: one line naming the layer and the module to pass, exit 2, nothing written."""
    path = tmp_path / "k3model.keras"
    save = f"import k3custom; k3custom.build((32, 32, 3), 10).save({str(path)!r})"
    saved = subprocess.run([sys.executable, "-c", save],
                           capture_output=True, text=True, cwd=keras3_pkg, timeout=300)
    assert saved.returncode == 0, saved.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = train(["--data", str(require_shared_cifar()), "--model", str(path), "--epochs", "1",
                  "--output", str(tmp_path / "out")], cwd=elsewhere)
    assert proc.returncode == 2 and not (tmp_path / "out").exists(), proc.stderr[-2000:]
    assert proc.stderr.strip() == (f"error: --model {path}: cannot be loaded by Keras 3 (custom layer(s) ScaledSwish "
                                   "(module k3custom) not known to Keras: name the module that defines them with "
                                   "--custom-objects k3custom)")


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_a_file_keras3_saved_trains_as_its_rebuild(tmp_path, suffix):
    """A model Keras 3 saved, as a worker builds it from the driver's bytes (.keras, and .h5 where Keras 3 writes
    its version): the tf_keras rebuild, computing what the Keras 3 model computes."""
    import keras

    from toolkit.models import build_model

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Rescaling(1 / 255),
                              keras.layers.Conv2D(8, 3, activation="relu"), keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(10, activation="softmax")])
    path = tmp_path / f"k3{suffix}"
    model.save(path)
    rebuilt = build_model(str(path), (32, 32, 3), 10, content=path.read_bytes())
    assert type(rebuilt).__module__.startswith("tf_keras")
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3)).astype(np.float32)
    assert np.allclose(rebuilt.predict(images, verbose=0), np.asarray(model(images)), atol=1e-5)
