"""A zoo of classifiers this project did not design its exporter for, each through ``python -m export``.

    python benchmarks/export_zoo.py --data ../shared/data/cifar10/cifar10-jpeg.tar.gz     # prints a table

Every model is trained here, briefly, on a real CIFAR-10 subset (or a view of it: two classes, or
grayscale at 40x40), saved the way its users save it, and exported with every variant. Each row is
what the export's report says: the variants built, skipped (with the reason) or failed, the float
and int8 accuracy, and the exit status. tests/test_export_zoo.py runs the same zoo at a smaller size.

  logits_cnn     Sequential CNN ending in Dense(10) without softmax, trained with from_logits=True
  mobile_block   functional: a 1x1 stride-2 shortcut and a stride-2 DepthwiseConv2D reading the same
                 tensor, BatchNormalization, ReLU(6), residual Add, SeparableConv2D, GAP, Dropout
  inception      parallel 3x3 and 5x5 branches joined by Concatenate, AveragePooling2D; saved as .h5
  binary_sigmoid two classes, one sigmoid unit, integer labels; saved as a SavedModel folder
  keras3_cnn     built, trained and saved by Keras 3 (.keras)
  gray40         grayscale 40x40 input (CIFAR-10 converted), one-hot labels
  outlier_range  a CNN whose hidden Dense layer has one unit that always outputs 10,000 (and is not
                 read by the next layer): the float model is unchanged, but int8's per-tensor range for
                 that layer rounds every other unit to zero; int8_selective has to rescue it
  mixed_float16  a CNN under the mixed_float16 policy (float32 softmax), as GPU teams train and save it; its
                 weights are trained under float32 and copied in (float16 is ten times slower on a CPU)
  group_norm     GroupNormalization with SiLU after each convolution, as in many recent CNNs
  custom_layer   a team's own layer (benchmarks/zoo_layers.py, registered, not imported by the exporter);
                 exported with --custom-objects benchmarks.zoo_layers
  regnet         keras.applications RegNetX002 (grouped convolutions), weights=None, under a new head
                 (2.3M parameters: 150 s of training here; the tests use grouped_conv instead)
  grouped_conv   a ResNeXt-style block of our own: grouped Conv2D and a residual written as x + y (a
                 TFOpLambda layer), RegNet's two traps at a twentieth of its training time
  preprocessing  a 48x48 input Resized to 32x32 in the model, an adapted Normalization, SpatialDropout2D
                 and GaussianNoise inside; exported with --image-size 48 --resize stretch
  as_saved       all five of the kinds above in one model (the test suite's: one export instead of five)

and the architectures of benchmarks/zoo_modern.py (squeeze-and-excitation with hard-swish, MobileNetV3Small
from tf_keras and from Keras 3, ViT-style, ConvNeXt-style, Keras 3 EfficientNetB0, keras-io's augmentation
model; keras3_modern, all of them in one Keras 3 model, is the test suite's).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks import zoo_modern  # noqa: E402

ZOO = ("logits_cnn", "mobile_block", "inception", "binary_sigmoid", "keras3_cnn", "gray40", "outlier_range",
       "mixed_float16", "group_norm", "custom_layer", "regnet", "grouped_conv", "preprocessing",
       *(m for m in zoo_modern.MODERN if m != "keras3_modern"))
# The test suite's zoo: the five kinds of models as users save them in one model, as_saved, and issue 18's
# architectures in one Keras 3 model, keras3_modern (one export each instead of twelve; the benchmark exports
# each kind alone).
# (gray40 is left to the benchmark: tests/test_own_data.py exports grayscale and non-32x32 models end to end.)
TEST_ZOO = ZOO[:4] + ("keras3_modern", "outlier_range", "as_saved")
# What each model's export needs besides the model and its data (as its users would pass it).
EXPORT_ARGS = {"custom_layer": ["--custom-objects", "benchmarks.zoo_layers"],
               "preprocessing": ["--image-size", "48", "--resize", "stretch"],
               "as_saved": ["--custom-objects", "benchmarks.zoo_layers", "--image-size", "48", "--resize", "stretch"]}
INPUT_48 = ("preprocessing", "as_saved")


@dataclass
class ZooModel:
    name: str
    path: str  # the saved model (file or SavedModel folder)
    data: str  # the class-folder tree it was trained on
    trained_accuracy: float  # on its test split, in Keras
    export_args: tuple = ()  # what its export needs (EXPORT_ARGS)


# -- data: views of a real CIFAR-10 subset, written as class-folder trees of PNGs -------------------


def _write_tree(root: Path, x_train, y_train, x_test, y_test, class_names) -> str:
    from PIL import Image

    for split, xs, ys in (("train", x_train, y_train), ("test", x_test, y_test)):
        for c in class_names:
            (root / split / c).mkdir(parents=True, exist_ok=True)
        for i, (x, y) in enumerate(zip(xs, ys)):
            Image.fromarray(x[:, :, 0] if x.shape[2] == 1 else x).save(root / split / class_names[y] / f"{i:05d}.png")
    return str(root)


def make_datasets(data: str, cache_dir: str, out: Path, n_train: int, n_test: int, seed: int = 0) -> dict[str, str]:
    """rgb32: a CIFAR-10 subset; binary: two of its classes (cat vs ship); gray40: grayscale, 40x40."""
    from PIL import Image

    from toolkit.data import load_dataset

    ds = load_dataset(data, cache_dir)
    rng = np.random.default_rng(seed)
    tr = np.sort(rng.permutation(len(ds.x_train))[:n_train])
    te = np.sort(rng.permutation(len(ds.x_test))[:n_test])
    xs = (ds.x_train[tr], ds.y_train[tr], ds.x_test[te], ds.y_test[te])
    trees = {"rgb32": _write_tree(out / "rgb32", *xs, ds.class_names)}
    a, b = ds.class_names.index("cat"), ds.class_names.index("ship")
    keep_tr = np.isin(ds.y_train, (a, b))
    keep_te = np.isin(ds.y_test, (a, b))
    btr = np.sort(rng.permutation(np.flatnonzero(keep_tr))[: n_train // 2])  # the copy is stored class by class
    bte = np.sort(rng.permutation(np.flatnonzero(keep_te))[: n_test // 2])
    trees["binary"] = _write_tree(out / "binary", ds.x_train[btr], (ds.y_train[btr] == b).astype(int),
                                  ds.x_test[bte], (ds.y_test[bte] == b).astype(int), ("cat", "ship"))

    def gray40(x):
        return np.stack([np.asarray(Image.fromarray(i).convert("L").resize((40, 40), Image.BILINEAR))[:, :, None]
                         for i in x])

    trees["gray40"] = _write_tree(out / "gray40", gray40(xs[0]), xs[1], gray40(xs[2]), xs[3], ds.class_names)
    return trees


# -- the models (tf_keras unless said) ------------------------------------------------------------


def logits_cnn(keras, shape, n):
    L = keras.layers
    return keras.Sequential([L.InputLayer(input_shape=shape), L.Rescaling(1 / 255), L.Conv2D(32, 3, activation="relu"),
                             L.MaxPooling2D(), L.Conv2D(64, 3, activation="relu"), L.MaxPooling2D(), L.Flatten(),
                             L.Dense(64, activation="relu"), L.Dense(n)])


def mobile_block(keras, shape, n):
    L = keras.layers  # batch-norm momentum 0.9: its statistics settle within a short training
    inp = keras.Input(shape)
    x = L.Rescaling(1 / 255)(inp)
    x = L.Conv2D(24, 3, padding="same", use_bias=False)(x)
    x = L.BatchNormalization(momentum=0.9)(x)
    x = L.ReLU(6.0)(x)
    shortcut = L.Conv2D(48, 1, strides=2)(x)  # both read x
    y = L.DepthwiseConv2D(3, strides=2, padding="same", use_bias=False)(x)
    y = L.BatchNormalization(momentum=0.9)(y)
    y = L.ReLU(6.0)(y)
    y = L.Conv2D(48, 1, use_bias=False)(y)
    y = L.BatchNormalization(momentum=0.9)(y)
    x = L.ReLU(6.0)(L.Add()([y, shortcut]))
    x = L.SeparableConv2D(64, 3, padding="same")(x)
    x = L.BatchNormalization(momentum=0.9)(x)
    x = L.ReLU(6.0)(x)
    x = L.GlobalAveragePooling2D()(x)
    x = L.Dropout(0.2)(x)
    return keras.Model(inp, L.Dense(n, activation="softmax")(x))


def inception(keras, shape, n, width: float = 1.0):
    """``width`` scales the filters (the test suite's zoo uses half: full-resolution 5x5 branches are the
    zoo's slowest export)."""
    L = keras.layers
    f = lambda k: max(4, int(k * width))  # noqa: E731
    inp = keras.Input(shape)
    x = L.Rescaling(1 / 255)(inp)
    x = L.Conv2D(f(32), 3, padding="same", activation="relu")(x)
    a = L.Conv2D(f(32), 3, padding="same", activation="relu")(x)
    b = L.Conv2D(f(16), 5, padding="same", activation="relu")(x)
    x = L.Concatenate()([a, b])
    x = L.AveragePooling2D()(x)
    x = L.Conv2D(f(64), 3, padding="same", activation="relu")(x)
    x = L.MaxPooling2D()(x)
    x = L.Flatten()(x)
    return keras.Model(inp, L.Dense(n, activation="softmax")(x))


def binary_sigmoid(keras, shape, n):
    L = keras.layers
    return keras.Sequential([L.InputLayer(input_shape=shape), L.Rescaling(1 / 255), L.Conv2D(16, 3, activation="relu"),
                             L.MaxPooling2D(), L.Conv2D(32, 3, activation="relu"), L.GlobalAveragePooling2D(),
                             L.Dense(1, activation="sigmoid")])


def seed_like(keras, shape, n):
    L = keras.layers
    return keras.Sequential([L.InputLayer(input_shape=shape), L.Rescaling(1 / 255), L.Conv2D(32, 3, activation="relu"),
                             L.MaxPooling2D(), L.Conv2D(64, 3, activation="relu"), L.MaxPooling2D(), L.Flatten(),
                             L.Dense(64, activation="relu", name="hidden"), L.Dense(n, activation="softmax")])


def _keras3_cnn(shape, n):
    import keras as keras3

    L = keras3.layers
    return keras3.Sequential([keras3.Input(shape), L.Rescaling(1 / 255), L.Conv2D(32, 3, activation="relu"),
                              L.MaxPooling2D(), L.Conv2D(64, 3, activation="relu"), L.MaxPooling2D(), L.Flatten(),
                              L.Dense(64, activation="relu"), L.Dense(n, activation="softmax")])


def mixed_float16(keras, shape, n, policy="float32"):
    """seed_like with a float32 softmax, as Keras's mixed-precision guide writes it. Under ``policy``
    "mixed_float16" it is the model as trained and saved on a GPU; build_zoo trains the float32 one (float16
    is ten times slower on a CPU) and copies the weights into the mixed one."""
    L = keras.layers
    keras.mixed_precision.set_global_policy(policy)
    try:
        return keras.Sequential([L.InputLayer(input_shape=shape), L.Rescaling(1 / 255),
                                 L.Conv2D(32, 3, activation="relu"), L.MaxPooling2D(), L.Conv2D(64, 3, activation="relu"),
                                 L.MaxPooling2D(), L.Flatten(), L.Dense(64, activation="relu"), L.Dense(n),
                                 L.Activation("softmax", dtype="float32")])
    finally:
        keras.mixed_precision.set_global_policy("float32")


def group_norm(keras, shape, n):
    L = keras.layers
    inp = keras.Input(shape)
    x = L.Rescaling(1 / 255)(inp)
    for filters in (32, 64, 64):
        x = L.Conv2D(filters, 3, padding="same")(x)
        x = L.GroupNormalization(groups=8)(x)
        x = L.Activation("swish")(x)
        x = L.MaxPooling2D()(x)
    x = L.GlobalAveragePooling2D()(x)
    return keras.Model(inp, L.Dense(n, activation="softmax")(x))


def custom_layer(keras, shape, n):
    from benchmarks.zoo_layers import ScaledSwish

    L = keras.layers
    return keras.Sequential([L.InputLayer(input_shape=shape), L.Rescaling(1 / 255), L.Conv2D(32, 3), ScaledSwish(),
                             L.MaxPooling2D(), L.Conv2D(64, 3), ScaledSwish(), L.MaxPooling2D(), L.Flatten(),
                             L.Dense(64, activation="relu"), L.Dense(n, activation="softmax")])


def grouped_conv(keras, shape, n):
    """A ResNeXt-style residual block at 8x8 (grouped convolutions are slow on a CPU: XLA-compiled)."""
    L = keras.layers
    inp = keras.Input(shape)
    x = L.Conv2D(32, 3, padding="same", activation="relu")(L.Rescaling(1 / 255)(inp))
    x = L.Conv2D(64, 3, padding="same", activation="relu")(L.MaxPooling2D()(x))
    x = L.MaxPooling2D()(x)
    y = L.Conv2D(64, 3, padding="same", groups=4, use_bias=False)(x)  # 4 groups of 16 channels
    y = L.ReLU()(L.BatchNormalization(momentum=0.9)(y))
    y = L.BatchNormalization(momentum=0.9)(L.Conv2D(64, 1, use_bias=False)(y))
    x = L.ReLU()(y + x)  # "+" is a TFOpLambda layer, as RegNet's residuals
    x = L.GlobalAveragePooling2D()(L.MaxPooling2D()(x))
    return keras.Model(inp, L.Dense(n, activation="softmax")(x))


def regnet(keras, shape, n):
    """keras.applications' RegNetX002 as transfer learning takes it (include_top=False, a new head)."""
    base = keras.applications.RegNetX002(include_top=False, weights=None, input_shape=shape)
    inp = keras.Input(shape)
    x = keras.layers.GlobalAveragePooling2D()(base(inp))
    return keras.Model(inp, keras.layers.Dense(n, activation="softmax")(x))


def adapted_normalization(keras, x_train):
    """A Normalization adapted, as keras-io's examples do, on 1,000 training images at the 32x32 the model
    resizes to."""
    norm = keras.layers.Normalization()
    norm.adapt(keras.layers.Resizing(32, 32)(x_train[:1000].astype("float32")).numpy())
    return norm


def preprocessing(keras, shape, n, x_train=None):
    """48x48 camera frames resized in the model, normalised by statistics adapted on the training images,
    with training-only layers (SpatialDropout2D, GaussianNoise) in the graph."""
    L = keras.layers
    norm = adapted_normalization(keras, x_train)
    inp = keras.Input(shape)
    x = norm(L.Resizing(32, 32)(inp))
    x = L.Conv2D(32, 3, activation="relu")(x)
    x = L.SpatialDropout2D(0.1)(x)
    x = L.MaxPooling2D()(x)
    x = L.GaussianNoise(0.1)(x)
    x = L.Conv2D(64, 3, activation="relu")(x)
    x = L.MaxPooling2D()(x)
    x = L.Flatten()(x)
    return keras.Model(inp, L.Dense(n, activation="softmax")(x))


def as_saved(keras, shape, n, x_train, policy="float32"):
    """48x48 frames Resized and Normalized in the model, a convolution with GroupNormalization and the
    team's ScaledSwish, SpatialDropout2D and GaussianNoise, a grouped-convolution residual written as
    x + y, a float32 softmax; under ``policy`` (build_zoo trains it as float32 and copies the weights into
    its mixed_float16 twin, as for mixed_float16). Half the filters of the models it stands for: the test
    suite's slowest export (grouped convolutions are XLA-compiled in tf_keras, slow on a CPU)."""
    from benchmarks.zoo_layers import ScaledSwish

    L = keras.layers
    norm = adapted_normalization(keras, x_train)
    keras.mixed_precision.set_global_policy(policy)
    try:
        inp = keras.Input(shape)
        x = norm(L.Resizing(32, 32)(inp))
        x = ScaledSwish()(L.GroupNormalization(groups=8)(L.Conv2D(16, 3, padding="same")(x)))
        x = L.SpatialDropout2D(0.1)(L.MaxPooling2D()(x))
        x = L.MaxPooling2D()(L.Conv2D(32, 3, padding="same", activation="relu")(x))
        x = L.GaussianNoise(0.1)(x)
        y = L.ReLU()(L.BatchNormalization(momentum=0.9)(L.Conv2D(32, 3, padding="same", groups=4, use_bias=False)(x)))
        y = L.BatchNormalization(momentum=0.9)(L.Conv2D(32, 1, use_bias=False)(y))
        x = L.GlobalAveragePooling2D()(L.MaxPooling2D()(L.ReLU()(y + x)))
        return keras.Model(inp, L.Activation("softmax", dtype="float32")(L.Dense(n)(x)))
    finally:
        keras.mixed_precision.set_global_policy("float32")


def add_outlier_unit(model) -> None:
    """Make hidden unit 0 output 10,000 for every image and cut it from the next layer: the model
    computes the same function, but the hidden layer's activation range is now [0, 10,000]."""
    hidden = model.get_layer("hidden")
    k, b = hidden.get_weights()
    k[:, 0], b[0] = 0.0, 1e4
    hidden.set_weights([k, b])
    nxt = model.layers[model.layers.index(hidden) + 1]
    k2, b2 = nxt.get_weights()
    k2[0, :] = 0.0
    nxt.set_weights([k2, b2])


def build_zoo(out: Path, trees: dict[str, str], cache_dir: str, epochs: int, names=ZOO, log=print,
              inception_width: float = 1.0, seed: int = 0) -> list[ZooModel]:
    """Train and save every zoo model, each from initial weights and batch order seeded by ``seed``; returns where
    each is."""
    from toolkit.data import ImageSpec, load_dataset
    from toolkit.tf import import_keras, save_model

    keras = import_keras()
    zoo = []
    for name in names:
        t0 = time.perf_counter()
        tree = trees["binary" if name == "binary_sigmoid" else "gray40" if name == "gray40" else "rgb32"]
        spec = ImageSpec((48, 48), "stretch") if name in INPUT_48 else ImageSpec()
        ds = load_dataset(tree, cache_dir, spec)
        shape, n = ds.x_train.shape[1:], ds.num_classes
        keras.utils.set_random_seed(seed)
        if name == "keras3_cnn" or zoo_modern.MODERN.get(name) == 3:
            import keras as keras3

            keras3.utils.set_random_seed(seed)
            model = _keras3_cnn(shape, n) if name == "keras3_cnn" else getattr(zoo_modern, name)(keras3, shape, n)
            model.compile(optimizer=keras3.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                          metrics=["accuracy"])
            model.fit(ds.x_train, ds.y_train, epochs=epochs, batch_size=32, verbose=0)
            acc = float(np.mean(model.predict(ds.x_test, verbose=0).argmax(1) == ds.y_test))
            path = out / f"{name}.keras"
            model.save(path)
            zoo.append(ZooModel(name, str(path), tree, acc))
            log(f"zoo: {name:<15} test accuracy {acc:.3f} ({time.perf_counter() - t0:.0f}s) -> {path}")
            continue
        factory = {"logits_cnn": logits_cnn, "mobile_block": mobile_block, "inception": inception,
                   "binary_sigmoid": binary_sigmoid, "gray40": seed_like, "outlier_range": seed_like,
                   "mixed_float16": mixed_float16, "group_norm": group_norm, "custom_layer": custom_layer,
                   "regnet": regnet, "grouped_conv": grouped_conv}.get(name) or getattr(zoo_modern, name, None)
        if name == "inception":
            factory = lambda *a: inception(*a, width=inception_width)  # noqa: E731
        model = factory(keras, shape, n) if factory else \
            {"preprocessing": preprocessing, "as_saved": as_saved}[name](keras, shape, n, ds.x_train)
        if name == "logits_cnn":
            loss, y = keras.losses.SparseCategoricalCrossentropy(from_logits=True), ds.y_train
        elif name == "binary_sigmoid":
            loss, y = "binary_crossentropy", ds.y_train.astype("float32")
        elif name in ("gray40", "mobile_block"):  # one-hot labels
            loss, y = "categorical_crossentropy", keras.utils.to_categorical(ds.y_train, n)
        else:  # integer labels
            loss, y = "sparse_categorical_crossentropy", ds.y_train
        model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=loss)
        model.fit(ds.x_train, y, epochs=epochs, batch_size=32, verbose=0)
        if name == "outlier_range":
            add_outlier_unit(model)
        if name in ("mixed_float16", "as_saved"):  # the same network under the policy, trained weights copied in
            trained = model
            model = mixed_float16(keras, shape, n, policy="mixed_float16") if name == "mixed_float16" else \
                as_saved(keras, shape, n, ds.x_train, policy="mixed_float16")
            model.set_weights(trained.get_weights())
            for layer in model.layers:  # an adapted Normalization computes from its weights once finalised
                if type(layer).__name__ == "Normalization":
                    layer.finalize_state()
        out_ = model.predict(ds.x_test, verbose=0)
        pred = (out_[:, 0] > 0.5).astype(int) if name == "binary_sigmoid" else out_.argmax(1)
        acc = float(np.mean(pred == ds.y_test))
        if name == "inception":
            path = out / f"{name}.h5"
            model.save(path, save_format="h5")
        elif name == "binary_sigmoid":
            path = out / f"{name}_savedmodel"
            model.save(path, save_format="tf")
        else:
            path = out / f"{name}.keras"
            save_model(model, str(path))
        zoo.append(ZooModel(name, str(path), tree, acc, tuple(EXPORT_ARGS.get(name, ()))))
        log(f"zoo: {name:<15} test accuracy {acc:.3f} ({time.perf_counter() - t0:.0f}s) -> {path}")
    return zoo


# -- running the exporter on it ----------------------------------------------------------------


def export_one(m: ZooModel, out: Path, cache_dir: str, extra: list[str]) -> tuple[subprocess.CompletedProcess, dict]:
    """``python -m export`` on one zoo model; returns the process and its report (or {})."""
    proc = subprocess.run([sys.executable, "-m", "export", m.path, "--data", m.data, "--out", str(out),
                           "--cache-dir", cache_dir, *m.export_args, *extra], capture_output=True, text=True, cwd=ROOT,
                          timeout=3600)
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    out.mkdir(parents=True, exist_ok=True)
    (out / "export.log").write_text(proc.stdout + proc.stderr)  # the search's steps, with --keep
    return proc, report


def report_line(name: str, rc: int, report: dict) -> dict:
    by = {v["name"]: v for v in report.get("variants", [])}

    def acc(v):
        r = by.get(v)
        return f"{r['accuracy'] * 100:.2f}" if r and r["status"] == "ok" else (r["status"] if r else "-")

    return {
        "model": name, "exit": rc, "output": report.get("output_kind", "-"),
        "float %": f"{report['float_accuracy'] * 100:.2f}" if report else "-",
        "int8 %": acc("int8"), "int8_selective %": acc("int8_selective"), "qat_int8 %": acc("qat_int8"),
        "built": len(report.get("built", [])), "skipped": ", ".join(report.get("skipped", {})) or "-",
        "failed": ", ".join(f for f in report.get("failed", []) if by.get(f, {}).get("status") == "failed") or "-",
        "over gate": ", ".join(f for f in report.get("failed", []) if by.get(f, {}).get("status") == "ok") or "-",
        "qat scheme": (by.get("qat_int8", {}).get("qat") or {}).get("scheme", "-"),
        "qat coverage": "{quantized_layers}/{weighted_layers}".format(**by["qat_int8"]["qat"])
        if (by.get("qat_int8") or {}).get("qat") else "-",
        "rewrites": "; ".join(r.split(" (checked")[0] for r in report.get("model_info", {}).get("rewrites", [])) or "-",
        "float layers (selective)": ", ".join(by.get("int8_selective", {}).get("float_layers", [])) or "-",
        "onnx_int8 %": acc("onnx_int8"), "onnx_int8 route": by.get("onnx_int8", {}).get("route") or "-",
        "int8 / float32 p50": p50_ratio(by, "int8"),
        "int8_selective / float32 p50": p50_ratio(by, "int8_selective"),
        "float op types (speed)": ", ".join(by.get("int8_selective", {}).get("float_op_types") or []) or "-",
        "fastest within gate": report.get("fastest_within_gate") or "-",
        "int8 in TFLite Micro": micro_cell(by.get("int8", {}).get("micro")),
        "speed notes": "; ".join(v["speed_note"]["text"].replace("`", "") for v in report.get("variants", [])
                                 if v.get("speed_note")) or "-",
        "why skipped or failed": "; ".join(f"{v['name']}: {v['reason']}" for v in report.get("variants", [])
                                           if v["status"] != "ok" and v["name"] != "int8_selective") or "-",
    }


def p50_ratio(by: dict, name: str) -> str:
    """A variant's batch-1 median latency over float32's, as the report measured them."""
    ok = by.get(name, {}).get("status") == "ok" and by.get("float32", {}).get("status") == "ok"
    return f"{by[name]['latency_ms_p50'] / by['float32']['latency_ms_p50']:.2f}x" if ok else "-"


def micro_cell(m) -> str:
    """The int8 file in TensorFlow Lite for Microcontrollers (export.tflite.micro): its arena and agreement, or why not."""
    if not m:
        return "-"
    if not m.get("runs"):
        return f"no: {m.get('reason')}"
    return f"arena {m['arena_bytes'] / 1024:,.1f} KB" + (
        f", agrees with LiteRT on {m['agreement_with_litert']:.1%} of {m['samples']}" if "samples" in m else "")


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="CIFAR-10 source (e.g. ../shared/data/cifar10/cifar10-jpeg.tar.gz)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--n-train", type=int, default=5000, help="training images of the subset")
    p.add_argument("--n-test", type=int, default=2000, help="test images of the subset")
    p.add_argument("--epochs", type=int, default=4, help="training epochs of each zoo model")
    p.add_argument("--models", default=",".join(ZOO))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="writes NAME.{json,md} here")
    p.add_argument("--name", default="export_zoo", help="the results' file name (a run of some models: another name)")
    p.add_argument("--export-args", default="--qat-epochs 1 --latency-runs 50",
                   help="extra arguments for every python -m export")
    p.add_argument("--keep", default=None, help="a folder where the models, data and exports (report, log) stay "
                   "(default: a temporary folder, deleted)")
    args = p.parse_args(argv)
    from toolkit.tf import set_tf_env

    set_tf_env()
    if args.keep:
        Path(args.keep).mkdir(parents=True, exist_ok=True)
    with (contextlib.nullcontext(args.keep) if args.keep else tempfile.TemporaryDirectory()) as tmp:
        tmp = Path(tmp)
        cache = args.cache_dir or str(tmp / "cache")
        trees = make_datasets(args.data, cache, tmp / "data", args.n_train, args.n_test)
        zoo = build_zoo(tmp, trees, cache, args.epochs, names=args.models.split(","))
        rows = []
        for m in zoo:
            proc, report = export_one(m, tmp / f"export-{m.name}", cache, args.export_args.split())
            rows.append(report_line(m.name, proc.returncode, report))
            print(f"export: {m.name}: exit {proc.returncode}", flush=True)
            if not report:
                print(proc.stderr[-2000:], file=sys.stderr)
    table = markdown(rows)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from toolkit.files import git_revision, machine

    meta = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "git_revision": git_revision(),
            "command": f"python benchmarks/export_zoo.py {' '.join(argv if argv is not None else sys.argv[1:])}"}
    (out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "args": vars(args), "rows": rows}, indent=2))
    (out / f"{args.name}.md").write_text(f"`{meta['command']}` ({meta['date']}, git {meta['git_revision']}, "
                                       f"{meta['machine']})\n\n" + table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
