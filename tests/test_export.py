"""Edge export: every variant converts and runs in its device runtime, the drift gate holds on a real
model, fails when it should, other architectures export, and bad input exits 2 leaving nothing behind."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, export_in_process, make_arrays, require_shared_cifar, write_image_tree
from export.variants import ALL_VARIANTS
from export.runtime import open_model

REPORT_KEYS = {"name", "format", "path", "size_bytes", "accuracy", "drop_pp", "agreement", "latency_ms_p50",
               "latency_ms_p90", "passed"}


def run_cli(module: str, args: list[str], timeout: int = 1200) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def test_default_variants_within_one_point_and_small(full_export):
    out, proc = full_export
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is True and report["max_drop_pp"] == 1.0
    assert 0.55 < report["float_accuracy"] < 1.0
    assert report["output_kind"] == "probabilities" and report["model_info"]["keras"] == 2
    assert [v["name"] for v in report["variants"]] == list(ALL_VARIANTS)
    # int8 is within budget, so there is nothing for int8_selective to rescue: skipped, with the reason.
    by = {v["name"]: v for v in report["variants"]}
    assert by["int8_selective"]["status"] == "skipped" and "within --max-drop" in by["int8_selective"]["reason"]
    assert report["skipped"] == {"int8_selective": by["int8_selective"]["reason"]}
    assert not (out / "int8_selective.tflite").exists()
    built = [v for v in report["variants"] if v["status"] == "ok"]
    assert [v["name"] for v in built] == [v for v in ALL_VARIANTS if v != "int8_selective"]
    for v in built:
        assert REPORT_KEYS <= set(v), v["name"]
        assert v["drop_pp"] <= 1.0, (v["name"], v["drop_pp"])
        if v["name"] != "qat_int8":  # QAT retrains the weights; the others only re-encode them
            assert v["agreement"] > 0.95, (v["name"], v["agreement"])
        assert v["drop_pp"] == pytest.approx((report["float_accuracy"] - v["accuracy"]) * 100)
        assert Path(v["path"]).parent == out and Path(v["path"]).stat().st_size == v["size_bytes"]
        assert 0 < v["latency_ms_p50"] <= v["latency_ms_p90"]
    for name in ("int8", "qat_int8"):
        assert by[name]["size_bytes"] <= 0.30 * by["float32"]["size_bytes"], name
    assert by["qat_int8"]["qat"]["scheme"] == "default"
    # --qat-images 5000: QAT fine-tuned on a seeded 5,000 of the training images, not all 45,000
    assert re.search(r"quantisation-aware fine-tuning \(\d+ epochs on 5,000 images", proc.stdout), proc.stdout[-3000:]
    assert by["qat_int8"]["qat"]["quantized_layers"] == by["qat_int8"]["qat"]["weighted_layers"] == 4
    assert by["onnx_int8"]["route"] in ("ort_static", "from_tflite")
    assert set(by["onnx_int8"]["candidates"]) == {"ort_static", "from_tflite"}
    # The table a person reads, the plot, the labels, and one sidecar per model file.
    md = (out / "report.md").read_text()
    assert "PASSED" in md and all(f"| {n}" in md for n in ("float32", "int8", "qat_int8", "onnx_int8"))
    assert "| int8_selective | tflite | skipped:" in md
    assert (out / "accuracy_vs_size.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "labels.txt").read_text().split()[0] == "airplane"
    for v in built:
        side = json.loads((out / f"{Path(v['path']).name}.json").read_text())
        assert {"input", "output"} <= set(side)
        assert side["output_kind"] == "probabilities" and side["apply_softmax"] is False
    assert not list(out.parent.glob(".export-*")), "staging folder removed"
    assert "Traceback" not in proc.stderr and "cuInit" not in proc.stdout + proc.stderr
    # Where the time went: each stage's seconds, in order, adding up to the whole; the variants' stage holds each
    # variant's own build time (and the worker process's start); the log says the same.
    stages = report["stage_seconds"]
    assert list(stages) == ["model", "data", "float predictions", "test images", "variants", "TFLite Micro", "checks",
                            "report"], stages
    assert sum(stages.values()) == pytest.approx(report["wall_time_s"], abs=0.5)
    assert stages["variants"] >= sum(v["build_s"] for v in built)
    line = next(line for line in proc.stdout.splitlines() if line.startswith("  time: "))
    assert f"variants {stages['variants']:.1f} s (float32 {by['float32']['build_s']:.1f}," in line, line


@pytest.fixture(scope="module")
def float_reference(regression_run, cache_dir):
    """500 real CIFAR-10 test images and the float Keras model's top-1 class for each."""
    from toolkit.data import load_dataset
    from toolkit.tf import import_keras

    ds = load_dataset(str(require_shared_cifar()), cache_dir)
    x = ds.x_test[np.random.default_rng(0).permutation(len(ds.x_test))[:500]]
    model = import_keras().models.load_model(str(regression_run / "model.keras"))
    return x, model.predict(x, verbose=0).argmax(1)


@pytest.mark.parametrize("name,in_dtype,out_dtype", [
    ("float32", "float32", "float32"), ("dynamic", "float32", "float32"), ("float16", "float32", "float32"),
    ("int8", "uint8", "uint8"), ("qat_int8", "uint8", "uint8"),
])
def test_tflite_variants_load_in_litert_with_expected_io(full_export, float_reference, name, in_dtype, out_dtype):
    out, _ = full_export
    m = open_model(str(out / f"{name}.tflite"))
    assert m.input.dtype == in_dtype and m.output.dtype == out_dtype
    assert m.input.shape[1:] == [32, 32, 3] and m.output.shape[-1] == 10
    if in_dtype == "uint8":
        # Raw camera bytes go in as they are: the model scales pixels itself.
        assert m.input.scale == pytest.approx(1.0) and m.input.zero_point == 0
        side = json.loads((out / f"{name}.tflite.json").read_text())
        assert side["input"]["scale"] == m.input.scale and side["output"]["zero_point"] == m.output.zero_point
    # Real test images, not zeros: the variant must classify them as the float model does (a wrong input
    # quantisation or output dequantisation would still give rows that sum to 1 on all-zero images).
    x, float_top1 = float_reference
    probs = m.predict(x)
    assert probs.shape == (len(x), 10) and np.allclose(probs.sum(1), 1.0, atol=0.05)
    agree = float(np.mean(probs.argmax(1) == float_top1))
    assert agree >= (0.85 if name == "qat_int8" else 0.95), (name, agree)


def test_onnx_variants_check_and_run(full_export, float_reference):
    import onnx

    out, _ = full_export
    x, float_top1 = float_reference
    for name in ("onnx_float32", "onnx_int8"):
        onnx.checker.check_model(onnx.load(out / f"{name}.onnx"), full_check=True)
        m = open_model(str(out / f"{name}.onnx"))
        assert m.input.shape[1:] == [32, 32, 3]
        probs = m.predict(x)
        assert probs.shape == (len(x), 10)
        agree = float(np.mean(probs.argmax(1) == float_top1))
        assert agree >= (0.99 if name == "onnx_float32" else 0.95), (name, agree)
    graph = onnx.load(out / "onnx_int8.onnx").graph
    ops = [n.op_type for n in graph.node]
    # A QDQ graph quantises activations and dequantises them again; int8 weights are initializers.
    assert ops.count("QuantizeLinear") >= 1 and ops.count("DequantizeLinear") >= 2, sorted(set(ops))
    assert any(t.data_type == onnx.TensorProto.INT8 for t in graph.initializer), "int8 weights"


def test_broken_calibration_fails_the_gate(regression_run, tmp_path, cache_dir):
    """Calibration images scaled to 0-1 (a classic preprocessing mix-up) ruin int8; the command exits 1."""
    ds_arrays = make_arrays(n_train=200, n_test=20)
    rng = np.random.default_rng(0)
    from toolkit.data import load_dataset

    real = load_dataset(str(require_shared_cifar()), cache_dir)
    idx = rng.permutation(len(real.x_train))[:200]
    wrong = (real.x_train[idx].astype(np.float32) / 255).round().astype(np.uint8)  # 0/1 "pixels"
    tree = write_image_tree(tmp_path / "cal", (wrong, real.y_train[idx], ds_arrays[2], ds_arrays[3]))
    out = tmp_path / "out"
    proc = export_in_process("export.tflite", [str(regression_run / "model.keras"), "--data", str(require_shared_cifar()),
                                     "--calibration-data", str(tree), "--variants", "int8", "--out", str(out),
                                     "--cache-dir", cache_dir, "--calibration-size", "200"])
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "FAIL int8:" in proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["passed"] is False and report["failed"] == ["int8"]
    assert report["variants"][0]["drop_pp"] > 1.0


def fit_and_save(model, tiny_tree_tgz, cache_dir, path):
    """``model`` trained 3 epochs on the tiny learnable tree (Adam 1e-2) and saved at ``path``, as a user would."""
    from toolkit.data import load_dataset
    from toolkit.tf import import_keras, save_model

    keras = import_keras()
    ds = load_dataset(str(tiny_tree_tgz), cache_dir)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    model.fit(ds.x_train, ds.y_train, epochs=3, batch_size=32, verbose=0)
    save_model(model, str(path))
    return path


def test_a_variant_that_cannot_convert_fails_alone(tmp_path, tiny_tree_tgz, cache_dir):
    """Bicubic upsampling has no TFLite kernel: every TFLite variant fails with the converter's reason in
    one line, the ONNX variants are still built, measured and written with the report, and the exit
    status is 1 with one FAIL line per missing variant, no traceback."""
    from toolkit.tf import import_keras

    keras = import_keras()
    L = keras.layers
    keras.utils.set_random_seed(0)
    m = keras.Sequential([L.InputLayer(input_shape=(32, 32, 3)), L.Rescaling(1 / 255), L.AveragePooling2D(4),
                          L.UpSampling2D(interpolation="bicubic"), L.Conv2D(8, 3, activation="relu"),
                          L.GlobalAveragePooling2D(), L.Dense(10, activation="softmax")])
    path = fit_and_save(m, tiny_tree_tgz, cache_dir, tmp_path / "bicubic.keras")
    out = tmp_path / "out"
    proc = export_in_process("export", [str(path), "--data", str(tiny_tree_tgz), "--out", str(out), "--cache-dir",
                                        cache_dir, "--qat-epochs", "1", "--latency-runs", "5", "--calibration-size",
                                        "50", "--max-drop", "100"])
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    report = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in report["variants"]}
    tflite = [v for v in ALL_VARIANTS if rows[v]["format"] == "tflite"]
    for v in tflite:
        assert rows[v]["status"] == "failed", rows[v]
        assert "ResizeBicubic" in rows[v]["reason"] and "\n" not in rows[v]["reason"], rows[v]["reason"]
        assert f"FAIL {v}: " in proc.stderr
        assert not (out / f"{v}.tflite").exists()
    assert rows["onnx_float32"]["status"] == "ok" and (out / "onnx_float32.onnx").exists()
    assert rows["onnx_int8"]["status"] == "ok" and rows["onnx_int8"]["route"] == "ort_static"
    assert "ResizeBicubic" in rows["onnx_int8"]["candidates"]["from_tflite"]["error"]
    assert set(report["failed"]) == set(tflite)
    assert "**FAILED**" in (out / "report.md").read_text()
    assert (out / "export-worker.log").exists()  # the converters' own words, for whoever debugs it
    err = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(err) == len(tflite), err


def test_qat_keeps_a_layer_tfmot_has_no_rule_for_in_float(tmp_path, tiny_tree_tgz, cache_dir):
    """A layer tfmot's 8-bit registry has no rule for (LayerNormalization: tfmot raises "not supported" when
    it is annotated, every time) no longer costs the default scheme: it is fine-tuned in float with its
    output quantised, named in the report with why, and every convolution and dense layer is quantised."""
    from toolkit.tf import import_keras

    keras = import_keras()
    L = keras.layers
    keras.utils.set_random_seed(0)
    inp = keras.Input((32, 32, 3))
    x = L.Conv2D(8, 3, activation="relu")(L.Rescaling(1 / 255)(inp))
    x = L.GlobalAveragePooling2D()(L.LayerNormalization()(L.Conv2D(16, 3, strides=2, activation="relu")(x)))
    m = keras.Model(inp, L.Dense(10, activation="softmax")(x))
    path = fit_and_save(m, tiny_tree_tgz, cache_dir, tmp_path / "layernorm.keras")
    out = tmp_path / "out"
    proc = export_in_process("export.tflite", [str(path), "--data", str(tiny_tree_tgz), "--out", str(out),
                                               "--cache-dir", cache_dir, "--variants", "qat_int8", "--latency-runs", "5",
                                               "--max-drop", "100"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    q = report["variants"][0]["qat"]
    assert q["scheme"] == "default" and q["schemes_failed"] == [], q
    assert q["float_layers"] == {"layer_normalization": "tfmot's 8-bit registry has no rule for LayerNormalization; "
                                                        "fine-tuned in float, output quantised"}, q
    assert q["quantized_layers"] == 3 and q["weighted_layers"] == 3, q  # two convolutions and the dense layer
    assert "weights of 3 of 3 layers with kernels (convolution, Dense, attention) quantised" in \
        (out / "report.md").read_text()


# -- bad input: exit 2, one line, nothing written -------------------------------------------------


def _bad_model_case(tmp_path, case, regression_model):
    if case == "missing model":
        return ["export", str(tmp_path / "nope.keras")], "model file does not exist"
    if case == "corrupt model":
        p = tmp_path / "corrupt.keras"
        p.write_bytes(b"PK\x03\x04 definitely not a model")
        return ["export", str(p)], "not a loadable Keras model"
    if case == "input shape mismatch":
        from toolkit.tf import import_keras, save_model

        keras = import_keras()
        m = keras.Sequential([keras.layers.InputLayer(input_shape=(28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(10, activation="softmax")])
        p = tmp_path / "mnist.keras"
        save_model(m, str(p))
        return ["export", str(p)], "model input shape (28, 28, 1) does not fit"
    if case == "NaN weights":
        from toolkit.models import make_model
        from toolkit.tf import save_model

        m = make_model("seed_cnn")
        w = m.get_layer("conv2").get_weights()
        w[0][0, 0, 0, 0] = np.nan
        m.get_layer("conv2").set_weights(w)
        p = tmp_path / "nan.keras"
        save_model(m, str(p))
        return ["export", str(p)], "layer conv2 has NaN weights"
    if case == "two inputs":
        from toolkit.tf import import_keras, save_model

        keras = import_keras()
        a, b = keras.Input((32, 32, 3)), keras.Input((4,))
        x = keras.layers.Concatenate()([keras.layers.GlobalAveragePooling2D()(a), b])
        p = tmp_path / "two.keras"
        save_model(keras.Model([a, b], keras.layers.Dense(10, activation="softmax")(x)), str(p))
        return ["export", str(p)], "model has 2 input(s) and 1 output(s); export supports classifiers with one"
    if case == "wrong class count":
        from toolkit.models import make_model
        from toolkit.tf import save_model

        p = tmp_path / "five.keras"
        save_model(make_model("seed_cnn", num_classes=5), str(p))
        return ["export", str(p)], "model has 5 outputs but data"
    if case == "unknown variant":
        return ["export", str(regression_model), "--variants", "int8,int4"], "unknown variant(s) int4"
    if case == "variant of the other format":
        return ["export.tflite", str(regression_model), "--variants", "onnx_int8"], "not produced by this command"
    if case == "qat on no images":
        return ["export", str(regression_model), "--qat-images", "0"], "qat_images: must be >= 1, got 0"
    if case == "bad data source":
        return ["export", str(regression_model), "--data", str(tmp_path / "missing.tar.gz")], "no such file"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing model", "corrupt model", "input shape mismatch", "NaN weights",
                                  "two inputs", "wrong class count", "unknown variant",
                                  "variant of the other format", "qat on no images", "bad data source"])
def test_bad_input_exits_2_and_leaves_nothing(tmp_path, case, tiny_tree_tgz, cache_dir):
    # A small stand-in model file for the cases that need a valid one (the fast path: no training).
    from toolkit.models import make_model
    from toolkit.tf import save_model

    model_path = tmp_path / "good.keras"
    save_model(make_model("seed_cnn"), str(model_path))
    (module, *args), expected = _bad_model_case(tmp_path, case, model_path)
    out = tmp_path / "out"
    data = [] if "--data" in args else ["--data", str(tiny_tree_tgz)]
    proc = export_in_process(module, [*args, *data, "--out", str(out), "--cache-dir", cache_dir])
    status, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    assert status == 2, stdout[-2000:] + stderr[-2000:]
    err = [l for l in stderr.splitlines() if l.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], stderr[-2000:]
    assert "Traceback" not in stderr
    assert not out.exists()
    assert not list(tmp_path.glob(".export-*"))


def test_bad_input_through_the_real_command(tmp_path, tiny_tree_tgz, cache_dir):
    """The same refusal from a real ``python -m export`` process (the other cases call its main in-process)."""
    proc = run_cli("export", [str(tmp_path / "nope.keras"), "--data", str(tiny_tree_tgz), "--out", str(tmp_path / "out"),
                              "--cache-dir", cache_dir], timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [l for l in proc.stderr.splitlines() if l.strip()] == [
        f"error: {tmp_path / 'nope.keras'}: model file does not exist"]


@pytest.mark.parametrize("module", ["export", "export.tflite", "export.onnx"])
def test_help(module):
    proc = export_in_process(module, ["--help"])
    assert proc.returncode == 0 and "--max-drop" in proc.stdout and "--variants" in proc.stdout
    assert f"python -m {module}" in proc.stdout


def test_bfloat16_rounding_is_not_mistaken_for_another_model():
    """A model trained under mixed_bfloat16 (--compute-dtype auto on CPUs with native bfloat16): its softmax rows
    sum to 1 only within bfloat16's rounding, and its float32 rebuild differs by more than float16's tolerance.
    Both once made the default run's model unexportable (read as logits, then refused as 'does not compute what
    the saved one does'); the full export of such a model is test_default_variants_within_one_point_and_small's."""
    from export.model.predictions import detect_output_kind
    from export.model.rewrite import outputs_close
    from toolkit.tf import import_tf

    tf = import_tf()
    logits = np.random.default_rng(0).normal(0, 4, (256, 10)).astype(np.float32)
    exact = tf.nn.softmax(logits).numpy()
    rounded = tf.cast(tf.nn.softmax(tf.cast(logits, tf.bfloat16)), tf.float32).numpy()
    assert np.abs(rounded.sum(-1) - 1).max() > 1e-3  # what float32's check would call logits
    assert detect_output_kind(rounded, "bfloat16") == "probabilities" == detect_output_kind(exact)
    close, measured = outputs_close(rounded, exact, "bfloat16")
    assert close, measured
    assert detect_output_kind(logits, "bfloat16") == "logits"
    assert not outputs_close(rounded, np.roll(exact, 1, axis=-1), "bfloat16")[0], "a different model still fails"


def test_bfloat16_rounding_through_a_deep_network_is_not_mistaken_for_another_model():
    """Seven layers computed in bfloat16 against float32, on 1,000 inputs: the largest output difference is
    0.042, on the input nearest a decision (CI's machine measured 0.044 on a real 6-epoch model, which the first
    tolerance of 0.04 refused), while the mean stays about 0.001. Passes; a rewrite that changes one class's
    weights by a fifth, or drops the last bias, does not. The bfloat16 model is emulated (float32 arithmetic, every
    tensor rounded to bfloat16, as a CPU with bfloat16 units accumulates): the same figures on any CPU, where the
    CPU's own bfloat16 matmul differs between machines (0.042 here, 0.047 on another)."""
    from export.model.rewrite import outputs_close
    from toolkit.tf import import_tf

    tf = import_tf()
    rng = np.random.default_rng(3)
    x = rng.normal(0, 1, (1000, 256)).astype(np.float32)
    kernels = [rng.normal(0, np.sqrt(2 / 256), (256, 256)).astype(np.float32) for _ in range(6)]
    head, bias = rng.normal(0, 0.4, (256, 10)).astype(np.float32), rng.normal(0, 1, 10).astype(np.float32)

    def run(dtype, head, bias):
        r = (lambda v: tf.cast(tf.cast(v, tf.bfloat16), tf.float32)) if dtype == tf.bfloat16 else tf.identity
        h = r(x)
        for k in kernels:
            h = r(tf.nn.relu(tf.matmul(h, r(k))))
        return r(tf.nn.softmax(r(r(tf.matmul(h, r(head))) + r(bias)))).numpy()

    saved = run(tf.bfloat16, head, bias)
    close, measured = outputs_close(saved, run(tf.float32, head, bias), "bfloat16")
    assert close, measured
    assert float(np.abs(saved - run(tf.float32, head, bias)).max()) > 0.04, "the case the first tolerance refused"
    scaled = head.copy()
    scaled[:, 0] *= 1.2
    for other in (run(tf.float32, scaled, bias), run(tf.float32, head, np.zeros_like(bias))):
        close, measured = outputs_close(saved, other, "bfloat16")
        assert not close, measured


def test_a_keras3_mixed_precision_model_converts_as_float32(tmp_path, tiny_tree_tgz, cache_dir):
    """Keras 3 under mixed_float16 (trained as float32 here, the weights copied in: float16 is slow on a CPU):
    its SavedModel would carry float16 ops the TFLite converter refuses ('tf.Mul' ... neither a custom op nor a
    flex op); the export rebuilds it as float32, checks it against the saved model, and converts that."""
    import keras as keras3

    from toolkit.data import load_dataset

    ds = load_dataset(str(tiny_tree_tgz), cache_dir)

    def build(policy):
        keras3.mixed_precision.set_global_policy(policy)
        try:
            L = keras3.layers
            return keras3.Sequential([keras3.Input((32, 32, 3)), L.Rescaling(1 / 255), L.Conv2D(8, 3, activation="relu"),
                                      L.GlobalAveragePooling2D(), L.Dense(10), L.Activation("softmax", dtype="float32")])
        finally:
            keras3.mixed_precision.set_global_policy("float32")

    keras3.utils.set_random_seed(0)
    trained = build("float32")
    trained.compile(optimizer=keras3.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    trained.fit(ds.x_train, ds.y_train, epochs=3, batch_size=32, verbose=0)
    model = build("mixed_float16")
    model.set_weights(trained.get_weights())
    path = tmp_path / "mixed.keras"
    model.save(path)
    out = tmp_path / "out"
    proc = export_in_process("export", [str(path), "--data", str(tiny_tree_tgz), "--out", str(out), "--cache-dir",
                                        cache_dir, "--variants", "float32,int8,onnx_float32", "--latency-runs", "5"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["model_info"]["keras"] == 3 and report["float_accuracy"] > 0.5
    assert report["model_info"]["rewrites"][0].startswith("built under the mixed_float16 policy: rebuilt as float32")
    rows = {r["name"]: r for r in report["variants"]}
    assert all(r["status"] == "ok" and r["drop_pp"] <= 1.0 for r in rows.values()), rows


def test_gelu_models_convert_to_onnx(tmp_path, tiny_tree_tgz, cache_dir):
    """Exact GELU (ConvNeXt, transformer blocks): TensorFlow computes it with erfc, which tf2onnx writes as an
    Erfc node that no ONNX opset has; the export writes it as 1 - Erf. Both ONNX variants pass onnx.checker, run
    in ONNX Runtime, and stay within a point of the float model."""
    from toolkit.tf import import_keras

    keras = import_keras()
    L = keras.layers
    keras.utils.set_random_seed(0)
    inp = keras.Input((32, 32, 3))
    x = L.Conv2D(16, 3, strides=2, activation="gelu")(L.Rescaling(1 / 255)(inp))
    x = L.Dense(32, activation="gelu")(L.GlobalAveragePooling2D()(x))
    m = keras.Model(inp, L.Dense(10, activation="softmax")(x))
    path = fit_and_save(m, tiny_tree_tgz, cache_dir, tmp_path / "gelu.keras")
    out = tmp_path / "out"
    proc = export_in_process("export.onnx", [str(path), "--data", str(tiny_tree_tgz), "--out", str(out),
                                             "--cache-dir", cache_dir, "--latency-runs", "5"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import onnx

    ops = {n.op_type for n in onnx.load(str(out / "onnx_float32.onnx")).graph.node}
    assert "Erf" in ops and "Erfc" not in ops, ops
    report = json.loads((out / "report.json").read_text())
    assert report["float_accuracy"] > 0.5
    assert all(r["status"] == "ok" and r["drop_pp"] <= 1.0 for r in report["variants"]), report["variants"]


def top_or_bottom_brighter(n: int, seed: int):
    """32x32 images whose top or bottom half is brighter (class 1: the top), each half one grey level plus noise."""
    rng = np.random.default_rng(seed)
    top, bottom = rng.integers(20, 235, n), rng.integers(20, 235, n)
    x = np.empty((n, 32, 32, 3), np.int64)
    x[:, :16], x[:, 16:] = top[:, None, None, None], bottom[:, None, None, None]
    return np.clip(x + rng.integers(-10, 10, x.shape), 0, 255).astype(np.uint8), (top > bottom).astype(np.int64)


@pytest.mark.parametrize("hard_swish", [False, True], ids=["integer", "hard_swish"])
def test_int8_selective_takes_16_bit_activations_when_no_int8_file_will_do(hard_swish, tmp_path, cache_dir):
    """Every activation after the first convolution carries an offset of 200 on top of the signal (a difference of
    grey levels, under one unit): int8's 256 steps over [0, 200] leave the signal less than a step, and the offset
    runs through four op types (convolution, depthwise, pooling, dense), so no tensor or op type kept in float brings
    int8 back. int8 fails the gate; int8_selective searches, finds no int8 file closer to the float model than
    int8, and ships TFLite's 16x8 mode (16-bit activations: 0.006 a step), within the gate, integer throughout.
    Its twin has a hard-swish on the offset (x itself there), an op 16x8 has no kernel for: the hard-swish is kept in
    float and the rest is 16x8, rather than no file (issue 34: keras3_modern on an Intel CPU ended with none)."""
    from toolkit.tf import import_keras, save_model

    keras = import_keras()
    L = keras.layers
    inp = keras.Input((32, 32, 3))
    h = L.AveragePooling2D(16)(L.Rescaling(1 / 255)(inp))  # (2, 2, 3): the top row of cells and the bottom
    h = L.DepthwiseConv2D(1, name="carry")(L.Conv2D(2, (2, 1), name="offset")(h))
    if hard_swish:  # tf_keras.applications.mobilenet_v3's: x * relu6(x + 3) / 6, which the converter fuses
        h = L.Multiply()([h, L.ReLU(6.0)(h + 3.0) * (1.0 / 6.0)])
    h = L.AveragePooling2D((1, 2))(h)
    model = keras.Model(inp, L.Dense(2, activation="softmax", name="decide")(L.Flatten()(h)))
    k = np.zeros((2, 1, 3, 2), np.float32)
    k[0, 0, :, 1] = k[1, 0, :, 0] = 1 / 3
    k[1, 0, :, 1] = k[0, 0, :, 0] = -1 / 3
    model.get_layer("offset").set_weights([k, np.full(2, 200.0, np.float32)])
    model.get_layer("carry").set_weights([np.ones((1, 1, 2, 1), np.float32), np.zeros(2, np.float32)])
    model.get_layer("decide").set_weights([np.array([[5, -5], [-5, 5]], np.float32), np.zeros(2, np.float32)])
    path = tmp_path / "offset.keras"
    save_model(model, str(path))
    data = write_image_tree(tmp_path / "data", (*top_or_bottom_brighter(400, 0), *top_or_bottom_brighter(200, 1)),
                            class_names=["bottom", "top"])
    out = tmp_path / "out"
    proc = export_in_process("export", [str(path), "--data", str(data), "--out", str(out), "--cache-dir", cache_dir,
                                        "--variants", "float32,int8,int8_selective", "--selective-steps", "1",
                                        "--latency-runs", "5", "--calibration-size", "100", "--micro-samples", "20"])
    report = json.loads((out / "report.json").read_text())
    rows = {r["name"]: r for r in report["variants"]}
    assert report["float_accuracy"] > 0.95, report["float_accuracy"]
    assert rows["int8"]["drop_pp"] > 10 and report["failed"] == ["int8"] and proc.returncode == 1, proc.stderr
    assert "agreement with the float model" in proc.stdout and "(under " in proc.stdout, "int8's agreement to beat"
    assert "trying 16-bit activations (16x8)" in proc.stdout
    sel = rows["int8_selective"]
    assert sel["status"] == "ok" and sel["activations"] == "int16" and sel["drop_pp"] <= 1.0, sel
    assert sel["agreement"] >= 0.98 and sel["float_tensors"] == [], sel
    from export.ops import tflite_ops

    ops = tflite_ops(out / "int8_selective.tflite")
    assert set(ops["ops"]) - {"QUANTIZE", "DEQUANTIZE"}, ops
    if hard_swish:  # that op alone in float, said so; the rest 16-bit
        assert "do not convert" in proc.stdout and "not yet supported for op: 'HARD_SWISH'" in proc.stdout
        assert sel["float_op_types"] == ["HARD_SWISH"] == sorted(ops["float_ops"]), (sel, ops)
        assert "int8_selective: 16-bit activations (16x8; HARD_SWISH in float)" in proc.stdout
        return
    assert not ops["float_ops"], ops  # integer inside
    assert "16-bit activations and int8 weights" in (out / "report.md").read_text()
    # TFLite Micro's int16 kernels run it, and compute what LiteRT's do
    assert sel["micro"]["runs"] and sel["micro"]["samples"] == 20, sel["micro"]
    assert sel["micro"]["agreement_with_litert"] >= 0.9, sel["micro"]
