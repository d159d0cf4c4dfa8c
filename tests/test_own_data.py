"""Users' own data and models, through jobs/train.py: real datasets beyond CIFAR-10 (scikit-learn's 8x8
grayscale digits; a 64x64 defect set of mixed sizes and modes), --image-size/--channels, a val/ split,
class counts and weights, a saved model and a factory, and every bad input as one line with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, train_in_process

TRAIN = str(ROOT / "jobs" / "train.py")
pytestmark = pytest.mark.usefixtures("joined_ray_node")  # one Ray for the module's runs


def train(args, cwd=ROOT, timeout=900):
    return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)


def one_error(proc) -> str:
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "layout:" not in proc.stdout, "refused before any worker started"
    return lines[0]


@pytest.fixture(scope="session")
def digits_tree(tmp_path_factory) -> Path:
    """scikit-learn's real digits (1,797 8x8 grayscale scans, 16 grey levels) as a class-folder PNG tree."""
    from PIL import Image

    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(images))
    root = tmp_path_factory.mktemp("digits")
    for i, k in enumerate(order):
        split = "test" if i % 5 == 0 else "train"
        folder = root / split / f"digit_{digits.target[k]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[k], mode="L").save(folder / f"{k:04d}.png")
    return root


def _defect_image(rng, kind: str, size: tuple[int, int]) -> np.ndarray:
    """A textured metal-like surface; a 'scratch' has a dark line, a 'spot' a dark blob."""
    h, w = size
    base = rng.normal(150, 12, size=(h, w, 1)) + np.linspace(-20, 20, w)[None, :, None]
    img = np.repeat(base, 3, axis=2) + rng.normal(0, 6, size=(h, w, 3))
    if kind == "scratch":
        y0, y1 = rng.integers(0, h, size=2)
        for x in range(w):
            y = int(y0 + (y1 - y0) * x / max(w - 1, 1))
            img[max(y - 1, 0):y + 2, x] -= 90
    elif kind == "spot":
        cy, cx, r = rng.integers(h // 4, 3 * h // 4), rng.integers(w // 4, 3 * w // 4), rng.integers(4, 9)
        yy, xx = np.ogrid[:h, :w]
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] -= 80
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def defects_tree(tmp_path_factory) -> Path:
    """A skewed 3-class defect set of our own making: mostly 'clean', few 'spot'; most images 64x64 RGB,
    some 80x96 (another camera), some RGBA and palette PNGs; train/, val/ and test/ splits."""
    from PIL import Image

    rng = np.random.default_rng(7)
    root = tmp_path_factory.mktemp("defects")
    counts = {"train": {"clean": 360, "scratch": 160, "spot": 60}, "val": {"clean": 60, "scratch": 30, "spot": 15},
              "test": {"clean": 90, "scratch": 45, "spot": 30}}
    for split, per_class in counts.items():
        for kind, n in per_class.items():
            folder = root / split / kind
            folder.mkdir(parents=True)
            for i in range(n):
                size = (80, 96) if i % 7 == 3 else (64, 64)
                im = Image.fromarray(_defect_image(rng, kind, size))
                if i % 11 == 5:
                    im = im.convert("RGBA")
                elif i % 13 == 6:
                    im = im.convert("P")
                im.save(folder / f"{i:04d}.png")
    return root


def test_digits_train_and_export_end_to_end(digits_tree, tmp_path, cache_dir):
    out = tmp_path / "out"
    proc = train(["--data", str(digits_tree), "--image-size", "32", "--recipe", "adam", "--epochs", "8",
                  "--batch-size", "64", "--learning-rate", "3e-3", "--no-augment", "--cache-dir", cache_dir,
                  "--output", str(out), "--storage-path", str(tmp_path / "ray"), "--max-drop", "2",
                  "--export-variants", "float32,int8,onnx_float32"])  # (every variant: the smoke test's)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "images of 32x32x1" in proc.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["image_shape"] == [32, 32, 1] and m["class_names"] == [f"digit_{d}" for d in range(10)]
    assert sum(m["class_counts"]["train"].values()) == m["num_train_images"]
    assert m["test_accuracy"] > 0.85, m["test_accuracy"]
    report = json.loads((out / "export" / "report.json").read_text())
    rows = {r["name"]: r for r in report["variants"]}
    assert list(rows) == ["float32", "int8", "onnx_float32"]  # --export-variants
    assert rows["int8"]["status"] == "ok" and rows["onnx_float32"]["status"] == "ok"
    assert abs(rows["float32"]["accuracy"] - m["test_accuracy"]) < 0.01 and report["passed"]


def test_digits_at_their_own_8x8_are_refused_with_a_hint(digits_tree, cache_dir, tmp_path):
    line = one_error(train(["--data", str(digits_tree), "--cache-dir", cache_dir, "--output", str(tmp_path / "o"),
                            "--no-export"]))
    assert line.startswith("error: --model seed_cnn: cannot be built for 8x8x1 images with 10 classes")
    assert "--image-size" in line


def test_mixed_sizes_and_modes_are_refused_with_what_to_do(defects_tree, cache_dir, tmp_path):
    line = one_error(train_in_process(["--data", str(defects_tree), "--cache-dir", cache_dir, "--output",
                                       str(tmp_path / "o")]))
    assert "--image-size" in line or "--channels" in line, line
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def defects_run(defects_tree, tmp_path_factory, cache_dir):
    tmp = tmp_path_factory.mktemp("defects_run")
    out = tmp / "out"
    proc = train(["--data", str(defects_tree), "--image-size", "64", "--channels", "3", "--class-weights", "balanced",
                  "--recipe", "adam", "--epochs", "6", "--batch-size", "32", "--cache-dir", cache_dir,
                  "--output", str(out), "--storage-path", str(tmp / "ray"), "--no-export"])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return tmp, out, proc


def test_own_64x64_set_trains_and_exports_with_val_split_and_class_weights(defects_run):
    _, out, proc = defects_run
    assert "580 train, 105 val (val/), 165 test images of 64x64x3" in proc.stdout
    assert "class weights (balanced): clean 0.54, scratch 1.21, spot 3.22" in proc.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["validation"] == "val/ split of the data"
    assert m["class_counts"]["train"] == {"clean": 360, "scratch": 160, "spot": 60}
    assert m["class_counts"]["val"] == {"clean": 60, "scratch": 30, "spot": 15}
    assert m["config"]["image_size"] == [64, 64] and m["config"]["class_weights"] == "balanced"
    assert m["test_accuracy"] > 0.6 and min(m["per_class_accuracy"].values()) > 0.3, m["per_class_accuracy"]
    assert (out / "confusion_matrix.png").stat().st_size > 1000


def test_own_64x64_model_exports_with_the_same_image_options(defects_run, defects_tree, cache_dir):
    """The digits run exports inside jobs/train.py; this one through python -m export, which takes the
    training's --image-size and --channels so the mixed-size, RGBA and palette images load the same way."""
    tmp, out, _ = defects_run
    proc = subprocess.run([sys.executable, "-m", "export", str(out / "model.keras"), "--data", str(defects_tree),
                           "--image-size", "64", "--channels", "3", "--variants", "int8,onnx_float32",
                           "--out", str(tmp / "export"), "--cache-dir", cache_dir, "--max-drop", "3"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp / "export" / "report.json").read_text())
    assert report["class_names"] == ["clean", "scratch", "spot"] and report["num_test_images"] == 165
    rows = {r["name"]: r for r in report["variants"]}
    assert rows["int8"]["status"] == "ok" and rows["int8"]["input"]["shape"][1:] == [64, 64, 3]
    assert abs(report["float_accuracy"] - json.loads((out / "metrics.json").read_text())["test_accuracy"]) < 1e-6


def test_a_saved_model_is_fine_tuned(defects_run, defects_tree, cache_dir):
    """One epoch from the saved model, against its control: the first run's own first epoch, from scratch
    with the same data, options and seed. Starting from the trained weights must beat it, and must not
    collapse to the majority class (57% of val/), which a single-class model would pass on accuracy alone."""
    tmp, out, _ = defects_run
    proc = train(["--data", str(defects_tree), "--image-size", "64", "--channels", "3", "--class-weights", "balanced",
                  "--model", str(out / "model.keras"), "--recipe", "adam", "--epochs", "1", "--batch-size", "32",
                  "--cache-dir", cache_dir,
                  "--output", str(tmp / "tuned"), "--storage-path", str(tmp / "ray"), "--no-export"])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    scratch_epoch1 = json.loads((out / "history.json").read_text())["val_accuracy"][0]
    trained = json.loads((out / "metrics.json").read_text())["val_accuracy"]
    tuned = json.loads((tmp / "tuned" / "metrics.json").read_text())
    assert tuned["val_accuracy"] > scratch_epoch1 + 0.05, (tuned["val_accuracy"], scratch_epoch1)
    assert tuned["val_accuracy"] > trained - 0.15, (tuned["val_accuracy"], trained)
    assert min(tuned["per_class_accuracy"].values()) > 0.2, tuned["per_class_accuracy"]


def test_a_saved_model_that_does_not_fit_the_data_is_refused(defects_run, digits_tree, cache_dir):
    _, out, _ = defects_run
    line = one_error(train_in_process(["--data", str(digits_tree), "--image-size", "32", "--model",
                                       str(out / "model.keras"), "--cache-dir", cache_dir, "--no-export"]))
    assert "takes 64x64x3 input but the data is 32x32x1" in line


FACTORY = '''
import tensorflow as tf
import tf_keras as keras

@keras.saving.register_keras_serializable(package="my_models")
class Swishy(keras.layers.Layer):  # a team's own layer
    def call(self, x):
        return x * tf.sigmoid(x)

def tiny(input_shape, num_classes):
    inp = keras.Input(shape=input_shape)
    x = keras.layers.Rescaling(1 / 255)(inp)
    x = Swishy()(keras.layers.Conv2D(16, 3)(x))
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(num_classes)(x))  # logits: the toolkit adds the softmax

def not_a_model(input_shape, num_classes):
    return {"layers": 3}
'''


def test_a_factory_model_trains_and_bad_factories_are_refused(digits_tree, tmp_path, cache_dir, monkeypatch):
    """A factory from the current folder, with a layer of its own: trained on the workers; the saved model
    loads again only with --custom-objects naming its module, and without it the error says so."""
    (tmp_path / "my_models.py").write_text(textwrap.dedent(FACTORY))
    common = ["--data", str(digits_tree), "--image-size", "16", "--cache-dir", cache_dir, "--no-export"]
    proc = train([*common, "--model", "my_models:tiny", "--epochs", "1", "--output", str(tmp_path / "out"),
                  "--storage-path", str(tmp_path / "ray")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["config"]["model"] == "my_models:tiny" and m["epochs"] == 1
    saved = str(tmp_path / "out" / "model.keras")
    assert one_error(train_in_process([*common, "--model", saved], cwd=tmp_path)) == (
        f"error: --model {saved}: cannot be loaded (custom layer(s) Swishy (module my_models) not known to Keras: "
        "name the module that defines them with --custom-objects my_models)")
    monkeypatch.chdir(tmp_path)  # where --custom-objects finds my_models, as the command does
    from toolkit.models import ModelError, build_model

    tuned = build_model(saved, (16, 16, 1), 10, custom_objects="my_models")
    assert type(tuned.layers[3]).__name__ == "Swishy"
    with pytest.raises(ModelError, match="custom_objects: cannot import nope_models"):
        build_model(saved, (16, 16, 1), 10, custom_objects="nope_models")
    assert one_error(train_in_process([*common, "--model", "my_models:nope"], cwd=tmp_path)) == \
        "error: --model my_models:nope: my_models has no function nope"
    assert one_error(train_in_process([*common, "--model", "my_models:not_a_model"], cwd=tmp_path)) == \
        "error: --model my_models:not_a_model: returned builtins.dict, not a Keras model"
    assert "cannot import no_such_module" in one_error(train_in_process([*common, "--model", "no_such_module:f"],
                                                                        cwd=tmp_path))
    assert "not a registered model" in one_error(train_in_process([*common, "--model", "resnet9000"], cwd=tmp_path))


def test_bad_image_options_are_one_line(digits_tree, cache_dir):
    proc = train_in_process(["--data", str(digits_tree), "--image-size", "0x32", "--no-export"])
    assert proc.returncode == 2 and "between 1x1 and 4096x4096" in proc.stderr and "Traceback" not in proc.stderr
    proc = train_in_process(["--data", str(digits_tree), "--image-size", "big", "--no-export"])
    assert proc.returncode == 2 and "H or HxW" in proc.stderr and "Traceback" not in proc.stderr
    proc = train_in_process(["--data", str(digits_tree), "--image-size", "32", "--export-variants", "int8,int9"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "layout:" not in proc.stdout, proc.stderr
    assert "argument --export-variants: unknown variant(s) int9; choose from float32, dynamic" in proc.stderr
